"""Applying stored directions: no optimization, just the direction added along the trajectory."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowgrad import TimeGrid, integrate
from flowgrad.batching import map_batches
from flowgrad.velocity import VelocityField

from .store import Direction

__all__ = ["resample_steps", "compose_controls", "apply_controls", "check_compatible", "EditSpec",
           "first_active_step", "uncontrolled_state", "APPLY_STEPS", "default_apply_steps"]

APPLY_STEPS = 100
"""Euler steps an edit is applied with unless told otherwise: the paper's N (and ``flowgrad edit``'s default).

Discovery may use fewer steps to save optimization work (the demo world's recipes: 20-30); applying costs no
optimization, and the samples of a few-step Euler integration are not the model's distribution (the demo flow's
quality gates are measured at 100 steps; its 20-step samples read older and blurrier, RESULTS.md §4.3 round 25).
A direction is resampled to the step count with :func:`resample_steps`."""


def default_apply_steps(directions: Sequence[Direction]) -> int:
    """Steps to apply ``directions`` with: :data:`APPLY_STEPS`, or the finest direction's own when it has more."""
    return max([APPLY_STEPS, *(int(d.n_steps) for d in directions)])


def resample_steps(vector: Tensor, n_steps: int) -> Tensor:
    """Resample per-step controls (N, ...) to M = ``n_steps`` steps, preserving integrated offsets.

    Step k of an N-step direction is taken to spread its offset u_k evenly over the fraction
    [k/N, (k+1)/N) of the trajectory. The cumulative offset U(s) (piecewise linear in s ∈ [0, 1]) is
    evaluated at s = j/M and differenced: u'_j = U((j+1)/M) - U(j/M). The total offset Σ u is kept
    exactly, as is the offset over any stretch that starts and ends on both grids; M = N is the
    identity.
    """
    n = vector.shape[0]
    if n_steps == n:
        return vector
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    flat = vector.reshape(n, -1).double()
    cum = torch.cat([torch.zeros_like(flat[:1]), flat.cumsum(0)])          # U at s = k/N, (N+1, D)
    s = torch.arange(n_steps + 1, dtype=torch.float64, device=vector.device) * (n / n_steps)
    lo = s.floor().long().clamp(max=n - 1)
    frac = (s - lo.double()).unsqueeze(1)
    at = cum[lo] + frac * (cum[lo + 1] - cum[lo])
    return (at[1:] - at[:-1]).to(vector.dtype).reshape(n_steps, *vector.shape[1:])


@dataclass(frozen=True)
class EditSpec:
    """One stored direction at a strength."""

    direction: Direction
    strength: float


def _orthonormal(vectors: Sequence[np.ndarray]) -> list[np.ndarray]:
    basis: list[np.ndarray] = []
    for v in vectors:
        w = v.astype(np.float64).ravel().copy()
        for b in basis:
            w -= (w @ b) * b
        norm = np.linalg.norm(w)
        if norm > 1e-12:
            basis.append(w / norm)
    return basis


def compose_controls(edits: Sequence[EditSpec], n_steps: int,
                     project_out: Sequence[Direction] = ()) -> Tensor:
    """(M, C, H, W) float32 control: Σ strength·vector, resampled to M steps, minus other directions.

    ``project_out`` directions (any number) are resampled too, orthonormalized, and the composed
    control's component along their span is removed, so the edit leaves those attributes alone
    to first order.
    """
    if not edits:
        raise ValueError("no direction to apply")
    shapes = {e.direction.vector.shape[1:] for e in edits} | {p.vector.shape[1:] for p in project_out}
    if len(shapes) != 1:
        raise ValueError(f"directions have different image shapes: {sorted(shapes)}")
    total = sum(e.strength * resample_steps(torch.from_numpy(e.direction.vector), n_steps).double()
                for e in edits)
    if project_out:
        flat = total.reshape(-1).numpy().copy()
        for b in _orthonormal([resample_steps(torch.from_numpy(p.vector), n_steps).numpy() for p in project_out]):
            flat -= (flat @ b) * b
        total = torch.from_numpy(flat).reshape(total.shape)
    return total.float()


def check_compatible(direction: Direction, velocity: VelocityField, *, force: bool = False) -> None:
    """Refuse a direction made for another model (fingerprint) or image shape; one-line ValueError."""
    shape = tuple(direction.image_shape)
    if shape != tuple(velocity.sample_shape):
        raise ValueError(f"direction {direction.name!r} is for images of shape {shape}, but model "
                         f"{velocity.name!r} makes {tuple(velocity.sample_shape)}")
    if direction.model_fingerprint and direction.model_fingerprint != velocity.fingerprint() and not force:
        raise ValueError(f"direction {direction.name!r} was made with another model (fingerprint "
                         f"{direction.model_fingerprint[:12]}…, this model {velocity.fingerprint()[:12]}…); "
                         "pass --force to apply it anyway")


def first_active_step(control: Tensor | None) -> int:
    """Index of the first step at which ``control`` (N, ...) is nonzero anywhere; 0 for None and N for all-zero.

    Before that step a controlled trajectory and the unedited one coincide, so edits of the same latents
    can branch there (a direction discovered in a time window [t_start, t_end] starts at t_start).
    """
    if control is None:
        return 0
    active = control.flatten(1).ne(0).any(dim=1).nonzero()
    return int(active[0]) if active.numel() else int(control.shape[0])


@torch.no_grad()
def uncontrolled_state(velocity, z0: Tensor, n_steps: int, step: int, eps: float = 1e-3) -> Tensor:
    """(B, C, H, W) the state x_step of the unedited trajectory from the latents ``z0`` (z0 for step 0)."""
    if step == 0:
        return z0
    grid = TimeGrid.uniform(n_steps, eps).sub(0, step)
    return map_batches(lambda z: integrate(velocity, z, grid, keep_states=False).final, z0, velocity=velocity)


@torch.no_grad()
def apply_controls(velocity, z0: Tensor, control: Tensor | None, n_steps: int,
                   eps: float = 1e-3, *, start_step: int = 0) -> Tensor:
    """Final states x_N (B, C, H, W) of trajectories with the same control for every image.

    ``z0`` is the state at step ``start_step`` of the N-step grid (by default the latents at t = eps),
    e.g. from :func:`uncontrolled_state` or an inversion down to that step; the control's rows before
    ``start_step`` must then be zero (see :func:`first_active_step`).
    """
    grid = TimeGrid.uniform(n_steps, eps)
    if start_step:
        if control is not None and first_active_step(control) < start_step:
            raise ValueError(f"the control is nonzero before step {start_step}, where these trajectories start")
        grid = grid.sub(start_step)
        control = None if control is None else control[start_step:]
    control = None if control is None else control.to(z0)

    def run(z: Tensor) -> Tensor:
        controls = None if control is None else control.unsqueeze(1).expand(grid.n_steps, *z.shape)
        return integrate(velocity, z, grid, controls, keep_states=False).final

    return map_batches(run, z0, velocity=velocity)
