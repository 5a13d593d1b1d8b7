"""Where the steps fall: a validated, immutable Euler time grid."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["TimeGrid", "DEFAULT_EPS"]

DEFAULT_EPS = 1e-3
"""Start time of the ODE integration (t = 0 is pure noise; the paper starts at 1e-3)."""


@dataclass(frozen=True)
class TimeGrid:
    """Evaluation times and step sizes of an N-step Euler integration from noise (t≈0) to data (t=1).

    Step k evaluates the velocity at ``times[k]`` and advances the state by ``steps[k]``:
    ``x_{k+1} = y_k + steps[k] * v(y_k, times[k])`` with ``y_k = x_k + u_k``.

    Attributes:
        times: (N,) strictly increasing evaluation times in [0, 1].
        steps: (N,) positive step sizes.
    """

    times: tuple[float, ...]
    steps: tuple[float, ...]

    def __post_init__(self) -> None:
        times = tuple(float(t) for t in self.times)
        steps = tuple(float(h) for h in self.steps)
        object.__setattr__(self, "times", times)
        object.__setattr__(self, "steps", steps)
        if len(times) < 1:
            raise ValueError("TimeGrid needs at least one step (got an empty grid)")
        if len(steps) != len(times):
            raise ValueError(f"TimeGrid: got {len(times)} times but {len(steps)} steps; they must match")
        if not all(math.isfinite(t) and 0.0 <= t <= 1.0 for t in times):
            raise ValueError(f"TimeGrid times must lie in [0, 1], got {times[0]} .. {times[-1]}")
        if any(b <= a for a, b in zip(times, times[1:])):
            raise ValueError("TimeGrid times must be strictly increasing")
        if not all(math.isfinite(h) and h > 0.0 for h in steps):
            raise ValueError("TimeGrid steps must be finite and positive")

    @classmethod
    def uniform(cls, n_steps: int, eps: float = DEFAULT_EPS) -> TimeGrid:
        """The paper's grid: ``t_k = eps + k/N * (1 - eps)`` and ``dt = 1/N`` for every step.

        The step 1/N (rather than (1 - eps)/N) is what the FlowGrad and Rectified Flow samplers use;
        keeping it reproduces their trajectories exactly.
        """
        if not isinstance(n_steps, int) or isinstance(n_steps, bool) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
        if not (0.0 <= eps < 1.0):
            raise ValueError(f"eps must be in [0, 1), got {eps!r}")
        times = tuple(k / n_steps * (1.0 - eps) + eps for k in range(n_steps))
        return cls(times=times, steps=(1.0 / n_steps,) * n_steps)

    @property
    def n_steps(self) -> int:
        return len(self.times)

    @property
    def end_time(self) -> float:
        """Time of the final state x_N: ``times[-1] + steps[-1]``, capped at 1 (1.0 on the uniform grid)."""
        return min(1.0, self.times[-1] + self.steps[-1])

    def sub(self, start: int, stop: int | None = None) -> TimeGrid:
        """The grid of steps ``start .. stop-1`` (same times and step sizes); at least one step."""
        n = self.n_steps
        stop = n if stop is None else stop
        if not 0 <= start < stop <= n:
            raise ValueError(f"sub-grid steps must satisfy 0 <= start < stop <= {n}, got {start}, {stop}")
        return TimeGrid(times=self.times[start:stop], steps=self.steps[start:stop])

    def segment_length(self, start: int, length: int) -> float:
        """Total time advanced by steps ``start .. start+length-1``."""
        return math.fsum(self.steps[start:start + length])

    def window_mask(self, t_start: float = 0.0, t_end: float = 1.0) -> Tensor:
        """(N,) bool: steps whose evaluation time lies in ``[t_start, t_end]``."""
        if not (0.0 <= t_start <= t_end <= 1.0):
            raise ValueError(f"time window must satisfy 0 <= t_start <= t_end <= 1, got [{t_start}, {t_end}]")
        times = torch.tensor(self.times, dtype=torch.float64)
        return (times >= t_start) & (times <= t_end)

    def time_tensor(self, device: torch.device | str | None = None,
                    dtype: torch.dtype = torch.float32) -> Tensor:
        """(N,) evaluation times as a tensor on ``device``."""
        return torch.tensor(self.times, dtype=torch.float64).to(device=device, dtype=dtype)
