"""Training of the demo world's three models from streamed renders.

* the velocity UNet by rectified-flow matching (t = 0 noise, t = 1 data),
* the tiny open_clip model contrastively on render/caption pairs,
* the factor judge by regression on the known factors.

Every function is reproducible from its seed for a given step count; ``max_seconds`` stops early
(the number of steps done is returned, so the run can be reproduced with ``steps=`` that number).
The library never prints: progress goes to ``callback(step, metrics)``.

``train_flow`` also trains data-parallel when a ``torch.distributed`` process group is active (one
process per GPU, started by torchrun); the other two trainers always run as a single process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as tdist
import torch.nn.functional as F
from torch import Tensor, nn

from ..augment import diff_augment, gaussian_blur
from .captions import caption
from .nets import DemoUNet, JudgeConfig, JudgeNet, UNetConfig
from .render import FACTORS, render, render_factors, sample_factors

__all__ = ["TrainConfig", "TrainResult", "train_flow", "train_clip", "train_judge", "factor_matrix", "sample_t"]

Callback = Callable[[int, dict[str, float]], None]


T_SAMPLING = ("uniform", "late")


@dataclass(frozen=True)
class TrainConfig:
    """Optimization settings shared by the three trainers.

    ``t_sampling`` (flow only): ``"uniform"`` draws t ~ U(0, 1); ``"late"`` draws half of each batch from
    U(0, 1) and half with density 2t (t = sqrt(u)), i.e. density 0.5 + t, more weight where the last, fine
    details are decided.
    """

    steps: int = 20_000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 0.0
    warmup: int = 500
    seed: int = 0
    max_seconds: float | None = None
    ema_decay: float = 0.999
    t_sampling: str = "uniform"

    def __post_init__(self) -> None:
        if self.t_sampling not in T_SAMPLING:
            raise ValueError(f"t_sampling must be one of {T_SAMPLING}, got {self.t_sampling!r}")
        for key in ("steps", "batch_size"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")


@dataclass
class TrainResult:
    model: nn.Module
    steps: int
    seconds: float
    metrics: dict[str, float] = field(default_factory=dict)


def _lr_lambda(cfg: TrainConfig, total: list[int]) -> Callable[[int], float]:
    """Linear warmup, then cosine decay to zero at ``total[0]`` steps (mutable: see ``_loop``)."""
    def f(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, total[0] - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast(
        "cpu", enabled=False)


def _batch_seed(cfg: TrainConfig, step: int, stream: int) -> int:
    # disjoint from evaluation seeds, which start at 10**9 (see evaluate.py)
    return (cfg.seed * 1_000_003 + step) * 8 + stream


def factor_matrix(factors: dict[str, Tensor]) -> Tensor:
    """(n, F) matrix of all factors in FACTORS order."""
    return torch.stack([factors[f.name].float() for f in FACTORS], dim=1)


CALIBRATION = (20, 70)
"""With ``max_seconds``, the step count is fixed from the speed between these two steps (inside the
warmup, so the learning-rate schedule of the whole run equals that of a run with ``steps=`` the
final count)."""

RANK_SEED_STRIDE = 7919
"""Under a process group, rank r draws its data from seed ``cfg.seed + RANK_SEED_STRIDE * r``, so rank 0
draws exactly what a single process draws."""


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def _from_rank0(value: float, device: torch.device) -> float:
    """Rank 0's ``value`` on every rank of the process group (NCCL needs a CUDA tensor, gloo a CPU one)."""
    on = device if tdist.get_backend() == "nccl" else torch.device("cpu")
    held = torch.tensor([value], dtype=torch.float64, device=on)
    tdist.broadcast(held, src=0)
    return float(held.item())


def _loop(cfg: TrainConfig, params, step_fn: Callable[[int], dict[str, float]],
          callback: Callback | None, after_step: Callable[[], None] | None = None,
          sync_device: torch.device | None = None) -> tuple[int, float]:
    """Optimize for ``cfg.steps`` steps (fewer with ``max_seconds``); returns (steps, seconds).

    With ``sync_device`` (set under a process group), every rank takes rank 0's step count and
    seconds, broadcast through tensors on that device, so no rank waits for a step the others skip.
    """
    total = [cfg.steps]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    start = time.perf_counter()
    mark = start
    step = 0
    while step < total[0]:
        opt.zero_grad(set_to_none=True)
        metrics = step_fn(step)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        step += 1
        if cfg.max_seconds is not None and step == CALIBRATION[0]:
            mark = time.perf_counter()
        if cfg.max_seconds is not None and step == CALIBRATION[1]:
            now = time.perf_counter()
            per_step = (now - mark) / (CALIBRATION[1] - CALIBRATION[0])
            left = cfg.max_seconds - (now - start)
            total[0] = max(step, min(cfg.steps, step + int(left / per_step)))
            if sync_device is not None:
                total[0] = int(_from_rank0(total[0], sync_device))
        if callback is not None and (step % 100 == 1 or step == total[0]):
            callback(step - 1, metrics | {"total": float(total[0])})
    seconds = time.perf_counter() - start
    if sync_device is not None:
        seconds = _from_rank0(seconds, sync_device)
    return step, seconds


def sample_t(n: int, mode: str, generator: torch.Generator) -> Tensor:
    """(n,) training times on the generator's device: U(0, 1), or for ``"late"`` every odd row sqrt(U(0, 1))
    (density 2t), so a batch mixes both halves evenly."""
    t = torch.rand(n, generator=generator, device=generator.device)
    if mode == "late":
        t = torch.where(torch.arange(n, device=t.device) % 2 == 1, t.sqrt(), t)
    return t


def render_pool(n: int, seed: int, device: torch.device, chunk: int = 4096) -> Tensor:
    """(n, 3, 64, 64) uint8 renders (what a PNG of them would hold), rendered in chunks."""
    pool = torch.empty((n, 3, 64, 64), dtype=torch.uint8, device=device)
    for i, start in enumerate(range(0, n, chunk)):
        images, _ = render(min(chunk, n - start), seed=_batch_seed(TrainConfig(seed=seed), i, 3), device=device)
        pool[start:start + len(images)] = (images * 255.0 + 0.5).to(torch.uint8)
    return pool


def train_flow(cfg: TrainConfig, arch: UNetConfig = UNetConfig(), device: str | torch.device = "cpu",
               pool: int = 0, init: dict[str, Tensor] | None = None,
               callback: Callback | None = None) -> TrainResult:
    """Rectified-flow matching: x_t = t·x1 + (1-t)·x0, target x1 - x0; returns the EMA model.

    With ``pool > 0``, that many renders are made once (8-bit, on ``device``) and batches are drawn
    from them; otherwise every batch is rendered fresh. ``init`` continues from existing weights.

    Under an active ``torch.distributed`` process group the net is wrapped in DistributedDataParallel
    (gradients averaged over ranks). ``cfg.batch_size`` and ``pool`` are per process (global batch =
    batch_size × world size); rank r draws its pool, batches and noise from seed
    ``cfg.seed + RANK_SEED_STRIDE * r`` (rank 0 draws what a single process draws), all ranks start
    from the same weights, and every rank returns the same result (rank 0's step count and seconds).
    ``device`` must then be this rank's own GPU under NCCL.
    """
    device = torch.device(device)
    distributed = _distributed()
    rank = tdist.get_rank() if distributed else 0
    if distributed and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if distributed and tdist.get_backend() == "nccl" and device.type != "cuda":
        raise ValueError(f"device must be this rank's CUDA device under the NCCL backend, got {device}; "
                         "use gloo for CPU training")
    data_cfg = replace(cfg, seed=cfg.seed + RANK_SEED_STRIDE * rank)
    torch.manual_seed(cfg.seed)
    net = DemoUNet(arch)
    if init is not None:
        net.load_state_dict({k: v.float() for k, v in init.items()})
    net = net.to(device).to(memory_format=torch.channels_last)
    ema = torch.optim.swa_utils.AveragedModel(
        net, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg.ema_decay))
    wrapped = net  # what the optimizer steps through: the net itself, or DDP around it
    if distributed:
        wrapped = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    gen = torch.Generator(device=device).manual_seed(data_cfg.seed)
    data = render_pool(pool, data_cfg.seed, device) if pool > 0 else None

    def step_fn(step: int) -> dict[str, float]:
        if data is None:
            images, _ = render(cfg.batch_size, seed=_batch_seed(data_cfg, step, 0), device=device)
        else:
            pick = torch.randint(len(data), (cfg.batch_size,), generator=gen, device=device)
            images = data[pick].float() / 255.0
        x1 = (images * 2.0 - 1.0).contiguous(memory_format=torch.channels_last)
        x0 = torch.randn(x1.shape, generator=gen, device=device)
        t = sample_t(x1.shape[0], cfg.t_sampling, gen)
        xt = t.view(-1, 1, 1, 1) * x1 + (1 - t.view(-1, 1, 1, 1)) * x0
        with _autocast(device):
            pred = wrapped(xt, t)
        loss = F.mse_loss(pred.float(), x1 - x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(wrapped.parameters(), 1.0)
        return {"loss": float(loss.detach())} if step % 100 == 0 else {}

    steps, seconds = _loop(cfg, wrapped.parameters(), step_fn, callback,
                           after_step=lambda: ema.update_parameters(net), sync_device=device if distributed else None)
    model = ema.module.eval().requires_grad_(False)
    return TrainResult(model=model, steps=steps, seconds=seconds)


def _caption_targets(captions: list[str], device: torch.device) -> Tensor:
    """Soft targets: images with identical captions are all positives for each other."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    idx = torch.tensor([ids[c] for c in captions], device=device)
    same = (idx[:, None] == idx[None, :]).float()
    return same / same.sum(1, keepdim=True)


class _CaptionStream(torch.utils.data.IterableDataset):
    """Factors, captions and tokens of every CLIP training step, made in worker processes.

    Worker w makes steps w, w + W, w + 2W, ...; the DataLoader interleaves workers round-robin, so
    batches arrive in step order whatever the number of workers.
    """

    def __init__(self, cfg: TrainConfig, tokenizer) -> None:
        self.cfg, self.tokenizer = cfg, tokenizer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for step in range(wid, self.cfg.steps, workers):
            seed = _batch_seed(self.cfg, step, 1)
            factors = sample_factors(self.cfg.batch_size, seed)
            texts = caption(factors, seed=seed)
            yield step, factors, texts, self.tokenizer(texts)


def train_clip(cfg: TrainConfig, clip_config_json: str, device: str | torch.device = "cpu",
               augment_prob: float = 0.5, workers: int = 0, callback: Callback | None = None,
               init: dict[str, Tensor] | None = None) -> TrainResult:
    """Contrastive training of an open_clip model from a config file on render/caption pairs.

    Captions that are identical within a batch count as positives for each other. Half the images
    are augmented with the guidance loss's own differentiable augmentations, so the model's
    similarity stays meaningful on augmented copies. ``init`` (a state dict of the same config)
    continues from existing weights.
    """
    from ..clip_guidance import random_clip

    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    clip = random_clip(clip_config_json, seed=cfg.seed, device=device)
    model = clip.model
    if init is not None:
        model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in init.items()})
    model = model.train().requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.seed)
    stream = iter(torch.utils.data.DataLoader(_CaptionStream(cfg, clip.tokenizer), batch_size=None,
                                              num_workers=workers, prefetch_factor=4 if workers else None))

    def step_fn(step: int) -> dict[str, float]:
        got, factors, texts, tokens = next(stream)
        if got != step:
            raise RuntimeError(f"caption stream out of order: got step {got}, expected {step}")
        images = render_factors({k: v.to(device) for k, v in factors.items()}, _batch_seed(cfg, step, 1),
                                device=device)
        if augment_prob > 0:
            augmented = diff_augment(images, ("color", "translation", "resize", "cutout"), gen)
            pick = (torch.rand(images.shape[0], generator=gen) < augment_prob).to(device)
            images = torch.where(pick.view(-1, 1, 1, 1), augmented, images)
        with _autocast(device):
            img = F.normalize(model.encode_image(clip.preprocess(images)).float(), dim=-1)
            txt = F.normalize(model.encode_text(tokens.to(device)).float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        targets = _caption_targets(list(texts), device)
        loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        return {"loss": float(loss.detach())} if step % 100 == 0 else {}

    steps, seconds = _loop(cfg, model.parameters(), step_fn, callback)
    model.eval().requires_grad_(False)
    return TrainResult(model=model, steps=steps, seconds=seconds)


def judge_config() -> JudgeConfig:
    return JudgeConfig(factors=tuple(f.name for f in FACTORS),
                       binary=tuple(f.kind == "binary" for f in FACTORS))


def train_judge(cfg: TrainConfig, device: str | torch.device = "cpu", noise: float = 0.04, blur: float = 0.0,
                callback: Callback | None = None) -> TrainResult:
    """Regress every factor (MSE for continuous, BCE for binary) from renders with mild noise.

    ``blur`` > 0: a random half of each batch is blurred with a Gaussian of sigma ~ U(0, blur) px
    before the noise, so the judge reads the factors of slightly soft (generated) images as it reads
    renders instead of taking softness for a factor (unblurred, narrow eyes and glasses frames are
    the finest details).
    """
    device = torch.device(device)
    torch.manual_seed(cfg.seed)
    jc = judge_config()
    net = JudgeNet(jc).to(device)
    binary = torch.tensor(jc.binary, device=device)
    gen = torch.Generator(device=device).manual_seed(cfg.seed)

    def step_fn(step: int) -> dict[str, float]:
        images, factors = render(cfg.batch_size, seed=_batch_seed(cfg, step, 2), device=device)
        if blur > 0:
            n = images.shape[0]
            sigma_px = blur * torch.rand(n, generator=gen, device=device)
            keep = torch.rand(n, generator=gen, device=device) < 0.5  # this half stays sharp
            images = gaussian_blur(images, torch.where(keep, torch.zeros_like(sigma_px), sigma_px))
        sigma = noise * torch.rand(images.shape[0], 1, 1, 1, generator=gen, device=device)
        images = (images + sigma * torch.randn(images.shape, generator=gen, device=device)).clamp(0, 1)
        target = factor_matrix(factors).to(device)
        with _autocast(device):
            logits = net.logits(images).float()
        mse = F.mse_loss(torch.sigmoid(logits), target, reduction="none")
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        loss = torch.where(binary, bce, 10.0 * mse).mean()
        loss.backward()
        return {"loss": float(loss.detach())} if step % 100 == 0 else {}

    steps, seconds = _loop(cfg, net.parameters(), step_fn, callback)
    return TrainResult(model=net.eval().requires_grad_(False), steps=steps, seconds=seconds)
