"""Building blocks of NCSN++ (the Rectified Flow / score-SDE network), in pure PyTorch.

Attribute names (``GroupNorm_0``, ``Conv_0``, ``Dense_0``, ``NIN_0.W`` ...) follow the upstream
checkpoints so that a state dict loads key for key. Upstream resamples with a custom CUDA
``upfirdn2d``; here FIR up/down-sampling is a depthwise ``conv_transpose2d`` / strided ``conv2d``
with the same 2-D kernel, which runs under autocast on any device and is differentiable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "AttnBlock", "Combine", "GaussianFourierProjection", "GroupNorm", "NIN", "Resample", "ResnetBlockBigGAN",
    "activation", "downsample_fir", "fir_kernel_2d", "group_norm", "positional_embedding",
    "upsample_fir",
]

Activation = Callable[[Tensor], Tensor]

GROUP_NORM_EPS = 1e-6
"""GroupNorm epsilon of every NCSN++ normalisation layer."""
MAX_GROUPS = 32
SKIP_SCALE = math.sqrt(2.0)
"""Residual sums are divided by sqrt(2) when ``skip_rescale`` is on."""
MAX_POSITIONS = 10000
"""Period scale of the sinusoidal (positional) time embedding."""

_ACTIVATIONS: dict[str, Activation] = {
    "swish": F.silu,
    "relu": F.relu,
    "elu": F.elu,
    "lrelu": lambda x: F.leaky_relu(x, negative_slope=0.2),
}


def activation(name: str) -> Activation:
    """The nonlinearity named by ``config.model.nonlinearity`` (``swish`` = SiLU in this family)."""
    try:
        return _ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"nonlinearity must be one of {sorted(_ACTIVATIONS)}, got {name!r}") from None


def group_norm(channels: int) -> GroupNorm:
    """NCSN++'s GroupNorm: ``min(C // 4, 32)`` groups, eps 1e-6, affine."""
    groups = min(channels // 4, MAX_GROUPS)
    if groups < 1 or channels % groups:
        raise ValueError(f"NCSN++ GroupNorm uses min(C // 4, 32) groups, which does not divide C={channels}; "
                         "choose nf and ch_mult so that every channel count is a multiple of 4 (and of 32 "
                         "above 128)")
    return GroupNorm(num_groups=groups, num_channels=channels, eps=GROUP_NORM_EPS)


class GroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` that keeps a half-precision input in half precision under autocast.

    CUDA autocast runs ``group_norm`` in float32, so every normalised activation of a bf16 network
    (and its gradient in the backward pass) is written and read in float32, twice the memory traffic
    of the bf16 convolutions around it. With ``keep_half`` (the default) a bf16/fp16 input is
    normalised in its own dtype: the kernel still accumulates its statistics in float32, only the
    output (and the activations saved for the backward pass) stay in the input's dtype,
    which the next convolution would cast them to anyway. Float32 inputs, autocast-free calls and
    code traced by ``torch.compile`` are unchanged: inductor fuses the casts around float32 GroupNorm
    itself, and keeping bf16 there slowed the compiled VJP of NCSN++ 256 at batch 64 (H100: 170 -> 136
    TFLOP/s), while eagerly it lifts forward / VJP from 84 / 86 to 107 / 116 TFLOP/s at batch 32 and
    lets batch 32 fit where it ran out of memory (tests/benchmarks/RESULTS.md, section 2).
    """

    keep_half: bool = True

    def forward(self, x: Tensor) -> Tensor:
        if (self.keep_half and x.dtype in (torch.bfloat16, torch.float16)
                and torch.is_autocast_enabled(x.device.type) and not torch.compiler.is_compiling()):
            with torch.autocast(x.device.type, enabled=False):
                return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype),
                                    self.eps)
        return super().forward(x)


# --------------------------------------------------------------------------- FIR resampling


def fir_kernel_2d(taps: Sequence[float]) -> Tensor:
    """(K, K) float32 separable FIR kernel: outer(taps, taps) normalised to sum 1."""
    values = [float(v) for v in taps]
    if len(values) < 2 or sum(values) == 0:
        raise ValueError(f"fir_kernel must be at least 2 taps with a nonzero sum, got {list(taps)!r}")
    k = torch.tensor(values, dtype=torch.float32, device="cpu")   # CPU even under a meta device context
    k2 = torch.outer(k, k)
    return k2 / k2.sum()


def upsample_fir(x: Tensor, kernel: Tensor) -> Tensor:
    """2x FIR upsampling (zero insertion, then filtering with ``4 * kernel``), zeros outside.

    Same result as upstream ``upsample_2d(x, k, factor=2)``: a transposed depthwise convolution
    does the zero insertion and the filtering in one op.

    Args:
        x: (B, C, H, W).
        kernel: (K, K) normalised FIR kernel (sum 1), K >= 2, on x's device.

    Returns:
        (B, C, 2H, 2W).
    """
    channels, size = x.shape[1], kernel.shape[-1]
    pad_before = (size - 1) // 2 + 1          # upstream's pad[0] for factor 2
    padding = size - 1 - pad_before           # the transposed-conv padding giving that alignment
    weight = (kernel * 4.0).to(x.dtype).expand(channels, 1, size, size).contiguous()
    out = F.conv_transpose2d(x, weight, stride=2, padding=padding, groups=channels)
    h, w = 2 * x.shape[2], 2 * x.shape[3]
    if out.shape[2] != h or out.shape[3] != w:   # odd-length kernels produce one extra row/column
        out = out[:, :, :h, :w]
    return out


def downsample_fir(x: Tensor, kernel: Tensor) -> Tensor:
    """2x FIR downsampling (filter with ``kernel``, keep every second sample), zeros outside.

    Same result as upstream ``downsample_2d(x, k, factor=2)``.

    Args:
        x: (B, C, H, W) with even H and W.
        kernel: (K, K) normalised FIR kernel (sum 1) on x's device.

    Returns:
        (B, C, H/2, W/2).
    """
    channels, size = x.shape[1], kernel.shape[-1]
    pad_before, pad_after = (size - 1) // 2, (size - 2) // 2
    weight = kernel.flip(0, 1).to(x.dtype).expand(channels, 1, size, size).contiguous()
    if pad_before == pad_after:
        return F.conv2d(x, weight, stride=2, padding=pad_before, groups=channels)
    x = F.pad(x, (pad_before, pad_after, pad_before, pad_after))
    return F.conv2d(x, weight, stride=2, groups=channels)


FIR_IMPLS = ("auto", "conv", "separable")
"""How :class:`Resample` runs FIR filters: ``"conv"``, one depthwise (transposed) convolution each way
(fewest kernels: fastest eagerly); ``"separable"``, the same sums as shifted slices along H, then W
(elementwise ops that ``torch.compile`` fuses with their neighbours: 1.3x faster compiled NCSN++ 256
forwards on an H100, see ``tests/benchmarks/profile_ncsnpp.py``); ``"auto"`` (the default), separable
while ``torch.compile`` traces and conv otherwise. Both give the same numbers up to rounding order."""


def _shifted(x: Tensor, dim: int, shifts: Sequence[int]) -> list[Tensor]:
    """``[y_s for s in shifts]`` with ``y_s[m] = x[m + s]`` along ``dim`` (zeros outside)."""
    n = x.shape[dim]
    before, after = max(0, -min(shifts)), max(0, max(shifts))
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [before, after]
    xp = F.pad(x, pad)
    return [xp.narrow(dim, s + before, n) for s in shifts]


def _up_1d(x: Tensor, taps: Sequence[float], dim: int) -> Tensor:
    """One axis of :func:`upsample_fir` (gain 2 per axis): polyphase sums, then interleaving."""
    size = len(taps)
    padding = size - 1 - ((size - 1) // 2 + 1)
    phases = []
    for r in (0, 1):
        ks = [k for k in range(size) if (r + padding - k) % 2 == 0]
        terms = _shifted(x, dim, [(r + padding - k) // 2 for k in ks])
        phases.append(sum(2.0 * taps[k] * y for k, y in zip(ks, terms)))
    out = torch.stack(phases, dim=dim % x.dim() + 1)
    return out.flatten(dim % x.dim(), dim % x.dim() + 1)


def _down_1d(x: Tensor, taps: Sequence[float], dim: int) -> Tensor:
    """One axis of :func:`downsample_fir`: ``out[i] = sum_j taps[K-1-j] * x_padded[2i + j]``."""
    size, n = len(taps), x.shape[dim]
    d = dim % x.dim()
    pad = [0, 0] * (x.dim() - 1 - d) + [(size - 1) // 2, (size - 2) // 2]
    xp = F.pad(x, pad)
    index = [slice(None)] * x.dim()
    out = None
    for j in range(size):
        index[d] = slice(j, j + n - 1, 2)
        term = taps[size - 1 - j] * xp[tuple(index)]
        out = term if out is None else out + term
    return out


class Resample(nn.Module):
    """Parameter-free 2x up- or down-sampling: FIR (``fir=True``) or nearest / 2x2 mean.

    The FIR kernel is not a buffer (it would change the state dict); it is built on first use
    per device and dtype and cached.
    """

    def __init__(self, direction: Literal["up", "down"], fir: bool, fir_kernel: Sequence[float]) -> None:
        super().__init__()
        if direction not in ("up", "down"):
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        self.direction = direction
        self.fir = fir
        self.taps = tuple(float(v) for v in fir_kernel)
        self._kernel = fir_kernel_2d(self.taps) if fir else None
        self._taps_1d = tuple(v / sum(self.taps) for v in self.taps) if fir else ()   # separable: outer(t, t)
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        self._impl = "auto"

    @property
    def impl(self) -> str:
        """FIR implementation, one of :data:`FIR_IMPLS` (not saved in the state dict)."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        if value not in FIR_IMPLS:
            raise ValueError(f"FIR implementation must be one of {', '.join(FIR_IMPLS)}, got {value!r}")
        self._impl = value

    def _kernel_for(self, x: Tensor) -> Tensor:
        key = (x.device, x.dtype)
        kernel = self._cache.get(key)
        if kernel is None:
            kernel = self._kernel.to(device=x.device, dtype=x.dtype)
            self._cache[key] = kernel
        return kernel

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, 2H, 2W) up or (B, C, H/2, W/2) down."""
        if self.fir and (self.impl == "separable" or (self.impl == "auto" and torch.compiler.is_compiling())):
            one_axis = _up_1d if self.direction == "up" else _down_1d
            return one_axis(one_axis(x, self._taps_1d, -2), self._taps_1d, -1)
        if self.fir:
            kernel = self._kernel_for(x)
            return upsample_fir(x, kernel) if self.direction == "up" else downsample_fir(x, kernel)
        if self.direction == "up":
            return F.interpolate(x, scale_factor=2, mode="nearest")
        return F.avg_pool2d(x, 2)

    def extra_repr(self) -> str:
        return f"{self.direction}, fir={self.fir}, taps={list(self.taps) if self.fir else None}"


# --------------------------------------------------------------------------- time embeddings


class GaussianFourierProjection(nn.Module):
    """Gaussian Fourier features of log-noise-level: ``[sin(p), cos(p)]``, ``p = (x ⊗ W) · 2π``.

    ``W`` is a frozen parameter (``requires_grad=False``), stored in checkpoints.
    """

    def __init__(self, embedding_size: int, scale: float) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B,) -> (B, 2 * embedding_size). The phase is evaluated in upstream's float order."""
        phase = x[:, None] * self.W[None, :] * 2 * math.pi
        return torch.cat([torch.sin(phase), torch.cos(phase)], dim=-1)


def positional_embedding(timesteps: Tensor, dim: int) -> Tensor:
    """Sinusoidal (DDPM) embedding of real-valued timesteps.

    Args:
        timesteps: (B,) e.g. ``999 * t`` (not rounded).
        dim: embedding size (>= 4).

    Returns:
        (B, dim) ``[sin(t f_i), cos(t f_i)]`` with ``f_i = 10000^(-i / (dim/2 - 1))``, zero-padded if odd.
    """
    half = dim // 2
    step = math.log(MAX_POSITIONS) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=timesteps.device) * -step)
    args = timesteps.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


# --------------------------------------------------------------------------- blocks


class NIN(nn.Module):
    """Per-pixel linear layer ("network in network"); weight stored as ``W: (C_in, C_out)``, bias ``b``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(out_dim))
        nn.init.normal_(self.W, std=in_dim ** -0.5)

    def apply_last(self, x: Tensor) -> Tensor:
        """x: (..., C_in) channels-last -> (..., C_out)."""
        return F.linear(x, self.W.t(), self.b)

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C_in, H, W) -> (B, C_out, H, W)."""
        return self.apply_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class Combine(nn.Module):
    """Merge the input-pyramid image into the features: ``Conv_0(pyramid) + h`` or a concat."""

    def __init__(self, dim1: int, dim2: int, method: Literal["sum", "cat"]) -> None:
        super().__init__()
        self.Conv_0 = nn.Conv2d(dim1, dim2, kernel_size=1)
        self.method = method

    def forward(self, pyramid: Tensor, h: Tensor) -> Tensor:
        """pyramid: (B, dim1, H, W), h: (B, dim2, H, W) -> (B, dim2 or 2*dim2, H, W)."""
        p = self.Conv_0(pyramid)
        return p + h if self.method == "sum" else torch.cat([p, h], dim=1)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels (DDPM style), with a residual connection."""

    def __init__(self, channels: int, skip_rescale: bool) -> None:
        super().__init__()
        self.GroupNorm_0 = group_norm(channels)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor) -> Tensor:
        """x: (B, C, H, W) -> (B, C, H, W)."""
        b, c, h, w = x.shape
        tokens = self.GroupNorm_0(x).flatten(2).transpose(1, 2)          # (B, HW, C)
        q = self.NIN_0.apply_last(tokens)[:, None]
        k = self.NIN_1.apply_last(tokens)[:, None]
        v = self.NIN_2.apply_last(tokens)[:, None]
        attended = F.scaled_dot_product_attention(q, k, v)[:, 0]      # softmax(q kᵀ / sqrt(C)) v
        out = self.NIN_3.apply_last(attended).transpose(1, 2).reshape(b, c, h, w)
        out = x + out
        return out.div_(SKIP_SCALE) if self.skip_rescale else out


class ResnetBlockBigGAN(nn.Module):
    """BigGAN-style residual block, optionally resampling both branches by 2 (FIR or naive).

    ``h = Conv_1(act(GN_1(Conv_0(resample(act(GN_0(x)))) + Dense_0(act(temb)))))``, skip through
    ``Conv_2`` (1x1) when the channel count changes or the block resamples.
    """

    def __init__(self, *, act: Activation, in_ch: int, out_ch: int | None = None, temb_dim: int,
                 up: bool = False, down: bool = False, dropout: float = 0.0, fir: bool = True,
                 fir_kernel: Sequence[float] = (1, 3, 3, 1), skip_rescale: bool = True) -> None:
        super().__init__()
        out_ch = out_ch or in_ch
        if up and down:
            raise ValueError("a residual block resamples up or down, not both")
        self.GroupNorm_0 = group_norm(in_ch)
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1)
        self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = group_norm(out_ch)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = nn.Conv2d(out_ch, out_ch, kernel_size=3, padding=1)
        if in_ch != out_ch or up or down:
            self.Conv_2 = nn.Conv2d(in_ch, out_ch, kernel_size=1)
        else:
            self.Conv_2 = None
        self.resample = Resample("up" if up else "down", fir, fir_kernel) if (up or down) else None
        self.act = act
        self.in_ch, self.out_ch, self.up, self.down = in_ch, out_ch, up, down
        self.skip_rescale = skip_rescale

    def forward(self, x: Tensor, temb_act: Tensor | None) -> Tensor:
        """x: (B, in_ch, H, W); temb_act: (B, temb_dim) = act(temb) or None -> (B, out_ch, H', W')."""
        h = self.act(self.GroupNorm_0(x))
        if self.resample is not None:
            h = self.resample(h)
            x = self.resample(x)
        h = self.Conv_0(h)
        if temb_act is not None:
            h += self.Dense_0(temb_act)[:, :, None, None]
        h = self.act(self.GroupNorm_1(h))
        h = self.Conv_1(self.Dropout_0(h))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        out = x + h
        return out.div_(SKIP_SCALE) if self.skip_rescale else out

    def extra_repr(self) -> str:
        return f"in_ch={self.in_ch}, out_ch={self.out_ch}, up={self.up}, down={self.down}"
