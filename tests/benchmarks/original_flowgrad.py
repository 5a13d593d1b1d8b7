"""The timing baseline: a re-implementation of the ORIGINAL FlowGrad code's per-image loop.

Written from the description of gnobitab/FlowGrad ``utils/flowgrad_utils.py`` (``generate_traj``,
``flowgrad_optimization``, ``embed_to_latent``) to reproduce its *work*, host round trips included,
so that the benchmarks compare flowgrad's engine against what the paper's code did on the same net:

* batch 1, eager, float32 (whatever TF32 setting the process has);
* forward (``generate_traj``): the trajectory is a Python list; x_0 is copied to the CPU, later
  states stay on the device (as in the original); every step's velocity is cloned and copied to
  the CPU (``pred.detach().clone().cpu()``), which synchronizes the device once per step; the
  time tensor is rebuilt on every step (``ones(B) * i / N * (1 - eps) + eps``);
* straightness: computed on the host from the CPU velocity list, summed over the whole tensor,
  ``d_i = max(||v_{i-1} - v_i||^2, ||v_{i+1} - v_i||^2) / ||v_i||^2`` with the original's
  wrap-around at step 0 (``v_{-1}`` is Python's last list element) and ``d2 = 0`` at the last
  step, accumulated until the sum exceeds the threshold (the segment closes after that step);
* controls: a dict ``{step: (1, C, H, W) tensor}`` of 100 leaf tensors, plain SGD over them;
* loss: a scalar ``loss_fn(x_N)`` and its gradient; the original printed the state, the loss and
  λ as NumPy arrays each iteration, so their device-to-host copies are made here too (without the
  printing) and the best loss is tracked on the host, cloning all controls when it improves;
* backward: for each segment start j, from the last to the first, one
  ``torch.autograd.functional.vjp`` of the flattened map
  ``x -> (x + u_j + v(x + u_j, t_j) * length_j / N).view(-1)`` at the stored state x_j, and
  ``u_j.grad = λ``; afterwards every step k of a segment gets a clone of its start's gradient;
* the function returns the LAST controls, not the best ones (as the original did).

Differences from the original, all recorded here:

* The original built the backward pass's time on the CPU (``torch.ones((1,)) * j / N * (1 - eps) +
  eps``) and handed it to a model on the GPU, a known defect; here the same host tensor is built and
  then moved to the state's device, so the host work is kept but nothing crashes.
* ``velocity(x, t)`` takes flowgrad's t in [0, 1]; the original passed ``t * 999`` to the raw
  network. The Rectified Flow velocity wrapper multiplies by 999 itself, so the network sees the
  same input.
* The original's ``print`` calls are left out (their NumPy copies are kept).
* ``segments`` may override the straightness segmentation (the straightness is still computed, as
  the host work is part of the original's cost); the benchmarks use it for fixed segment counts.
* Inversion: the original solved the ODE backwards with SciPy RK45 (adaptive, tolerance 1e-5) on a
  float64 NumPy state, copying the state to the device and the velocity back for every evaluation.
  For timing against flowgrad's fixed-step inversion, :func:`original_inversion` keeps that host
  round trip but uses fixed-step Euler with the same step count and rule as
  ``flowgrad.invert(method="euler")``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "OriginalResult", "SegmentSet", "original_backprop", "original_generate_traj", "original_inversion",
    "original_optimization", "original_straightness", "segment_set_from_starts",
]

EPS = 1e-3
"""Start time of the original's grid (``t_i = i / N * (1 - eps) + eps``, step ``1 / N``)."""

SegmentSet = dict[str, Any]
"""The original's ``non_uniform_set``: ``{"indices": [start, ...], "length": {start: n_steps}}``."""

Controls = dict[int, Tensor]
"""The original's controls: step index -> (1, C, H, W) leaf tensor."""


class _Timer(Protocol):
    def phase(self, name: str) -> Any: ...


class _NoTimer:
    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        yield


@dataclass
class OriginalResult:
    """Outcome of :func:`original_optimization`.

    Attributes:
        controls: {step: (1, C, H, W)} the LAST controls (the original returned these).
        best_loss: lowest loss seen (tracked, as in the original, but not what is returned).
        losses: loss of each iteration's forward pass.
        segments: the segmentation used in each iteration.
        straightness_segments: the straightness segmentation of each iteration (equal to
            ``segments`` unless a fixed one was passed).
        gradients: {step: (1, C, H, W)} the gradients of the last iteration (after re-assignment).
        n_vjps: VJP calls per iteration.
    """

    controls: Controls
    best_loss: float
    losses: list[float] = field(default_factory=list)
    segments: list[SegmentSet] = field(default_factory=list)
    straightness_segments: list[SegmentSet] = field(default_factory=list)
    gradients: Controls = field(default_factory=dict)
    n_vjps: list[int] = field(default_factory=list)


def _time(i: int, n_steps: int, batch: int, device: torch.device) -> Tensor:
    """The original's per-step time, rebuilt each step: ``ones(B) * i / N * (1 - eps) + eps``."""
    return torch.ones(batch, device=device) * i / n_steps * (1.0 - EPS) + EPS


def segment_set_from_starts(starts: list[int], n_steps: int) -> SegmentSet:
    """A ``non_uniform_set`` from segment starts (0 included), e.g. ``Segmentation.evenly(...).starts``."""
    ends = list(starts[1:]) + [n_steps]
    return {"indices": list(starts), "length": {s: e - s for s, e in zip(starts, ends)}}


def original_straightness(pred_list: list[Tensor], threshold: float, wrap: bool = True) -> SegmentSet:
    """The original's segmentation from the CPU velocity list (wrap-around at step 0).

    Args:
        pred_list: N velocities (on the CPU), one per step.
        threshold: accumulated straightness that closes a segment.
        wrap: False: step 0 compares with step 1 only (flowgrad's one-sided rule) instead of also with the
            last step; an experiment's switch, not the original's behaviour.
    """
    n = len(pred_list)
    segments: SegmentSet = {"indices": [], "length": {}}
    acc_straightness, acc_length, cur_index = 0.0, 0, 0
    for i in range(n):
        norm = pred_list[i].pow(2).sum()
        d1 = (pred_list[i - 1] - pred_list[i]).pow(2).sum() / norm if wrap or i > 0 else 0.0  # i = 0 wraps
        d2 = (pred_list[i + 1] - pred_list[i]).pow(2).sum() / norm if i + 1 < n else 0.0
        acc_straightness += float(max(d1, d2))
        acc_length += 1
        if acc_straightness > threshold or i == n - 1:
            segments["length"][cur_index] = acc_length
            segments["indices"].append(cur_index)
            acc_straightness, acc_length, cur_index = 0.0, 0, i + 1
    return segments


@torch.no_grad()
def original_generate_traj(velocity: Callable[[Tensor, Tensor], Tensor], z0: Tensor, u: Controls | None = None,
                           n_steps: int = 100,
                           threshold: float | None = None,
                           wrap: bool = True) -> tuple[list[Tensor], SegmentSet | None]:
    """The original's controlled Euler trajectory.

    Args:
        velocity: v(x, t), t in [0, 1].
        z0: (1, C, H, W) latent.
        u: {step: control} or None.
        n_steps: N.
        threshold: straightness threshold, or None to skip the segmentation.
        wrap: see :func:`original_straightness`.

    Returns:
        (states x_0 .. x_N as a list, x_0 on the CPU and the rest on z0's device; the segment set or None).
    """
    traj = [z0.detach().clone().cpu()]
    z = z0.detach().clone()
    dt = 1.0 / n_steps
    pred_list = []
    for i in range(n_steps):
        if u is not None and i in u:
            z = z + u[i]
        t = _time(i, n_steps, z0.shape[0], z0.device)
        pred = velocity(z, t)
        z = z.detach().clone() + pred * dt
        traj.append(z.detach().clone())
        pred_list.append(pred.detach().clone().cpu())
    return traj, (None if threshold is None else original_straightness(pred_list, threshold, wrap))


def original_backprop(velocity: Callable[[Tensor, Tensor], Tensor], z_traj: list[Tensor], lam: Tensor,
                      u: Controls, segments: SegmentSet, n_steps: int) -> int:
    """The original's backward pass: one functional VJP per segment, then gradient re-assignment.

    Sets ``u[k].grad`` for every step k; returns the number of VJP calls.
    """
    device, shape = lam.device, lam.shape
    n_vjps = 0
    for j in range(n_steps - 1, -1, -1):
        if j not in segments["indices"]:
            continue
        inputs = z_traj[j].to(device).detach().clone().requires_grad_(True)
        # Original: a CPU time tensor handed to the GPU model (a defect); moved to the device here.
        t = (torch.ones((1,)) * j / n_steps * (1.0 - EPS) + EPS).to(device)
        length = segments["length"][j]

        def func(x: Tensor, j: int = j, t: Tensor = t, length: int = length) -> Tensor:
            y = x.contiguous().reshape(shape) + u[j].detach().clone()
            return (y + velocity(y, t.detach().clone()) * length / n_steps).view(-1)

        _, vjp = torch.autograd.functional.vjp(func, inputs.view(-1), v=lam.detach().clone().reshape(-1))
        lam = vjp.detach().clone().contiguous().reshape(shape)
        u[j].grad = lam.detach().clone()
        n_vjps += 1
        del inputs
    starts = segments["indices"]
    for m, start in enumerate(starts):
        end = starts[m + 1] if m + 1 < len(starts) else n_steps
        for k in range(start, end):
            if k in u:
                u[k].grad = u[start].grad.detach().clone()
    return n_vjps


def original_optimization(velocity: Callable[[Tensor, Tensor], Tensor], z0: Tensor,
                          loss_fn: Callable[[Tensor], Tensor], n_steps: int = 100, iterations: int = 10,
                          threshold: float = 5e-3, lr: float = 10.0, *, segments: SegmentSet | None = None,
                          timer: _Timer | None = None, wrap: bool = True) -> OriginalResult:
    """The original ``flowgrad_optimization`` for one image (controls at every step).

    Args:
        velocity: v(x, t), t in [0, 1].
        z0: (1, C, H, W) latent (the original ran one image at a time).
        loss_fn: ``loss_fn(x_N) -> scalar`` loss of the final state (data space).
        n_steps, iterations, threshold, lr: the original's N, number_of_iterations,
            straightness_threshold and SGD learning rate.
        segments: a fixed ``non_uniform_set`` to use instead of the straightness one (timing only).
        timer: optional object with ``phase(name)`` context managers; phases "forward" (trajectory
            and straightness), "loss" (loss, λ, host copies, best tracking), "backward" (VJPs and
            re-assignment), "step" (zero_grad and SGD).
        wrap: the straightness rule at step 0 (see :func:`original_straightness`; True = the original's).

    Returns:
        :class:`OriginalResult` holding the LAST controls.

    Raises:
        ValueError: if z0 is not a single image.
    """
    if z0.dim() != 4 or z0.shape[0] != 1:
        raise ValueError(f"z0 must be one image of shape (1, C, H, W) (the original's batch of one), "
                         f"got {tuple(z0.shape)}")
    timer = timer or _NoTimer()
    device = z0.device
    u: Controls = {}
    for ind in range(n_steps):
        u[ind] = torch.zeros_like(z0)
        u[ind].requires_grad = True
        u[ind].grad = torch.zeros_like(u[ind])
    optimizer = torch.optim.SGD([u[k] for k in range(n_steps)], lr=lr)
    best = 1e6
    result = OriginalResult(controls=u, best_loss=best)
    for _ in range(iterations):
        with timer.phase("step"):
            optimizer.zero_grad()
        with timer.phase("forward"):
            z_traj, found = original_generate_traj(velocity, z0, u=u, n_steps=n_steps, threshold=threshold,
                                                   wrap=wrap)
        plan = segments if segments is not None else found
        with timer.phase("loss"):
            inputs = z_traj[-1].to(device).detach().clone().requires_grad_(True)
            with torch.enable_grad():
                loss = loss_fn(inputs)
                lam = torch.autograd.grad(loss, inputs)[0].detach().clone()
            _ = inputs.view(-1).detach().cpu().numpy()      # the original printed these three
            loss_value = float(loss.detach().cpu().numpy())
            _ = lam.reshape(-1).detach().cpu().numpy()
            if loss.detach().cpu().numpy() < best:
                _ = {k: v.detach().clone() for k, v in u.items()}   # the original's opt_u (unused)
                best = loss_value
        with timer.phase("backward"):
            n_vjps = original_backprop(velocity, z_traj, lam, u, plan, n_steps)
        with timer.phase("step"):
            optimizer.step()
        result.losses.append(loss_value)
        result.segments.append(plan)
        result.straightness_segments.append(found)
        result.n_vjps.append(n_vjps)
    result.best_loss = best
    result.gradients = {k: v.grad for k, v in u.items()}
    result.controls = {k: v.detach().clone() for k, v in u.items()}
    return result


@torch.no_grad()
def original_inversion(velocity: Callable[[Tensor, Tensor], Tensor], x1: Tensor, n_steps: int = 100,
                       timer: _Timer | None = None) -> Tensor:
    """Image -> latent with the original's host round trip, as fixed-step Euler (see module docstring).

    The state lives on the host as float64 NumPy (as SciPy's was); each step copies it to the
    device in x1's dtype (float32 in the original), evaluates the velocity and copies it back:
    ``x_k = x_{k+1} - h v(x_{k+1}, t_{k+1})`` with ``t_N = 1``, like ``flowgrad.invert(method="euler")``.

    Args:
        velocity: v(x, t).
        x1: (1, C, H, W) data-space image.
        n_steps: number of Euler steps.
        timer: optional phase timer (phase "inversion").

    Returns:
        (1, C, H, W) latent on x1's device, in x1's dtype.
    """
    device, shape, dtype = x1.device, x1.shape, x1.dtype
    times = [k / n_steps * (1.0 - EPS) + EPS for k in range(n_steps)] + [1.0]
    h = 1.0 / n_steps
    with (timer or _NoTimer()).phase("inversion"):
        x = x1.detach().clone().cpu().numpy().reshape(-1).astype(np.float64)
        for k in reversed(range(n_steps)):
            xt = torch.from_numpy(x.reshape(shape)).to(device).type(dtype)
            vec_t = torch.ones(shape[0], device=device, dtype=dtype) * times[k + 1]
            drift = velocity(xt, vec_t).detach().cpu().numpy().reshape(-1)
            x = x - h * drift
        return torch.tensor(x).reshape(shape).to(device).type(dtype)
