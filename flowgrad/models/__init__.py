"""One model-spec language for the CLI's ``--model``/``--clip`` and the Python API."""

from __future__ import annotations

from pathlib import Path

import torch

from ..velocity import VelocityField

__all__ = ["load_model", "load_guidance_clip", "MODEL_SPECS"]

MODEL_SPECS = "'demo' (the embedded demo world) or 'ncsnpp:PATH' (a Rectified Flow NCSN++ checkpoint)"


def load_model(spec: str, config: str | None = None, *, device: str | torch.device = "cpu",
               **kwargs) -> VelocityField:
    """The velocity field v(x, t) named by ``spec``.

    Args:
        spec: ``"demo"`` — the embedded demo world's rectified flow (64x64 portraits);
            ``"ncsnpp:PATH"`` — a Rectified Flow NCSN++ checkpoint in the original on-disk format.
        config: for ``ncsnpp:`` specs, a preset name or a JSON config file (default: the paper's
            ``rectified-flow-celebahq-256`` preset). Not used for ``demo``.
        device: where to put the model.
        **kwargs: passed to the loader (e.g. ``autocast_dtype``, ``compile_backend`` for NCSN++).

    Returns:
        A frozen :class:`~flowgrad.velocity.VelocityField` with ``sample_shape``, ``to_image``,
        ``from_image`` and ``fingerprint``.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"model spec must be {MODEL_SPECS}, got {spec!r}")
    if spec == "demo":
        if config is not None:
            raise ValueError("the demo model takes no config")
        if kwargs.get("autocast_dtype") is not None:
            raise ValueError("bf16 autocast is for NCSN++ models; the demo flow runs in float32")
        if kwargs.get("compile_backend") is not None:
            raise ValueError("torch.compile is for NCSN++ models; the demo flow is small enough to run eagerly")
        from ..demo.world import load_demo_flow

        return load_demo_flow(device)
    if spec.startswith("ncsnpp:"):
        from .rectified_flow import load_rectified_flow

        path = spec[len("ncsnpp:"):]
        if not path:
            raise ValueError("model spec 'ncsnpp:' needs a checkpoint path, e.g. ncsnpp:checkpoints/celeba_hq.pth")
        return load_rectified_flow(Path(path).expanduser(), config, device=device, **kwargs)
    raise ValueError(f"unknown model spec {spec!r}; use {MODEL_SPECS}")


def load_guidance_clip(spec: str, *, device: str | torch.device = "cpu", allow_download: bool = False):
    """An open_clip model for guidance: ``"demo"`` (the tiny demo CLIP) or any
    :func:`flowgrad.clip_guidance.load_clip` spec (``NAME:FILE``, ``CONFIG_JSON:FILE``, a model folder,
    ``hf-hub:ORG/REPO`` from the local cache)."""
    from ..clip_guidance import load_clip

    if spec == "demo":
        from ..demo.world import demo_clip_spec

        spec = demo_clip_spec()
    return load_clip(spec, device=device, allow_download=allow_download)
