"""`flowgrad edit`: one FlowGrad edit of one image (invert, optimize, write results)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .common import (Command, bf16_option, coarse_option, compile_option, console, deterministic_option,
                     friendly_errors, graphs_option, maybe_graphed, model_kwargs, pick_device, precision_name,
                     progress_bar, setup_logging)


@click.command("edit", cls=Command)
@click.argument("image", type=click.Path(dir_okay=False))
@click.option("--prompt", required=True, help='e.g. "A photo of a smiling face."')
@click.option("--negative", default=None, help="Optional negative prompt (directional CLIP loss).")
@click.option("--alpha", type=float, default=0.7, show_default=True, help="CLIP weight; 1-alpha weighs L1.")
@click.option("--off-axis-weight", type=float, default=0.0, show_default=True,
              help="Weight of the term charging what CLIP sees change besides the prompt's direction (0: off).")
@click.option("--model", default="demo", show_default=True)
@click.option("--model-config", default=None)
@bf16_option
@compile_option
@click.option("--clip", default="demo", show_default=True)
@click.option("--steps", "n_steps", type=int, default=100, show_default=True)
@click.option("--iterations", type=int, default=10, show_default=True)
@click.option("--lr", type=float, default=None, help="Default: 10 (the paper's) for NCSN++, 1 for the demo.")
@click.option("--threshold", type=float, default=5e-3, show_default=True)
@click.option("--t-window", nargs=2, type=float, default=(0.0, 1.0), show_default=True,
              help="Optimize only controls with t in [T_START, T_END]; the image is inverted only down to T_START's "
                   "step.")
@coarse_option
@graphs_option
@click.option("--replicas", type=click.IntRange(min=1), default=None, help="Augmented copies (default: 20, demo 4).")
@click.option("--invert-method", type=click.Choice(["euler", "heun", "fixed-point"]), default="euler",
              show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("-v", "--verbose", is_flag=True)
@deterministic_option
@friendly_errors
def edit(image, prompt, negative, alpha, off_axis_weight, model, model_config, bf16, compile_model, clip, n_steps,
         iterations, lr, threshold, t_window, coarse_forward, cuda_graphs, replicas, invert_method, seed, device,
         out_dir, verbose) -> None:
    """Invert IMAGE, optimize it towards --prompt with FlowGrad, and write original/reconstruct/optimized PNGs
    plus metrics.json."""
    setup_logging(verbose)
    import torch

    from flowgrad import FlowGradConfig, initial_pass, invert, optimize, rmse
    from flowgrad.clip_guidance import ClipLoss, clip_score
    from flowgrad.cuda_graphs import GraphedVelocity
    from flowgrad.models import load_guidance_clip, load_model
    from flowgrad.velocity import strict_float32

    from .images import load_image, save_image

    demo = model == "demo"
    cfg = FlowGradConfig(n_steps=n_steps, iterations=iterations, lr=(1.0 if demo else 10.0) if lr is None else lr,
                         threshold=None if threshold == 0 else threshold, coarse_forward=coarse_forward,
                         t_window=tuple(t_window))
    first = cfg.first_window_step  # the steps before the window carry no control: invert only down to it
    timings: dict[str, float] = {}
    t = time.perf_counter()
    dev = pick_device(device)
    velocity = load_model(model, model_config, device=dev, **model_kwargs(bf16, compile_model))
    # float32 means float32 on a GPU (no TF32): the optimization amplifies TF32's rounding (RESULTS.md 4.1)
    with strict_float32(dev, precision_name(velocity)):  # before any graph is captured
        guidance = load_guidance_clip(clip, device=dev)
        velocity = maybe_graphed(velocity, dev, cuda_graphs)
        timings["load"] = time.perf_counter() - t
        notices: list[str] = []
        original = load_image(Path(image), velocity.sample_shape[-1], notices=notices).unsqueeze(0).to(dev)
        for n in notices:
            console(f"notice: {n}")

        t = time.perf_counter()
        x1 = velocity.from_image(original)
        z0 = invert(velocity, x1, cfg.grid.sub(first), method=invert_method)
        start = initial_pass(velocity, z0, cfg, start_step=first)  # the reconstruction, and the first pass
        recon_rmse = rmse(start.final, x1)
        timings["inversion"] = time.perf_counter() - t
        loss = ClipLoss(guidance, prompt, negative_prompt=negative, source=original, alpha=alpha,
                        replicas=(4 if demo else 20) if replicas is None else replicas, seed=seed,
                        off_axis_weight=off_axis_weight)
        t = time.perf_counter()
        with progress_bar(total=iterations + 1, desc="flowgrad", unit="it") as bar:
            def callback(info) -> None:
                bar.n = info.iteration + 1
                bar.set_postfix(loss=f"{float(info.losses[0]):.4f}", best=f"{float(info.best[0]):.4f}", refresh=False)
                bar.refresh()

            result = optimize(velocity, z0, lambda x: loss(velocity.to_image(x)), config=cfg, initial=start,
                              start_step=first, callback=callback)
        timings["optimization"] = time.perf_counter() - t
        timings.update({f"optimization.{k}": v for k, v in result.timings.items()})
        optimized = velocity.to_image(result.images).clamp(0, 1)
        reconstructed = velocity.to_image(start.final).clamp(0, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_image(original[0], out_dir / "original.png")
        save_image(reconstructed[0], out_dir / "reconstruct.png")
        save_image(optimized[0], out_dir / "optimized.png")
        with torch.no_grad():
            metrics = {
                "prompt": prompt, "negative_prompt": negative, "alpha": alpha, "off_axis_weight": off_axis_weight,
                "model": model, "clip": clip,
                "clip_score_original": float(clip_score(guidance, original, prompt)[0]),
                "clip_score_reconstruct": float(clip_score(guidance, reconstructed, prompt)[0]),
                "clip_score_optimized": float(clip_score(guidance, optimized, prompt)[0]),
                "l1_optimized_vs_original": float((optimized - original).abs().mean()),
                "reconstruction_rmse": float(recon_rmse[0]),
                "loss_before": float(result.initial_loss[0]), "loss_best": float(result.best_loss[0]),
                "best_iteration": int(result.best_iteration[0]), "status": result.status[0],
                "segments_per_iteration": result.segment_counts[:, 0].tolist(), "n_steps": n_steps,
                "iterations": iterations, "lr": cfg.lr, "threshold": cfg.threshold, "t_window": list(cfg.t_window),
                "inverted_to_step": first,
                "precision": precision_name(velocity), "tf32": torch.backends.cudnn.allow_tf32 and dev.type == "cuda",
                "compile_backend": getattr(velocity, "compile_backend", None),
                "coarse_forward": cfg.coarse_forward, "cuda_graphs": isinstance(velocity, GraphedVelocity),
                "deterministic": torch.are_deterministic_algorithms_enabled(),
                "wall_time_s": {k: round(v, 3) for k, v in timings.items()},
            }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    console(f"CLIP score {metrics['clip_score_original']:.4f} -> {metrics['clip_score_optimized']:.4f}, "
            f"L1 {metrics['l1_optimized_vs_original']:.4f}, reconstruction RMSE {metrics['reconstruction_rmse']:.4f}, "
            f"{sum(metrics['segments_per_iteration'])} segments in {iterations} iterations -> {out_dir}")
