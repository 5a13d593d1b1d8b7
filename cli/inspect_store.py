"""`flowgrad inspect`: what a direction store holds."""

from __future__ import annotations

from pathlib import Path

import click

from .common import Command, console, friendly_errors


@click.command("inspect", cls=Command)
@click.argument("store_path", type=click.Path(dir_okay=False, path_type=Path))
@friendly_errors
def inspect_store(store_path: Path) -> None:
    """List the directions of a store with provenance, scale, reliability and pairwise cosines."""
    import numpy as np

    from directions.apply import resample_steps
    from directions.store import DirectionStore

    import torch

    directions = DirectionStore(store_path).read_all()
    console(f"{store_path}: {len(directions)} direction(s)")
    for d in directions:
        rec = d.records
        ok = np.asarray(rec.get("status", [])) == "ok"
        gain = (np.asarray(rec["clip_after"])[ok] - np.asarray(rec["clip_before"])[ok]).mean() \
            if "clip_after" in rec and ok.any() else float("nan")
        cos = np.asarray(rec.get("cosine_to_direction", [np.nan]), dtype=float)
        settings = d.settings if isinstance(d.settings, dict) else {}
        terms = [f"{key.removesuffix('_weight').replace('_', '-')} {settings[key]:g}"
                 for key in ("off_axis_weight", "preserve_weight") if (settings.get(key) or 0) > 0]
        console(f"\n[{d.name}] prompt={d.prompt!r} negative={d.negative_prompt!r}\n"
                f"  method={d.method} images={d.n_images}{f'/{len(ok)}' if len(ok) else ''} steps={d.n_steps} "
                f"shape={d.image_shape} "
                f"t_window={d.time_window}" + (f" loss terms: {', '.join(terms)}" if terms else "") + "\n"
                f"  scale={d.scale:.4g} split_half_cosine={d.split_half_cosine:.3f} "
                f"per-image cosine median={np.nanmedian(cos) if np.isfinite(cos).any() else float('nan'):.3f} "
                f"CLIP gain={gain:+.4f}\n"
                f"  model={d.model} fingerprint={d.model_fingerprint[:16]}… clip={d.clip}\n"
                f"  created={d.created_at} flowgrad={d.flowgrad_version}")
    if len(directions) > 1:
        n = max(d.n_steps for d in directions)
        units = [resample_steps(torch.from_numpy(d.vector), n).double().flatten() for d in directions]
        units = [u / u.norm() for u in units]
        width = max(len(d.name) for d in directions)
        mixed = len({d.image_shape for d in directions}) > 1
        console("\npairwise cosines (after resampling to a common step count"
                + ("; n/a: different image shapes):" if mixed else "):"))
        console(" " * (width + 2) + "  ".join(f"{d.name[:8]:>8}" for d in directions))
        for d, u in zip(directions, units):
            console(f"{d.name:<{width}}  " + "  ".join(
                f"{float(u @ v):8.3f}" if d.image_shape == e.image_shape else f"{'n/a':>8}"
                for e, v in zip(directions, units)))
