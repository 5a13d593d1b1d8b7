"""`discover-directions`: optimize many images against an attribute and store a global direction."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import click

from .common import (CliError, Command, bf16_option, coarse_option, compile_option, console, deterministic_option,
                     friendly_errors, graphs_option, maybe_graphed, model_kwargs, pick_device, precision_name,
                     progress_bar, run_program, setup_logging, warm_cuda)

DEFAULT_STORE = Path("directions.h5")
GPU_DEMO_BATCH = 64
"""Default --batch-size for the demo model on a GPU: its calls are launch-bound, so one batch of the job's
images is fastest (a fresh `discover-directions --attr old` on an H100: 8.3-9.4 s instead of 9.1-9.7 s at 16)."""

AGGREGATOR_NAMES = ("mean", "pc1", "pca", "probe", "robust", "joint")
"""--aggregator's choices (the registry's ``AGGREGATORS``; kept literal so that --help imports no torch)."""


def default_batch_size(device, model: str, n_images: int, world: int = 1) -> int:
    """--batch-size when not given: 16, or with the demo model on a GPU every image of the job in one batch
    (at most :data:`GPU_DEMO_BATCH`), shared evenly among ``world`` processes."""
    if getattr(device, "type", str(device).split(":")[0]) == "cuda" and model == "demo":
        return max(1, min(GPU_DEMO_BATCH, -(-n_images // max(1, world))))
    return 16


def _slug(text: str) -> str:
    """A direction name from a prompt; a long one is cut and given a short hash, so prompts that share
    their first 48 characters still get different names."""
    slug = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_") or "direction"
    if len(slug) <= 48:
        return slug
    return f"{slug[:40].rstrip('_')}_{hashlib.sha256(text.encode()).hexdigest()[:7]}"


def skipped_note(statuses: Iterable[str]) -> str:
    """`` (24 no improvement, 1 nonfinite)`` for the per-image statuses that are not ``ok`` ("" if none)."""
    reasons = Counter(str(s).removeprefix("skipped: ").split("@")[0] for s in statuses if s != "ok")
    return f" ({', '.join(f'{n} {r}' for r, n in reasons.most_common())})" if reasons else ""


@click.command("discover-directions", cls=Command)
@click.option("--attr", help="Attribute name from the registry (data/attributes.toml), e.g. old.")
@click.option("--prompt", help="Attribute prompt (instead of --attr).")
@click.option("--negative", "negative", default=None, help="Negative prompt to move away from.")
@click.option("--name", default=None, help="Direction name in the store (default: the attribute).")
@click.option("--model", default="demo", show_default=True, help="'demo' or 'ncsnpp:CHECKPOINT'.")
@click.option("--model-config", default=None, help="NCSN++ preset name or JSON config.")
@bf16_option
@compile_option
@click.option("--clip", default="demo", show_default=True,
              help="'demo', NAME:FILE, CONFIG_JSON:FILE, a model folder or hf-hub:ORG/REPO (local cache).")
@click.option("--images", "images", type=click.Path(file_okay=False, exists=True), default=None,
              help="Folder of real images to invert (default: fresh seeded samples).")
@click.option("--n-images", type=int, default=None, help="Images to optimize [default: 32, or the attribute's "
              "registry recipe; with --images at most the folder's count].")
@click.option("--batch-size", type=int, default=None, help="Images optimized together [default: 16; with the demo "
              "model on a GPU all of them, up to 64, shared evenly among torchrun's processes]. Every image draws its "
              "own noise and augmentations, so the direction does not depend on it.")
@click.option("--steps", "n_steps", type=int, default=None, help="Euler steps N [default: 20, or the attribute's "
              "registry recipe].")
@click.option("--iterations", type=int, default=None, help="FlowGrad iterations per image [default: 6, or the "
              "attribute's registry recipe].")
@click.option("--lr", type=float, default=None, help="Step size [default: 10, or the attribute's recipe].")
@click.option("--optimizer", type=click.Choice(["sgd", "adam"]), default="sgd", show_default=True)
@click.option("--threshold", type=float, default=5e-3, show_default=True,
              help="Straightness threshold (0: exact backprop).")
@click.option("--alpha", type=float, default=0.7, show_default=True, help="CLIP weight; 1-alpha weighs L1.")
@click.option("--replicas", type=int, default=4, show_default=True, help="Augmented copies in the CLIP loss.")
@click.option("--t-window", nargs=2, type=float, default=None,
              help="Optimize only controls with t in [T_START, T_END] [default: 0.3 1, or the attribute's recipe].")
@coarse_option
@graphs_option
@click.option("--preserve", "preserve", multiple=True, metavar="ATTR",
              help="Registry attribute the edit should leave alone (repeatable; default with --attr: its "
                   "registry 'preserve' list). Used when --preserve-weight > 0.")
@click.option("--preserve-weight", type=float, default=None,
              help="Weight of the term holding the preserved attributes' CLIP scores [default: 0 = off, or the "
                   "attribute's recipe].")
@click.option("--off-axis-weight", type=float, default=None,
              help="Weight of the term charging what CLIP sees change besides the prompt's direction "
                   "[default: 0 = off, or the attribute's recipe].")
@click.option("--aggregator", type=click.Choice(AGGREGATOR_NAMES), default=None,
              help="How the direction is formed: an aggregate of per-image controls, or 'joint': one "
                   "control optimized on all images at once [default: mean, or the attribute's recipe].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "store_path", type=click.Path(dir_okay=False, path_type=Path), default=DEFAULT_STORE,
              show_default=True, help="HDF5 direction store.")
@click.option("--keep-offsets", is_flag=True, help="Also store every image's raw controls (compressed).")
@click.option("--resume", is_flag=True, help="Continue an interrupted job with the same settings.")
@click.option("--overwrite", is_flag=True, help="Replace a direction of the same name in the store (without it, "
              "an existing name is refused before any work).")
@click.option("-v", "--verbose", is_flag=True)
@deterministic_option
@friendly_errors
def discover_directions(attr, prompt, negative, name, model, model_config, bf16, compile_model, clip, images, n_images,
                        batch_size, n_steps, iterations, lr, optimizer, threshold, alpha, replicas, t_window,
                        coarse_forward, cuda_graphs, preserve, preserve_weight, off_axis_weight, aggregator, seed,
                        device, store_path, keep_offsets, resume, overwrite, verbose) -> None:
    """Discover a global semantic direction with FlowGrad and store it in an HDF5 file.

    Runs under torchrun too: `torchrun --nproc-per-node K discover-directions ...` shares the batches
    between the processes; rank 0 writes the store.
    """
    setup_logging(verbose)
    from directions import distributed as dist
    from directions.discover import DiscoveryConfig, check_name_free, discover, image_files
    from flowgrad import FlowGradConfig
    from flowgrad.clip_guidance import import_open_clip
    from flowgrad.demo.registry import get_attribute, load_registry, preserve_pairs
    from flowgrad.models import load_guidance_clip, load_model
    from flowgrad.velocity import strict_float32

    from .images import load_image

    if bool(attr) == bool(prompt):
        raise CliError("give exactly one of --attr NAME or --prompt TEXT")
    recipe = {}
    if attr:
        a = get_attribute(attr)
        prompt, negative = a.prompt, a.negative_prompt if negative is None else negative
        name = name or a.name
        recipe = dict(a.discovery)
    name = name or _slug(prompt)
    if not overwrite:  # before any model is loaded (discover checks again under the store's lock)
        check_name_free(store_path, name)
    # an option given on the command line, else the attribute's registry recipe, else DiscoveryConfig's default
    builtin = DiscoveryConfig(name=name, prompt=prompt)
    if n_images is None:
        n_images = recipe.get("n_images", builtin.n_images)
        if images:  # a folder of real images: up to that many of them
            n_images = min(n_images, len(image_files(images)))
    lr = recipe.get("lr", builtin.flowgrad.lr) if lr is None else lr
    n_steps = recipe.get("steps", builtin.flowgrad.n_steps) if n_steps is None else n_steps
    aggregator = recipe.get("aggregator", builtin.aggregator) if aggregator is None else aggregator
    iterations = recipe.get("iterations", builtin.flowgrad.iterations) if iterations is None else iterations
    t_window = recipe.get("t_window", builtin.flowgrad.t_window) if t_window is None else t_window
    if preserve_weight is None:
        preserve_weight = recipe.get("preserve_weight", builtin.preserve_weight)
    if off_axis_weight is None:
        off_axis_weight = recipe.get("off_axis_weight", builtin.off_axis_weight)
    for flag, value in (("--preserve-weight", preserve_weight), ("--off-axis-weight", off_axis_weight)):
        if not value >= 0:
            raise CliError(f"{flag} must be >= 0, got {value}")
    keep_names = list(preserve) or (list(a.preserve) if attr else [])
    keep = preserve_pairs(keep_names, load_registry()) if preserve_weight > 0 else ()
    if preserve_weight > 0 and not keep:
        raise CliError("--preserve-weight needs attributes to preserve: pass --preserve ATTR")
    fg = FlowGradConfig(n_steps=n_steps, iterations=iterations, lr=lr, optimizer=optimizer,
                        threshold=None if threshold == 0 else threshold, t_window=tuple(t_window),
                        coarse_forward=coarse_forward)
    cfg = DiscoveryConfig(name=name, prompt=prompt, negative_prompt=negative or "", model=model, clip=clip,
                          images=str(Path(images).resolve()) if images else None, n_images=n_images,
                          batch_size=builtin.batch_size if batch_size is None else batch_size, seed=seed,
                          flowgrad=fg, alpha=alpha, replicas=replicas,
                          preserve=keep, preserve_weight=preserve_weight, off_axis_weight=off_axis_weight,
                          aggregator=aggregator, keep_offsets=keep_offsets)
    with dist.process_group(pick_device(device)) as dev, contextlib.ExitStack() as stack:
        rank, world = dist.rank_and_world()
        if batch_size is None:
            cfg = dataclasses.replace(cfg, batch_size=default_batch_size(dev, model, n_images, world))
        t0 = time.perf_counter()
        velocity = load_model(model, model_config, device=dev, **model_kwargs(bf16, compile_model))
        cfg = dataclasses.replace(cfg, precision=precision_name(velocity))
        stack.enter_context(strict_float32(dev, cfg.precision))  # before any graph is captured
        velocity = maybe_graphed(velocity, dev, cuda_graphs)
        # CUDA's first-use costs for this network (and its graph captures) overlap with importing open_clip
        warming = warm_cuda(dev, None if compile_model else velocity, min(cfg.batch_size, n_images))
        import_open_clip()
        if warming is not None:
            warming.join()
        guidance = load_guidance_clip(clip, device=dev)
        with progress_bar(total=cfg.n_images, desc=f"discover {name}", unit="img", disable=rank != 0) as bar:
            def progress(p) -> None:
                bar.n = p.images_done
                bar.set_postfix(batch=f"{p.batch + 1}/{p.n_batches}", it=f"{p.iteration}/{p.iterations}",
                                loss=f"{p.loss:.4f}", refresh=False)
                bar.refresh()

            direction = discover(cfg, velocity, guidance, store_path, resume=resume, device=dev, overwrite=overwrite,
                                 load_image=load_image, progress=progress)
            bar.n = cfg.n_images
            bar.refresh()
    if rank == 0 and direction is not None:
        rec = direction.records
        ok = rec["status"] == "ok"
        gain = float((rec["clip_after"][ok] - rec["clip_before"][ok]).mean()) if ok.any() else float("nan")
        console(f"{name}: {int(ok.sum())}/{len(ok)} images ok{skipped_note(rec['status'])}, "
                f"CLIP score gain {gain:+.4f}, "
                f"scale {direction.scale:.3g}, split-half cosine {direction.split_half_cosine:.3f}, "
                f"{time.perf_counter() - t0:.1f}s on {dev}{f' x{world}' if world > 1 else ''} -> {store_path}")


def main() -> None:
    """Console-script entry point (see :func:`cli.common.run_program`)."""
    run_program(discover_directions)


if __name__ == "__main__":  # python -m cli.discover (also what torchrun -m cli.discover runs)
    main()
