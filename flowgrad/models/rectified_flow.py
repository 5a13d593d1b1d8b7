"""Rectified Flow checkpoints (NCSN++): presets, config loading, safe checkpoint loading, velocity adapter.

The paper's model is the CelebA-HQ 256 checkpoint of the Rectified Flow project
(https://github.com/gnobitab/RectifiedFlow). Its on-disk format (upstream ``save_checkpoint``) is a
``torch.save``d dict ``{model, ema, optimizer, step}``: ``model`` is the state dict of the
``DataParallel``-wrapped network (keys prefixed ``module.``) and ``ema.shadow_params`` a plain list
with one tensor per *trainable* parameter in ``parameters()`` order (so the frozen Fourier ``W``
is not in it; ``W`` and the ``sigmas`` buffer always come from ``model``). Inference uses the EMA
weights.

Time: the network expects ``time_cond = 999 * t``; :class:`RectifiedFlowVelocity` takes flowgrad's
t in [0, 1] (t = 0 noise, t = 1 data) and does the scaling, nothing else does.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from torch import Tensor

from ..velocity import VelocityField
from .ncsnpp import NCSNpp, NCSNppConfig, make_sigmas

__all__ = [
    "CheckpointError", "CheckpointNotFoundError", "DEFAULT_PRESET", "NCSNppConfig", "PRESETS",
    "RectifiedFlowVelocity", "TIME_SCALE", "build_random", "load_config", "load_rectified_flow",
    "ncsnpp_from_state_dict",
]

TIME_SCALE = 999.0
"""Rectified Flow checkpoints were trained with ``time_cond = 999 * t``."""

DEFAULT_PRESET = "rectified-flow-celebahq-256"

PRESETS: dict[str, NCSNppConfig] = {
    DEFAULT_PRESET: NCSNppConfig(
        image_size=256, num_channels=3, centered=True, nf=128, ch_mult=(1, 1, 2, 2, 2, 2, 2),
        num_res_blocks=2, attn_resolutions=(16,), dropout=0.0, conditional=True, fir=True,
        fir_kernel=(1, 3, 3, 1), skip_rescale=True, resblock_type="biggan", progressive="output_skip",
        progressive_input="input_skip", progressive_combine="sum", embedding_type="fourier",
        fourier_scale=16, nonlinearity="swish", scale_by_sigma=True, sigma_min=0.01, sigma_max=378,
        num_scales=2000, resamp_with_conv=True, init_scale=0.0),
}
"""Named architectures. ``rectified-flow-celebahq-256``: the paper's model (65,574,549 parameters)."""

ConfigSpec = Union[NCSNppConfig, str, os.PathLike, Mapping[str, Any]]
"""An NCSN++ config: the object, a preset name, a JSON file path, or a dict (see ``from_dict``)."""

_CHECKPOINT_SOURCE = ("the paper's model is the CelebA-HQ 256 checkpoint of the Rectified Flow project "
                      "(https://github.com/gnobitab/RectifiedFlow, linked from its README); download it, "
                      "save it e.g. as checkpoints/rectified_flow_celebahq256.pth and pass that path")
_MISMATCH_HINT = "the config probably does not match the checkpoint; pass the config it was trained with"


class CheckpointError(ValueError):
    """A file that is not a loadable Rectified Flow NCSN++ checkpoint for the given config."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint file does not exist (also a :class:`FileNotFoundError`)."""


# --------------------------------------------------------------------------- configs


def load_config(spec: ConfigSpec) -> NCSNppConfig:
    """Resolve a config: an :class:`NCSNppConfig`, a preset name, a JSON file path, or a dict.

    JSON files may use upstream's nested layout (``{"data": {...}, "model": {...}}``) or flat
    field names.

    Raises:
        ValueError: unknown preset and no such file, unreadable or invalid JSON, unsupported values.
        TypeError: a spec of another type.
    """
    if isinstance(spec, NCSNppConfig):
        return spec
    if isinstance(spec, Mapping):
        return NCSNppConfig.from_dict(spec)
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"config must be an NCSNppConfig, a preset name, a JSON path or a dict, "
                        f"got {type(spec).__name__}")
    if isinstance(spec, str) and spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"unknown NCSN++ config {str(spec)!r}: not a preset (known: {', '.join(PRESETS)}) "
                         "and not an existing JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read NCSN++ config file {str(path)!r}: {_one_line(exc)}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"NCSN++ config file {str(path)!r} is not valid JSON: {_one_line(exc)}") from None
    if not isinstance(data, Mapping):
        raise ValueError(f"NCSN++ config file {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return NCSNppConfig.from_dict(data)


# --------------------------------------------------------------------------- loading


def _one_line(exc: BaseException | str, limit: int = 240) -> str:
    """The first non-empty line of an error message, without terminal escapes, shortened."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[0] if lines else type(exc).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _torch_load(path: Path, allow_unsafe_pickle: bool) -> Any:
    """``torch.load`` restricted to tensors and plain containers unless ``allow_unsafe_pickle``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        if found and not allow_unsafe_pickle:
            raise CheckpointError(
                f"checkpoint {str(path)!r} needs full unpickling (it stores the Python object "
                f"{found.group(1)}), which safe loading refuses; pass allow_unsafe_pickle=True only if you "
                "trust the file, because unpickling can run arbitrary code from it") from None
        raise CheckpointError(f"{str(path)!r} is not a PyTorch checkpoint ({_one_line(exc)})") from None
    except MemoryError:
        raise
    except Exception as exc:  # torch.load raises many types for foreign files (KeyError, EOFError, ...)
        raise CheckpointError(f"{str(path)!r} is not a PyTorch checkpoint (torch.load failed: "
                              f"{type(exc).__name__}: {_one_line(exc)})") from None


def _is_state_dict(obj: Any) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()))


def _split_checkpoint(obj: Any, source: str, use_ema: bool) -> tuple[Mapping[str, Tensor], Sequence[Tensor] | None]:
    """(state dict, EMA shadow list or None) from upstream's checkpoint dict or a plain state dict."""
    if _is_state_dict(obj):
        return obj, None
    if not isinstance(obj, Mapping) or "model" not in obj:
        what = (f"a dict with keys {sorted(map(str, obj))[:6]}" if isinstance(obj, Mapping)
                else f"a {type(obj).__name__}")
        raise CheckpointError(f"{source} is not a Rectified Flow checkpoint: expected upstream's dict with a "
                              f"'model' state dict (and 'ema') or a plain state dict of tensors, got {what}")
    state = obj["model"]
    if not _is_state_dict(state):
        raise CheckpointError(f"{source}: its 'model' entry is not a state dict of tensors; "
                              "is it a Rectified Flow checkpoint?")
    if not use_ema:
        return state, None
    ema = obj.get("ema")
    shadow = ema.get("shadow_params") if isinstance(ema, Mapping) else None
    if not isinstance(shadow, (list, tuple)) or not all(isinstance(t, Tensor) for t in shadow):
        raise CheckpointError(f"{source} has no EMA weights (an 'ema' entry with a 'shadow_params' list of "
                              "tensors); pass use_ema=False to use its raw training weights")
    return state, shadow


def _strip_prefix(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Drop the ``module.`` prefix that ``torch.nn.DataParallel`` adds to every key."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def _shape(t: Tensor) -> str:
    return "(" + ", ".join(map(str, t.shape)) + ")"


def ncsnpp_from_state_dict(state: Mapping[str, Tensor], config: ConfigSpec, *,
                           ema_shadow: Sequence[Tensor] | None = None,
                           source: str = "state dict") -> NCSNpp:
    """Build an :class:`NCSNpp` holding exactly the given weights (strict; no copies of matching tensors).

    Args:
        state: the network's state dict, keys with or without the ``module.`` prefix.
        config: its architecture.
        ema_shadow: upstream's EMA ``shadow_params`` list (one tensor per trainable parameter in
            ``parameters()`` order); if given it replaces those parameters, while the frozen ``W``
            and the ``sigmas`` buffer stay from ``state``.
        source: how to name the weights in error messages.

    Returns:
        The network on the CPU (or wherever ``state`` lives), in eval mode.

    Raises:
        CheckpointError: missing / unexpected keys, shape mismatches, a wrong EMA list (one line).
    """
    config = load_config(config)
    with torch.device("meta"):
        net = NCSNpp(config)
    expected = net.state_dict()
    state = _strip_prefix(state)
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"lacks {len(missing)} key(s) the model needs (first: {missing[0]!r})")
        if unexpected:
            parts.append(f"has {len(unexpected)} key(s) the model does not have (first: {unexpected[0]!r})")
        raise CheckpointError(f"{source} {' and '.join(parts)}; {_MISMATCH_HINT}")
    loaded: dict[str, Tensor] = {}
    for key, want in expected.items():
        got = state[key]
        if got.shape != want.shape:
            raise CheckpointError(f"{source}: key {key!r} has shape {_shape(got)} but the model expects "
                                  f"{_shape(want)}; {_MISMATCH_HINT}")
        if not got.is_floating_point():
            raise CheckpointError(f"{source}: key {key!r} has dtype {got.dtype}, expected a floating tensor")
        loaded[key] = got.to(want.dtype)
    if ema_shadow is not None:
        trainable = [name for name, p in net.named_parameters() if p.requires_grad]
        if len(ema_shadow) != len(trainable):
            raise CheckpointError(f"{source}: its EMA list has {len(ema_shadow)} tensors but the model has "
                                  f"{len(trainable)} trainable parameters; {_MISMATCH_HINT}")
        for name, shadow in zip(trainable, ema_shadow):
            if shadow.shape != expected[name].shape or not shadow.is_floating_point():
                raise CheckpointError(f"{source}: EMA tensor for {name!r} has shape {_shape(shadow)} "
                                      f"({shadow.dtype}), expected {_shape(expected[name])}; {_MISMATCH_HINT}")
            loaded[name] = shadow.to(expected[name].dtype)
    net.load_state_dict(loaded, strict=True, assign=True)
    return net.eval()


def load_rectified_flow(path: str | os.PathLike, config: ConfigSpec | None = None, *, use_ema: bool = True,
                        allow_unsafe_pickle: bool = False, device: torch.device | str = "cpu",
                        autocast_dtype: torch.dtype | None = None,
                        channels_last: bool = False, compile_backend: str | None = None) -> RectifiedFlowVelocity:
    """Load a Rectified Flow NCSN++ checkpoint as a frozen velocity field.

    Args:
        path: upstream checkpoint (``{model, ema, optimizer, step}``) or a plain state dict file.
        config: architecture (see :data:`ConfigSpec`); default the ``rectified-flow-celebahq-256`` preset.
        use_ema: use the EMA weights, as upstream's sampler does (ignored for a plain state dict).
        allow_unsafe_pickle: allow full unpickling for files that store Python objects. Dangerous:
            unpickling runs code from the file; use only for files you trust.
        device: where the weights go.
        autocast_dtype: e.g. ``torch.bfloat16`` to run the network under autocast (output stays float32).
        channels_last: keep weights and activations in channels-last memory format.
        compile_backend: run the network through ``torch.compile`` with this backend (``"inductor"``:
            PyTorch's default compiler; the first calls of each batch size compile, about a minute).

    Returns:
        :class:`RectifiedFlowVelocity` taking t in [0, 1].

    Raises:
        CheckpointNotFoundError: no file at ``path`` (a FileNotFoundError; says where to get the paper's).
        CheckpointError: not a checkpoint, another architecture, a config that does not match (one line).
    """
    file = Path(path).expanduser()
    if not file.exists():
        raise CheckpointNotFoundError(f"Rectified Flow checkpoint not found at {str(file)!r}; {_CHECKPOINT_SOURCE}")
    if not file.is_file():
        raise CheckpointError(f"Rectified Flow checkpoint path {str(file)!r} is not a file")
    config = load_config(PRESETS[DEFAULT_PRESET] if config is None else config)
    source = f"checkpoint {str(file)!r}"
    obj = _torch_load(file, allow_unsafe_pickle)
    state, shadow = _split_checkpoint(obj, source, use_ema)
    del obj
    net = ncsnpp_from_state_dict(state, config, ema_shadow=shadow, source=source)
    del state, shadow
    return RectifiedFlowVelocity(net.to(device), name=f"ncsnpp:{file}", autocast_dtype=autocast_dtype,
                                 channels_last=channels_last, compile_backend=compile_backend)


# --------------------------------------------------------------------------- the velocity field


class RectifiedFlowVelocity(VelocityField):
    """A frozen NCSN++ Rectified Flow network as a flowgrad velocity field.

    ``forward(x, t)`` calls ``net(x, t * 999)`` (float32 multiply, as upstream's samplers do).
    Data space is [-1, 1] for ``centered`` configs (CelebA-HQ) and [0, 1] otherwise.

    Attributes:
        autocast_dtype: None (plain float32) or the autocast dtype used inside :meth:`forward`.
        channels_last: whether inputs are converted to channels-last before the network.
        compile_backend: None (eager) or the ``torch.compile`` backend the network call runs through.
    """

    def __init__(self, net: NCSNpp, *, name: str = "ncsnpp", autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, compile_backend: str | None = None) -> None:
        if not isinstance(net, NCSNpp):
            raise TypeError(f"net must be an NCSNpp, got {type(net).__name__}")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}")
        cfg = net.config
        super().__init__(net, (cfg.num_channels, cfg.image_size, cfg.image_size), name)
        self.autocast_dtype = autocast_dtype
        self.channels_last = bool(channels_last)
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if compile_backend is not None and not (isinstance(compile_backend, str) and compile_backend):
            raise ValueError(f"compile_backend must be None or a torch.compile backend name, got {compile_backend!r}")
        self.compile_backend = compile_backend
        # The weights stay in self.net (fingerprint, state dict); only the call is compiled.
        self._call = self._run if compile_backend is None else torch.compile(self._run, backend=compile_backend)

    @property
    def config(self) -> NCSNppConfig:
        return self.net.config

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """Velocity dx/dt.

        Args:
            x: (B, C, H, W) state in data space.
            t: (B,) times in (0, 1] (t = 0 noise, t = 1 data), or a scalar for the whole batch.

        Returns:
            (B, C, H, W) velocity in x's dtype.
        """
        if not isinstance(t, Tensor):
            raise TypeError(f"t must be a torch.Tensor of shape (B,), got {type(t).__name__}")
        if t.dim() == 0:
            t = t.expand(x.shape[0])
        if t.dim() != 1 or t.shape[0] != x.shape[0]:
            raise ValueError(f"t must have shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
        return self._call(x, t.to(torch.float32) * TIME_SCALE)

    def _run(self, x: Tensor, time_cond: Tensor) -> Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.autocast_dtype is None:
            return self.net(x, time_cond)
        with torch.autocast(device_type=x.device.type, dtype=self.autocast_dtype):
            out = self.net(x, time_cond)
        return out.to(x.dtype)

    def to_image(self, x: Tensor) -> Tensor:
        """Data space -> image space [0, 1] (identity for ``centered=False`` models)."""
        return super().to_image(x) if self.config.centered else x

    def from_image(self, image: Tensor) -> Tensor:
        """Image space [0, 1] -> data space (identity for ``centered=False`` models)."""
        return super().from_image(image) if self.config.centered else image


# --------------------------------------------------------------------------- random weights


@torch.no_grad()
def build_random(config: ConfigSpec, seed: int = 0, *, device: torch.device | str = "cpu",
                 autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False) -> RectifiedFlowVelocity:
    """A velocity field with random weights of the given architecture (for benchmarks and tests).

    Every conv / linear / NIN weight ~ N(0, 1/fan_in), biases ~ N(0, 0.1²), GroupNorm scale
    ~ 1 + N(0, 0.2²) and shift ~ N(0, 0.2²), Fourier ``W`` = 16·N(0, 1) (``fourier_scale``), drawn
    on the CPU from ``torch.Generator().manual_seed(seed)`` in parameter order, so outputs are
    non-trivial and reproducible across devices.
    """
    config = load_config(config)
    with torch.device("meta"):
        net = NCSNpp(config)
    net = net.to_empty(device="cpu")
    net.sigmas.copy_(make_sigmas(config))
    gen = torch.Generator().manual_seed(seed)
    modules = dict(net.named_modules())
    for name, p in net.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules[owner_name]
        if leaf == "W" and not p.requires_grad:
            p.copy_(torch.randn(p.shape, generator=gen) * config.fourier_scale)
        elif isinstance(owner, torch.nn.GroupNorm):
            base = 1.0 if leaf == "weight" else 0.0
            p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
        elif p.dim() == 1:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        else:
            fan_in = p.shape[0] if leaf == "W" else p[0].numel()
            p.copy_(torch.randn(p.shape, generator=gen) * fan_in ** -0.5)
    return RectifiedFlowVelocity(net.eval().to(device), name=f"ncsnpp-random:{seed}",
                                 autocast_dtype=autocast_dtype, channels_last=channels_last)
