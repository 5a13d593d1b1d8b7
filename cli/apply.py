"""`apply-directions`: edit images with stored directions at given strengths (no optimization)."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import click

from .common import CliError, Command, console, friendly_errors, pick_device, run_program, setup_logging


def parse_edits(attrs: tuple[str, ...], strength: float) -> list[tuple[str, float]]:
    """``--attr old`` (uses --strength) or ``--attr old=1.5``; any number of them.

    The strength is what follows the last ``=`` when it is a number; otherwise the whole argument is the
    name (direction names may contain ``=``). Strengths must be finite.
    """
    edits = []
    for a in attrs:
        name, _, value = a.rpartition("=")
        try:
            edits.append((name.strip(), float(value)) if name else (a.strip(), strength))
        except ValueError:
            edits.append((a.strip(), strength))
    for a, (name, s) in zip(attrs, edits):
        if not math.isfinite(s):
            raise CliError(f"--attr {a!r}: the strength must be a finite number, got {s}")
    if not edits:
        raise CliError("give at least one --attr NAME[=STRENGTH]")
    return edits


@click.command("apply-directions", cls=Command)
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--directions", "store_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="HDF5 direction store.")
@click.option("--attr", "attrs", multiple=True, help="Direction name, or NAME=STRENGTH; repeat to compose.")
@click.option("--strength", type=float, default=1.0, show_default=True, help="Strength for --attr without '='.")
@click.option("--project-out", "project_out", multiple=True, help="Remove the component along this direction.")
@click.option("--samples", type=int, default=None, help="Edit K fresh samples instead of image files.")
@click.option("--seed", type=int, default=1, show_default=True, help="Seed of the samples.")
@click.option("--steps", "n_steps", type=int, default=None,
              help="Euler steps (default: 100, the paper's N, or the direction's own when it has more; the "
                   "direction is resampled to them).")
@click.option("--model", default=None, help="Model spec (default: the one stored with the direction).")
@click.option("--model-config", default=None)
@click.option("--invert-method", type=click.Choice(["euler", "heun", "fixed-point"]), default="euler",
              show_default=True)
@click.option("--force", is_flag=True, help="Apply even if the model fingerprint differs.")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-v", "--verbose", is_flag=True)
@friendly_errors
def apply_directions(images, store_path, attrs, strength, project_out, samples, seed, n_steps, model, model_config,
                     invert_method, force, device, out_dir, verbose) -> None:
    """Edit real images (inverted) or fresh samples with stored directions; writes PNGs and a grid."""
    setup_logging(verbose)
    import torch

    from directions.apply import (EditSpec, apply_controls, check_compatible, compose_controls, default_apply_steps,
                                  first_active_step)
    from directions.store import DirectionStore
    from flowgrad import rmse
    from flowgrad.models import load_model

    from .images import make_grid, save_image
    from .sources import load_sources, rmse_list

    t0 = time.perf_counter()
    edits = parse_edits(attrs, strength)
    store = DirectionStore(store_path)
    specs = [EditSpec(store.read(name), s) for name, s in edits]
    removed = [store.read(name) for name in project_out]
    dev = pick_device(device)
    velocity = load_model(model or specs[0].direction.model or "demo", model_config, device=dev)
    for d in [e.direction for e in specs] + removed:
        check_compatible(d, velocity, force=force)
    steps = default_apply_steps([e.direction for e in specs]) if n_steps is None else n_steps
    control = compose_controls(specs, steps, removed).to(dev)
    eps = specs[0].direction.eps
    # Before its first active step (the direction's window start) the edit is the unedited trajectory:
    # both branch from the state there (real images are inverted down to it only).
    start = min(first_active_step(control), steps - 1)
    src = load_sources(velocity, images, samples, seed, steps, dev, invert_method, start_step=start, eps=eps,
                       reconstruct=False)
    with torch.no_grad():
        before_x = apply_controls(velocity, src.z0, None, steps, eps, start_step=start)
        after = velocity.to_image(apply_controls(velocity, src.z0, control, steps, eps,
                                                 start_step=start)).clamp(0, 1)
        before = velocity.to_image(before_x).clamp(0, 1)
        if src.originals is not None:  # the unedited branch is the reconstruction
            src.reconstruction_rmse = rmse_list(rmse(before_x, velocity.from_image(src.originals)))
    out_dir.mkdir(parents=True, exist_ok=True)
    for label, b, a in zip(src.labels, before, after):
        save_image(b, out_dir / f"{label}_before.png")
        save_image(a, out_dir / f"{label}_edited.png")
    rows = [src.originals, before, after] if src.originals is not None else [before, after]
    save_image(make_grid(torch.cat(rows), nrow=len(src.labels), scale=2 if before.shape[-1] <= 64 else 1),
               out_dir / "grid.png")
    applied: dict[str, float] = {}
    for name, s in edits:  # a name given twice is applied twice: report the summed strength
        applied[name] = applied.get(name, 0.0) + s
    report = {"edits": applied, "project_out": list(project_out), "n_steps": steps, "branch_step": start,
              "images": src.labels, "reconstruction_rmse": src.reconstruction_rmse,
              "l1_change": (after - before).abs().flatten(1).mean(1).tolist(),
              "seconds": round(time.perf_counter() - t0, 2)}
    (out_dir / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    for notice in src.notices:
        console(f"notice: {notice}")
    if src.reconstruction_rmse is not None:
        console("reconstruction RMSE (data space): " + ", ".join(f"{r:.4f}" for r in src.reconstruction_rmse))
    console(f"edited {len(src.labels)} image(s) with {', '.join(f'{n}={s:g}' for n, s in edits)} -> {out_dir}")


def main() -> None:
    """Console-script entry point (see :func:`cli.common.run_program`)."""
    run_program(apply_directions)


if __name__ == "__main__":  # python -m cli.apply
    main()
