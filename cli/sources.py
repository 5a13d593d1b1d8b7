"""Where edited images come from: real image files (inverted) or fresh seeded samples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .common import CliError
from .images import load_image


@dataclass
class Sources:
    """Latents to edit and what they came from.

    Attributes:
        z0: (B, C, H, W) latents (the states at the requested step).
        originals: (B, 3, H, W) the real images in [0, 1], or None for samples.
        labels: file names or ``sample-<i>``.
        reconstruction_rmse: per-image inversion error (data space), or None for samples.
        notices: one line per resized image.
    """

    z0: Tensor
    originals: Tensor | None
    labels: list[str]
    reconstruction_rmse: list[float] | None
    notices: list[str]


def load_sources(velocity, images: tuple[str, ...], samples: int | None, seed: int, n_steps: int,
                 device: torch.device, invert_method: str = "euler", *, start_step: int = 0,
                 eps: float = 1e-3, reconstruct: bool = True) -> Sources:
    """Latents of the images to edit: states at step ``start_step`` of the N-step grid (default: t = eps).

    Samples are integrated from their seeded noise up to that step; real images are inverted from t = 1
    down to it only (a shorter round trip than to t = eps and back). ``reconstruct=False`` leaves the
    reconstruction error to the caller (who regenerates the images anyway); it is then None.
    """
    from directions.apply import uncontrolled_state
    from directions.discover import sample_latents
    from flowgrad import TimeGrid, integrate, invert, rmse
    from flowgrad.batching import map_batches

    if images and samples:
        raise CliError("give image files or --samples K, not both")
    if not images and not samples:
        raise CliError("nothing to edit: give image files or --samples K")
    if samples:
        if samples < 1:
            raise CliError(f"--samples must be >= 1, got {samples}")
        z0 = sample_latents(tuple(velocity.sample_shape), seed, range(samples)).to(device)
        z0 = uncontrolled_state(velocity, z0, n_steps, start_step, eps)
        return Sources(z0, None, [f"sample-{i}" for i in range(samples)], None, [])
    notices: list[str] = []
    size = velocity.sample_shape[-1]
    try:
        originals = torch.stack([load_image(Path(p), size, notices=notices) for p in images]).to(device)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    x1 = velocity.from_image(originals)
    grid = TimeGrid.uniform(n_steps, eps).sub(start_step)
    # in batches that fit (halved on out-of-memory, nothing lost)
    z0 = map_batches(lambda x: invert(velocity, x, grid, method=invert_method), x1, velocity=velocity)
    labels = _unique_labels([Path(p).stem for p in images])
    if not reconstruct:
        return Sources(z0, originals, labels, None, notices)
    rows = torch.arange(len(x1), device=x1.device)
    errors = map_batches(lambda i: rmse(integrate(velocity, z0[i], grid, keep_states=False).final, x1[i]), rows,
                         velocity=velocity)
    return Sources(z0, originals, labels, rmse_list(errors), notices)


def rmse_list(rmse: Tensor) -> list[float]:
    """Per-image RMSE as floats (NaN for a non-finite value)."""
    return [float(r) if math.isfinite(float(r)) else float("nan") for r in rmse.cpu()]


def _unique_labels(stems: list[str]) -> list[str]:
    """File stems, repeats suffixed ``-2``, ``-3``, ... so that outputs never overwrite each other."""
    used: set[str] = set()
    labels = []
    for stem in stems:
        label, k = stem, 1
        while label in used:
            k += 1
            label = f"{stem}-{k}"
        used.add(label)
        labels.append(label)
    return labels
