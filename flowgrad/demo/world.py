"""Loading the embedded demo world's committed models from ``data/demo``.

Every weight file is listed in ``data/demo/manifest.json`` with its sha256; a missing or corrupted
file raises :class:`DemoWeightsError` saying which file, what was expected and how to regenerate it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..paths import demo_dir
from ..velocity import VelocityField
from .nets import DemoUNet, JudgeConfig, JudgeNet, UNetConfig

__all__ = ["DemoWeightsError", "DemoFlow", "WEIGHT_FILES", "CLIP_CONFIG", "load_demo_flow", "load_judge",
           "judge", "demo_clip_spec", "sha256_file", "read_manifest", "weight_path"]

WEIGHT_FILES = {"flow": "flow.pt", "clip": "tiny_clip.pt", "judge": "judge.pt"}
CLIP_CONFIG = "flowgrad-tiny-clip.json"
MANIFEST = "manifest.json"
REGENERATE = "regenerate with `flowgrad demo train --out data/demo` (GPU recommended) or restore it with git"


class DemoWeightsError(ValueError):
    """A demo weight file is missing, corrupted or not described by the manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(directory: Path | None = None) -> dict:
    path = (directory or demo_dir()) / MANIFEST
    if not path.is_file():
        raise DemoWeightsError(f"demo manifest not found: {path}; {REGENERATE}")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DemoWeightsError(f"demo manifest {path} is unreadable ({exc}); {REGENERATE}") from None


def weight_path(kind: str, directory: Path | None = None, *, verify: bool = True) -> Path:
    """Path of a demo weight file ("flow", "clip", "judge"), checked against the manifest's sha256."""
    directory = directory or demo_dir()
    path = directory / WEIGHT_FILES[kind]
    if not path.is_file():
        raise DemoWeightsError(f"demo {kind} weights not found: {path}; {REGENERATE}")
    if verify:
        entry = read_manifest(directory).get("files", {}).get(WEIGHT_FILES[kind])
        if entry is None:
            raise DemoWeightsError(f"{path.name} is not listed in {directory / MANIFEST}; {REGENERATE}")
        actual = _cached_sha(str(path), path.stat().st_mtime_ns, path.stat().st_size)
        if actual != entry["sha256"]:
            raise DemoWeightsError(f"demo {kind} weights {path} are corrupted: sha256 {actual[:12]}…, "
                                   f"expected {entry['sha256'][:12]}… (manifest); {REGENERATE}")
    return path


@functools.lru_cache(maxsize=16)
def _cached_sha(path: str, mtime_ns: int, size: int) -> str:
    return sha256_file(Path(path))


def _load_payload(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a bad file
        raise DemoWeightsError(f"cannot read demo weights {path}: {type(exc).__name__}; {REGENERATE}") from None


def _float_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


class DemoFlow(VelocityField):
    """The demo world's rectified flow: 64x64 RGB portraits, data space [-1, 1], t in [0, 1]."""

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.net(x, t)


def load_demo_flow(device: str | torch.device = "cpu", directory: Path | None = None) -> DemoFlow:
    """The committed demo velocity field (EMA weights), frozen, on ``device``.

    On the CPU its convolution weights are kept channels-last: oneDNN then runs the network's forward and VJP
    1.1-1.2x faster, and a default `discover-directions` job 1.14x (tests/benchmarks/RESULTS.md 4.8); outputs
    differ from the contiguous layout's by float32 rounding (~2e-6 relative). On a GPU the layout stays
    contiguous (channels-last gained nothing there in float32).
    """
    payload = _load_payload(weight_path("flow", directory))
    net = DemoUNet(UNetConfig.from_dict(payload["config"]))
    net.load_state_dict(_float_state(payload["state_dict"]))
    flow = DemoFlow(net, (3, 64, 64), "demo").to(device)
    if torch.device(device).type == "cpu":
        flow.to(memory_format=torch.channels_last)
    return flow


@functools.lru_cache(maxsize=4)
def _judge_cached(device: str, directory: str | None) -> JudgeNet:
    return load_judge(device, Path(directory) if directory else None)


def load_judge(device: str | torch.device = "cpu", directory: Path | None = None) -> JudgeNet:
    """The committed factor judge (evaluation only; never used for guidance)."""
    payload = _load_payload(weight_path("judge", directory))
    net = JudgeNet(JudgeConfig.from_dict(payload["config"]))
    net.load_state_dict(_float_state(payload["state_dict"]))
    return net.eval().requires_grad_(False).to(device)


@torch.no_grad()
def judge(images: Tensor, batch_size: int = 256) -> dict[str, Tensor]:
    """Predicted factors of (n, 3, 64, 64) images in [0, 1]: name -> (n,) tensor in [0, 1] (on CPU).

    Binary factors are thresholded to exactly 0/1.
    """
    if images.dim() != 4 or tuple(images.shape[1:]) != (3, 64, 64):
        raise ValueError(f"judge expects images of shape (n, 3, 64, 64), got {tuple(images.shape)}")
    net = _judge_cached(str(images.device), None)
    out = torch.cat([net(images[i:i + batch_size].float().clamp(0, 1)).cpu()
                     for i in range(0, images.shape[0], batch_size)])
    cfg = net.config
    return {name: (out[:, j] > 0.5).float() if binary else out[:, j]
            for j, (name, binary) in enumerate(zip(cfg.factors, cfg.binary))}


def demo_clip_spec(directory: Path | None = None) -> str:
    """``CONFIG_JSON:WEIGHTS`` spec of the tiny demo CLIP for :func:`flowgrad.clip_guidance.load_clip`."""
    directory = directory or demo_dir()
    return f"{directory / CLIP_CONFIG}:{weight_path('clip', directory)}"


def save_payload(model: nn.Module, config: dict, path: Path) -> dict:
    """Save fp16 weights + config; returns the manifest entry (sha256, bytes, parameters)."""
    state = {k: v.detach().to("cpu", torch.float16) if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    payload = {"config": config, "state_dict": state} if config is not None else state
    torch.save(payload, path)
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size,
            "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float16"}
