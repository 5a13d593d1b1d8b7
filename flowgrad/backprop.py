"""How gradients flow: a VJP sweep that mirrors the forward Euler step, one step's graph at a time.

With λ_N = ∂L/∂x_N, going backwards over segments [s, s + n) of time length H_s:

    y_s = x_s + u_s
    λ_s = λ_{s+n} + H_s · (∂v/∂y)(y_s, t_s)ᵀ λ_{s+n}     (one VJP through the velocity)
    ∂L/∂u_k = λ_s  for every k in [s, s + n)

With every segment of length one (``segments=None``) this is exact backprop through the unrolled
Euler loop. Only the graph of the current VJP is alive, so memory does not grow with N beyond the
stored states.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .grid import DEFAULT_EPS
from .segments import Segmentation, start_mask
from .trajectory import Trajectory, integrate, resolve_grid
from .velocity import Velocity

__all__ = ["ControlGradients", "control_gradients", "loss_and_adjoint", "backward_sweep", "LossFn",
           "Segments"]

LossFn = Callable[[Tensor], Tensor]
"""``loss_fn(x1) -> (B,)`` per-image losses of the final state (data space)."""

Segments = Segmentation | Sequence[Segmentation] | None
"""None (exact), one segmentation shared by the batch, or one per image."""


@dataclass(frozen=True)
class ControlGradients:
    """Result of :func:`control_gradients`; unpacks as ``losses, gradients``.

    Attributes:
        losses: (B,) per-image loss of the final state.
        gradients: (N, B, C, H, W) ∂L_b/∂u_k.
        trajectory: the forward trajectory the gradients were computed on.
        n_vjps: number of velocity VJP calls made by the backward sweep.
    """

    losses: Tensor
    gradients: Tensor
    trajectory: Trajectory
    n_vjps: int

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.losses, self.gradients))


def loss_and_adjoint(loss_fn: LossFn, x1: Tensor) -> tuple[Tensor, Tensor]:
    """Per-image losses (B,) and λ_N = ∂(Σ_b L_b)/∂x_N (B, C, H, W).

    Images are independent, so row b of λ_N is ∂L_b/∂x_N[b].
    """
    x = x1.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = loss_fn(x)
        if not isinstance(losses, Tensor) or tuple(losses.shape) != (x.shape[0],):
            got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(f"loss_fn(x1) must return per-image losses of shape ({x.shape[0]},), got {got}")
        if not losses.requires_grad:
            raise ValueError("loss_fn(x1) does not depend on x1 differentiably (no gradient would flow)")
        (lam,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), lam


def jt_product(velocity: Velocity, y: Tensor, t: Tensor, lam: Tensor) -> Tensor:
    """(∂v/∂y)ᵀ λ at ``y`` by autograd through one velocity call; zeros when v does not depend on y."""
    leaf = y.detach().requires_grad_(True)
    with torch.enable_grad():
        v = velocity(leaf, t)
        if not v.requires_grad:  # v does not depend on x: the Jacobian is zero
            return torch.zeros_like(lam)
        (jt_lam,) = torch.autograd.grad(v, leaf, grad_outputs=lam, allow_unused=True)
    return torch.zeros_like(lam) if jt_lam is None else jt_lam


def _vjp(velocity: Velocity, y: Tensor, t: Tensor, lam: Tensor, length: Tensor | float) -> Tensor:
    """λ + length · (∂v/∂y)ᵀ λ at y: the adjoint of one Euler step of the given time length.

    A velocity with its own ``vjp(y, t, lam)`` method (e.g. :class:`~flowgrad.cuda_graphs.GraphedVelocity`)
    computes the product itself.
    """
    own = getattr(velocity, "vjp", None)
    return lam + length * (own(y, t, lam) if callable(own) else jt_product(velocity, y, t, lam))


def _as_per_image(segments: Segments, n_steps: int, batch: int) -> Segmentation | list[Segmentation]:
    if segments is None:
        return Segmentation.uniform(n_steps)
    if isinstance(segments, Segmentation):
        shared = segments
    else:
        segs = list(segments)
        if len(segs) != batch or not all(isinstance(s, Segmentation) for s in segs):
            raise ValueError(f"segments must be None, a Segmentation or {batch} Segmentations (one per image)")
        if all(s == segs[0] for s in segs):
            shared = segs[0]
        else:
            for s in segs:
                if s.n_steps != n_steps:
                    raise ValueError(f"a segmentation covers {s.n_steps} steps but the grid has {n_steps}")
            return segs
    if shared.n_steps != n_steps:
        raise ValueError(f"segmentation covers {shared.n_steps} steps but the grid has {n_steps}")
    return shared


def backward_sweep(velocity: Velocity, traj: Trajectory, lam: Tensor,
                   segments: Segments = None, *, stop: int = 0) -> tuple[Tensor, int]:
    """Back-propagate λ_N through the trajectory to every control.

    Args:
        velocity: the same v(x, t) that produced ``traj``.
        traj: forward trajectory with all states kept.
        lam: (B, C, H, W) ∂L/∂x_N.
        segments: None (exact), a shared :class:`Segmentation`, or one per image.
        stop: only the gradients of steps ``>= stop`` are wanted (e.g. a time window's first step):
            the sweep ends with the segment that contains step ``stop``, and the rows below it are
            zero. The wanted rows equal those of a full sweep.

    Returns:
        gradients (N, B, C, H, W) and the number of VJP calls.
    """
    grid, n, b = traj.grid, traj.n_steps, lam.shape[0]
    if traj.states.shape[0] != n + 1:
        raise ValueError("backward_sweep needs a trajectory that kept all states")
    if isinstance(stop, bool) or not isinstance(stop, int) or not 0 <= stop <= n:
        raise ValueError(f"stop must be an int in [0, {n}], got {stop!r}")
    times = grid.time_tensor(lam.device, lam.dtype)
    grads = (torch.empty if stop == 0 else torch.zeros)((n, *lam.shape), dtype=lam.dtype, device=lam.device)
    plan = _as_per_image(segments, n, b)
    if isinstance(plan, Segmentation):
        calls = 0
        for s, length in zip(reversed(plan.starts), reversed(plan.lengths)):
            if s + length <= stop:
                break
            lam = _vjp(velocity, traj.step_input(s), times[s].expand(b), lam, grid.segment_length(s, length))
            grads[max(s, stop):s + length] = lam
            calls += 1
        return grads, calls
    # Per-image segmentations: at each step, one batched VJP over the images whose segment starts there.
    starts = start_mask(plan)
    lengths = torch.zeros((n, b), dtype=torch.long)
    for i, seg in enumerate(plan):
        lengths[list(seg.starts), i] = torch.tensor(seg.lengths)
    lam = lam.clone()
    n_calls = 0
    for k in reversed(range(n)):
        idx = [i for i in starts[k].nonzero().flatten().tolist() if k + int(lengths[k, i]) > stop]
        if not idx:
            continue
        span = torch.tensor([grid.segment_length(k, int(lengths[k, i])) for i in idx],
                            dtype=lam.dtype, device=lam.device).view(-1, *([1] * (lam.dim() - 1)))
        sel = torch.tensor(idx, device=lam.device)
        y = traj.step_input(k).index_select(0, sel)
        lam_sel = _vjp(velocity, y, times[k].expand(len(idx)), lam.index_select(0, sel), span)
        lam.index_copy_(0, sel, lam_sel)
        for j, i in enumerate(idx):
            grads[max(k, stop):k + int(lengths[k, i]), i] = lam_sel[j]
        n_calls += 1
    return grads, n_calls


def control_gradients(velocity: Velocity, z0: Tensor, controls: Tensor | None, loss_fn: LossFn,
                      n_steps: int, segments: Segments = None,
                      eps: float = DEFAULT_EPS) -> ControlGradients:
    """Per-image losses and gradients of the loss w.r.t. every control.

    Args:
        velocity: any callable v(x, t), x (B, C, H, W), t (B,) in [0, 1].
        z0: (B, C, H, W) latent at t = eps.
        controls: (N, B, C, H, W) controls u_k, or None for zeros.
        loss_fn: ``loss_fn(x1) -> (B,)`` per-image losses of the final state.
        n_steps: number of Euler steps N (or a :class:`~flowgrad.grid.TimeGrid`).
        segments: None for exact (uniform) backprop; a :class:`Segmentation` shared by the batch;
            or a sequence of B segmentations (one per image), e.g. from
            ``straightness_segments(traj, threshold, per_image=True)``.
        eps: start time of the uniform grid.

    Returns:
        :class:`ControlGradients` (unpacks as ``losses, gradients``); gradients (N, B, C, H, W).
    """
    grid = resolve_grid(n_steps, eps)
    if controls is None:
        controls = torch.zeros((grid.n_steps, *z0.shape), dtype=z0.dtype, device=z0.device)
    traj = integrate(velocity, z0, grid, controls)
    losses, lam = loss_and_adjoint(loss_fn, traj.final)
    grads, n_vjps = backward_sweep(velocity, traj, lam, segments)
    return ControlGradients(losses=losses, gradients=grads, trajectory=traj, n_vjps=n_vjps)
