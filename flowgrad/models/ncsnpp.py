"""NCSN++ as used by the Rectified Flow checkpoints (Liu et al.), re-implemented in pure PyTorch.

The module tree, parameter names, shapes and registration order equal upstream's
(``gnobitab/RectifiedFlow`` ``ImageGeneration/models/ncsnpp.py``) so that its checkpoints load
strictly; the state dict has no ``module.`` prefix (the loader strips the one DataParallel adds).

Call convention of the network itself (the velocity adapter in :mod:`.rectified_flow` hides it):
``net(x, time_cond)`` with ``x: (B, C, H, W)`` and ``time_cond = 999 * t``, t in (0, 1].

Supported subset of the upstream options: BigGAN residual blocks; ``progressive`` in
{none, output_skip}; ``progressive_input`` in {none, input_skip}; Fourier or positional time
embedding; FIR or naive resampling. Anything else is refused by :class:`NCSNppConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .ncsnpp_layers import (
    AttnBlock, Combine, GaussianFourierProjection, Resample, ResnetBlockBigGAN, activation, group_norm,
    positional_embedding,
)

__all__ = ["NCSNpp", "NCSNppConfig", "make_sigmas"]

_CHOICES: dict[str, tuple[str, ...]] = {
    "resblock_type": ("biggan",),
    "progressive": ("none", "output_skip"),
    "progressive_input": ("none", "input_skip"),
    "progressive_combine": ("sum", "cat"),
    "embedding_type": ("fourier", "positional"),
    "nonlinearity": ("swish", "relu", "elu", "lrelu"),
}
_UPSTREAM_ONLY: dict[str, str] = {
    "progressive": "residual", "progressive_input": "residual", "resblock_type": "ddpm",
}
_DATA_KEYS = ("image_size", "num_channels", "centered")
# Keys of the upstream ``config.model`` that must hold one specific value (the class hard-codes it).
_FIXED_MODEL_KEYS: dict[str, Any] = {
    "name": "ncsnpp", "normalization": "groupnorm", "attention_type": "ddpm", "conv_size": 3,
}


def _fail(field: str, expected: str, got: Any) -> ValueError:
    return ValueError(f"NCSNppConfig.{field} must be {expected}, got {got!r}")


@dataclass(frozen=True)
class NCSNppConfig:
    """Architecture of an NCSN++ network (the keys upstream's model code reads).

    Defaults are the Rectified Flow CelebA-HQ 256 values. ``dropout`` only matters in training;
    ``resamp_with_conv`` has no effect with BigGAN blocks and ``init_scale`` / ``fourier_scale``
    only affect initialisation, but they are kept so a config round-trips.

    Attributes:
        image_size: H = W of the data.
        num_channels: C of the data (3).
        centered: True if data live in [-1, 1]; False for [0, 1] (the net then maps x -> 2x - 1).
        nf: base channel count.
        ch_mult: channel multiplier per resolution level (level i works at image_size / 2**i).
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_resolutions: resolutions with self-attention.
        embedding_type: ``fourier`` (of log(time_cond)) or ``positional`` (of time_cond).
        scale_by_sigma: divide the output by the noise level (``time_cond`` on the Fourier path).
        sigma_min, sigma_max, num_scales: the ``sigmas`` buffer (geometric, float64).
    """

    image_size: int = 256
    num_channels: int = 3
    centered: bool = True
    nf: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 2, 2, 2)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (16,)
    dropout: float = 0.0
    conditional: bool = True
    fir: bool = True
    fir_kernel: tuple[float, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    resblock_type: str = "biggan"
    progressive: str = "output_skip"
    progressive_input: str = "input_skip"
    progressive_combine: str = "sum"
    embedding_type: str = "fourier"
    fourier_scale: float = 16.0
    nonlinearity: str = "swish"
    scale_by_sigma: bool = True
    sigma_min: float = 0.01
    sigma_max: float = 378.0
    num_scales: int = 2000
    resamp_with_conv: bool = True
    init_scale: float = 0.0

    def __post_init__(self) -> None:
        set_ = self._set
        for name in ("image_size", "num_channels", "nf", "num_res_blocks", "num_scales"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise _fail(name, "a positive integer", value)
        for name in ("centered", "conditional", "fir", "skip_rescale", "scale_by_sigma", "resamp_with_conv"):
            if not isinstance(getattr(self, name), bool):
                raise _fail(name, "a bool (true/false)", getattr(self, name))
        for name in ("ch_mult", "attn_resolutions"):
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
                raise _fail(name, "a list of positive integers", value)
            value = tuple(value)
            if not all(_is_int(v) and v >= 1 for v in value) or (name == "ch_mult" and not value):
                raise _fail(name, "a list of positive integers", list(value))
            set_(name, value)
        taps = self.fir_kernel
        if isinstance(taps, (str, bytes)) or not hasattr(taps, "__iter__"):
            raise _fail("fir_kernel", "a list of at least 2 numbers", taps)
        taps = tuple(taps)
        if len(taps) < 2 or not all(_is_number(v) for v in taps) or sum(taps) == 0:
            raise _fail("fir_kernel", "a list of at least 2 numbers with a nonzero sum", list(taps))
        set_("fir_kernel", taps)
        for name in ("dropout", "fourier_scale", "sigma_min", "sigma_max", "init_scale"):
            value = getattr(self, name)
            if not _is_number(value) or not math.isfinite(value):
                raise _fail(name, "a finite number", value)
            set_(name, float(value))
        if not 0.0 <= self.dropout < 1.0:
            raise _fail("dropout", "in [0, 1)", self.dropout)
        if self.sigma_min <= 0 or self.sigma_max <= 0:
            raise ValueError(f"NCSNppConfig.sigma_min and sigma_max must be positive, got "
                             f"{self.sigma_min} and {self.sigma_max}")
        for name, choices in _CHOICES.items():
            value = getattr(self, name)
            if not isinstance(value, str) or value.lower() not in choices:
                hint = (f" (upstream's {value!r} variant is not implemented here)"
                        if isinstance(value, str) and _UPSTREAM_ONLY.get(name) == value.lower() else "")
                raise ValueError(f"NCSNppConfig.{name}={value!r} is not supported; expected one of "
                                 f"{', '.join(repr(c) for c in choices)}{hint}")
            set_(name, value.lower())
        if self.nf < 4:
            raise _fail("nf", "at least 4 (GroupNorm uses nf // 4 groups)", self.nf)
        factor = 2 ** (len(self.ch_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"NCSNppConfig.image_size={self.image_size} must be divisible by "
                             f"2**(len(ch_mult) - 1) = {factor} (ch_mult has {len(self.ch_mult)} levels)")

    def _set(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)

    @property
    def all_resolutions(self) -> tuple[int, ...]:
        """Resolution of each level: image_size, image_size/2, ..."""
        return tuple(self.image_size // 2 ** i for i in range(len(self.ch_mult)))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NCSNppConfig:
        """Build from upstream's nested layout (``{"data": {...}, "model": {...}}``) or a flat dict.

        In the nested layout, keys the architecture does not read (``training``, ``optim``,
        ``model.ema_rate`` ...) are ignored and missing keys take the defaults; ``model.name``,
        ``normalization``, ``attention_type`` and ``conv_size`` must have the values the class
        hard-codes. A flat dict must use field names only.

        Raises:
            ValueError: on an unknown flat key or an unsupported value (one line).
            TypeError: if ``d`` or its sections are not mappings.
        """
        if not isinstance(d, Mapping):
            raise TypeError(f"NCSNppConfig.from_dict expects a mapping, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        if "model" not in d and "data" not in d:
            unknown = sorted(set(d) - fields)
            if unknown:
                raise ValueError(f"unknown NCSNppConfig key(s) {unknown}; expected the nested upstream layout "
                                 "{'data': {...}, 'model': {...}} or flat field names")
            return cls(**d)
        model, data = d.get("model", {}), d.get("data", {})
        for section, value in (("model", model), ("data", data)):
            if not isinstance(value, Mapping):
                raise TypeError(f"config section {section!r} must be a mapping, got {type(value).__name__}")
        for key, want in _FIXED_MODEL_KEYS.items():
            got = model.get(key, want)
            if (got.lower() if isinstance(got, str) else got) != want:
                raise ValueError(f"config model.{key}={got!r} is not supported; NCSN++ here needs {want!r}")
        kwargs = {k: v for k, v in model.items() if k in fields and k not in _DATA_KEYS}
        kwargs.update({k: v for k, v in data.items() if k in _DATA_KEYS})
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        """Upstream's nested layout (JSON-serialisable); ``from_dict(to_dict())`` gives back ``self``."""
        flat = dataclasses.asdict(self)
        data = {k: flat.pop(k) for k in _DATA_KEYS}
        model = {"name": "ncsnpp"}
        model.update({k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()})
        return {"data": data, "model": model}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def make_sigmas(config: NCSNppConfig) -> Tensor:
    """(num_scales,) float64 geometric noise levels from sigma_max down to sigma_min (the ``sigmas`` buffer)."""
    return torch.exp(torch.linspace(math.log(config.sigma_max), math.log(config.sigma_min),
                                    config.num_scales, dtype=torch.float64))


class NCSNpp(nn.Module):
    """The NCSN++ U-Net. ``forward(x, time_cond)`` returns the Rectified Flow velocity.

    The state dict starts with the float64 ``sigmas`` buffer, then ``all_modules.<i>.*`` in
    upstream order; ``all_modules.0.W`` (Fourier features) is a frozen parameter.
    """

    def __init__(self, config: NCSNppConfig) -> None:
        super().__init__()
        if not isinstance(config, NCSNppConfig):
            raise TypeError(f"config must be an NCSNppConfig, got {type(config).__name__}")
        self.config = c = config
        self.act = activation(c.nonlinearity)
        self.register_buffer("sigmas", make_sigmas(c))
        nf, levels = c.nf, len(c.ch_mult)
        self.attn_levels = frozenset(i for i, r in enumerate(c.all_resolutions) if r in c.attn_resolutions)
        temb_dim = 4 * nf

        modules: list[nn.Module] = []
        if c.embedding_type == "fourier":
            modules.append(GaussianFourierProjection(nf, c.fourier_scale))
            embed_dim = 2 * nf
        else:
            embed_dim = nf
        if c.conditional:
            modules += [nn.Linear(embed_dim, temb_dim), nn.Linear(temb_dim, temb_dim)]

        def block(in_ch: int, out_ch: int | None = None, **kw: bool) -> ResnetBlockBigGAN:
            return ResnetBlockBigGAN(act=self.act, in_ch=in_ch, out_ch=out_ch, temb_dim=temb_dim,
                                     dropout=c.dropout, fir=c.fir, fir_kernel=c.fir_kernel,
                                     skip_rescale=c.skip_rescale, **kw)

        def attn(channels: int) -> AttnBlock:
            return AttnBlock(channels, skip_rescale=c.skip_rescale)

        if c.progressive == "output_skip":
            self.pyramid_upsample = Resample("up", c.fir, c.fir_kernel)
        if c.progressive_input == "input_skip":
            self.pyramid_downsample = Resample("down", c.fir, c.fir_kernel)

        channels = c.num_channels
        modules.append(nn.Conv2d(channels, nf, kernel_size=3, padding=1))
        skip_channels = [nf]
        in_ch = nf
        for level in range(levels):                       # down path
            for _ in range(c.num_res_blocks):
                out_ch = nf * c.ch_mult[level]
                modules.append(block(in_ch, out_ch))
                in_ch = out_ch
                if level in self.attn_levels:
                    modules.append(attn(in_ch))
                skip_channels.append(in_ch)
            if level != levels - 1:
                modules.append(block(in_ch, down=True))
                if c.progressive_input == "input_skip":
                    modules.append(Combine(channels, in_ch, c.progressive_combine))
                    if c.progressive_combine == "cat":
                        in_ch *= 2
                skip_channels.append(in_ch)

        in_ch = skip_channels[-1]                          # middle
        modules += [block(in_ch), attn(in_ch), block(in_ch)]

        for level in reversed(range(levels)):             # up path
            for _ in range(c.num_res_blocks + 1):
                out_ch = nf * c.ch_mult[level]
                modules.append(block(in_ch + skip_channels.pop(), out_ch))
                in_ch = out_ch
            if level in self.attn_levels:
                modules.append(attn(in_ch))
            if c.progressive == "output_skip":
                modules += [group_norm(in_ch), nn.Conv2d(in_ch, channels, kernel_size=3, padding=1)]
            if level != 0:
                modules.append(block(in_ch, up=True))
        if skip_channels:  # pragma: no cover - construction invariant
            raise RuntimeError("NCSN++ construction left unused skip connections")
        if c.progressive != "output_skip":
            modules += [group_norm(in_ch), nn.Conv2d(in_ch, channels, kernel_size=3, padding=1)]
        self.all_modules = nn.ModuleList(modules)

    def _check_inputs(self, x: Tensor, time_cond: Tensor) -> None:
        c = self.config
        expected = (c.num_channels, c.image_size, c.image_size)
        if not isinstance(x, Tensor) or x.dim() != 4 or tuple(x.shape[1:]) != expected:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"NCSNpp input x must have shape (B, {', '.join(map(str, expected))}), got {got}")
        if not isinstance(time_cond, Tensor) or tuple(time_cond.shape) != (x.shape[0],):
            got = tuple(time_cond.shape) if isinstance(time_cond, Tensor) else type(time_cond).__name__
            raise ValueError(f"NCSNpp time_cond must have shape (B,) = ({x.shape[0]},), got {got}")

    def forward(self, x: Tensor, time_cond: Tensor) -> Tensor:
        """Velocity of the Rectified Flow ODE.

        Args:
            x: (B, C, H, W) state; in [-1, 1] data space if ``centered`` else [0, 1].
            time_cond: (B,) ``999 * t`` (must be > 0 with the Fourier embedding, which takes its log).

        Returns:
            (B, C, H, W) dx/dt.
        """
        self._check_inputs(x, time_cond)
        c = self.config
        modules = iter(self.all_modules)
        if c.embedding_type == "fourier":
            used_sigmas = time_cond
            temb = next(modules)(torch.log(time_cond))
        else:
            used_sigmas = None
            if c.scale_by_sigma:   # float64 buffer; keep the output in float32 (float64 for a float64 x)
                used_sigmas = self.sigmas[time_cond.long()].to(torch.promote_types(x.dtype, torch.float32))
            temb = positional_embedding(time_cond, c.nf)
        temb_act = None
        if c.conditional:
            temb = temb.to(x.dtype)
            temb = next(modules)(temb)
            temb = next(modules)(self.act(temb))
            temb_act = self.act(temb)      # every residual block applies act() to temb first

        if not c.centered:
            x = 2 * x - 1.0
        input_pyramid = x

        hs = [next(modules)(x)]
        levels = len(c.ch_mult)
        for level in range(levels):
            for _ in range(c.num_res_blocks):
                h = next(modules)(hs[-1], temb_act)
                if level in self.attn_levels:
                    h = next(modules)(h)
                hs.append(h)
            if level != levels - 1:
                h = next(modules)(hs[-1], temb_act)
                if c.progressive_input == "input_skip":
                    input_pyramid = self.pyramid_downsample(input_pyramid)
                    h = next(modules)(input_pyramid, h)
                hs.append(h)

        h = next(modules)(hs[-1], temb_act)
        h = next(modules)(h)
        h = next(modules)(h, temb_act)

        pyramid = None
        for level in reversed(range(levels)):
            for _ in range(c.num_res_blocks + 1):
                h = next(modules)(torch.cat([h, hs.pop()], dim=1), temb_act)
            if level in self.attn_levels:
                h = next(modules)(h)
            if c.progressive == "output_skip":
                norm, conv = next(modules), next(modules)
                out = conv(self.act(norm(h)))
                pyramid = out if pyramid is None else self.pyramid_upsample(pyramid) + out
            if level != 0:
                h = next(modules)(h, temb_act)

        if c.progressive == "output_skip":
            h = pyramid
        else:
            norm, conv = next(modules), next(modules)
            h = conv(self.act(norm(h)))

        if c.scale_by_sigma:
            h = h / used_sigmas.reshape(-1, *([1] * (h.dim() - 1)))
        return h
