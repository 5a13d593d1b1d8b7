"""`plot-sweep`: an image grid and metric curves over a range of strengths."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import click

from .common import Command, console, friendly_errors, pick_device, run_program, setup_logging


@click.command("plot-sweep", cls=Command)
@click.argument("images", nargs=-1, type=click.Path(dir_okay=False))
@click.option("--directions", "store_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--attr", required=True, help="Direction name.")
@click.option("--strengths", default="-2:2:9", show_default=True, help="start:stop:count or a,b,c.")
@click.option("--samples", type=int, default=None, help="Sweep K fresh samples instead of image files.")
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--steps", "n_steps", type=int, default=None,
              help="Euler steps (default: 100, or the direction's own when it has more).")
@click.option("--model", default=None)
@click.option("--model-config", default=None)
@click.option("--clip", default=None, help="CLIP for the score curve (default: the direction's).")
@click.option("--project-out", "project_out", multiple=True)
@click.option("--force", is_flag=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="PNG figure; metrics go next to it as .csv and .json.")
@click.option("-v", "--verbose", is_flag=True)
@friendly_errors
def plot_sweep(images, store_path, attr, strengths, samples, seed, n_steps, model, model_config, clip,
               project_out, force, device, out_path, verbose) -> None:
    """Edit images at several strengths; plot the grid and CLIP/L1 (and judged factor) curves."""
    setup_logging(verbose)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from directions.apply import check_compatible, default_apply_steps
    from directions.store import DirectionStore
    from directions.sweep import parse_strengths, sweep, sweep_start
    from flowgrad.models import load_guidance_clip, load_model

    from .images import make_grid
    from .sources import load_sources

    values = parse_strengths(strengths)
    store = DirectionStore(store_path)
    direction = store.read(attr)
    removed = [store.read(n) for n in project_out]
    dev = pick_device(device)
    spec = model or direction.model or "demo"
    velocity = load_model(spec, model_config, device=dev)
    check_compatible(direction, velocity, force=force)
    steps = default_apply_steps([direction]) if n_steps is None else n_steps
    start = sweep_start(direction, steps, removed)
    src = load_sources(velocity, images, samples, seed, steps, dev, start_step=start, eps=direction.eps,
                       reconstruct=False)
    guidance = load_guidance_clip(clip or direction.clip or "demo", device=dev)
    judge = None
    if spec == "demo":
        from flowgrad.demo import world

        judge = world.judge
    result = sweep(velocity, src.z0, direction, values, steps, clip=guidance, judge=judge, project_out=removed,
                   start_step=start)

    n_img = result.images.shape[1]
    grid = make_grid(result.images.transpose(0, 1).reshape(-1, *result.images.shape[2:]), nrow=len(values),
                     scale=2 if result.images.shape[-1] <= 64 else 1)
    means = result.mean_metrics()
    factor_names = [k for k in means if k not in ("clip", "l1")]
    fig, axes = plt.subplots(1, 3 if factor_names else 2, figsize=(18 if factor_names else 12, 6),
                             gridspec_kw={"width_ratios": [2, 1, 1] if factor_names else [2, 1]})
    axes[0].imshow(grid.permute(1, 2, 0).numpy())
    axes[0].set_title(f"{attr}: rows = images, columns = strength {values[0]:g} .. {values[-1]:g}")
    axes[0].axis("off")
    ax = axes[1]
    ax.plot(values, means["clip"], "o-", label=f"CLIP score: '{direction.prompt}'")
    ax.set_xlabel("strength")
    ax.set_ylabel("CLIP score")
    ax2 = ax.twinx()
    ax2.plot(values, means["l1"], "s--", color="tab:red", label="L1 to unedited")
    ax2.set_ylabel("L1 to unedited")
    ax.legend(loc="upper left")
    ax2.legend(loc="lower right")
    if factor_names:
        for name in factor_names:
            axes[2].plot(values, means[name], label=name, lw=2.5 if name in _targets(direction) else 1)
        axes[2].set_xlabel("strength")
        axes[2].set_ylabel("judged factor (mean)")
        axes[2].set_title("demo-world judge: target vs leakage")
        axes[2].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)

    rows = [{"strength": s, "image": src.labels[i], **{k: float(v[j, i]) for k, v in result.metrics.items()}}
            for j, s in enumerate(values) for i in range(n_img)]
    with open(out_path.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out_path.with_suffix(".json").write_text(json.dumps({"direction": attr, "strengths": values, "n_steps": steps,
                                                         "mean": means, "per_image": rows}, indent=2) + "\n")
    console(f"sweep of {attr} over {len(values)} strengths x {n_img} images -> {out_path} "
            f"(+ {out_path.with_suffix('.csv').name}, {out_path.with_suffix('.json').name})")


def _targets(direction) -> set[str]:
    from flowgrad.demo.registry import load_registry

    return {a.factor for a in load_registry().values() if a.prompt == direction.prompt and a.factor}


def main() -> None:
    """Console-script entry point (see :func:`cli.common.run_program`)."""
    run_program(plot_sweep)


if __name__ == "__main__":  # python -m cli.sweep
    main()
