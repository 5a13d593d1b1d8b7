"""CLIP guidance: load an open_clip model from local files and score images against prompts.

This is the only module of flowgrad that imports ``open_clip``; it does so lazily, inside
functions, after ``os.environ.setdefault("HF_HUB_OFFLINE", "1")``, so ``import
flowgrad.clip_guidance`` stays cheap and nothing here reaches the network unless asked to.

The guidance loss follows FlowGrad (Liu et al., CVPR 2023): each image is replicated,
DiffAugment-style augmented (:mod:`flowgrad.augment`), resized to the CLIP input size, normalized
with the model's mean/std and scored against the prompt; an optional L1 term keeps the image
close to a source image::

    loss_b = alpha * (clip_b + w * off_b) + (1 - alpha) * l1_b + beta * keep_b
    clip_b = mean_r [ -cos(E(aug_r(x_b)), e_text) ]                          (no negative prompt)
    clip_b = mean_r [ -(cos(E(aug_r(x_b)), e_text) - cos(E(aug_r(x_b)), e_neg)) ]  (directional)
    l1_b   = mean_{c,h,w} |x_b - source_b|                                   (0 without a source)
    keep_b = mean_k | mean_r [ s_k(aug_r(x_b)) - s_k(aug_r(source_b)) ] |   (without preserved prompts: none)
    off_b  = mean_r |P (E(aug_r(x_b)) - E(aug_r(source_b)))|                (w = 0: none)

where ``s_k`` is the (directional) score of the k-th *preserved* prompt pair: attributes the edit
should leave alone (e.g. hair colour while ageing), compared with the source under the same
augmentations, and ``P`` removes the component along the text direction ``e_text - e_neg`` (``e_text``
without a negative prompt): the *off-axis* term charges every change CLIP sees that is not the
requested one, the idea of the directional CLIP loss of StyleGAN-NADA (Gal et al. 2022) and
DiffusionCLIP (Kim et al. 2022) kept as a penalty next to FlowGrad's score (``|.|`` smoothed at 0).

Images outside the engine are float tensors in [0, 1] of shape (B, 3, H, W), any H and W.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import POLICY_OPS, AugmentParams, Policy, apply_augment, bilinear_matrix, parse_policy, \
    resample_separable, sample_augment_params, sample_augment_params_each

__all__ = [
    "ClipLoadError", "ClipLoss", "ClipLossTerms", "ClipModel", "DEMO_CONFIG_DIR", "clip_score",
    "import_open_clip", "load_clip", "random_clip", "zero_shot",
]

DEMO_CONFIG_DIR = Path(__file__).resolve().parents[1] / "data" / "demo"
"""Where model configs such as ``flowgrad-tiny-clip.json`` are found by name."""

HF_CONFIG_NAME = "open_clip_config.json"
HF_WEIGHT_NAMES = (
    "open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
"""Weight files of a Hugging Face hub layout folder, in open_clip's order of preference."""
HF_HUB_PREFIX = "hf-hub:"
INSTALL_HINT = "open_clip is not installed; install it with `pip install open_clip_torch`"
OFF_AXIS_SMOOTHING = 0.02  # the off-axis norm is smoothed below this distance between unit embeddings
_CONFIG_KEYS = ("embed_dim", "vision_cfg", "text_cfg")
_DEFAULT_HF_WEIGHTS = "open_clip_pytorch_model.bin"


class ClipLoadError(ValueError):
    """A CLIP spec could not be turned into a model; the message (one line) says how to fix it."""


# --------------------------------------------------------------------------- model holder


@dataclass(frozen=True, eq=False)
class ClipModel:
    """A frozen open_clip model with its tokenizer and image preprocessing constants.

    Attributes:
        model: the open_clip model, in eval mode, ``requires_grad`` False.
        tokenizer: open_clip tokenizer, ``list[str] -> (T, context_length)`` token ids.
        image_size: side of the square CLIP input.
        mean: per-channel normalization mean (from the model's preprocess config).
        std: per-channel normalization std.
        name: the spec the model was loaded from, e.g. ``"ViT-B-32:/models/clip.pt"``.
    """

    model: nn.Module = field(repr=False)
    tokenizer: Callable[..., Tensor] = field(repr=False)
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str

    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights (inputs are cast to it)."""
        return next(self.model.parameters()).dtype

    @torch.no_grad()
    def encode_text(self, prompts: Sequence[str]) -> Tensor:
        """Embed prompts. Returns (T, D) float32, L2-normalized, no graph."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise TypeError(f"prompts must be a list of str, got {prompts!r}; wrap one prompt "
                            f"in a list")
        tokens = self.tokenizer(list(prompts)).to(self.device)
        return self.model.encode_text(tokens, normalize=True).float()

    def preprocess(self, images: Tensor) -> Tensor:
        """Resize (bilinear, no antialias) and normalize images for the image tower.

        Args:
            images: (B, 3, H, W) float images in [0, 1] on :attr:`device`.

        Returns:
            (B, 3, S, S) with S = :attr:`image_size`, in the model's dtype; differentiable.
        """
        _check_images(images, "images", self.device)
        size = self.image_size
        if images.shape[-2:] != (size, size) and torch.are_deterministic_algorithms_enabled():
            # the same resampling as two matrix products (interpolate's CUDA backward is not deterministic)
            h, w = images.shape[-2:]
            images = resample_separable(images, _resize_matrix(h, size, images), _resize_matrix(w, size, images))
        elif images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear",
                                   align_corners=False, antialias=False)
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
        return ((images - mean) / std).to(self.dtype)

    def encode_image(self, images: Tensor, *, max_batch: int | None = None) -> Tensor:
        """Embed images; differentiable with respect to the pixels.

        Args:
            images: (B, 3, H, W) float images in [0, 1], any H and W, on :attr:`device`.
            max_batch: encode at most this many images per forward call (None: one call).

        Returns:
            (B, D) float32, L2-normalized.
        """
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
        x = self.preprocess(images)
        chunks = [x] if max_batch is None else x.split(max_batch)
        return torch.cat([self.model.encode_image(c, normalize=True).float() for c in chunks])


def _resize_matrix(n_in: int, n_out: int, like: Tensor) -> Tensor:
    """(1, n_out, n_in) weights of ``interpolate(mode="bilinear", align_corners=False, antialias=False)``.

    Output sample ``i`` reads source position ``(i + 0.5) * n_in / n_out - 0.5``, clamped to the image
    (interpolate repeats the edge pixels).
    """
    i = torch.arange(n_out, dtype=like.dtype, device=like.device)
    source = ((i + 0.5) * (n_in / n_out) - 0.5).clamp(0.0, n_in - 1.0)
    return bilinear_matrix(source, n_in).unsqueeze(0)


def _check_images(images: Any, arg: str, device: torch.device) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{arg} must be a (B, 3, H, W) float tensor in [0, 1], got {got}")
    if not images.is_floating_point():
        raise TypeError(f"{arg} must be a float tensor in [0, 1], got {images.dtype}; "
                        f"convert with images.float() / 255")
    if images.device != device:
        raise ValueError(f"{arg} is on {images.device} but the CLIP model is on {device}; "
                         f"move it with .to({str(device)!r})")


# --------------------------------------------------------------------------- loading


def import_open_clip() -> ModuleType:
    """Import open_clip (with ``HF_HUB_OFFLINE=1`` unless the environment sets it) and return the module.

    Host work only (seconds: open_clip imports torchvision and timm), so a caller can overlap it with GPU
    work on another thread before loading a model; raises ImportError with an install hint if missing.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import open_clip
    except ImportError as err:
        raise ImportError(INSTALL_HINT) from err
    return open_clip


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    return f"{type(err).__name__}: {text}"


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as err:
        raise ClipLoadError(f"{what} {path} is not readable JSON ({_one_line(err)})") from err
    if not isinstance(data, dict):
        raise ClipLoadError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _register_config(path: str | Path) -> str:
    """Register a model config JSON with open_clip; returns its model name (the file stem)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise ClipLoadError(f"model config not found: {path}; pass an open_clip model config JSON")
    cfg = _read_json(path, "model config")
    missing = [k for k in _CONFIG_KEYS if k not in cfg]
    if missing:
        raise ClipLoadError(f"model config {path} lacks {missing}; an open_clip model config "
                            f"needs keys {list(_CONFIG_KEYS)}")
    open_clip = import_open_clip()
    name = path.stem
    known = open_clip.get_model_config(name)
    if known is None:
        open_clip.add_model_config(path)
    elif known != cfg:
        raise ClipLoadError(f"model config {path} is named '{name}', but open_clip already has a "
                            f"different model of that name; rename the file")
    return name


def _model_name(name: str) -> str:
    """A registered open_clip model name; configs in :data:`DEMO_CONFIG_DIR` register on demand."""
    open_clip = import_open_clip()
    if name in open_clip.list_models():
        return name
    demo = DEMO_CONFIG_DIR / f"{name}.json"
    if demo.is_file():
        return _register_config(demo)
    raise ClipLoadError(
        f"unknown open_clip model '{name}'; list names with `python -c \"import open_clip; "
        f"print(open_clip.list_models())\"` or pass CONFIG_JSON:FILE for a custom config")


def _weights_source(name: str, tag: str | None = None) -> tuple[str, str]:
    """(which weights to get and from where, a QuickGELU note or "") for model ``name``."""
    open_clip = import_open_clip()
    tags = open_clip.list_pretrained_tags_by_model(name)
    if tag is None and tags:
        tag = "openai" if "openai" in tags else tags[0]
    if tag is None:
        return f"the {name} weights (an open_clip state dict .pt/.bin/.safetensors)", ""
    cfg = open_clip.get_pretrained_cfg(name, tag)
    if cfg.get("hf_hub"):
        repo, file = os.path.split(cfg["hf_hub"])  # "org/repo/" or "org/repo/file.bin"
        where = f"file {file or _DEFAULT_HF_WEIGHTS} from {HF_HUB_PREFIX}{repo}"
    else:
        where = f"from {cfg.get('url', 'the open_clip pretrained list')}"
    quick = f"{name}-quickgelu"
    note = ""
    if (cfg.get("quick_gelu") and not (open_clip.get_model_config(name) or {}).get("quick_gelu")
            and quick in open_clip.list_models()):
        note = f" (these weights were trained with QuickGELU: load them as {quick}:FILE)"
    return f"the open_clip {name} '{tag}' weights ({where})", note


def _missing_weights(name: str, path: Path) -> ClipLoadError:
    what, note = _weights_source(name)
    return ClipLoadError(f"CLIP weights not found: {path}; put {what} there or pass "
                         f"--clip NAME:FILE{note}")


def _hf_cache_folder(repo: str, cache_dir: str | Path | None, allow_download: bool) -> Path:
    """The snapshot folder of ``repo`` in the local HF cache holding config + weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import huggingface_hub
    except ImportError as err:
        raise ClipLoadError("hf-hub: specs need huggingface_hub (pip install huggingface_hub); "
                            "or pass a folder or NAME:FILE") from err
    spec = f"{HF_HUB_PREFIX}{repo}"
    try:
        config = huggingface_hub.try_to_load_from_cache(repo, HF_CONFIG_NAME, cache_dir=cache_dir)
        weights = [huggingface_hub.try_to_load_from_cache(repo, w, cache_dir=cache_dir)
                   for w in HF_WEIGHT_NAMES]
    except ValueError as err:  # huggingface_hub's HFValidationError for a malformed repo id
        raise ClipLoadError(f"{spec} is not a valid repo id ({_one_line(err)})") from err
    found = [Path(w) for w in weights if isinstance(w, str)]
    if isinstance(config, str) and found and found[0].parent == Path(config).parent:
        return Path(config).parent
    if not allow_download:
        raise ClipLoadError(
            f"{spec} is not in the local Hugging Face cache "
            f"({cache_dir or huggingface_hub.constants.HF_HUB_CACHE}); download it once with "
            f"`huggingface-cli download {repo} {HF_CONFIG_NAME} {_DEFAULT_HF_WEIGHTS}`, or pass "
            f"a folder or NAME:FILE")
    return _hf_download(repo, cache_dir)


def _hf_download(repo: str, cache_dir: str | Path | None) -> Path:
    import huggingface_hub

    spec = f"{HF_HUB_PREFIX}{repo}"
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    fix = "; set HF_HUB_OFFLINE=0 before starting Python to download" if offline else ""
    try:
        config = huggingface_hub.hf_hub_download(repo, HF_CONFIG_NAME, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line with a fix
        raise ClipLoadError(f"could not download {HF_CONFIG_NAME} of {spec} "
                            f"({_one_line(err)}){fix}") from err
    last: Exception | None = None
    for name in HF_WEIGHT_NAMES:
        try:
            weights = huggingface_hub.hf_hub_download(repo, name, cache_dir=cache_dir)
        except Exception as err:  # noqa: BLE001 - try the next file name
            last = err
            continue
        if Path(weights).parent == Path(config).parent:
            return Path(config).parent
    raise ClipLoadError(f"{spec} has none of {list(HF_WEIGHT_NAMES)} "
                        f"({_one_line(last) if last else 'revision mismatch'}){fix}")


@dataclass(frozen=True)
class _Resolved:
    """What to pass to open_clip for one spec."""

    model_name: str
    pretrained: str | None
    weights: str


def _resolve_folder(folder: Path) -> _Resolved:
    config = folder / HF_CONFIG_NAME
    if not config.is_file():
        raise ClipLoadError(f"CLIP folder {folder} has no {HF_CONFIG_NAME}; a Hugging Face "
                            f"layout folder holds {HF_CONFIG_NAME} and {HF_WEIGHT_NAMES[0]} "
                            f"or {_DEFAULT_HF_WEIGHTS}")
    model_cfg = _read_json(config, "CLIP config").get("model_cfg")
    if not isinstance(model_cfg, dict) or any(k not in model_cfg for k in _CONFIG_KEYS):
        raise ClipLoadError(f"{config} needs a 'model_cfg' object with keys {list(_CONFIG_KEYS)}")
    weights = [folder / w for w in HF_WEIGHT_NAMES if (folder / w).is_file()]
    if not weights:
        raise ClipLoadError(f"CLIP weights not found in {folder}; put {HF_WEIGHT_NAMES[0]} or "
                            f"{_DEFAULT_HF_WEIGHTS} next to {HF_CONFIG_NAME}")
    return _Resolved(f"local-dir:{folder}", None, str(weights[0]))


def _resolve(spec: str, cache_dir: str | Path | None, allow_download: bool) -> _Resolved:
    if spec.startswith(HF_HUB_PREFIX):
        return _resolve_folder(_hf_cache_folder(spec[len(HF_HUB_PREFIX):], cache_dir,
                                                allow_download))
    if Path(spec).expanduser().is_dir():
        return _resolve_folder(Path(spec).expanduser().resolve())
    if ":" not in spec:
        raise ClipLoadError(
            f"CLIP spec '{spec}' is not NAME:FILE, CONFIG_JSON:FILE, a folder with "
            f"{HF_CONFIG_NAME}, or hf-hub:ORG/REPO; e.g. ViT-B-32-quickgelu:/models/clip.bin "
            f"(random weights for tests: random_clip('{spec}'))")
    left, right = spec.split(":", 1)
    if not left.endswith(".json") and ".json:" in spec:  # CONFIG_JSON:FILE whose config path has a colon
        left, _, right = spec.partition(".json:")
        left += ".json"
    weights = Path(right).expanduser()
    if weights.is_file():
        name = _register_config(left) if left.endswith(".json") else _model_name(left)
        return _Resolved(name, str(weights.resolve()), str(weights.resolve()))
    if left.endswith(".json"):
        raise _missing_weights(_register_config(left), weights.resolve())
    name = _model_name(left)
    if right in import_open_clip().list_pretrained_tags_by_model(name):
        if allow_download:
            return _Resolved(name, right, f"open_clip tag '{right}'")
        what, note = _weights_source(name, right)
        raise ClipLoadError(f"'{right}' is an open_clip pretrained tag, not a local file, and "
                            f"downloads are off; save {what} to a file and pass {name}:FILE{note}, "
                            f"or use allow_download=True with HF_HUB_OFFLINE=0")
    raise _missing_weights(name, weights.resolve())


def _create(open_clip: ModuleType, model_name: str, pretrained: str | None,
            device: torch.device | str) -> nn.Module:
    model, _, _ = open_clip.create_model_and_transforms(
        model_name, pretrained=pretrained, device=device, pretrained_text=False)
    return model.eval().requires_grad_(False)


def _holder(open_clip: ModuleType, model: nn.Module, tokenizer_name: str, name: str) -> ClipModel:
    cfg = model.visual.preprocess_cfg
    size = cfg["size"]
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h != w:
        raise ClipLoadError(f"CLIP model {name} has a non-square input {h}x{w}; only square "
                            f"inputs are supported")
    return ClipModel(model=model, tokenizer=open_clip.get_tokenizer(tokenizer_name),
                     image_size=int(h), mean=tuple(float(m) for m in cfg["mean"]),
                     std=tuple(float(s) for s in cfg["std"]), name=name)


def load_clip(spec: str, *, device: torch.device | str = "cpu", allow_download: bool = False,
              cache_dir: str | Path | None = None) -> ClipModel:
    """Load a CLIP model from local files through ``open_clip.create_model_and_transforms``.

    Args:
        spec: one of

            * ``NAME:FILE``: an open_clip model name and a local state dict (.pt/.bin/.safetensors),
              e.g. ``ViT-B-32-quickgelu:/models/open_clip_pytorch_model.bin`` (OpenAI weights
              need the ``-quickgelu`` variant of the name). Names of configs in
              :data:`DEMO_CONFIG_DIR` (``flowgrad-tiny-clip``) work too.
            * ``CONFIG_JSON:FILE``: a custom open_clip model config (registered under its file
              stem) and its weights.
            * a folder in Hugging Face hub layout: ``open_clip_config.json`` (with
              ``model_cfg``, optional ``preprocess_cfg``) plus ``open_clip_model.safetensors``
              or ``open_clip_pytorch_model.bin``.
            * ``hf-hub:ORG/REPO``: such a folder from the local Hugging Face cache only.
        device: where the model goes.
        allow_download: allow ``hf-hub:`` specs and ``NAME:TAG`` (an open_clip pretrained tag) to
            download. Downloads also need ``HF_HUB_OFFLINE=0`` in the environment, since flowgrad
            defaults it to 1 before huggingface_hub is imported.
        cache_dir: Hugging Face cache to search for ``hf-hub:`` specs (default: the standard one).

    Returns:
        A frozen :class:`ClipModel` whose ``name`` is ``spec``.

    Raises:
        ClipLoadError: one line naming the missing/corrupt file or unknown name and the fix.
        ImportError: open_clip is not installed (with the install command).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ClipLoadError(f"CLIP spec must be a non-empty str such as 'ViT-B-32-quickgelu:FILE', "
                            f"got {spec!r}")
    resolved = _resolve(spec.strip(), cache_dir, allow_download)
    open_clip = import_open_clip()
    try:
        model = _create(open_clip, resolved.model_name, resolved.pretrained, device)
    except Exception as err:  # noqa: BLE001 - torch, pickle and safetensors raise many types
        if "loading state_dict" in str(err):
            raise ClipLoadError(f"weights {resolved.weights} do not fit model "
                                f"'{resolved.model_name}' ({_one_line(err)}); pass the model "
                                f"name the weights were trained with") from err
        raise ClipLoadError(f"CLIP weights file {resolved.weights} is corrupt or not an open_clip "
                            f"state dict ({_one_line(err)})") from err
    return _holder(open_clip, model, resolved.model_name, spec.strip())


@contextmanager
def _quiet_logging() -> Iterator[None]:
    """Silence open_clip's expected "initialized randomly" warning."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def random_clip(name_or_config_json: str, *, seed: int = 0,
                device: torch.device | str = "cpu") -> ClipModel:
    """A randomly initialized open_clip model (no weights), for tests and timing.

    Args:
        name_or_config_json: an open_clip model name (``ViT-B-32``), a config name in
            :data:`DEMO_CONFIG_DIR` (``flowgrad-tiny-clip``), or a model config JSON path.
        seed: seeds the (CPU) initialization; the global RNG state is left untouched.
        device: where the model goes.

    Returns:
        A frozen :class:`ClipModel` named ``random:NAME:seed=SEED``.
    """
    if not isinstance(name_or_config_json, str) or not name_or_config_json:
        raise ClipLoadError(f"name_or_config_json must be a model name or config path, got "
                            f"{name_or_config_json!r}")
    if name_or_config_json.endswith(".json"):
        name = _register_config(name_or_config_json)
    else:
        name = _model_name(name_or_config_json)
    open_clip = import_open_clip()
    with torch.random.fork_rng(devices=[]), _quiet_logging():
        torch.manual_seed(seed)
        model = _create(open_clip, name, None, device)
    return _holder(open_clip, model, name, f"random:{name}:seed={seed}")


# --------------------------------------------------------------------------- loss and metrics


@dataclass(frozen=True)
class ClipLossTerms:
    """The parts of one :class:`ClipLoss` evaluation, each (B,).

    Attributes:
        loss: ``alpha * (clip + off_axis_weight * off_axis) + (1 - alpha) * l1 + preserve_weight * keep``.
        clip: mean over replicas of ``-cos`` (or the directional difference).
        l1: mean absolute difference to the source image (zeros without a source).
        keep: mean absolute change of the preserved prompts' scores (None without any).
        off_axis: mean norm of the image embedding's change off the text direction (None when its
            weight is 0).
    """

    loss: Tensor
    clip: Tensor
    l1: Tensor
    keep: Tensor | None = None
    off_axis: Tensor | None = None

    def detach(self) -> ClipLossTerms:
        """The same terms without autograd history."""
        return ClipLossTerms(self.loss.detach(), self.clip.detach(), self.l1.detach(),
                             None if self.keep is None else self.keep.detach(),
                             None if self.off_axis is None else self.off_axis.detach())


class ClipLoss:
    """FlowGrad's CLIP guidance loss with per-image values.

    ``loss_b = alpha * (clip_b + off_axis_weight * off_b) + (1 - alpha) * l1_b + preserve_weight * keep_b``
    where, over ``replicas`` augmented copies ``a_{b,r}`` of image ``b``:

    * without a negative prompt: ``clip_b = mean_r -cos(E(a_{b,r}), e_prompt)``;
    * with one (directional): ``clip_b = mean_r -(cos(E(a_{b,r}), e_prompt) -
      cos(E(a_{b,r}), e_negative))``;
    * ``l1_b = mean |x_b - source_b|`` over (C, H, W), or 0 without a source;
    * ``keep_b = mean_k |mean_r (s_k(a_{b,r}) - s_k(a'_{b,r}))|`` over the ``preserve`` prompt pairs,
      where ``a'_{b,r}`` is the source under the same augmentation as ``a_{b,r}`` and
      ``s_k(a) = cos(E(a), e_k) - cos(E(a), e_k^neg)`` (just ``cos(E(a), e_k)`` for a pair without a
      negative). It keeps what CLIP sees of other attributes where it was (needs a source).
    * ``off_b = mean_r sqrt(|P (E(a_{b,r}) - E(a'_{b,r}))|^2 + d^2) - d`` with ``P`` the projection
      off the unit text direction (prompt minus negative, or the prompt alone) and
      ``d = OFF_AXIS_SMOOTHING``: what the edit changes in CLIP's view besides the requested
      attribute, of every kind and not only the preserved prompts' (needs a source). On the demo
      world it moved old's gain-versus-leakage frontier (``tests/benchmarks/RESULTS.md`` 4.3, round 17).

    Augmentation parameters are drawn per image per replica from the loss's own CPU generator
    (seeded once with ``seed``), so a sequence of calls is reproducible and image ``b``'s loss
    depends only on image ``b`` (and its parameters). With ``image_seeds`` (one per image of the batch)
    every image draws from a generator of its own instead, so its augmentations, and so its loss, do not
    depend on which images share its batch (discovery uses this: its result does not depend on
    ``--batch-size``). By default every call draws new ones; with
    ``fixed_augmentations`` the first call with a batch of B images draws them and every later call
    with B images reuses them, so the loss is a deterministic function of the images (passes of an
    optimization are then compared without augmentation noise). Text embeddings are computed once; all
    ``B * replicas`` augmented images go through the image tower in one call (or chunks of
    ``max_batch``).

    Attributes:
        last_terms: detached :class:`ClipLossTerms` of the latest call (None before the first).
    """

    def __init__(self, clip: ClipModel, prompt: str, *, negative_prompt: str | None = None,
                 source: Tensor | None = None, alpha: float = 0.7, replicas: int = 20,
                 policy: Policy = POLICY_OPS, seed: int = 0, max_batch: int | None = None,
                 preserve: Sequence[tuple[str, str]] = (), preserve_weight: float = 0.0,
                 off_axis_weight: float = 0.0, fixed_augmentations: bool = False,
                 image_seeds: Sequence[int] | None = None) -> None:
        if not isinstance(clip, ClipModel):
            raise TypeError(f"clip must be a ClipModel (from load_clip/random_clip), got "
                            f"{type(clip).__name__}")
        for arg, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{arg} must be a non-empty str, got {value!r}")
        if prompt is None:
            raise ValueError("prompt must be a non-empty str, got None")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be a float in [0, 1], got {alpha!r}")
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise ValueError(f"replicas must be an int >= 1, got {replicas!r}")
        if max_batch is not None and (isinstance(max_batch, bool)
                                      or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be None or an int >= 1, got {max_batch!r}")
        if source is not None:
            _check_images(source, "source", clip.device)
        pairs = _preserve_pairs(preserve)
        if isinstance(preserve_weight, bool) or not isinstance(preserve_weight, (int, float)) \
                or not preserve_weight >= 0:
            raise ValueError(f"preserve_weight must be a float >= 0, got {preserve_weight!r}")
        if pairs and source is None:
            raise ValueError("preserved prompts are compared with the source image; pass source=")
        if isinstance(off_axis_weight, bool) or not isinstance(off_axis_weight, (int, float)) \
                or not off_axis_weight >= 0:
            raise ValueError(f"off_axis_weight must be a float >= 0, got {off_axis_weight!r}")
        if off_axis_weight > 0 and source is None:
            raise ValueError("the off-axis term compares the image with the source image; pass source=")
        self.clip = clip
        self.prompt = prompt
        self.negative_prompt = negative_prompt
        self.source = None if source is None else source.detach()
        self.alpha = float(alpha)
        self.replicas = replicas
        self.policy = parse_policy(policy)
        self.seed = int(seed)
        self.max_batch = max_batch
        self.generator = torch.Generator().manual_seed(self.seed)
        self.image_generators: list[torch.Generator] | None = None
        if image_seeds is not None:
            if isinstance(image_seeds, (int, str, bytes)) or not isinstance(image_seeds, Sequence):
                raise ValueError(f"image_seeds must be a sequence of ints (one per image), got {image_seeds!r}")
            self.reseed(image_seeds)
        self.fixed_augmentations = bool(fixed_augmentations)
        self._fixed_params: dict[int, AugmentParams] = {}
        texts = [prompt] if negative_prompt is None else [prompt, negative_prompt]
        embeddings = clip.encode_text(texts)
        self.text_embedding: Tensor = embeddings[0]
        self.negative_embedding: Tensor | None = embeddings[1] if negative_prompt else None
        self.off_axis_weight = float(off_axis_weight)
        axis = self.text_embedding if self.negative_embedding is None else \
            self.text_embedding - self.negative_embedding
        self.text_axis: Tensor = axis / axis.norm().clamp_min(1e-12)  # unit; what the off-axis term leaves free
        self.preserve = pairs
        self.preserve_weight = float(preserve_weight)
        # (D, K): column k scores pair k (prompt minus negative; a missing negative adds nothing).
        self.preserve_matrix: Tensor | None = None
        if pairs:
            cols = []
            for text, neg in pairs:
                e = clip.encode_text([text, neg] if neg else [text])
                cols.append(e[0] - e[1] if neg else e[0])
            self.preserve_matrix = torch.stack(cols, dim=1)
        self.last_terms: ClipLossTerms | None = None

    def reseed(self, seed: int | Sequence[int]) -> None:
        """Restart the draws: an int reseeds the loss's generator, a sequence gives every image its own.

        Fixed augmentations (``fixed_augmentations``) already drawn are kept.
        """
        if isinstance(seed, Sequence) and not isinstance(seed, (str, bytes)):
            if not all(isinstance(s, int) and not isinstance(s, bool) for s in seed):
                raise ValueError(f"image_seeds must be ints, got {list(seed)!r}")
            self.image_generators = [torch.Generator().manual_seed(int(s)) for s in seed]
        elif isinstance(seed, int) and not isinstance(seed, bool):
            self.generator.manual_seed(seed)
            self.image_generators = None
        else:
            raise ValueError(f"seed must be an int or a sequence of ints (one per image), got {seed!r}")

    def sample_params(self, batch_size: int) -> AugmentParams:
        """Draw augmentation params for a batch from the loss's generator (or the images' own).

        Row ``b * replicas + r`` belongs to image ``b``, replica ``r``; the rows of image ``b``
        are ``params.select(slice(b * replicas, (b + 1) * replicas))``.
        """
        if self.image_generators is not None:
            if batch_size != len(self.image_generators):
                raise ValueError(f"the loss has seeds for {len(self.image_generators)} images, got a batch of "
                                 f"{batch_size}")
            return sample_augment_params_each(self.policy, self.replicas, self.image_generators)
        return sample_augment_params(self.policy, batch_size * self.replicas, self.generator)

    def terms(self, images: Tensor, params: AugmentParams | None = None) -> ClipLossTerms:
        """Loss and its parts for ``images`` (B, 3, H, W) in [0, 1]; differentiable.

        Args:
            images: the images to score, on the CLIP model's device.
            params: augmentation params with ``B * replicas`` rows (default: fresh ones from
                :meth:`sample_params`).
        """
        _check_images(images, "images", self.clip.device)
        b = images.shape[0]
        if params is None and self.fixed_augmentations:
            if b not in self._fixed_params:
                self._fixed_params[b] = self.sample_params(b)
            params = self._fixed_params[b]
        elif params is None:
            params = self.sample_params(b)
        elif len(params) != b * self.replicas and params.policy:
            raise ValueError(f"params has {len(params)} rows, expected batch * replicas = "
                             f"{b * self.replicas}; draw them with sample_params({b})")
        copies = apply_augment(images.repeat_interleave(self.replicas, dim=0), params)
        emb = self.clip.encode_image(copies, max_batch=self.max_batch)  # (B * R, D)
        score = emb @ self.text_embedding
        if self.negative_embedding is not None:
            score = score - emb @ self.negative_embedding
        clip_term = -score.view(b, self.replicas).mean(dim=1)
        l1_term = self._l1(images)
        loss = self.alpha * clip_term + (1.0 - self.alpha) * l1_term
        keep = off = None
        if self.preserve_matrix is not None or self.off_axis_weight > 0:
            ref = self._source_embeddings(params)
            if self.preserve_matrix is not None:
                keep = self._keep(emb, ref, b)
                if self.preserve_weight > 0:
                    loss = loss + self.preserve_weight * keep
            if self.off_axis_weight > 0:
                off = self._off_axis(emb, ref, b)
                loss = loss + self.alpha * self.off_axis_weight * off
        return ClipLossTerms(loss=loss, clip=clip_term, l1=l1_term, keep=keep, off_axis=off)

    def _source_embeddings(self, params: AugmentParams) -> Tensor:
        """(B * R, D) embeddings of the source under the same augmentations as the images (no grad)."""
        assert self.source is not None  # shapes checked by _l1 already
        with torch.no_grad():
            return self.clip.encode_image(apply_augment(self.source.repeat_interleave(self.replicas, dim=0),
                                                        params), max_batch=self.max_batch)

    def _keep(self, emb: Tensor, ref: Tensor, b: int) -> Tensor:
        """(B,) mean |change| of the preserved scores vs the source under the same augmentations."""
        assert self.preserve_matrix is not None
        ref_scores = (ref @ self.preserve_matrix).view(b, self.replicas, -1).mean(dim=1)
        scores = (emb @ self.preserve_matrix).view(b, self.replicas, -1).mean(dim=1)
        return (scores - ref_scores).abs().mean(dim=1)

    def _off_axis(self, emb: Tensor, ref: Tensor, b: int) -> Tensor:
        """(B,) mean smoothed norm of the embedding change orthogonal to the text axis."""
        change = emb - ref
        off = change - (change @ self.text_axis)[:, None] * self.text_axis
        d = OFF_AXIS_SMOOTHING
        return ((off.square().sum(dim=1) + d * d).sqrt() - d).view(b, self.replicas).mean(dim=1)

    def __call__(self, images: Tensor, params: AugmentParams | None = None) -> Tensor:
        """Per-image loss (B,) for ``images`` (B, 3, H, W) in [0, 1]; see :meth:`terms`."""
        terms = self.terms(images, params)
        self.last_terms = terms.detach()
        return terms.loss

    def _l1(self, images: Tensor) -> Tensor:
        if self.source is None:
            return images.new_zeros(images.shape[0], dtype=torch.float32)
        if self.source.shape != images.shape:
            raise ValueError(f"source has shape {tuple(self.source.shape)} but images have "
                             f"{tuple(images.shape)}; pass a source of the same batch and size")
        return (images - self.source).abs().mean(dim=(1, 2, 3))


def _preserve_pairs(preserve: object) -> tuple[tuple[str, str], ...]:
    """Validate ``preserve``: a sequence of (prompt, negative_prompt) pairs ("" for no negative)."""
    if isinstance(preserve, (str, bytes)) or not isinstance(preserve, Sequence):
        raise ValueError(f"preserve must be a sequence of (prompt, negative_prompt) pairs, got {preserve!r}")
    pairs = []
    for pair in preserve:
        if (isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2
                or not all(isinstance(t, str) for t in pair) or not pair[0].strip()):
            raise ValueError(f"each preserved entry must be a (prompt, negative_prompt) pair of str with a "
                             f"non-empty prompt, got {pair!r}")
        pairs.append((pair[0], pair[1]))
    return tuple(pairs)


def clip_score(clip: ClipModel, images_0_1: Tensor, prompt: str) -> Tensor:
    """Plain cosine similarity (no augmentation) of each image with ``prompt``: (B,) float32.

    Differentiable; wrap in ``torch.no_grad()`` when used as a metric.
    """
    return clip.encode_image(images_0_1) @ clip.encode_text([prompt])[0]


def zero_shot(clip: ClipModel, images: Tensor, prompt: str, negative_prompt: str) -> Tensor:
    """(B,) bool: True where an image is closer to ``prompt`` than to ``negative_prompt``."""
    with torch.no_grad():
        scores = clip.encode_image(images) @ clip.encode_text([prompt, negative_prompt]).T
    return scores[:, 0] > scores[:, 1]
