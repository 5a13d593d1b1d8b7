"""Where flowgrad finds its data folder (attribute registry, demo weights)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["data_dir", "demo_dir"]


def data_dir() -> Path:
    """The ``data/`` folder: ``$FLOWGRAD_DATA`` if set, else the one beside the installed packages.

    Install with ``pip install -e .`` (editable) so the repository's ``data/`` is used in place.
    """
    env = os.environ.get("FLOWGRAD_DATA")  # flowgrad.demo.registry.DATA_ENV
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parents[1] / "data"


def demo_dir() -> Path:
    """``data/demo``: weights, manifest and model card of the embedded demo world."""
    return data_dir() / "demo"
