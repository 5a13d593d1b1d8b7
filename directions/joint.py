"""Joint discovery: optimize one control shared by all images (``--aggregator joint``).

The other aggregators optimize every image on its own and then combine the per-image controls. The
joint method instead optimizes the direction itself: a single control sequence ``w`` (N, C, H, W) is
added to every image's trajectory, and each SGD step follows the gradient of the *mean* loss over
all discovery images::

    w <- w - lr * mean_i dL_i/du_i |_{u_i = w}

Every per-image gradient is computed exactly as in FlowGrad (same loss, segmentation and time
window), so the cost per iteration equals per-image FlowGrad on the same images. What differs is
what gets optimized: edits that help only one image cancel in the mean gradient, and the result is
the edit that works on average when applied unchanged, which is how a stored direction is used.
Strength 1.0 is the optimized control itself (the lowest mean loss seen).

Reliability figures: the split-half cosine is the cosine between the summed gradient steps of two
disjoint halves of the images along the shared optimization; the per-image cosine is the cosine
between each image's own descent direction (its negative gradient at the last evaluated control)
and the direction.

Out of memory: a batch that does not fit is halved, and its halves (and theirs, down to single images)
run in its place for the rest of the job; every image's loss and gradient are its own (seeded per
image), so the result is the whole batch's up to floating-point summation order and nothing is lost.

Resumable: the state after every iteration is checkpointed (a job continues from the last finished
iteration); under torchrun each rank takes the batches ``b % world == rank`` and gradients meet in an
all-reduce, so the result equals a one-process run up to floating-point summation order.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowgrad import integrate
from flowgrad.backprop import backward_sweep, loss_and_adjoint
from flowgrad.batching import OutOfMemory, in_halves, release_memory
from flowgrad.clip_guidance import ClipLoss, clip_score
from flowgrad.segments import straightness_segments

from . import distributed as dist
from .seeds import augment_seed

__all__ = ["JointResult", "optimize_joint"]

log = logging.getLogger(__name__)

BatchInputs = Callable[[Sequence[int]], tuple[Tensor, Tensor, list[str], Tensor]]
"""``inputs(indices) -> (z0, source images, source labels, reconstruction RMSE)``."""


@dataclass(frozen=True)
class JointResult:
    """Outcome of :func:`optimize_joint` (identical on every rank).

    Attributes:
        vector: (N, C, H, W) float32 optimized shared control (strength 1).
        records: per-image columns in image order (as the per-image discovery writes them).
        split_half_cosine: cosine of the two halves' summed gradient steps.
        info: mean loss per iteration, best iteration.
    """

    vector: np.ndarray
    records: dict[str, list]
    split_half_cosine: float
    info: dict


def _halves(n: int, seed: int) -> np.ndarray:
    """Half (0 or 1) of every image: a seeded random split into two disjoint halves."""
    perm = np.random.default_rng(seed).permutation(n)
    half = np.zeros(n, dtype=np.int64)
    half[perm[n // 2:]] = 1
    return half


def single_image_out_of_memory(device: torch.device) -> RuntimeError:
    """The error for a single image that does not fit (nothing left to halve); per-image discovery uses it too."""
    return RuntimeError(f"out of {device.type.upper()} memory with a single image; free memory, "
                        "use fewer --steps or --device cpu")


def _inputs_in_parts(inputs: BatchInputs, idx: list[int], velocity, device: torch.device):
    """``inputs(idx)``, made in halves (recursively) when the whole batch runs out of memory."""
    def halved(n: int, h: int) -> None:
        log.warning("images %d-%d: out of memory making %d inputs; making them in halves of %d and %d",
                    idx[0], idx[-1], n, h, n - h)

    def join(a, b):
        return torch.cat([a[0], b[0]]), torch.cat([a[1], b[1]]), list(a[2]) + list(b[2]), torch.cat([a[3], b[3]])

    return in_halves(inputs, idx, join, velocity=velocity, too_large=single_image_out_of_memory(device),
                     on_halve=halved)


def _batch_pass(cfg, velocity, clip, loss, w: Tensor, z0: Tensor, grid):
    """One batch at the shared control ``w``: per-image losses (B,), finite mask (B,), CLIP scores (B,) and
    control gradients (N, B, C, H, W), zero for images whose loss or gradient is not finite."""
    fg = cfg.flowgrad
    traj = integrate(velocity, z0, grid, w.unsqueeze(1).expand(grid.n_steps, *z0.shape))
    losses, lam = loss_and_adjoint(lambda x: loss(velocity.to_image(x)), traj.final)
    with torch.no_grad():
        clips = clip_score(clip, velocity.to_image(traj.final).clamp(0, 1), cfg.prompt)
    ok = torch.isfinite(losses) & torch.isfinite(lam).flatten(1).all(1)
    lam = torch.where(ok.view(-1, 1, 1, 1), lam, torch.zeros_like(lam))
    segments = None if fg.threshold is None else straightness_segments(traj, fg.threshold, per_image=True)
    grads, _ = backward_sweep(velocity, traj, lam, segments)
    ok &= torch.isfinite(grads).flatten(2).all(2).all(0)
    grads = torch.where(ok.view(1, -1, 1, 1, 1), grads, torch.zeros_like(grads))
    return losses.detach(), ok, clips, grads


def optimize_joint(cfg, velocity, clip, inputs: BatchInputs, ckpt, device: torch.device,
                   report: Callable[[int, int, int, float], None] | None = None) -> JointResult:
    """Run the joint optimization of ``cfg`` (a :class:`~directions.discover.DiscoveryConfig`).

    Args:
        cfg: the job's settings (``cfg.flowgrad`` gives steps, iterations, lr, threshold, window).
        velocity, clip: the frozen model and the guidance CLIP.
        inputs: makes the latents and source images of a batch's image indices.
        ckpt: the job's :class:`~directions.checkpoint.JobCheckpoint`; entry ``k`` holds the state
            after iteration ``k`` (only the latest is kept).
        device: where to compute.
        report: ``report(iteration, batches_done, n_batches_total, running_loss)`` after each batch.
    """
    fg = cfg.flowgrad  # SGD only: DiscoveryConfig refuses another optimizer for the joint method
    rank, world = dist.rank_and_world()
    n, iters = cfg.n_images, fg.iterations
    grid = fg.grid
    window = grid.window_mask(*fg.t_window).to(device).view(-1, 1, 1, 1)
    shape = (grid.n_steps, *velocity.sample_shape)
    mine = [b for b in range(cfg.n_batches) if b % world == rank]
    half_of = _halves(n, cfg.seed)
    negative = cfg.negative_prompt if (cfg.directional and cfg.negative_prompt) else None
    preserve = cfg.preserve if cfg.preserve_weight > 0 else ()

    w = np.zeros(shape, dtype=np.float32)
    best_w = w.copy()
    acc = np.zeros((2, *shape), dtype=np.float64)
    loss_hist = np.full((iters + 1, n), np.nan)
    clip_hist = np.full((iters + 1, n), np.nan)
    finite = np.ones(n, dtype=bool)
    best_loss, best_it, start = math.inf, 0, 0
    dots = np.zeros((n, 3))  # last pass: <-g_i, w>, <-g_i, best_w>, |g_i|
    done = ckpt.done_batches()
    if done:  # resume after the last finished iteration
        k = max(done)
        arrays, _ = ckpt.load_batch(k)
        w, best_w, acc = arrays["w"], arrays["best_w"], arrays["acc"]
        loss_hist, clip_hist, finite = arrays["loss_hist"], arrays["clip_hist"], arrays["finite"].astype(bool)
        best_loss, best_it = float(arrays["best"][0]), int(arrays["best"][1])
        dots = arrays["dots"]
        start = k + 1

    cache = {b: _inputs_in_parts(inputs, list(cfg.batch_indices(b)), velocity, device) for b in mine}

    def make_loss(source: Tensor) -> ClipLoss:
        return ClipLoss(clip, cfg.prompt, negative_prompt=negative, source=source, alpha=cfg.alpha,
                        replicas=cfg.replicas, preserve=preserve, preserve_weight=cfg.preserve_weight,
                        off_axis_weight=cfg.off_axis_weight, fixed_augmentations=cfg.fixed_augmentations)

    # Each batch runs as parts: (positions in the batch, their loss). One part (the whole batch) until it runs out
    # of memory; then halves, kept for the rest of the job. One loss per part (text embeddings once); its
    # augmentation draws are reseeded per (image, iteration).
    parts = {b: [(list(range(len(cache[b][2]))), make_loss(cache[b][1]))] for b in mine}

    def batch_pass(b: int, idx: list[int], it: int, wt: Tensor):
        """:func:`_batch_pass` over batch ``b``'s parts, joined in image order."""
        outs, k = [], 0
        while k < len(parts[b]):
            pos, loss = parts[b][k]
            # each image's own draws, restarted per iteration (fixed augmentations: iteration 0's draw in every
            # pass, also after a --resume)
            loss.reseed([augment_seed(cfg.seed, idx[p], 0 if cfg.fixed_augmentations else it) for p in pos])
            z0 = cache[b][0] if len(pos) == len(idx) else cache[b][0][pos]
            try:
                outs.append(_batch_pass(cfg, velocity, clip, loss, wt, z0, grid))
                k += 1
                continue
            except OutOfMemory:
                if len(pos) == 1:
                    raise single_image_out_of_memory(device) from None
            release_memory(velocity)
            h = len(pos) // 2
            log.warning("batch %d: out of memory with %d images; continuing in halves of %d and %d",
                        b, len(pos), h, len(pos) - h)
            source = cache[b][1]
            parts[b][k:k + 1] = [(pos[:h], make_loss(source[pos[:h]])), (pos[h:], make_loss(source[pos[h:]]))]
        if len(outs) == 1:
            return outs[0]
        return (torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs]), torch.cat([o[2] for o in outs]),
                torch.cat([o[3] for o in outs], dim=1))

    for it in range(start, iters + 1):
        last = it == iters  # the final evaluation: its gradients only give the per-image cosines
        wt = torch.from_numpy(w).to(device)
        g_sum = torch.zeros(shape, dtype=torch.float64, device=device)
        g_half = torch.zeros((2, *shape), dtype=torch.float64, device=device)
        losses_local, clips_local, finite_local, dots_local = {}, {}, {}, {}
        running = []
        for j, b in enumerate(mine):
            idx = list(cfg.batch_indices(b))
            losses, ok, clips, grads = batch_pass(b, idx, it, wt)
            grads = grads * window.unsqueeze(1)
            if last:
                flat = -grads.transpose(0, 1).flatten(1)
                refs = torch.stack([wt.flatten(), torch.from_numpy(best_w).to(device).flatten()], 1)
                dots_local[b] = torch.cat([flat @ refs, flat.norm(dim=1, keepdim=True)], 1).double().cpu().numpy()
            else:
                g_sum += grads.sum(1).double()
                hb = torch.as_tensor(half_of[idx], device=device)
                for h in (0, 1):
                    g_half[h] += grads[:, hb == h].sum(1).double()
            losses_local[b] = losses.double().cpu().numpy()
            clips_local[b] = clips.double().cpu().numpy()
            finite_local[b] = ok.cpu().numpy()
            running.extend(losses_local[b][finite_local[b]].tolist())
            if report is not None:
                report(it, j + 1, len(mine), float(np.mean(running)) if running else math.nan)
        for part in dist.all_gather((losses_local, clips_local, finite_local, dots_local)):
            for b in part[0]:
                sel = list(cfg.batch_indices(b))
                loss_hist[it, sel], clip_hist[it, sel] = part[0][b], part[1][b]
                finite[sel] &= part[2][b]
                if last:
                    dots[sel] = part[3][b]
        if not finite.any():
            raise ValueError("every image's loss or gradient stopped being finite; lower --lr")
        mean_loss = float(loss_hist[it, finite].mean())
        if mean_loss < best_loss:
            best_loss, best_it, best_w = mean_loss, it, w.copy()
        if not last:
            acc += dist.all_reduce_sum(g_half.cpu().numpy())
            w = (w - fg.lr * dist.all_reduce_sum(g_sum.cpu().numpy()) / finite.sum()).astype(np.float32)
        if rank == 0:
            ckpt.save_batch(it, {"w": w, "best_w": best_w, "acc": acc, "loss_hist": loss_hist,
                                 "clip_hist": clip_hist, "finite": finite, "dots": dots,
                                 "best": np.array([best_loss, best_it], dtype=np.float64)}, {})
            if it > 0:  # only the latest state is needed to resume (written first, so never none)
                ckpt.drop_batch(it - 1)
        dist.barrier()

    if best_it == 0:
        raise ValueError("the shared control never lowered the mean loss; raise --iterations or --lr")
    # The last pass evaluated w (the final update); its gradients give each image's descent direction.
    ref = w if best_it == iters else best_w
    col = 0 if best_it == iters else 1
    ref_norm = float(np.linalg.norm(ref))
    cosine = np.divide(dots[:, col], dots[:, 2] * ref_norm, out=np.zeros(n), where=dots[:, 2] > 0)
    half = float("nan")
    if n >= 4:
        a, b = acc[0].ravel(), acc[1].ravel()
        denom = np.linalg.norm(a) * np.linalg.norm(b)
        half = float(a @ b / denom) if denom > 0 else float("nan")
    labels = []
    for part in dist.all_gather({b: (cache[b][2], cache[b][3].tolist()) for b in mine}):
        for b, (lab, rm) in part.items():
            labels.append((b, lab, rm))
    labels.sort(key=lambda x: x[0])
    records = {
        "index": list(range(n)),
        "source": [s for _, lab, _ in labels for s in lab],
        "loss_before": loss_hist[0].tolist(),
        "loss_after": loss_hist[best_it].tolist(),
        "clip_before": clip_hist[0].tolist(),
        "clip_after": clip_hist[best_it].tolist(),
        "control_norm": [float(np.linalg.norm(best_w))] * n,
        "best_iteration": [best_it] * n,
        "reconstruction_rmse": [r for _, _, rm in labels for r in rm],
        "status": ["ok" if f else "skipped: non-finite loss or gradient" for f in finite],
        "cosine_to_direction": np.where(finite, cosine, np.nan).tolist(),
        "inlier": finite.tolist(),
    }
    info = {"mean_loss_per_iteration": np.nanmean(np.where(finite, loss_hist, np.nan), axis=1).tolist(),
            "best_iteration": best_it}
    return JointResult(vector=best_w.astype(np.float32), records=records, split_half_cosine=half, info=info)
