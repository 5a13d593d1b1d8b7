"""Batch discovery of a global semantic direction.

Many images (fresh seeded samples of the model, or real images inverted to latents) are optimized
with FlowGrad against an attribute prompt, batch by batch; every finished batch is checkpointed so an
interrupted job resumes where it stopped. The per-image optimized controls are then aggregated into
one direction (see :mod:`directions.aggregate`) and written to the HDF5 store with full provenance.

Determinism: image i's latent comes from its own seed (independent of batching), and batch b's
augmentation draws come from a seed derived from (seed, b). Batches always hold the same images, so
a resumed job or a job spread over several processes computes the same controls as one
uninterrupted process.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

import flowgrad
from flowgrad import FlowGradConfig, InitialPass, TimeGrid, initial_pass, integrate, invert, optimize, rmse
from flowgrad.batching import in_halves
from flowgrad.clip_guidance import ClipLoss, clip_score
from flowgrad.velocity import strict_float32

from . import distributed as dist
from .aggregate import Method, aggregate, split_half_cosine
from .checkpoint import JobCheckpoint
from .joint import optimize_joint, single_image_out_of_memory
from .seeds import augment_seed, image_seed
from .store import Direction, DirectionStore, check_name

log = logging.getLogger(__name__)

__all__ = ["DiscoveryConfig", "BatchProgress", "augment_seed", "check_name_free", "discover", "image_files",
           "image_seed", "job_images", "probe_labels", "sample_latents", "partial_dir", "strict_float32"]


@dataclass(frozen=True)
class DiscoveryConfig:
    """Every setting of a discovery job (stored as the direction's ``settings``).

    Attributes:
        name: direction name in the store.
        prompt, negative_prompt: the attribute prompt and what to move away from ("" for none).
        model, clip: model specs (see :func:`flowgrad.models.load_model`).
        images: a folder of real images to invert, or None for fresh seeded samples.
        n_images, batch_size, seed: how many images, how many per optimization batch, base seed.
        flowgrad: the per-image FlowGrad optimization settings.
        alpha: weight of the CLIP term (1 - alpha weighs the L1 term to the unedited image).
        replicas: augmented copies per image in the CLIP loss.
        directional: use ``cos(prompt) - cos(negative)`` as the CLIP term when a negative is given.
        preserve: (prompt, negative_prompt) pairs of attributes the edit should leave alone; their CLIP
            scores are held near the unedited image's (see :class:`~flowgrad.clip_guidance.ClipLoss`).
        preserve_weight: weight of that term (0: off).
        off_axis_weight: weight of the guidance loss's off-axis term: what CLIP sees change besides the
            prompt's direction (0: off; see :class:`~flowgrad.clip_guidance.ClipLoss`).
        fixed_augmentations: draw each batch's CLIP augmentations once and reuse them in every pass, so
            the passes (and the "improved" decision) are compared on the same objective instead of on
            fresh random crops each time. Off by default: on the demo world it kept a few more images but
            made smaller edits with no better gain-versus-leakage trade (RESULTS.md 4.3, round 19).
        aggregator: how per-image controls become one direction, or "joint": optimize one control shared
            by all images instead (:mod:`directions.joint`).
        invert_method: inversion solver for real images.
        invert_to_window: invert real images from t = 1 only down to the time window's first step and
            optimize from there (the steps before the window carry no control; a shorter round trip than
            to t = eps and back). Not for the "probe" and "joint" aggregators, which need the latents at
            t = eps; False inverts all the way for every aggregator.
        images_digest: sha256 of the names and sizes of the ``n_images`` files a real-image job uses (filled
            in by :func:`discover`; a resume, or a batch, that finds the folder changed is refused).
        keep_offsets: also store the raw per-image controls.
        precision: how the caller runs the model ("float32" or "bf16-autocast"); recorded for provenance.
    """

    name: str
    prompt: str
    negative_prompt: str = ""
    model: str = "demo"
    clip: str = "demo"
    images: str | None = None
    n_images: int = 32
    batch_size: int = 16
    seed: int = 0
    flowgrad: FlowGradConfig = field(default_factory=lambda: FlowGradConfig(
        n_steps=20, iterations=6, lr=10.0, t_window=(0.3, 1.0)))  # chosen by tests/benchmarks/tune_directions.sh
    alpha: float = 0.7
    replicas: int = 4
    directional: bool = True
    preserve: tuple[tuple[str, str], ...] = ()
    preserve_weight: float = 0.0
    off_axis_weight: float = 0.0
    fixed_augmentations: bool = False
    aggregator: Method = "mean"
    invert_method: str = "euler"
    invert_to_window: bool = True
    images_digest: str = ""
    keep_offsets: bool = False
    precision: str = "float32"

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError("prompt must not be empty")
        check_name(self.name)  # checked here, not only when the finished direction is written
        if not self.flowgrad.t_window[0] < self.flowgrad.t_window[1]:
            raise ValueError(f"a direction's time window needs t_start < t_end, got {list(self.flowgrad.t_window)}")
        for key in ("n_images", "batch_size", "replicas"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        for key in ("preserve_weight", "off_axis_weight"):
            if not getattr(self, key) >= 0.0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        object.__setattr__(self, "preserve", tuple((str(p), str(n)) for p, n in self.preserve))
        if self.aggregator == "probe" and self.flowgrad.first_window_step > 0:
            raise ValueError(f"--aggregator probe puts its direction on the first step (t = eps), which the time "
                             f"window {list(self.flowgrad.t_window)} leaves out; use --t-window 0 1")
        if self.aggregator == "joint" and self.flowgrad.optimizer != "sgd":
            raise ValueError("--aggregator joint uses SGD on the shared control; drop --optimizer adam")
        if self.aggregator == "joint" and self.flowgrad.coarse_forward:
            raise ValueError("--aggregator joint runs its own full forward passes; drop --coarse-forward")
        if self.aggregator == "joint" and self.keep_offsets:
            raise ValueError("--keep-offsets stores per-image controls; --aggregator joint has none "
                             "(it optimizes one shared control)")

    def settings(self) -> dict:
        d = asdict(self)
        d["flowgrad"] = asdict(self.flowgrad)
        return d

    @property
    def start_step(self) -> int:
        """The step of the N-step grid real images are inverted to and optimized from (0: t = eps)."""
        if self.images is None or not self.invert_to_window or self.aggregator in ("probe", "joint"):
            return 0
        return self.flowgrad.first_window_step

    @property
    def n_batches(self) -> int:
        return math.ceil(self.n_images / self.batch_size)

    def batch_indices(self, b: int) -> range:
        return range(b * self.batch_size, min(self.n_images, (b + 1) * self.batch_size))


@dataclass(frozen=True)
class BatchProgress:
    """Reported to the progress callback after every FlowGrad iteration of every batch."""

    batch: int
    n_batches: int
    images_done: int
    n_images: int
    iteration: int
    iterations: int
    loss: float


def sample_latents(shape: tuple[int, ...], seed: int, indices: range) -> Tensor:
    """(len(indices), *shape) standard normal latents, one generator per image."""
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(seed, i)))
                        for i in indices])


def partial_dir(store_path: str | Path, name: str) -> Path:
    """Folder of the resumable job checkpoint next to the store."""
    p = Path(store_path)
    return p.with_name(f"{p.name}.partial-{name}")


def image_files(folder: str) -> list[Path]:
    """The image files (by suffix) of ``folder``, sorted: the images a discovery from real images uses."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"--images {folder!r} is not a folder")
    suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"}
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"no images (.png/.jpg/...) in {folder!r}")
    return files


def check_name_free(store_path: str | Path, name: str, names: Sequence[str] | None = None) -> None:
    """Refuse a job whose direction name the store already holds (``names``: the store's, when known)."""
    if names is None:
        store = DirectionStore(store_path)
        names = store.names() if store.exists() else []
    if name in names:
        raise ValueError(f"direction {name!r} already exists in {store_path}; pass --overwrite to replace it, "
                         "or --name NAME to store the new one beside it")


def job_images(cfg: DiscoveryConfig) -> tuple[list[Path], str]:
    """The files a real-image job uses (the first ``n_images`` of :func:`image_files`) and their digest.

    Raises:
        ValueError: too few images, or the folder no longer holds the files ``cfg.images_digest`` describes.
    """
    assert cfg.images is not None
    files = image_files(cfg.images)
    if cfg.n_images > len(files):
        raise ValueError(f"--n-images {cfg.n_images} but only {len(files)} images in {cfg.images!r}")
    files = files[:cfg.n_images]
    h = hashlib.sha256()
    for f in files:
        h.update(f"{f.name}\t{f.stat().st_size}\n".encode())
    digest = h.hexdigest()
    if cfg.images_digest and digest != cfg.images_digest:
        raise ValueError(f"the images in {cfg.images!r} changed during the job (files added, removed or "
                         "rewritten); restore them or start a new job")
    return files, digest


def _batch_inputs(cfg: DiscoveryConfig, velocity, idx: Sequence[int], device: torch.device,
                  load_image: Callable[[Path, int], Tensor] | None, *, keep_pass: bool = False
                  ) -> tuple[Tensor, Tensor, list[str], Tensor, InitialPass | None]:
    """Latents z0 (B, C, H, W) (real images: the states at ``cfg.start_step``), source images in [0, 1],
    source labels, reconstruction RMSE (B,), and with ``keep_pass`` the unedited trajectory that gave the
    sources (or the reconstructions), for ``optimize``."""
    step = cfg.start_step
    grid = TimeGrid.uniform(cfg.flowgrad.n_steps, cfg.flowgrad.eps).sub(step)

    def unedited(z0: Tensor) -> tuple[Tensor, InitialPass | None]:
        if keep_pass:
            start = initial_pass(velocity, z0, cfg.flowgrad, start_step=step)
            return start.final, start
        return integrate(velocity, z0, grid, keep_states=False).final, None

    if cfg.images is None:
        z0 = sample_latents(tuple(velocity.sample_shape), cfg.seed, idx).to(device)
        x1, start = unedited(z0)
        labels = [f"sample:seed={cfg.seed}:index={i}" for i in idx]
        return z0, velocity.to_image(x1).clamp(0, 1), labels, torch.full((len(idx),), math.nan), start
    if load_image is None:
        raise ValueError("discovering from real images needs an image loader")
    files, _ = job_images(cfg)
    images = torch.stack([load_image(files[i], velocity.sample_shape[-1]) for i in idx]).to(device)
    x1 = velocity.from_image(images)
    z0 = invert(velocity, x1, grid, method=cfg.invert_method)  # type: ignore[arg-type]
    recon, start = unedited(z0)
    return z0, images, [str(files[i]) for i in idx], rmse(recon, x1).cpu(), start


def _run_batch(cfg: DiscoveryConfig, velocity, clip, b: int, device: torch.device, load_image,
               report: Callable[[int, float], None]) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    """Optimize the images of batch ``b``. After an out-of-memory, its halves run now (recursively), so the
    batch is stored complete and nothing is lost."""
    def halved(n: int, h: int) -> None:
        log.warning("batch %d: out of memory with %d images; continuing in halves of %d and %d", b, n, h, n - h)

    def join(a, c):
        return ({k: np.concatenate([a[0][k], c[0][k]]) for k in a[0]},
                {k: list(a[1][k]) + list(c[1][k]) for k in a[1]})

    return in_halves(lambda idx: _optimize_images(cfg, velocity, clip, idx, device, load_image, report),
                     cfg.batch_indices(b), join, velocity=velocity, too_large=single_image_out_of_memory(device),
                     on_halve=halved)


def _optimize_images(cfg: DiscoveryConfig, velocity, clip, idx: list[int], device: torch.device,
                     load_image, report: Callable[[int, float], None]
                     ) -> tuple[dict[str, np.ndarray], dict[str, list]]:
    z0, source, labels, recon_rmse, start = _batch_inputs(cfg, velocity, idx, device, load_image, keep_pass=True)
    negative = cfg.negative_prompt if (cfg.directional and cfg.negative_prompt) else None
    # Each image draws its augmentations from its own seed: the same in any batch, or half of one after an
    # out-of-memory.
    preserve = cfg.preserve if cfg.preserve_weight > 0 else ()
    loss = ClipLoss(clip, cfg.prompt, negative_prompt=negative, source=source, alpha=cfg.alpha,
                    replicas=cfg.replicas, image_seeds=[augment_seed(cfg.seed, i) for i in idx],
                    preserve=preserve, preserve_weight=cfg.preserve_weight,
                    off_axis_weight=cfg.off_axis_weight, fixed_augmentations=cfg.fixed_augmentations)
    result = optimize(velocity, z0, lambda x: loss(velocity.to_image(x)), config=cfg.flowgrad, initial=start,
                      start_step=cfg.start_step,
                      callback=lambda info: report(info.iteration, float(np.nanmean(info.losses.numpy()))))
    with torch.no_grad():
        after = velocity.to_image(result.images).clamp(0, 1)
        clip_before = clip_score(clip, source, cfg.prompt).cpu().double()
        clip_after = clip_score(clip, after, cfg.prompt).cpu().double()
    controls = result.controls.transpose(0, 1).float().cpu()
    records = {
        "index": idx,
        "source": labels,
        "loss_before": result.initial_loss.tolist(),
        "loss_after": result.best_loss.tolist(),
        "clip_before": clip_before.tolist(),
        "clip_after": clip_after.tolist(),
        "control_norm": controls.flatten(1).norm(dim=1).double().tolist(),
        "best_iteration": result.best_iteration.tolist(),
        "reconstruction_rmse": recon_rmse.double().tolist(),
        "status": [("ok" if it > 0 else "skipped: no improvement") if s == "ok" else f"skipped: {s}"
                   for s, it in zip(result.status, result.best_iteration.tolist())],
    }
    arrays = {"controls": controls.numpy(), "latents": z0.float().cpu().numpy()}
    return arrays, records


def discover(cfg: DiscoveryConfig, velocity, clip, store_path: str | Path, *, resume: bool = False,
             device: str | torch.device = "cpu", load_image: Callable[[Path, int], Tensor] | None = None,
             progress: Callable[[BatchProgress], None] | None = None, overwrite: bool = True) -> Direction | None:
    """Run a discovery job and write its direction to the store at ``store_path``.

    Under ``torchrun`` (an initialized process group), batches are shared round-robin by rank,
    results meet through collectives, and rank 0 writes the store; other ranks return None.

    Args:
        cfg: the job's settings.
        velocity: the frozen model (a :class:`~flowgrad.velocity.VelocityField`).
        clip: a :class:`~flowgrad.clip_guidance.ClipModel` for the guidance loss.
        store_path: HDF5 store to add the direction to (created if missing).
        resume: continue an interrupted job from its checkpoint (same settings required).
        device: where to optimize.
        load_image: ``load_image(path, size) -> (3, size, size)`` for real-image folders.
        progress: called after every FlowGrad iteration.
        overwrite: replace a direction of the same name in the store (False: refuse before any work).

    Returns:
        The stored :class:`~directions.store.Direction` (on rank 0).
    """
    with strict_float32(device, cfg.precision):
        return _discover(cfg, velocity, clip, store_path, resume=resume, device=device, load_image=load_image,
                         progress=progress, overwrite=overwrite)


def _discover(cfg: DiscoveryConfig, velocity, clip, store_path: str | Path, *, resume: bool = False,
              device: str | torch.device = "cpu", load_image: Callable[[Path, int], Tensor] | None = None,
              progress: Callable[[BatchProgress], None] | None = None, overwrite: bool = True) -> Direction | None:
    device = torch.device(device)
    rank, world = dist.rank_and_world()
    store = DirectionStore(store_path)
    if cfg.images is not None:  # the files' names and sizes go into the settings a resume must match
        cfg = replace(cfg, images_digest=job_images(cfg)[1])
    settings = cfg.settings() | {"model_fingerprint": velocity.fingerprint(),
                                 "flowgrad_version": flowgrad.__version__,
                                 "augmentation_seeds": "per image"}
    lock = store.lock() if rank == 0 else dist.nullcontext()
    with lock:
        if rank == 0:
            names = store.names() if store.exists() else []  # refuse a corrupt/unknown-version store up front
            if not overwrite:
                check_name_free(store_path, cfg.name, names)
            ckpt = JobCheckpoint.open(partial_dir(store_path, cfg.name), settings, resume=resume)
        dist.barrier()
        if rank != 0:
            ckpt = JobCheckpoint.open(partial_dir(store_path, cfg.name), settings, resume=True)
        t0 = time.perf_counter()
        if cfg.aggregator == "joint":
            direction = _discover_joint(cfg, velocity, clip, ckpt, device, load_image, progress, settings, t0)
        else:
            done = set(ckpt.done_batches())
            mine = [b for b in range(cfg.n_batches) if b % world == rank]
            # A finished batch is written (and fsynced) by a helper thread while the next one runs; at most
            # one write is pending, and leaving the block (also on an error or Ctrl-C) waits for it. The
            # batches of this run stay in memory for the aggregation (only resumed ones are read back).
            written: dict[int, Future] = {}
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowgrad-checkpoint") as writer:
                pending = None
                for b in mine:
                    if b in done:
                        continue
                    n_before = sum(len(cfg.batch_indices(x)) for x in range(cfg.n_batches) if x in done or x < b)

                    def report(it: int, loss: float, b: int = b, n_before: int = n_before) -> None:
                        if progress is not None:
                            progress(BatchProgress(b, cfg.n_batches, n_before, cfg.n_images, it,
                                                   cfg.flowgrad.iterations, loss))

                    arrays, records = _run_batch(cfg, velocity, clip, b, device, load_image, report)
                    if pending is not None:
                        pending.result()
                    pending = written[b] = writer.submit(ckpt.save_batch, b, arrays, records)
                    done.add(b)
                if pending is not None:
                    pending.result()
            dist.barrier()
            local = {b: written[b].result() if b in written else ckpt.load_batch(b) for b in mine}
            direction = _aggregate(cfg, velocity, local, settings, time.perf_counter() - t0, device)
        if rank != 0:
            return None
        store.write(direction, overwrite=overwrite)
        ckpt.remove()
        return direction


def _discover_joint(cfg: DiscoveryConfig, velocity, clip, ckpt, device: torch.device, load_image,
                    progress: Callable[[BatchProgress], None] | None, settings: dict, t0: float) -> Direction:
    """The joint method (:mod:`directions.joint`): one shared control optimized on all images."""
    iters = cfg.flowgrad.iterations

    def report(it: int, done: int, total: int, loss: float) -> None:
        if progress is not None:
            share = (it * total + done) / ((iters + 1) * total)
            progress(BatchProgress(done - 1, total, int(round(cfg.n_images * share)), cfg.n_images, it, iters,
                                   loss))

    res = optimize_joint(cfg, velocity, clip, lambda idx: _batch_inputs(cfg, velocity, idx, device, load_image)[:4],
                         ckpt, device, report)
    return _direction(cfg, velocity, res.vector, res.records, settings, res.info, time.perf_counter() - t0,
                      "the optimized shared control itself (lowest mean loss)", res.split_half_cosine)


def _direction(cfg: DiscoveryConfig, velocity, vector: np.ndarray, records: dict, settings: dict, info: dict,
               seconds: float, scale_statistic: str, half: float, offsets: np.ndarray | None = None) -> Direction:
    """The stored direction of a finished job (strength 1 = ``vector``)."""
    return Direction(
        name=cfg.name, vector=vector, scale=float(np.linalg.norm(vector.astype(np.float64))),
        prompt=cfg.prompt, negative_prompt=cfg.negative_prompt, method=cfg.aggregator,
        n_images=int(np.sum(records["inlier"])), model_fingerprint=velocity.fingerprint(), model=cfg.model,
        clip=cfg.clip, time_window=cfg.flowgrad.t_window, eps=cfg.flowgrad.eps,
        settings=settings | {"aggregator_info": info, "wall_time_s": round(seconds, 2),
                             "scale_statistic": scale_statistic},
        split_half_cosine=half, records=records, offsets=offsets)


def _concat(parts: list[dict]) -> dict:
    """Concatenate per-batch dicts of arrays/lists (already in batch order) column by column."""
    out: dict = {}
    for part in parts:
        for k, v in part.items():
            out.setdefault(k, []).append(np.asarray(v))
    return {k: np.concatenate(v) for k, v in out.items()}


BLOCK_ELEMENTS = 1 << 25
"""Float64 elements per block of rows in the mean aggregation (256 MiB)."""


def _mean_direction(cfg: DiscoveryConfig, local: dict[int, tuple[dict, dict]], order: list[int],
                    ok: np.ndarray, dim: int, device: torch.device | None = None):
    """Mean aggregator over ranks: all-reduce of partial sums; only scalars per image are gathered.

    Works one block of rows at a time (float64 on ``device``, the job's, from the float32 controls as
    stored), so its memory beyond the loaded batches is a few vectors of length ``dim`` and one block,
    whatever the number of images. On a GPU the float64 sums and projections take a fraction of a second
    where NumPy on one host core took seconds (2,048 demo images: 6.2 s).

    Returns (unit, scale, per-image cosine (n,), split-half cosine).
    """
    device = torch.device("cpu") if device is None else device
    sizes = {b: len(cfg.batch_indices(b)) for b in order}
    offsets = dict(zip(order, np.cumsum([0] + [sizes[b] for b in order])[:-1]))
    positions = {b: np.arange(offsets[b], offsets[b] + sizes[b]) for b in sorted(local)}
    n_ok = int(ok.sum())
    half_of = np.full(len(ok), -1)
    if n_ok >= 4:  # same halves as aggregate.split_half_cosine
        perm = np.random.default_rng(cfg.seed).permutation(n_ok)
        ok_pos = np.flatnonzero(ok)
        half_of[ok_pos[perm[: n_ok // 2]]] = 0
        half_of[ok_pos[perm[n_ok // 2:]]] = 1
    block = max(1, BLOCK_ELEMENTS // max(dim, 1))  # rows per float64 block

    # Each block is converted to float64 twice (sums, then projections): keeping the float64 copies between the
    # two passes would make the memory grow with the number of images, which this function exists to bound.
    def blocks(b: int):
        controls = local[b][0]["controls"].reshape(sizes[b], -1)
        for lo in range(0, sizes[b], block):
            rows = controls[lo:lo + block]
            # host: NumPy converts to float64 about twice as fast as torch; GPU: send float32, convert there
            x = (torch.from_numpy(rows.astype(np.float64)) if device.type == "cpu"
                 else torch.from_numpy(np.ascontiguousarray(rows)).to(device).double())
            yield positions[b][lo:lo + block], x

    sums = torch.zeros(3, dim, dtype=torch.float64, device=device)  # all ok images, first half, second half
    norms = np.zeros(len(ok))
    for b in positions:
        for pos, x in blocks(b):
            norms[pos] = torch.linalg.vector_norm(x, dim=1).cpu().numpy()
            x[torch.from_numpy(~ok[pos]).to(device)] = 0.0  # skipped rows may be NaN: 0 * NaN would spoil the sums
            weights = np.stack([ok[pos], half_of[pos] == 0, half_of[pos] == 1]).astype(np.float64)
            sums += torch.from_numpy(weights).to(device) @ x
    sums = dist.all_reduce_sum(sums.cpu().numpy())
    if not np.linalg.norm(sums[0]) > 0:
        raise ValueError("the mean control is zero: no image moved; raise --iterations or --lr")
    unit = sums[0] / np.linalg.norm(sums[0])
    unit_t = torch.from_numpy(unit).to(device)
    proj_all, cos_all = np.zeros(len(ok)), np.zeros(len(ok))
    mine = []
    for b in positions:
        for pos, x in blocks(b):
            proj = (x @ unit_t).cpu().numpy()
            mine.append((pos, proj, np.divide(proj, norms[pos], out=np.zeros_like(proj), where=norms[pos] > 0)))
    for part in dist.all_gather(mine):
        for p, pr, co in part:
            proj_all[p], cos_all[p] = pr, co
    scale = float(np.median(proj_all[ok]))
    if not scale > 0:  # as aggregate(): a non-positive median projection falls back to |projection|
        scale = float(np.median(np.abs(proj_all[ok]))) or 1.0
    half = float("nan")
    if n_ok >= 4:
        half = float(sums[1] @ sums[2] / (np.linalg.norm(sums[1]) * np.linalg.norm(sums[2])))
    return unit, scale, cos_all, half


def probe_labels(clip_before: np.ndarray) -> np.ndarray:
    """The probe's labels: which images show the attribute before editing (CLIP score above the median)."""
    return clip_before > np.median(clip_before)


def _aggregate(cfg: DiscoveryConfig, velocity, local: dict[int, tuple[dict, dict]], settings: dict,
               seconds: float, device: torch.device | None = None) -> Direction:
    """Aggregate the batches of all ranks (``local`` holds this rank's: batch -> (arrays, records)).

    The mean aggregator computes on ``device`` (the job's); the others on the host (scikit-learn).
    """
    gathered: dict[int, dict] = {}
    for part in dist.all_gather({b: rec for b, (_, rec) in local.items()}):
        gathered.update(part)
    order = sorted(gathered)
    records = {k: v.tolist() for k, v in _concat([gathered[b] for b in order]).items()}
    ok = np.asarray(records["status"]) == "ok"
    if not ok.any():
        raise ValueError("no image was optimized successfully (none improved or all were non-finite); "
                         "raise --iterations or --lr")
    shape = next(s for s in dist.all_gather(next(iter(local.values()))[0]["controls"].shape[1:]
                                            if local else None) if s is not None)
    need_all = cfg.aggregator != "mean" or cfg.keep_offsets
    controls = None
    if need_all:
        arrays: dict[int, dict] = {}
        for part in dist.all_gather({b: arr for b, (arr, _) in local.items()}):
            arrays.update(part)
        full = _concat([arrays[b] for b in order])
        controls = full["controls"]
    info: dict = {}
    if cfg.aggregator == "mean":
        unit, scale, cosine, half = _mean_direction(cfg, local, order, ok, int(np.prod(shape)), device)
        inlier = ok.copy()
    else:
        kwargs = {}
        if cfg.aggregator == "probe":
            kwargs = {"latents": full["latents"].reshape(len(controls), -1)[ok],
                      "labels": probe_labels(np.asarray(records["clip_before"])[ok])}
        agg = aggregate(controls[ok], cfg.aggregator, **kwargs)
        half = split_half_cosine(controls[ok], cfg.aggregator, seed=cfg.seed, **kwargs)
        unit, scale, info = agg.unit, agg.scale, agg.info
        cosine = np.full(len(ok), np.nan)
        cosine[ok] = agg.per_image_cosine
        inlier = np.zeros(len(ok), dtype=bool)
        inlier[ok] = agg.inlier
    cosine = np.where(ok, cosine, np.nan)
    records = records | {"cosine_to_direction": cosine.tolist(), "inlier": inlier.tolist()}
    vector = (unit * scale).reshape(shape).astype(np.float32)
    return _direction(cfg, velocity, vector, records, settings, info, seconds,
                      info.get("scale_note", "median over images of the control's component along the unit "
                                                "direction"), half,
                      controls if cfg.keep_offsets else None)
