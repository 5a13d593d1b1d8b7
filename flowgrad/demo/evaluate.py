"""Quality gates of the demo world, measured on seeds never used in training.

Training streams renders from seeds below 10**9 (see ``train._batch_seed``); every evaluation here
renders from seeds at or above :data:`EVAL_SEED`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..augment import gaussian_blur
from ..grid import TimeGrid
from ..trajectory import integrate
from .nets import JudgeNet
from .render import FACTORS, render

__all__ = ["EVAL_SEED", "ZERO_SHOT_ATTRIBUTES", "BLUR_CHECK_SIGMA", "judge_quality", "judge_blur_shift", "judge_features", "frechet_distance", "zero_shot_accuracy", "sample_images",
           "flow_quality", "predict"]

EVAL_SEED = 10**9
ZERO_SHOT_ATTRIBUTES = ("old", "smiling", "glasses", "beard")
CLEAR_MARGIN = 0.2
"""Zero-shot labels of a continuous factor use only clear cases: |factor - 0.5| >= this margin."""
BLUR_CHECK_SIGMA = 0.6
"""Blur (px) of the judge's robustness check: about the softness of demo-flow samples around the eyes."""


@torch.no_grad()
def predict(net: JudgeNet, images: Tensor, batch_size: int = 500) -> Tensor:
    """(n, F) raw judge outputs in [0, 1]."""
    return torch.cat([net(images[i:i + batch_size]) for i in range(0, len(images), batch_size)])


@torch.no_grad()
def judge_features(net: JudgeNet, images: Tensor, batch_size: int = 500) -> Tensor:
    """(n, 256) penultimate judge activations, the feature space of the Fréchet distance."""
    feats = []
    for i in range(0, len(images), batch_size):
        h = net.features(images[i:i + batch_size] * 2.0 - 1.0)
        feats.append(net.head[:3](h))
    return torch.cat(feats).double()


def frechet_distance(a: Tensor, b: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (n, D)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    evals, evecs = torch.linalg.eigh(cov_a)
    sqrt_a = evecs @ torch.diag(evals.clamp(min=0).sqrt()) @ evecs.T
    cross = torch.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def judge_quality(net: JudgeNet, n: int = 2000, device: str | torch.device = "cpu") -> dict[str, dict]:
    """R² per continuous factor and accuracy per binary factor on ``n`` held-out renders."""
    images, factors = render(n, seed=EVAL_SEED, device=device)
    pred = predict(net, images).cpu()
    out = {}
    for j, spec in enumerate(FACTORS):
        true = factors[spec.name].cpu().double()
        p = pred[:, j].double()
        if spec.kind == "binary":
            out[spec.name] = {"accuracy": float(((p > 0.5).double() == true).double().mean())}
        else:
            ss_res = float((p - true).square().sum())
            ss_tot = float((true - true.mean()).square().sum())
            out[spec.name] = {"r2": 1.0 - ss_res / ss_tot}
    return out


def judge_blur_shift(net: JudgeNet, n: int = 2000, sigma: float = BLUR_CHECK_SIGMA,
                     device: str | torch.device = "cpu") -> dict[str, dict]:
    """How a slight blur of held-out renders moves the judge: per factor, the mean change of its output
    and the std of the outputs on blurred renders over that on the same renders unblurred.

    The true factors do not change under blur, so a good instrument for (softer) generated images shows
    mean shifts near 0 and std ratios near 1.
    """
    images, _ = render(n, seed=EVAL_SEED + 4, device=device)
    clean, blurred = predict(net, images).cpu(), predict(net, gaussian_blur(images, sigma)).cpu()
    return {spec.name: {"mean_shift": float(blurred[:, j].mean() - clean[:, j].mean()),
                        "std_ratio": float(blurred[:, j].std() / clean[:, j].std())}
            for j, spec in enumerate(FACTORS)}


def _labels(attr, factors: Mapping[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(label, usable) for an attribute: label True when the prompt should win."""
    f = factors[attr.factor].cpu().float()
    binary = bool(((f == 0) | (f == 1)).all())
    label = (f > 0.5) if attr.direction > 0 else (f < 0.5)
    usable = torch.ones_like(label) if binary else (f - 0.5).abs() >= CLEAR_MARGIN
    return label, usable


def zero_shot_accuracy(clip, images: Tensor, factors: Mapping[str, Tensor], attributes) -> dict[str, dict]:
    """Prompt-vs-negative zero-shot accuracy per attribute, on clear cases (see CLEAR_MARGIN)."""
    from ..clip_guidance import zero_shot

    out = {}
    for attr in attributes:
        label, usable = _labels(attr, factors)
        wins = torch.cat([zero_shot(clip, images[i:i + 500], attr.prompt, attr.negative_prompt).cpu()
                          for i in range(0, len(images), 500)])
        correct = (wins == label)[usable]
        out[attr.name] = {"accuracy": float(correct.float().mean()), "n": int(usable.sum())}
    return out


@torch.no_grad()
def sample_images(flow, n: int, n_steps: int = 100, seed: int = EVAL_SEED, batch_size: int = 500,
                  device: str | torch.device = "cpu") -> Tensor:
    """(n, 3, 64, 64) Euler samples of the demo flow, as images in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    grid = TimeGrid.uniform(n_steps)
    out = []
    for i in range(0, n, batch_size):
        z0 = torch.randn((min(batch_size, n - i), *flow.sample_shape), generator=gen).to(device)
        out.append(flow.to_image(integrate(flow, z0, grid, keep_states=False).final).clamp(0, 1))
    return torch.cat(out)


def flow_quality(flow, net: JudgeNet, n: int = 2000, n_steps: int = 100,
                 device: str | torch.device = "cpu") -> tuple[dict, Tensor]:
    """Judged factor statistics of flow samples vs renders, and Fréchet distances in judge features.

    Returns the report and the samples (for zero-shot checks and grids).
    """
    samples = sample_images(flow, n, n_steps, device=device)
    renders, _ = render(n, seed=EVAL_SEED + 1, device=device)
    renders2, _ = render(n, seed=EVAL_SEED + 2, device=device)
    ps, pr = predict(net, samples).cpu(), predict(net, renders).cpu()
    factors = {}
    for j, spec in enumerate(FACTORS):
        s, r = ps[:, j], pr[:, j]
        if spec.kind == "binary":
            s, r = (s > 0.5).float(), (r > 0.5).float()
        std_ratio = float(s.std() / r.std()) if float(r.std()) > 0 else math.nan
        factors[spec.name] = {"sample_mean": float(s.mean()), "render_mean": float(r.mean()),
                              "mean_diff": float(s.mean() - r.mean()), "sample_std": float(s.std()),
                              "render_std": float(r.std()), "std_ratio": std_ratio}
    fs, fr, fr2 = (judge_features(net, x) for x in (samples, renders, renders2))
    report = {"factors": factors, "frechet_samples_vs_renders": frechet_distance(fs, fr),
              "frechet_renders_vs_renders": frechet_distance(fr2, fr), "n": n, "n_steps": n_steps}
    return report, samples
