"""Differentiable image augmentations (DiffAugment-style), pure torch.

CLIP guidance scores many randomly augmented copies of each image so that the gradient pushes
the image's content, not one adversarial pixel pattern (FlowGrad uses the DiffAugment policy
``"color,translation,resize,cutout"``). Every op here is differentiable with respect to the
pixels; the random parameters are not.

Randomness is split from application so that it can be controlled and tested:

* :func:`sample_augment_params` draws one :class:`AugmentParams` (uniform numbers in [0, 1),
  one row per sample) from a CPU :class:`torch.Generator`; :func:`sample_augment_params_each` draws
  each sample's rows from its own generator;
* :func:`apply_augment` applies them to ``x`` (B, C, H, W) with B equal to the number of rows;
  row ``i`` only ever touches ``x[i]``, so samples are independent of each other;
* :func:`diff_augment` does both.

Parameters are stored as uniforms and mapped to each op's range at application time, so the
same params work for any image size.

Value range: the ops accept any range, but the magnitudes follow DiffAugment for images in
[0, 1] (brightness shifts by up to +-0.5). Outputs are not clamped.

Ops (applied in policy order):

* ``color``: brightness ``x + (u - 0.5)``, then saturation ``(x - mean_c) * 2u + mean_c``
  (mean over channels per pixel), then contrast ``(x - mean) * (u + 0.5) + mean`` (mean over
  C, H, W), each with its own u per sample.
* ``translation``: integer shift by up to ``round(size / 8)`` pixels in each axis, zero padding.
* ``resize``: zoom about the centre by a factor in [0.8, 1.2] (bilinear, zero padding): > 1
  crops and enlarges, < 1 shrinks with a zero border; output size equals input size. Under
  ``torch.use_deterministic_algorithms(True)`` the same resampling runs as two matrix products
  (:func:`resample_separable`), since ``grid_sample``'s CUDA backward is not deterministic.
* ``cutout``: a zeroed square of half the image size (clipped at the borders) at a uniformly
  random centre.

:func:`gaussian_blur` (one sigma per image) is not a guidance op: the demo world's judge trains with it
so that it reads soft generated images as it reads sharp renders.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AugmentParams", "POLICY_OPS", "Policy", "apply_augment", "bilinear_matrix", "diff_augment", "gaussian_blur",
    "parse_policy", "resample_separable", "sample_augment_params", "sample_augment_params_each",
]

POLICY_OPS: tuple[str, ...] = ("color", "translation", "resize", "cutout")
"""The known ops, in FlowGrad's default order."""

Policy = str | Sequence[str]
"""A comma-separated string (``"color,cutout"``) or a sequence of op names."""

TRANSLATION_RATIO = 0.125
"""Largest shift as a fraction of the image size."""
RESIZE_RANGE = (0.8, 1.2)
"""Zoom factors of the ``resize`` op."""
CUTOUT_RATIO = 0.5
"""Side of the cutout square as a fraction of the image size."""

# Uniforms per sample drawn by each op, in draw order.
_DRAWS = {"color": 3, "translation": 2, "resize": 1, "cutout": 2}


@dataclass(frozen=True, eq=False)
class AugmentParams:
    """Random parameters of one augmentation pass; row ``i`` belongs to sample ``i``.

    All fields are uniforms in [0, 1); an op that is not in ``policy`` has ``None``.

    Attributes:
        policy: the ops to apply, in order.
        color: (N, 3) brightness, saturation, contrast uniforms.
        translation: (N, 2) shift uniforms for (y, x).
        resize: (N, 1) zoom uniform.
        cutout: (N, 2) centre uniforms for (y, x).
    """

    policy: tuple[str, ...]
    color: Tensor | None = None
    translation: Tensor | None = None
    resize: Tensor | None = None
    cutout: Tensor | None = None

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name != "policy" and getattr(self, f.name) is not None}

    def __len__(self) -> int:
        tensors = self._tensors()
        return next(iter(tensors.values())).shape[0] if tensors else 0

    def select(self, index: Tensor | slice | int) -> AugmentParams:
        """The rows ``index`` (a slice, an int, or a 1-D index tensor) as new params."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return replace(self, **{k: v[index] for k, v in self._tensors().items()})

    def to(self, device: torch.device | str) -> AugmentParams:
        """The same params on ``device``."""
        return replace(self, **{k: v.to(device) for k, v in self._tensors().items()})


def parse_policy(policy: Policy) -> tuple[str, ...]:
    """Normalize a policy to a tuple of known op names (empty policy -> no ops).

    Raises:
        ValueError: on an unknown op name.
        TypeError: if ``policy`` is neither a string nor a sequence of strings.
    """
    if isinstance(policy, str):
        ops = tuple(p.strip() for p in policy.split(",") if p.strip())
    elif isinstance(policy, Sequence) and all(isinstance(p, str) for p in policy):
        ops = tuple(policy)
    else:
        raise TypeError(f"policy must be a comma-separated str or a sequence of op names, "
                        f"got {type(policy).__name__}")
    unknown = [op for op in ops if op not in POLICY_OPS]
    if unknown:
        raise ValueError(f"policy has unknown op(s) {unknown}; expected names from {POLICY_OPS}")
    return ops


def sample_augment_params(policy: Policy, n: int, generator: torch.Generator) -> AugmentParams:
    """Draw parameters for ``n`` samples from ``generator`` (a CPU generator).

    Draws happen op by op in policy order, ``n`` rows at a time, so the same generator state
    gives the same params.
    """
    ops = parse_policy(policy)
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise TypeError(f"generator must be a CPU torch.Generator, got {generator!r}; "
                        f"create one with torch.Generator().manual_seed(seed)")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    drawn = {op: torch.rand(n, _DRAWS[op], generator=generator) for op in ops}
    return AugmentParams(policy=ops, **drawn)


def sample_augment_params_each(policy: Policy, rows: int, generators: Sequence[torch.Generator]) -> AugmentParams:
    """Draw ``rows`` parameter rows from each generator: ``len(generators) * rows`` rows in all.

    Rows ``i * rows`` to ``(i + 1) * rows - 1`` come from ``generators[i]`` alone (op by op, as
    :func:`sample_augment_params`), so sample ``i``'s parameters do not depend on the other generators:
    with one generator per image, an image draws the same augmentations whichever images share its batch.
    """
    ops = parse_policy(policy)
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
        raise ValueError(f"rows must be an int >= 0, got {rows!r}")
    parts = [sample_augment_params(ops, rows, g) for g in generators]
    if not parts:
        return AugmentParams(policy=ops, **{op: torch.empty(0, _DRAWS[op]) for op in ops})
    return AugmentParams(policy=ops, **{op: torch.cat([getattr(p, op) for p in parts]) for op in ops})


def apply_augment(x: Tensor, params: AugmentParams) -> Tensor:
    """Apply ``params`` to ``x``; differentiable with respect to ``x``.

    Args:
        x: (B, C, H, W) images, B == len(params).
        params: from :func:`sample_augment_params` (moved to ``x.device`` here).

    Returns:
        (B, C, H, W) augmented images, same dtype as ``x``.
    """
    if not isinstance(x, Tensor) or x.ndim != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if params.policy and len(params) != x.shape[0]:
        raise ValueError(f"params has {len(params)} rows but x has batch {x.shape[0]}; "
                         f"sample params with n=x.shape[0]")
    params = params.to(x.device)
    for op in params.policy:
        u = getattr(params, op).to(x.dtype)
        x = _OPS[op](x, u)
    return x


def diff_augment(x: Tensor, policy: Policy, generator: torch.Generator) -> Tensor:
    """Augment each sample of ``x`` (B, C, H, W) independently; returns (B, C, H, W).

    Parameters are drawn from ``generator`` (CPU) and moved to ``x.device``.
    """
    return apply_augment(x, sample_augment_params(policy, x.shape[0], generator))


def _color(x: Tensor, u: Tensor) -> Tensor:
    brightness, saturation, contrast = (u[:, i].view(-1, 1, 1, 1) for i in range(3))
    x = x + (brightness - 0.5)
    mean_c = x.mean(dim=1, keepdim=True)
    x = (x - mean_c) * (saturation * 2.0) + mean_c
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (contrast + 0.5) + mean


def _translation(x: Tensor, u: Tensor) -> Tensor:
    b, _, h, w = x.shape
    sy, sx = int(h * TRANSLATION_RATIO + 0.5), int(w * TRANSLATION_RATIO + 0.5)
    # Integer shifts in [-s, s]; out[y, x] = in[y - dy, x - dx], zero outside.
    dy = (u[:, 0] * (2 * sy + 1)).floor().long().clamp(max=2 * sy) - sy
    dx = (u[:, 1] * (2 * sx + 1)).floor().long().clamp(max=2 * sx) - sx
    padded = F.pad(x, (sx, sx, sy, sy))
    rows = torch.arange(h, device=x.device)[None, :] + sy - dy[:, None]  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] + sx - dx[:, None]  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2)


def _resize(x: Tensor, u: Tensor) -> Tensor:
    low, high = RESIZE_RANGE
    zoom = low + (high - low) * u[:, 0]
    if torch.are_deterministic_algorithms_enabled():  # grid_sample's CUDA backward is not deterministic
        h, w = x.shape[-2:]
        return resample_separable(x, _zoom_matrix(h, zoom), _zoom_matrix(w, zoom))
    theta = torch.zeros(x.shape[0], 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = 1.0 / zoom
    theta[:, 1, 1] = 1.0 / zoom
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def bilinear_matrix(source: Tensor, n_in: int) -> Tensor:
    """Rows of 1-D bilinear interpolation weights: (..., n_out) source coordinates -> (..., n_out, n_in).

    Output sample ``i`` reads pixel ``j`` (centres at integer ``j``) with the tent weight
    ``max(0, 1 - |source_i - j|)``; coordinates outside [0, n_in - 1] lose the weight of the missing
    neighbour (zero padding). Applied along both axes (:func:`resample_separable`) this is bilinear
    resampling as ``grid_sample`` / ``interpolate`` compute it, as two matrix products, whose
    gradients are deterministic on a GPU (those two ops accumulate theirs with atomics).
    """
    j = torch.arange(n_in, dtype=source.dtype, device=source.device)
    return (1.0 - (source.unsqueeze(-1) - j).abs()).clamp_min(0.0)


def resample_separable(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``rows @ x @ cols^T`` per image: x (B, C, H, W), rows (B or 1, H', H), cols (B or 1, W', W)."""
    return rows.unsqueeze(1) @ x @ cols.unsqueeze(1).transpose(-1, -2)


def _zoom_matrix(n: int, zoom: Tensor) -> Tensor:
    """(B, n, n) weights of the ``resize`` op's zoom about the centre along one axis (zero padding).

    The same sample points as ``affine_grid`` + ``grid_sample(align_corners=False)``: output pixel ``i``
    at normalized position ``g = (2i + 1) / n - 1`` reads ``g / zoom``, i.e. pixel ``((g / zoom + 1) n - 1) / 2``.
    """
    g = (2.0 * torch.arange(n, dtype=zoom.dtype, device=zoom.device) + 1.0) / n - 1.0
    source = ((g[None, :] * (1.0 / zoom)[:, None] + 1.0) * n - 1.0) / 2.0
    return bilinear_matrix(source, n)


def _cutout(x: Tensor, u: Tensor) -> Tensor:
    _, _, h, w = x.shape
    ch, cw = int(h * CUTOUT_RATIO + 0.5), int(w * CUTOUT_RATIO + 0.5)
    cy = (u[:, 0] * h).floor().long().clamp(max=h - 1)
    cx = (u[:, 1] * w).floor().long().clamp(max=w - 1)
    ys = torch.arange(h, device=x.device)[None, :] - (cy[:, None] - ch // 2)  # (B, H)
    xs = torch.arange(w, device=x.device)[None, :] - (cx[:, None] - cw // 2)  # (B, W)
    inside = ((ys >= 0) & (ys < ch))[:, :, None] & ((xs >= 0) & (xs < cw))[:, None, :]
    return x * (~inside).to(x.dtype)[:, None]


_OPS = {"color": _color, "translation": _translation, "resize": _resize, "cutout": _cutout}


def gaussian_blur(images: Tensor, sigma: Tensor | float, radius: int | None = None) -> Tensor:
    """Separable Gaussian blur of (n, C, H, W) images with one sigma (px) per image (reflect padding).

    ``sigma`` is a float or an (n,) tensor; sigma 0 leaves an image unchanged. The kernel spans
    ``2 * radius + 1`` pixels; by default radius = ceil(3 * largest sigma), at least 1.
    """
    n, c, h, w = images.shape
    sigma = torch.as_tensor(sigma, dtype=images.dtype, device=images.device).expand(n)
    if radius is None:
        radius = max(1, math.ceil(3 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-offsets.square() / (2 * sigma.clamp(min=1e-3).square()[:, None]))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (n*C, K)
    x = images.reshape(1, n * c, h, w)
    x = F.pad(x, (radius, radius, 0, 0), mode="reflect")
    x = F.conv2d(x, kernel[:, None, None, :], groups=n * c)
    x = F.pad(x, (0, 0, radius, radius), mode="reflect")
    x = F.conv2d(x, kernel[:, None, :, None], groups=n * c)
    return x.reshape(n, c, h, w)
