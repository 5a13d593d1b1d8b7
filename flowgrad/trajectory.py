"""One step and the forward pass: controlled Euler trajectories.

Step k (k = 0 .. N-1), with control u_k added to the state *before* the step::

    y_k     = x_k + u_k
    x_{k+1} = y_k + dt_k * v(y_k, t_k)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import DEFAULT_EPS, TimeGrid
from .velocity import Velocity, check_velocity

__all__ = ["Trajectory", "trajectory", "integrate", "euler_step", "resolve_grid", "check_controls"]


@dataclass(frozen=True)
class Trajectory:
    """A controlled Euler trajectory.

    Attributes:
        grid: the time grid (N steps).
        states: (N+1, B, C, H, W) states x_0 .. x_N *before* each step's control (x_0 = z0).
        controls: (N, B, C, H, W) the controls u_k, or None for an uncontrolled trajectory.
        velocities: (N, B, C, H, W) v(y_k, t_k), or None when not kept.
        velocity_sq_norms: (N, B) ||v_k||^2 per image (always kept; float64).
        velocity_diff_sq_norms: (N-1, B) ||v_{k+1} - v_k||^2 per image (always kept; float64).
        last_velocity: (B, C, H, W) the last step's velocity v_{N-1} (set by :func:`integrate`), which a
            trajectory continuing this one needs for its first straightness statistic.
    """

    grid: TimeGrid
    states: Tensor
    controls: Tensor | None
    velocities: Tensor | None
    velocity_sq_norms: Tensor
    velocity_diff_sq_norms: Tensor
    last_velocity: Tensor | None = None

    @property
    def final(self) -> Tensor:
        """(B, C, H, W) the last state x_N."""
        return self.states[-1]

    @property
    def n_steps(self) -> int:
        return self.grid.n_steps

    def step_input(self, k: int) -> Tensor:
        """(B, C, H, W) y_k = x_k + u_k, the point where step k evaluates the velocity."""
        x = self.states[k]
        return x if self.controls is None else x + self.controls[k]


def euler_step(velocity: Velocity, y: Tensor, t: Tensor, dt: float) -> tuple[Tensor, Tensor]:
    """One Euler step from the controlled state ``y``; returns (x_next, v)."""
    v = velocity(y, t)
    return torch.add(y, v, alpha=dt), v


def resolve_grid(n_steps: int | TimeGrid, eps: float) -> TimeGrid:
    """Accept an int (uniform paper grid) or an explicit :class:`TimeGrid`."""
    return n_steps if isinstance(n_steps, TimeGrid) else TimeGrid.uniform(n_steps, eps)


def check_latents(z0: Tensor, name: str = "z0") -> None:
    if not isinstance(z0, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dim() != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(z0.shape)}")
    if not z0.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {z0.dtype}")


def check_controls(controls: Tensor | None, grid: TimeGrid, z0: Tensor) -> None:
    """Validate controls of shape (N, B, C, H, W) matching the grid and z0."""
    if controls is None:
        return
    expected = (grid.n_steps, *z0.shape)
    if not isinstance(controls, Tensor):
        raise TypeError(f"controls must be a torch.Tensor or None, got {type(controls).__name__}")
    if tuple(controls.shape) != expected:
        raise ValueError(f"controls must have shape (n_steps, B, C, H, W) = {expected}, "
                         f"got {tuple(controls.shape)}")
    if controls.dtype != z0.dtype or controls.device != z0.device:
        raise ValueError(f"controls must have z0's dtype and device ({z0.dtype}, {z0.device}), "
                         f"got {controls.dtype} on {controls.device}")


def _sq_norm(v: Tensor) -> Tensor:
    """(B,) squared L2 norm per image, accumulated in float64."""
    return torch.linalg.vector_norm(v.flatten(1), dim=1, dtype=torch.float64).square()


def _hold_mask(hold: Sequence[int] | Tensor, n: int, b: int) -> Tensor:
    """(N, B) bool CPU mask of the steps where each image's velocity is evaluated."""
    if isinstance(hold, Tensor):
        if tuple(hold.shape) != (n, b) or hold.dtype != torch.bool:
            raise ValueError(f"a hold mask must be a bool tensor of shape (n_steps, B) = ({n}, {b}), "
                             f"got {hold.dtype} {tuple(hold.shape)}")
        mask = hold.to("cpu", copy=True)  # callers keep their own mask
        if not mask[0].all():
            raise ValueError("hold must include step 0 for every image")
        return mask
    steps = sorted(set(int(k) for k in hold))
    if not steps or steps[0] != 0 or steps[-1] >= n or steps[0] < 0:
        raise ValueError(f"hold must include step 0 and lie in [0, {n}), got {steps}")
    mask = torch.zeros((n, b), dtype=torch.bool)
    mask[steps] = True
    return mask


def integrate(velocity: Velocity, z0: Tensor, grid: TimeGrid, controls: Tensor | None = None, *,
              keep_states: bool = True, keep_velocities: bool = False,
              hold: Sequence[int] | Tensor | None = None, prefix: Trajectory | None = None) -> Trajectory:
    """Integrate ``z0`` along ``grid`` with optional controls (no autograd graph is built).

    Args:
        velocity: v(x, t).
        z0: (B, C, H, W) the state at the start of the grid.
        grid: the Euler time grid.
        controls: (N, B, C, H, W) or None.
        keep_states: store all states (needed for backprop); otherwise only x_0 and x_N.
        keep_velocities: also store every velocity (N, B, C, H, W).
        hold: a coarsened forward: the velocity is evaluated only at these steps (0 must be one) and
            every other step reuses the last evaluated velocity; the controls still join every step.
            On a straight stretch this is the full trajectory up to the stretch's bending, at one
            network call per stretch. Either step indices shared by the batch, or an (N, B) bool mask
            (per image: at step k only the images with ``hold[k, b]`` are evaluated, as one smaller
            batch; row 0 must be all True). None: evaluate at every step.
        prefix: the uncontrolled trajectory of the grid's first K steps from the same ``z0`` (e.g.
            ``integrate(velocity, z0, grid.sub(0, K))``, all states kept). Its states and statistics are
            copied and integration resumes at step K, so the result is the one a full integration gives
            when ``controls[:K]`` are zero, which is required (a time window that starts later: the steps
            before it are the same in every pass and need computing once). With ``hold``, the held
            integration starts at step K with a fresh velocity for every image.

    Returns:
        The trajectory, always with per-image velocity norms for the straightness statistic (under
        ``hold`` they describe the held velocities: zero change inside a stretch).
    """
    check_latents(z0)
    check_controls(controls, grid, z0)
    n, b = grid.n_steps, z0.shape[0]
    start = 0 if prefix is None else _check_prefix(prefix, grid, z0, controls, keep_states)
    mask = None if hold is None else _hold_mask(hold, n, b)
    if mask is not None and start:
        mask[start] = True  # the first step after the prefix evaluates the velocity of every image
    rows = (None if mask is None else  # images evaluated at each step of a held forward, on the device
            [None if mask[k].all() else mask[k].nonzero().flatten().to(z0.device) for k in range(n)])
    times = grid.time_tensor(z0.device, z0.dtype)
    states = torch.empty((n + 1 if keep_states else 2, *z0.shape), dtype=z0.dtype, device=z0.device)
    velocities = (torch.empty((n, *z0.shape), dtype=z0.dtype, device=z0.device)
                  if keep_velocities else None)
    sq_norms = torch.empty((n, b), dtype=torch.float64, device=z0.device)
    diff_sq = torch.empty((max(n - 1, 0), b), dtype=torch.float64, device=z0.device)
    states[0] = z0
    x, v_prev = z0, None
    if prefix is not None:
        states[:start + 1] = prefix.states
        sq_norms[:start] = prefix.velocity_sq_norms
        diff_sq[:start - 1] = prefix.velocity_diff_sq_norms
        x, v_prev = prefix.final, prefix.last_velocity
        if velocities is not None:
            if prefix.velocities is None:
                raise ValueError("keep_velocities=True needs a prefix that kept its velocities")
            velocities[:start] = prefix.velocities
    v = v_prev
    with torch.no_grad():
        for k in range(start, n):
            y = x if controls is None else x + controls[k]
            t = times[k].expand(b)
            if k == 0:
                v = check_velocity(velocity, y, t)
            elif rows is None or rows[k] is None:
                v = velocity(y, t)
            elif rows[k].numel():  # only the images whose held velocity ends here
                v = v.index_copy(0, rows[k], velocity(y.index_select(0, rows[k]), t.index_select(0, rows[k])))
            x = torch.add(y, v, alpha=grid.steps[k])
            if keep_states:
                states[k + 1] = x
            if velocities is not None:
                velocities[k] = v
            sq_norms[k] = _sq_norm(v)
            if v_prev is not None:
                diff_sq[k - 1] = _sq_norm(v - v_prev)
            v_prev = v
        if not keep_states:
            states[1] = x
    return Trajectory(grid=grid, states=states, controls=controls, velocities=velocities,
                      velocity_sq_norms=sq_norms, velocity_diff_sq_norms=diff_sq, last_velocity=v)


def _check_prefix(prefix: Trajectory, grid: TimeGrid, z0: Tensor, controls: Tensor | None,
                  keep_states: bool) -> int:
    """Validate a prefix trajectory for :func:`integrate`; returns its number of steps K."""
    k = prefix.n_steps
    if prefix.last_velocity is None:
        raise ValueError("the prefix must come from integrate() (it needs its last velocity)")
    if not keep_states:
        raise ValueError("integrate(prefix=...) keeps all states; pass keep_states=True")
    if k >= grid.n_steps or prefix.grid.times != grid.times[:k] or prefix.grid.steps != grid.steps[:k]:
        raise ValueError(f"the prefix must cover the first K < {grid.n_steps} steps of the grid")
    if prefix.states.shape[0] != k + 1 or prefix.states.shape[1:] != z0.shape or prefix.controls is not None:
        raise ValueError("the prefix must be an uncontrolled trajectory of the same batch with all states kept")
    if not torch.equal(prefix.states[0], z0):
        raise ValueError("the prefix starts from another z0")
    if controls is not None and bool(controls[:k].any()):
        raise ValueError(f"controls of the first {k} steps must be zero when a prefix covers them")
    return k


def trajectory(velocity: Velocity, z0: Tensor, n_steps: int | TimeGrid, controls: Tensor | None = None,
               eps: float = DEFAULT_EPS, *, keep_velocities: bool = True) -> Trajectory:
    """Run the controlled Euler ODE from noise ``z0`` (t = eps) to data (t = 1).

    Args:
        velocity: any callable v(x, t) with x (B, C, H, W) and t (B,) in [0, 1].
        z0: (B, C, H, W) latent noise at t = eps.
        n_steps: number of Euler steps N (uniform paper grid), or an explicit :class:`TimeGrid`.
        controls: (N, B, C, H, W) additive controls u_k, or None.
        eps: start time of the uniform grid.
        keep_velocities: store every velocity (default True; the engine itself keeps only norms).

    Returns:
        :class:`Trajectory` with states x_0 .. x_N and the velocities.
    """
    return integrate(velocity, z0, resolve_grid(n_steps, eps), controls, keep_velocities=keep_velocities)
