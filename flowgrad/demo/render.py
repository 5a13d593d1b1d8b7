"""The demo world: procedural cartoon portraits rendered from known factors.

No pretrained face model can be downloaded where flowgrad is developed and tested, so the demo
models (a small rectified flow, a tiny CLIP and a factor judge) are trained on this renderer's
output. Every image is a deterministic function of a factor vector and a texture seed, so an edit
can be measured by how far the judged target factor moves and how little the others leak.

Geometry lives in normalised canvas coordinates ``x, y`` in [-1, 1] (``y`` grows downwards) and in
head-local coordinates ``u, v`` (the canvas shifted to the head centre and rotated by the tilt).
Every part is a soft mask of a signed distance, drawn at ``size * supersample`` pixels and
average-pooled down. Parts are drawn only inside static windows that contain them for every head
offset and tilt, which keeps the renderer fast on one CPU core.

Determinism: image ``i`` of seed ``s`` depends only on ``(s, i)`` and its factors. Random numbers
come from a counter-based integer hash of ``(seed, index, stream, cell)`` (no generator state), and
rendering uses only correctly rounded float operations, so on the CPU image ``i`` is bitwise the same
whether it is rendered in a batch of 10 or of 100.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "FACTORS", "FACTOR_NAMES", "HAIR_COLORS", "FactorSpec", "factor_spec", "render",
    "render_factors", "sample_factors",
]


@dataclass(frozen=True)
class FactorSpec:
    """One factor of the demo world.

    Attributes:
        name: key in factor dicts.
        kind: ``"continuous"`` (values in [0, 1]) or ``"binary"`` (values exactly 0 or 1).
        description: what the factor does to the image, at 0 and at 1.
        p: sampling probability of 1 for a binary factor (unused for continuous ones).
    """

    name: str
    kind: Literal["continuous", "binary"]
    description: str
    p: float = 0.5


HUE_SPAN = 0.8
"""Hue factors cover hues [0, 0.8] (red to blue-violet), so a hue factor is a line, not a circle, and
the judge can regress it."""

HAIR_COLORS: tuple[str, ...] = ("hair_black", "hair_brown", "hair_blond", "hair_red")
"""One-hot hair colour factors: exactly one of them is 1 in every image."""

FACTORS: tuple[FactorSpec, ...] = (
    FactorSpec("age", "continuous",
               "0 young (smooth skin, full hair) .. 1 old, in stages: nasolabial and mouth-corner "
               "folds from 0.15, forehead lines from 0.3, grey strands in hair/brows/beard from 0.35 "
               "(mean grey mix at most 55%, so the hair colour stays identifiable), crow's feet and "
               "eye bags from 0.4, receding hairline from 0.45; skin turns paler throughout"),
    FactorSpec("smile", "continuous",
               "0 slightly sad (mouth corners down) .. 0.3 flat mouth .. 1 big wide smile, open with "
               "teeth from 0.5, rosy raised cheeks and smile lines at the corners"),
    FactorSpec("glasses", "binary", "rectangular glasses frames with tinted lenses", p=0.4),
    FactorSpec("glasses_frame", "continuous",
               "frame colour along black, dark red, blue, gold; 0 when glasses is 0"),
    FactorSpec("beard", "binary",
               "beard over jaw, chin and upper lip in the hair colour, darkened to stay darker than "
               "the skin", p=0.35),
    FactorSpec("beard_density", "continuous",
               "0 sparse speckled stubble .. 1 thick, dark beard growing past the jaw and up the "
               "cheeks; 0 when beard is 0"),
    FactorSpec("hair_black", "binary", "hair (and brows, beard) colour is black", p=0.25),
    FactorSpec("hair_brown", "binary", "hair (and brows, beard) colour is brown", p=0.25),
    FactorSpec("hair_blond", "binary", "hair (and brows, beard) colour is blond", p=0.25),
    FactorSpec("hair_red", "binary", "hair (and brows, beard) colour is red", p=0.25),
    FactorSpec("hair_length", "continuous",
               "0 short cropped hair .. 1 long hair falling past the chin onto the shoulders"),
    FactorSpec("skin_tone", "continuous", "0 light .. 1 dark skin"),
    FactorSpec("face_width", "continuous", "0 narrow .. 1 wide head (eye spacing follows)"),
    FactorSpec("eye_openness", "continuous", "0 nearly closed .. 1 wide open eyes"),
    FactorSpec("background_hue", "continuous",
               "hue of the background along red, yellow, green, cyan, blue (0 red .. 1 blue-violet; not circular)"),
    FactorSpec("background_brightness", "continuous", "0 dark .. 1 bright background"),
    FactorSpec("clothing_hue", "continuous",
               "hue of the V-neck shirt along red, yellow, green, cyan, blue (0 red .. 1 blue-violet; not circular)"),
    FactorSpec("offset_x", "continuous", "head position, 0 left .. 0.5 centred .. 1 right (±2.6 px)"),
    FactorSpec("offset_y", "continuous", "head position, 0 up .. 0.5 centred .. 1 down (±1.9 px)"),
    FactorSpec("tilt", "continuous", "head roll of up to 8 degrees either way, 0.5 upright"),
)
"""All factors, in a fixed order (the factor judge regresses them in this order)."""

FACTOR_NAMES: tuple[str, ...] = tuple(f.name for f in FACTORS)
_SPECS = {f.name: f for f in FACTORS}
_GATED = {"glasses_frame": "glasses", "beard_density": "beard"}  # value factor -> its binary gate


def factor_spec(name: str) -> FactorSpec:
    """The :class:`FactorSpec` called ``name``; ValueError listing the known names otherwise."""
    if name not in _SPECS:
        raise ValueError(f"unknown factor {name!r}; known factors: {', '.join(FACTOR_NAMES)}")
    return _SPECS[name]


# ----------------------------------------------------------------------------------------------
# Counter-based random numbers: uniform(seed, index, stream, cell) via a 32-bit integer hash.
# All products stay below 2**63, so int64 arithmetic never overflows.

_M32 = 0xFFFFFFFF
_STREAM_FACTOR = 1_000  # + factor index
_STREAM_TEXTURE = 2_000  # + texture id


def _mix(x: Tensor) -> Tensor:
    """32-bit avalanche hash of an int64 tensor with values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _mix_int(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)


def _stream_key(seed: int, stream: int) -> int:
    key = _mix_int(seed & _M32)
    key = _mix_int(key ^ ((seed >> 32) & _M32))
    return _mix_int(key ^ stream)


def _uniform(seed: int, stream: int, index: Tensor, cells: int = 0) -> Tensor:
    """Uniform [0, 1) float32 numbers, a pure function of (seed, stream, index, cell).

    Args:
        index: (m,) int64 image indices.
        cells: 0 for one number per image, else the number of numbers per image.

    Returns:
        (m,) if ``cells == 0`` else (m, cells).
    """
    h = _mix(index ^ _stream_key(seed, stream))
    if cells:
        cell = torch.arange(cells, dtype=torch.int64, device=index.device)
        h = _mix(h[:, None] ^ ((cell * 0x9E3779B1) & _M32))
    return (h >> 8).to(torch.float32) * (1.0 / (1 << 24))


# ----------------------------------------------------------------------------------------------
# Factors.

def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _as_column(name: str, value: object, n: int, device: torch.device) -> Tensor:
    """A user-given factor value as an (n,) float32 tensor, validated."""
    try:
        col = torch.as_tensor(value, dtype=torch.float32).to(device)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"factor {name!r} must be a number or a tensor of shape ({n},), "
                        f"got {type(value).__name__}") from err
    if col.dim() == 0:
        col = col.expand(n)
    if tuple(col.shape) != (n,):
        raise ValueError(f"factor {name!r} must have shape ({n},) (or be a scalar), "
                         f"got {tuple(col.shape)}")
    if not bool(torch.isfinite(col).all()) or bool(((col < 0) | (col > 1)).any()):
        raise ValueError(f"factor {name!r} must lie in [0, 1], got values in "
                         f"[{col.min().item():.4g}, {col.max().item():.4g}]")
    if _SPECS[name].kind == "binary" and not bool(((col == 0) | (col == 1)).all()):
        raise ValueError(f"binary factor {name!r} must be exactly 0 or 1")
    return col.clone()


def _hair_colours(given: dict[str, Tensor], u: Tensor) -> dict[str, Tensor]:
    """Complete the one-hot hair colour group from a (possibly empty) given subset.

    Rows where a given colour is 1 get 0 elsewhere; other rows pick uniformly (with ``u``) among
    the colours not given.
    """
    n = u.shape[0]
    given_sum = sum((given[c] for c in given), torch.zeros(n, device=u.device))
    if bool((given_sum > 1).any()):
        raise ValueError(f"at most one of {', '.join(HAIR_COLORS)} may be 1 per image")
    missing = [c for c in HAIR_COLORS if c not in given]
    if not missing:
        if bool((given_sum != 1).any()):
            raise ValueError(f"exactly one of {', '.join(HAIR_COLORS)} must be 1 per image; "
                             "pass a subset to let the others be sampled")
        return dict(given)
    pick = (u * len(missing)).floor().clamp(max=len(missing) - 1)
    out = dict(given)
    for k, name in enumerate(missing):
        out[name] = ((pick == k) & (given_sum == 0)).to(torch.float32)
    return out


def sample_factors(n: int, seed: int, *, factors: Mapping[str, object] | None = None,
                   device: torch.device | str = "cpu") -> dict[str, Tensor]:
    """Sample the factors of ``n`` portraits; entries in ``factors`` override the sampled ones.

    Continuous factors are Uniform(0, 1), binary ones Bernoulli(``spec.p``), hair colour is one of
    four uniformly, all independent. Factor ``j`` of image ``i`` depends only on ``(seed, i, j)``,
    so overriding one factor leaves the others of the same seed unchanged.

    Gates: ``glasses_frame`` is 0 where ``glasses`` is 0 and ``beard_density`` is 0 where ``beard``
    is 0. Giving a gated value factor without its gate sets the gate to 1; giving a gate of 0 with a
    nonzero value is an error. Giving a subset of the hair colours completes the one-hot group.

    Args:
        n: number of images.
        seed: any Python int.
        factors: optional overrides, name -> scalar or (n,) tensor in [0, 1].
        device: device of the returned tensors.

    Returns:
        name -> (n,) float32 tensor for every name in :data:`FACTOR_NAMES`, in that order.
    """
    n = _check_int("n", n, 0)
    seed = _check_int("seed", seed, -(1 << 63))
    device = torch.device(device)
    given = dict(factors or {})
    unknown = sorted(set(given) - set(FACTOR_NAMES))
    if unknown:
        raise ValueError(f"unknown factor(s) {unknown}; known factors: {', '.join(FACTOR_NAMES)}")
    given = {k: _as_column(k, v, n, device) for k, v in given.items()}
    index = torch.arange(n, dtype=torch.int64, device=device)
    out: dict[str, Tensor] = {}
    for j, spec in enumerate(FACTORS):
        if spec.name in HAIR_COLORS:
            continue
        if spec.name in given:
            out[spec.name] = given[spec.name]
            continue
        u = _uniform(seed, _STREAM_FACTOR + j, index)
        out[spec.name] = (u < spec.p).to(torch.float32) if spec.kind == "binary" else u
    for value_name, gate_name in _GATED.items():
        if value_name in given:
            if gate_name not in given:
                out[gate_name] = torch.ones(n, device=device)
            elif bool(((out[gate_name] == 0) & (out[value_name] != 0)).any()):
                raise ValueError(f"{value_name} must be 0 where {gate_name} is 0; pass {gate_name}=1 "
                                 f"or leave {value_name} out")
        out[value_name] = out[value_name] * out[gate_name]
    hair_u = _uniform(seed, _STREAM_FACTOR + FACTOR_NAMES.index(HAIR_COLORS[0]), index)
    hair = _hair_colours({k: v for k, v in given.items() if k in HAIR_COLORS}, hair_u)
    out.update(hair)
    return {name: out[name] for name in FACTOR_NAMES}


def _check_factors(factors: Mapping[str, Tensor]) -> int:
    """Validate a complete factor dict (as from :func:`sample_factors`); returns n."""
    if not isinstance(factors, Mapping):
        raise TypeError(f"factors must be a mapping name -> (n,) tensor, got {type(factors).__name__}")
    missing = [k for k in FACTOR_NAMES if k not in factors]
    unknown = sorted(set(factors) - set(FACTOR_NAMES))
    if missing or unknown:
        raise ValueError(f"factors must have exactly the keys of FACTOR_NAMES; missing {missing}, "
                         f"unknown {unknown}; use sample_factors(n, seed, factors=...) to complete them")
    n = int(torch.as_tensor(factors[FACTOR_NAMES[0]]).reshape(-1).shape[0])
    for name in FACTOR_NAMES:
        _as_column(name, factors[name], n, torch.device("cpu"))
    hair_sum = sum(torch.as_tensor(factors[c], dtype=torch.float32).cpu() for c in HAIR_COLORS)
    if bool((hair_sum != 1).any()):
        raise ValueError(f"exactly one of {', '.join(HAIR_COLORS)} must be 1 per image")
    return n


# ----------------------------------------------------------------------------------------------
# Geometry constants (normalised canvas units: the canvas spans [-1, 1]).

_SCALE = 1.22            # canvas units per head-local unit (how large the head is drawn)
_HEAD_Y = -0.1           # head centre y when offset_y = 0.5
_SHIFT_X = 0.08          # max head shift in x (offset_x = 0 or 1)
_SHIFT_Y = 0.06          # max head shift in y
_TILT = math.radians(8)  # max head roll
_HEAD_B = 0.47           # head half-height
_EYE_Y = -0.03
_MOUTH_Y = 0.30
_CHUNK = 16              # images drawn together on the CPU (keeps the working set in cache)
_CHUNK_ACCELERATOR = 512  # images drawn together elsewhere (fewer kernel launches)

_HAIR_RGB = ((0.10, 0.08, 0.08), (0.43, 0.25, 0.12), (0.93, 0.80, 0.45), (0.80, 0.30, 0.10))
_GREY_RGB = (0.80, 0.80, 0.82)
_SKIN_STOPS = ((0.99, 0.87, 0.77), (0.84, 0.64, 0.48), (0.43, 0.28, 0.18))
_FRAME_STOPS = ((0.04, 0.04, 0.05), (0.62, 0.08, 0.10), (0.10, 0.30, 0.85), (0.92, 0.75, 0.15))
_IRIS_RGB = (0.30, 0.20, 0.10)
_LIP_RGB = (0.80, 0.30, 0.32)
_LIP_LINE_RGB = (0.36, 0.08, 0.10)
_MOUTH_RGB = (0.30, 0.04, 0.07)
_TEETH_RGB = (0.98, 0.97, 0.94)
_BLUSH_RGB = (0.95, 0.42, 0.45)
_LENS_RGB = (0.75, 0.85, 0.95)

_BEARD_DARK = 0.7        # beard colour relative to hair colour ...
_BEARD_CONTRAST = 0.6    # ... but at most this fraction of the skin's luma, so beards always show
_MAX_GREY = 0.55          # mean grey mix at age 1 (hair colour stays identifiable)


def _smoothstep(lo: float, hi: float, x: Tensor) -> Tensor:
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _palette(t: Tensor, stops: tuple[tuple[float, float, float], ...]) -> Tensor:
    """Piecewise-linear colour map. t: (m,) in [0, 1] -> (m, 3)."""
    table = torch.tensor(stops, dtype=torch.float32, device=t.device)
    pos = t * (len(stops) - 1)
    i0 = pos.floor().clamp(max=len(stops) - 2)
    frac = (pos - i0)[:, None]
    i0 = i0.long()
    return table[i0] * (1.0 - frac) + table[i0 + 1] * frac


def _hsv(h: Tensor, s: float | Tensor, v: float | Tensor) -> Tensor:
    """HSV -> RGB with arithmetic only. h: (m,) -> (m, 3)."""
    out = []
    for k0 in (5.0, 3.0, 1.0):
        k = torch.remainder(k0 + h * 6.0, 6.0)
        out.append(v - v * s * torch.minimum(k, 4.0 - k).clamp(0.0, 1.0))
    return torch.stack(out, dim=1)


def _rgb(c: tuple[float, float, float], device: torch.device) -> Tensor:
    return torch.tensor(c, dtype=torch.float32, device=device).view(1, 3, 1, 1)


def _fill(d: Tensor, aa: float) -> Tensor:
    """Soft coverage of a signed distance (negative inside), one render pixel wide. In place."""
    return d.mul_(-1.0 / aa).add_(0.5).clamp_(0.0, 1.0)


def _seg(u: Tensor, v: Tensor, a: tuple[float, float], b: tuple[float, float]) -> Tensor:
    """Distance from (u, v) to the segment a-b."""
    bu, bv = b[0] - a[0], b[1] - a[1]
    pu, pv = u - a[0], v - a[1]
    h = ((pu * bu + pv * bv) * (1.0 / (bu * bu + bv * bv))).clamp_(0.0, 1.0)
    return torch.sqrt((pu - h * bu).square_() + (pv - h * bv).square_())


@lru_cache(maxsize=64)
def _window(res: int, u0: float, u1: float, v0: float, v1: float) -> tuple[slice, slice]:
    """Static (rows, cols) pixel window containing the head-local box for every offset and tilt."""
    xs, ys = [], []
    for k in range(9):
        th = _TILT * (k / 4.0 - 1.0)
        c, s = math.cos(th), math.sin(th)
        for u in (u0 * _SCALE, u1 * _SCALE):
            for v in (v0 * _SCALE, v1 * _SCALE):
                xs.append(c * u - s * v)
                ys.append(s * u + c * v)
    x_lo, x_hi = min(xs) - _SHIFT_X, max(xs) + _SHIFT_X
    y_lo, y_hi = min(ys) + _HEAD_Y - _SHIFT_Y, max(ys) + _HEAD_Y + _SHIFT_Y

    def px(t: float) -> float:
        return (t + 1.0) * 0.5 * res

    def span(lo: float, hi: float) -> slice:
        a = max(0, int(math.floor(px(lo) - 2)) // 8 * 8)
        b = min(res, -(-int(math.ceil(px(hi) + 2)) // 8) * 8)
        return slice(a, b)

    return span(y_lo, y_hi), span(x_lo, x_hi)


@dataclass(frozen=True)
class _Look:
    """Per-image drawing parameters derived from factors; tensors are (m, 1, 1, 1) or (m, 3, 1, 1)."""

    cx: Tensor
    cy: Tensor
    cos: Tensor
    sin: Tensor
    a: Tensor             # head half-width
    skin: Tensor
    hair: Tensor          # base hair colour
    hair_len: Tensor
    grey: Tensor          # mean grey mix of hair, brows and beard
    folds: Tensor         # nasolabial and mouth-corner lines (appear first)
    forehead: Tensor      # forehead lines
    crows: Tensor         # crow's feet and eye bags (appear last)
    recede: Tensor        # hairline recession
    smile: Tensor
    open_mouth: Tensor
    eye_h: Tensor         # eye half-height
    glasses: Tensor
    frame: Tensor
    beard: Tensor
    density: Tensor
    beard_dark: Tensor    # beard colour = hair colour * beard_dark (kept darker than the skin)
    background: Tensor
    clothing: Tensor


def _look(f: Mapping[str, Tensor]) -> _Look:
    """Drawing parameters of a chunk from its (m,) factor columns."""

    def col(name: str) -> Tensor:
        return f[name].view(-1, 1, 1, 1)

    m = f["age"].shape[0]
    age = col("age")
    th = (col("tilt") - 0.5) * (2.0 * _TILT)
    th2 = th * th
    cos = 1.0 - th2 * (0.5 - th2 * (1.0 / 24.0))  # Taylor series: arithmetic only, exact to 1e-9 here
    sin = th * (1.0 - th2 * ((1.0 / 6.0) - th2 * (1.0 / 120.0)))
    hair_rgb = torch.tensor(_HAIR_RGB, dtype=torch.float32, device=age.device)
    onehot = torch.stack([f[c] for c in HAIR_COLORS], dim=1)
    skin = _palette(f["skin_tone"], _SKIN_STOPS).view(m, 3, 1, 1)
    pale = 0.3 * age
    skin = skin + pale * (skin.mean(dim=1, keepdim=True) + 0.06 - skin)
    bright = 0.32 + 0.63 * f["background_brightness"]
    smile = col("smile")
    hair = (onehot[:, :, None] * hair_rgb).sum(dim=1).view(m, 3, 1, 1)  # exact, no matmul
    grey = _MAX_GREY * _smoothstep(0.35, 1.0, age)
    mean_hair = hair + grey * (torch.tensor(_GREY_RGB, device=age.device).view(1, 3, 1, 1) - hair)
    luma = torch.tensor((0.3, 0.59, 0.11), device=age.device).view(1, 3, 1, 1)
    hair_luma = (mean_hair * luma).sum(dim=1, keepdim=True)
    skin_luma = (skin * luma).sum(dim=1, keepdim=True)
    return _Look(
        cx=(col("offset_x") - 0.5) * (2.0 * _SHIFT_X),
        cy=_HEAD_Y + (col("offset_y") - 0.5) * (2.0 * _SHIFT_Y),
        cos=cos, sin=sin,
        a=0.33 + 0.11 * col("face_width"),
        skin=skin,
        hair=hair,
        hair_len=col("hair_length"),
        grey=grey,
        folds=0.85 * _smoothstep(0.15, 0.7, age),
        forehead=0.85 * _smoothstep(0.3, 0.8, age),
        crows=0.85 * _smoothstep(0.4, 0.9, age),
        recede=_smoothstep(0.45, 1.0, age),
        smile=smile,
        open_mouth=_smoothstep(0.5, 0.9, smile),
        eye_h=0.058 * (0.12 + 0.88 * col("eye_openness")),
        glasses=col("glasses"),
        frame=_palette(f["glasses_frame"], _FRAME_STOPS).view(m, 3, 1, 1),
        beard=col("beard"),
        density=col("beard_density"),
        beard_dark=(_BEARD_CONTRAST * skin_luma / hair_luma).clamp(max=_BEARD_DARK),
        background=_hsv(HUE_SPAN * f["background_hue"], 0.45, bright).view(m, 3, 1, 1),
        clothing=_hsv(HUE_SPAN * f["clothing_hue"], 0.55, 0.58).view(m, 3, 1, 1),
    )


class _Painter:
    """Draws one chunk of portraits on a (m, 3, R, R) canvas."""

    def __init__(self, look: _Look, seed: int, index: Tensor, res: int) -> None:
        self.p = look
        self.seed = seed
        self.index = index
        self.res = res
        self.aa = 2.0 / (res * _SCALE)  # one render pixel in head-local units
        dev = index.device
        self.dev = dev
        m = index.shape[0]
        grid = (torch.arange(res, dtype=torch.float32, device=dev) + 0.5) * (2.0 / res) - 1.0
        self.x = grid.view(1, 1, 1, res)
        self.y = grid.view(1, 1, res, 1)
        dx = self.x - look.cx
        dy = self.y - look.cy
        self.u = (look.cos * dx + look.sin * dy) * (1.0 / _SCALE)
        self.v = (look.cos * dy - look.sin * dx) * (1.0 / _SCALE)
        shade = 1.06 - 0.12 * (self.y + 1.0)
        self._hair_rgb: Tensor | None = None
        self.canvas = (look.background * shade).expand(m, 3, res, res).contiguous()

    # -- helpers --------------------------------------------------------------------------------
    def uv(self, box: tuple[float, float, float, float]) -> tuple[Tensor, Tensor, tuple[slice, slice]]:
        win = _window(self.res, *box)
        return self.u[..., win[0], win[1]], self.v[..., win[0], win[1]], win

    def paint(self, win: tuple[slice, slice], color: Tensor, alpha: Tensor) -> None:
        self.canvas[..., win[0], win[1]].lerp_(color, alpha)

    def noise(self, texture: int, rows: int, cols: int, size: tuple[int, int],
              mode: Literal["nearest", "bilinear"]) -> Tensor:
        """(m, 1, *size) value noise of the given grid resolution, fixed per (seed, image)."""
        m = self.index.shape[0]
        g = _uniform(self.seed, _STREAM_TEXTURE + texture, self.index, rows * cols)
        g = g.view(m, 1, rows, cols)
        if (rows, cols) == tuple(size):
            return g
        if mode == "nearest":
            return F.interpolate(g, size=size, mode="nearest")
        return F.interpolate(g, size=size, mode="bilinear", align_corners=False)

    def hair_colour(self, win: tuple[slice, slice], dark: float | Tensor = 1.0) -> Tensor:
        """(m, 3, h, w) hair colour inside a canvas window: strands, greyed with age.

        One strand texture serves both shading and greying (the lighter strands turn grey first);
        the grey mix averages ``p.grey``. Computed once per chunk on the whole canvas.
        """
        if self._hair_rgb is None:
            strands = self.noise(0, 6, 48, (self.res, self.res), "bilinear")
            greyed = (strands * 1.4 + 0.3).mul_(self.p.grey).clamp_(max=1.0)
            base = self.p.hair * (0.8 + 0.4 * strands)
            grey = _rgb(_GREY_RGB, self.dev) * (0.85 + 0.25 * strands)
            self._hair_rgb = base.lerp_(grey, greyed)
        colour = self._hair_rgb[..., win[0], win[1]]
        return colour if isinstance(dark, float) and dark == 1.0 else colour * dark

    # -- layers, back to front -----------------------------------------------------------------
    def clothing(self) -> None:
        """Shirt: a wide ellipse at the bottom, following the head's x offset halfway."""
        p = self.p
        rows = slice(int(self.res * 0.8) // 8 * 8, self.res)
        win = (rows, slice(0, self.res))
        x = self.x - 0.6 * p.cx
        y = self.y[..., rows, :]
        k = torch.sqrt((x * (1.0 / 0.95)).square() + ((y - 1.27) * (1.0 / 0.6)).square())
        alpha = _fill((k - 1.0).mul_(0.6), self.aa * _SCALE)  # canvas units here
        shade = 1.0 - 0.25 * (x * x)
        self.paint(win, p.clothing * shade, alpha)

    def hair_back(self) -> None:
        """Hair behind the head: a rounded box whose bottom edge follows hair_length."""
        p = self.p
        u, v, win = self.uv((-0.62, 0.62, -0.62, 0.95))
        half_w = p.a + 0.09 + 0.06 * p.hair_len
        bottom = -0.05 + 0.85 * p.hair_len
        top = -0.3
        r = 0.16
        qu = u.abs() - half_w + r
        qv = (v - (bottom + top) * 0.5).abs_() - (bottom - top) * 0.5 + r
        d = torch.sqrt(qu.clamp(min=0.0).square() + qv.clamp(min=0.0).square())
        d = d + torch.maximum(qu, qv).clamp(max=0.0) - r
        self.paint(win, self.hair_colour(win, dark=0.8), _fill(d, self.aa))

    def neck(self) -> None:
        """Neck with a shadow under the chin, cut by a V-neck."""
        p = self.p
        u, v, win = self.uv((-0.3, 0.3, 0.2, 1.1))
        half = 0.12 + 0.1 * (p.a - 0.33)
        d = torch.maximum(u.abs() - half, 0.3 - v)
        vneck = v - (0.78 - 0.9 * u.abs())  # V-neck: the shirt cuts the neck
        d = torch.maximum(d, vneck)
        shadow = 1.0 - 0.3 * _smoothstep(0.62, 0.42, v)
        self.paint(win, p.skin * (0.9 * shadow), _fill(d, self.aa))

    def ears(self) -> None:
        """Ears on both sides (hidden under long hair)."""
        p = self.p
        u, v, win = self.uv((-0.56, 0.56, -0.16, 0.16))
        uu = u.abs() - p.a
        k = torch.sqrt((uu * (1.0 / 0.06)).square() + (v * (1.0 / 0.1)).square())
        shown = 1.0 - _smoothstep(0.3, 0.6, p.hair_len)  # long hair covers the ears
        self.paint(win, p.skin * 0.93, _fill((k - 1.0).mul_(0.07), self.aa).mul_(shown))
        inner = torch.sqrt(((uu - 0.008) * (1.0 / 0.028)).square() + (v * (1.0 / 0.06)).square())
        self.paint(win, p.skin * 0.72, _fill((inner - 1.0).mul_(0.03), self.aa).mul_(0.7 * shown))

    def head(self) -> None:
        """Skin ellipse, narrower at the chin, darker towards the rim."""
        p = self.p
        u, v, win = self.uv((-0.46, 0.46, -0.5, 0.5))
        taper = 1.0 - 0.16 * (v * (1.0 / _HEAD_B)).clamp(min=0.0).square()  # narrower chin
        k = torch.sqrt((u / (p.a * taper)).square() + (v * (1.0 / _HEAD_B)).square())
        alpha = _fill((k - 1.0).mul_(0.42), self.aa)
        shade = 1.05 - 0.16 * k.square() * k.square() + 0.04 * (-v).clamp(min=0.0)
        self.paint(win, p.skin * shade, alpha)

    def age_lines(self) -> None:
        """Wrinkles in three stages: folds, then forehead lines, then crow's feet and eye bags."""
        p = self.p
        ink = p.skin * 0.55
        hw = 0.011
        # forehead: three parallel arcs
        u, v, win = self.uv((-0.22, 0.22, -0.38, -0.15))
        w = v - 0.7 * u * u + 0.21
        period = 0.05
        line = (torch.remainder(w + period * 0.5, period) - period * 0.5).abs_() - hw
        band = (w + 0.05).abs_() - 0.065
        d = torch.maximum(torch.maximum(line, band), u.abs() - 0.19 + 0.3 * (w + 0.05).abs())
        self.paint(win, ink, _fill(d, self.aa).mul_(p.forehead))
        # crow's feet and eye bags
        u, v, win = self.uv((-0.46, 0.46, -0.12, 0.13))
        ex = 0.43 * p.a
        uu = u.abs() - ex - 0.1
        vv = v - _EYE_Y
        d = None
        for ang in (-0.5, 0.5):
            c, s = math.cos(ang), math.sin(ang)
            along = uu * c + vv * s
            perp = (vv * c - uu * s).abs_() - hw
            ray = torch.maximum(perp, (along - 0.03).abs_() - 0.025)
            d = ray if d is None else torch.minimum(d, ray)
        bu = u.abs() - ex
        bag = torch.maximum((vv - 0.085 - 2.0 * bu * bu).abs_() - hw, bu.abs() - 0.06)
        d = torch.minimum(d, bag)
        self.paint(win, ink, _fill(d, self.aa).mul_(p.crows))
        # nasolabial folds and mouth-corner lines
        u, v, win = self.uv((-0.26, 0.26, 0.08, 0.46))
        au = u.abs()
        d = _seg(au, v, (0.085, 0.12), (0.175, 0.31)) - hw
        d = torch.minimum(d, _seg(au, v, (0.175, 0.34), (0.16, 0.42)) - hw)
        self.paint(win, ink, _fill(d, self.aa).mul_(p.folds))

    def cheeks(self) -> None:
        """Rosy raised cheeks for a smile."""
        p = self.p
        u, v, win = self.uv((-0.36, 0.36, 0.04, 0.32))
        r = torch.sqrt((u.abs() - 0.2).square() + (v - 0.17).square())
        alpha = (1.0 - r * (1.0 / 0.085)).clamp_(0.0, 1.0).mul_(0.45 * _smoothstep(0.45, 1.0, p.smile))
        self.paint(win, _rgb(_BLUSH_RGB, self.dev), alpha)

    def beard(self) -> None:
        """Beard over jaw, chin and upper lip: sparse speckled stubble to a thick bushy beard."""
        p = self.p
        u, v, win = self.uv((-0.5, 0.5, -0.1, 0.56))
        bush = 0.005 + 0.06 * p.density  # a dense beard grows past the jaw line
        h, w = win[0].stop - win[0].start, win[1].stop - win[1].start
        tex = self.noise(2, h, w, (h, w), "nearest")
        a = p.a + bush
        taper = 1.0 - 0.16 * (v * (1.0 / _HEAD_B)).clamp(min=0.0).square()
        k = torch.sqrt((u / (a * taper)).square() + (v / (_HEAD_B + bush)).square())
        top = (0.23 - 0.06 * p.density) - 0.27 * (u / p.a).square()
        d = torch.maximum((k - 1.0).mul_(0.42), top - v)
        d = d + (tex - 0.5) * 0.02  # ragged edge
        cover = (0.4 + 0.6 * p.density) + (tex - 0.5) * (1.0 - 0.8 * p.density)
        alpha = _fill(d, self.aa * 2.0).mul_(cover.clamp_(0.0, 1.0)).mul_(p.beard)
        self.paint(win, self.hair_colour(win, dark=p.beard_dark), alpha)

    def nose(self) -> None:
        """Nose tip shading, one side line and nostrils."""
        p = self.p
        u, v, win = self.uv((-0.1, 0.1, -0.02, 0.22))
        tip = torch.sqrt((u * (1.0 / 0.055)).square() + ((v - 0.155) * (1.0 / 0.035)).square())
        self.paint(win, p.skin * 0.8, (1.0 - tip).clamp_(0.0, 1.0).mul_(0.6))
        d = torch.minimum(_seg(u, v, (0.035, 0.0), (0.05, 0.14)) - 0.008,
                          torch.sqrt((u.abs() - 0.027).square() + (v - 0.175).square()) - 0.013)
        self.paint(win, p.skin * 0.5, _fill(d, self.aa).mul_(0.7))

    def mouth(self) -> None:
        """Mouth curve from sad to smiling; opens with teeth for a big smile; lower lip."""
        p = self.p
        u, v, win = self.uv((-0.26, 0.26, 0.16, 0.46))
        curve = -0.03 + 0.10 * p.smile
        half = 0.095 + 0.07 * p.smile
        t2 = (u / half).square()
        y0 = _MOUTH_Y + curve * (0.5 - t2)
        bulge = (1.0 - t2).clamp_(min=0.0)
        gap = p.open_mouth * 0.085
        top = y0 - 0.25 * gap * bulge
        bottom = y0 + gap * bulge
        side = u.abs() - half
        inside = torch.maximum(torch.maximum(top - v, v - bottom), side)
        lips = torch.maximum(torch.maximum(top - 0.02 * bulge - v, v - bottom - 0.03 * bulge), side)
        self.paint(win, p.skin.lerp(_rgb(_LIP_RGB, self.dev), 0.7), _fill(lips, self.aa))
        self.paint(win, _rgb(_MOUTH_RGB, self.dev), _fill(inside.clone(), self.aa))
        teeth = torch.maximum(inside, v - top - 0.45 * (bottom - top))
        self.paint(win, _rgb(_TEETH_RGB, self.dev), _fill(teeth, self.aa))
        outline = inside.abs_() - 0.009
        self.paint(win, _rgb(_LIP_LINE_RGB, self.dev), _fill(outline, self.aa))
        # smile lines at the corners
        corner_y = _MOUTH_Y - 0.5 * curve
        cu = u.abs() - half - 0.025
        dimple = torch.maximum((cu - 40.0 * (v - corner_y).square()).abs_() - 0.008,
                               (v - corner_y).abs() - 0.04)
        self.paint(win, p.skin * 0.6, _fill(dimple, self.aa).mul_(_smoothstep(0.55, 0.9, p.smile)))

    def eyes(self) -> None:
        """Eye whites (height from eye_openness), iris, pupil, glint, lids and eyebrows."""
        p = self.p
        u, v, win = self.uv((-0.34, 0.34, -0.2, 0.08))
        ex = 0.43 * p.a
        uu = u.abs() - ex
        vv = v - _EYE_Y
        ew = 0.085
        eh = p.eye_h
        gu = uu * (1.0 / (ew * ew))
        gv = vv / (eh * eh)
        k = torch.sqrt((uu * (1.0 / ew)).square() + (vv / eh).square())
        d_eye = (k - 1.0) * k / torch.sqrt(gu.square() + gv.square()).clamp_(min=1e-6)
        eye = _fill(d_eye.clone(), self.aa)
        self.paint(win, _rgb((0.97, 0.97, 0.97), self.dev), eye)
        r = torch.sqrt(uu.square() + vv.square())
        iris = _fill(r - 0.042, self.aa).mul_(eye)
        self.paint(win, _rgb(_IRIS_RGB, self.dev), iris)
        pupil = _fill(r - 0.019, self.aa).mul_(eye)
        self.paint(win, _rgb((0.02, 0.02, 0.02), self.dev), pupil)
        glint = torch.sqrt((uu + 0.014).square() + (vv + 0.014).square())
        self.paint(win, _rgb((1.0, 1.0, 1.0), self.dev), _fill(glint - 0.009, self.aa).mul_(eye))
        # lid outline, heavier on the upper lid
        lash = d_eye.abs_() - (0.007 + 0.007 * (-vv / eh).clamp(0.0, 1.0))
        self.paint(win, _rgb((0.08, 0.05, 0.05), self.dev), _fill(lash, self.aa))
        # eyebrows
        bu = uu + 0.005
        arc = vv + 0.105 + 0.02 * (1.0 - (bu * (1.0 / 0.09)).square())
        thick = 0.016 * (1.0 - 0.5 * (bu * (1.0 / 0.1)).clamp(-1.0, 1.0))
        brow = torch.maximum(arc.abs() - thick, bu.abs() - 0.09)
        self.paint(win, self.hair_colour(win, dark=0.7), _fill(brow, self.aa))

    def hair_front(self) -> None:
        """Hair cap down to the hairline (which recedes with age), leaving the face free."""
        p = self.p
        u, v, win = self.uv((-0.62, 0.62, -0.62, 0.1))
        vol = 0.07 + 0.05 * p.hair_len
        k = torch.sqrt((u / (p.a + vol)).square() + ((v + 0.02) / (_HEAD_B + vol)).square())
        outer = torch.maximum((k - 1.0).mul_(0.5), v - (-0.06 + 0.1 * p.hair_len))
        un = u / p.a
        temple = (1.0 - ((un.abs() - 0.55) * (1.0 / 0.3)).square()).clamp_(min=0.0)
        line = (-0.27 - 0.12 * p.recede) + 0.26 * un.square() - 0.22 * p.recede * temple
        taper = 1.0 - 0.16 * (v * (1.0 / _HEAD_B)).clamp(min=0.0).square()
        k_head = torch.sqrt((u / (p.a * taper)).square() + (v * (1.0 / _HEAD_B)).square())
        bald = torch.maximum((k_head - 1.0).mul_(0.42), line - v)  # skin below the hairline
        alpha = _fill(torch.maximum(outer, bald.neg_()), self.aa)
        self.paint(win, self.hair_colour(win), alpha)

    def glasses(self) -> None:
        """Tinted lenses, frames, bridge and arms in the frame colour."""
        p = self.p
        u, v, win = self.uv((-0.5, 0.5, -0.16, 0.1))
        ex = 0.43 * p.a
        cu = u.abs() - ex
        cv = v - (_EYE_Y + 0.005)
        half_w, half_h, r = 0.11, 0.075, 0.035
        qu = cu.abs() - half_w + r
        qv = cv.abs() - half_h + r
        d = torch.sqrt(qu.clamp(min=0.0).square() + qv.clamp(min=0.0).square())
        d = d + torch.maximum(qu, qv).clamp(max=0.0) - r
        lens = _fill(d.clone(), self.aa).mul_(0.22 * p.glasses)
        self.paint(win, _rgb(_LENS_RGB, self.dev), lens)
        ring = d.abs_() - 0.014
        bar = (v - (_EYE_Y - 0.02)).abs() - 0.011
        bridge = torch.maximum(bar, u.abs() - (ex - half_w + 0.005))
        arm = torch.maximum(bar, torch.maximum(ex + half_w - u.abs(), u.abs() - p.a - 0.01))
        d = torch.minimum(ring, torch.minimum(bridge, arm))
        self.paint(win, p.frame, _fill(d, self.aa).mul_(p.glasses))

    def draw(self) -> Tensor:
        self.clothing()
        self.hair_back()
        self.neck()
        self.ears()
        self.head()
        self.age_lines()
        self.cheeks()
        if bool((self.p.beard > 0).any()):
            self.beard()
        self.nose()
        self.mouth()
        self.eyes()
        self.hair_front()
        if bool((self.p.glasses > 0).any()):
            self.glasses()
        return self.canvas


def _downsample(canvas: Tensor, k: int) -> Tensor:
    """Average over k x k pixel blocks: (m, 3, R, R) -> (m, 3, R/k, R/k) (faster than avg_pool2d)."""
    if k == 1:
        return canvas
    total = canvas[..., 0::k, 0::k].clone()
    for dy in range(k):
        for dx in range(k):
            if dy or dx:
                total += canvas[..., dy::k, dx::k]
    return total.mul_(1.0 / (k * k))


def render_factors(factors: Mapping[str, Tensor], seed: int, *, size: int = 64,
                   supersample: int = 2, device: torch.device | str | None = None) -> Tensor:
    """Render portraits from a complete factor dict.

    Textures (hair strands, grey streaks, beard) depend on ``(seed, image index)`` only, so
    rendering the same seed with one factor changed gives the same person with that change.

    Args:
        factors: name -> (n,) tensor for every name in :data:`FACTOR_NAMES` (see
            :func:`sample_factors`).
        seed: texture seed (any Python int).
        size: output side in pixels.
        supersample: render at ``size * supersample`` and average-pool down (anti-aliasing).
        device: where to render; defaults to the device of ``factors["age"]``.

    Returns:
        (n, 3, size, size) float32 images in [0, 1].
    """
    n = _check_factors(factors)
    seed = _check_int("seed", seed, -(1 << 63))
    size = _check_int("size", size, 8)
    supersample = _check_int("supersample", supersample, 1)
    dev = torch.device(device) if device is not None else torch.as_tensor(factors["age"]).device
    f = {k: torch.as_tensor(factors[k], dtype=torch.float32).reshape(n).to(dev) for k in FACTOR_NAMES}
    res = size * supersample
    out = torch.empty(n, 3, size, size, dtype=torch.float32, device=dev)
    chunk = _CHUNK if dev.type == "cpu" else _CHUNK_ACCELERATOR
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        look = _look({k: val[start:stop] for k, val in f.items()})
        index = torch.arange(start, stop, dtype=torch.int64, device=dev)
        canvas = _Painter(look, seed, index, res).draw()
        out[start:stop] = _downsample(canvas, supersample).clamp_(0.0, 1.0)
    return out


def render(n: int, seed: int, *, size: int = 64, supersample: int = 2,
           factors: Mapping[str, object] | None = None,
           device: torch.device | str = "cpu") -> tuple[Tensor, dict[str, Tensor]]:
    """Sample factors and render ``n`` portraits.

    Args:
        n: number of images.
        seed: seed of both the factors and the textures.
        size: output side in pixels.
        supersample: anti-aliasing factor (render at ``size * supersample``).
        factors: optional overrides, name -> scalar or (n,) tensor (see :func:`sample_factors`).
        device: device of the outputs.

    Returns:
        images: (n, 3, size, size) float32 in [0, 1].
        factors: name -> (n,) float32 in [0, 1] for every name in :data:`FACTOR_NAMES`.
    """
    f = sample_factors(n, seed, factors=factors, device=device)
    return render_factors(f, seed, size=size, supersample=supersample, device=device), f
