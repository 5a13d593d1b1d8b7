"""Inversion: real images -> latents, by integrating the ODE backwards from t = 1 to t = eps."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from .grid import DEFAULT_EPS, TimeGrid
from .trajectory import check_latents, integrate, resolve_grid
from .velocity import Velocity, check_velocity

__all__ = ["invert", "reconstruction_error", "rmse", "InversionMethod"]

InversionMethod = Literal["euler", "heun", "fixed-point"]


def invert(velocity: Velocity, x1: Tensor, n_steps: int | TimeGrid = 100, *,
           method: InversionMethod = "euler", eps: float = DEFAULT_EPS,
           fixed_point_iterations: int = 4) -> Tensor:
    """Latents z0 whose forward Euler trajectory ends (approximately) at ``x1``.

    The steps of the forward grid are undone from the last to the first. Step k of the forward pass
    maps x_k to x_{k+1} = x_k + h_k v(x_k, t_k); the methods invert it as

    * ``"euler"``: x_k = x_{k+1} - h_k v(x_{k+1}, t_{k+1}) (explicit; error O(h) overall);
    * ``"heun"``: the Euler guess, then the trapezoid correction
      x_k = x_{k+1} - h_k/2 [v(x_{k+1}, t_{k+1}) + v(guess, t_k)] (2 evaluations per step);
    * ``"fixed-point"``: solves x_k + h_k v(x_k, t_k) = x_{k+1} by fixed-point iteration from the
      Euler guess, i.e. it inverts the discrete forward map itself (converges when h_k·Lip(v) < 1;
      ``1 + fixed_point_iterations`` evaluations per step).

    t_{k+1} is the next evaluation time (t_N = the grid's end time, 1.0).

    Args:
        velocity: v(x, t).
        x1: (B, C, H, W) data-space images at t = 1.
        n_steps: number of steps N (uniform paper grid) or an explicit grid.
        method: "euler", "heun" or "fixed-point".
        eps: start time of the uniform grid.
        fixed_point_iterations: corrector iterations of the fixed-point method.

    Returns:
        (B, C, H, W) latents at t = eps.
    """
    check_latents(x1, "x1")
    if method not in ("euler", "heun", "fixed-point"):
        raise ValueError(f"method must be 'euler', 'heun' or 'fixed-point', got {method!r}")
    grid = resolve_grid(n_steps, eps)
    b = x1.shape[0]
    times = [*grid.times, grid.end_time]
    x = x1.detach()
    with torch.no_grad():
        for k in reversed(range(grid.n_steps)):
            h = grid.steps[k]
            t_next = torch.full((b,), times[k + 1], dtype=x.dtype, device=x.device)
            t_here = torch.full((b,), times[k], dtype=x.dtype, device=x.device)
            v_next = check_velocity(velocity, x, t_next) if k == grid.n_steps - 1 else velocity(x, t_next)
            guess = x - h * v_next
            if method == "heun":
                guess = x - 0.5 * h * (v_next + velocity(guess, t_here))
            elif method == "fixed-point":
                for _ in range(fixed_point_iterations):
                    guess = x - h * velocity(guess, t_here)
            x = guess
    return x


def reconstruction_error(velocity: Velocity, x1: Tensor, z0: Tensor, n_steps: int | TimeGrid = 100, *,
                         eps: float = DEFAULT_EPS) -> tuple[Tensor, Tensor]:
    """Regenerate ``x1`` from ``z0`` and measure how far it lands.

    Returns:
        (reconstruction (B, C, H, W), per-image RMSE (B,) in data space).
    """
    check_latents(x1, "x1")
    recon = integrate(velocity, z0, resolve_grid(n_steps, eps), keep_states=False).final
    return recon, rmse(recon, x1)


def rmse(x: Tensor, target: Tensor) -> Tensor:
    """Per-image root-mean-square difference (B,) of two (B, C, H, W) batches."""
    return (x - target).flatten(1).square().mean(1).sqrt()
