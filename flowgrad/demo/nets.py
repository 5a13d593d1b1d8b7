"""Networks of the demo world: the velocity UNet and the factor judge.

Both are deliberately small: the velocity net must run a FlowGrad edit on a laptop CPU, and the
judge only has to read factors off 64x64 renders.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetConfig", "DemoUNet", "JudgeConfig", "JudgeNet"]


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of the demo velocity UNet.

    The 64x64 input is folded 2x2 into channels (pixel unshuffle), so the UNet works at 32, 16 and 8
    pixels; self-attention runs at the lowest resolution.
    """

    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128, 192)
    blocks_per_level: int = 1
    patch: int = 2
    time_dim: int = 128
    attention_heads: int = 4
    groups: int = 8

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        d = dict(d)
        d["channels"] = tuple(d["channels"])
        return cls(**d)


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """(B,) times in [0, 1] -> (B, dim) sinusoidal features of 1000·t."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, time_dim: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(time_dim, 2 * cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.temb(temb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.out = nn.Conv2d(channels, channels, 1)
        self.heads = heads
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.out(out.transpose(-1, -2).reshape(b, c, h, w))


class DemoUNet(nn.Module):
    """Velocity network v(x, t) for 64x64 RGB in [-1, 1]; t (B,) in [0, 1] (0 noise, 1 data)."""

    def __init__(self, config: UNetConfig = UNetConfig()) -> None:
        super().__init__()
        self.config = config
        ch, p, td, g = config.channels, config.patch, config.time_dim, config.groups
        self.time_mlp = nn.Sequential(nn.Linear(td, td), nn.SiLU(), nn.Linear(td, td))
        self.stem = nn.Conv2d(3 * p * p, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        skips = [ch[0]]
        cur = ch[0]
        for i, c in enumerate(ch):
            for _ in range(config.blocks_per_level):
                self.down.append(ResBlock(cur, c, td, g))
                cur = c
                skips.append(cur)
            if i < len(ch) - 1:
                self.downsample.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid1 = ResBlock(cur, cur, td, g)
        self.mid_attn = Attention(cur, config.attention_heads, g)
        self.mid2 = ResBlock(cur, cur, td, g)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, c in reversed(list(enumerate(ch))):
            for _ in range(config.blocks_per_level + 1):
                self.up.append(ResBlock(cur + skips.pop(), c, td, g))
                cur = c
            if i > 0:
                self.upsample.append(nn.Conv2d(cur, cur, 3, padding=1))
        self.out_norm = nn.GroupNorm(min(g, cur), cur)
        self.out = nn.Conv2d(cur, 3 * p * p, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        cfg = self.config
        temb = self.time_mlp(timestep_embedding(t, cfg.time_dim).to(x.dtype))
        h = self.stem(F.pixel_unshuffle(x, cfg.patch))
        hs = [h]
        blocks = iter(self.down)
        for i in range(len(cfg.channels)):
            for _ in range(cfg.blocks_per_level):
                h = next(blocks)(h, temb)
                hs.append(h)
            if i < len(cfg.channels) - 1:
                h = self.downsample[i](h)
                hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        blocks = iter(self.up)
        for j, i in enumerate(reversed(range(len(cfg.channels)))):
            for _ in range(cfg.blocks_per_level + 1):
                h = next(blocks)(torch.cat([h, hs.pop()], dim=1), temb)
            if i > 0:
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        return F.pixel_shuffle(self.out(F.silu(self.out_norm(h))), cfg.patch)


@dataclass(frozen=True)
class JudgeConfig:
    """Architecture of the factor judge: a plain strided CNN with one output per factor."""

    factors: tuple[str, ...] = ()
    binary: tuple[bool, ...] = ()
    channels: tuple[int, ...] = (32, 64, 128, 256)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> JudgeConfig:
        return cls(factors=tuple(d["factors"]), binary=tuple(d["binary"]), channels=tuple(d["channels"]))


class JudgeNet(nn.Module):
    """Regresses every factor from a (B, 3, 64, 64) image in [0, 1]; outputs (B, n_factors) in [0, 1]."""

    def __init__(self, config: JudgeConfig) -> None:
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        cin = 3
        for c in config.channels:
            layers += [nn.Conv2d(cin, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c), nn.SiLU(), nn.AvgPool2d(2)]
            cin = c
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(cin * 16, 256), nn.SiLU(),
                                  nn.Linear(256, len(config.factors)))

    def logits(self, images: Tensor) -> Tensor:
        return self.head(self.features(images * 2.0 - 1.0))

    def forward(self, images: Tensor) -> Tensor:
        return torch.sigmoid(self.logits(images))
