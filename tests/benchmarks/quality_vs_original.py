"""Edit quality of flowgrad's engine against the original FlowGrad loop, on the same images.

The GPU-performance issue asks for speed "at equal edit quality: CLIP score gain and L1 within 5% of the
original's on the same images, demo world and random-weight NCSN++ both reported". This script runs both
implementations on the same source images with the same settings and reports, per implementation, the mean
CLIP score gain (``clip_score`` of the edit minus that of the source: the prompt's cosine in the guidance
CLIP, no augmentation), the mean L1 to the source (pixels in [0, 1]) and the seconds per image, and the
relative differences ours vs original (within 5%: yes / no). On the demo world it also reads the
attribute's factor with the judge (exact edit quality: mean signed change of the factor).

* original: ``original_flowgrad.original_optimization`` one image at a time (its inversion with Euler
  steps, its straightness segmentation, SGD, and the LAST controls, as the original returned), then one
  more trajectory with those controls (the original's ``generate_traj``);
* ours: the batch through ``flowgrad.invert`` (Euler) and ``flowgrad.optimize`` (per-image segmentation,
  the BEST controls seen per image), optionally under bf16 autocast, ``torch.compile`` and CUDA graphs,
  the settings that give the speed ratios of ``bench_paper.py``.

Each image's CLIP augmentations come from its own seed in both (the same seed for image i), but the two
loops draw them in a different order, so they are not the same draws: the comparison is statistical, which
is why it averages over images.

    python3 tests/benchmarks/quality_vs_original.py --world demo --attr old      # 2-core CPU: a few minutes
    python3 tests/benchmarks/quality_vs_original.py --world ncsnpp               # small random NCSN++ (CPU)
    python3 tests/benchmarks/quality_vs_original.py --world ncsnpp --full --clip ViT-B-32 --device cuda \\
        --lr 10 --bf16 --compile --graphs                                      # the paper's 256 network
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402

import common as C  # noqa: E402

from flowgrad import FlowGradConfig, invert, optimize  # noqa: E402
from flowgrad.clip_guidance import ClipLoss, clip_score, random_clip  # noqa: E402
from flowgrad.cuda_graphs import GraphedVelocity  # noqa: E402
from flowgrad.demo.render import render  # noqa: E402
from original_flowgrad import original_generate_traj, original_inversion, original_optimization  # noqa: E402

NCSNPP_PROMPT = "a photo of a smiling face"
TOLERANCE = 0.05
"""The issue's "within 5%" (relative to the original's figure)."""
SAME_PATH = 1e-4
"""Largest loss difference at which an image's optimization is counted as the same path in both."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", choices=("demo", "ncsnpp"), default="demo")
    p.add_argument("--attr", default="old", help="demo world: registry attribute (its prompt; its factor is judged)")
    p.add_argument("--full", action="store_true", help="ncsnpp: the paper's 256 preset instead of a small one")
    p.add_argument("--clip", default=None, help="ncsnpp: random open_clip model [default: the demo's tiny config]")
    p.add_argument("--n-images", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--lr", type=float, default=1.0, help="SGD step (the paper: 10 on CelebA-HQ; the demo edit: 1)")
    p.add_argument("--threshold", type=float, default=5e-3)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--replicas", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--image-seed", type=int, default=3, help="seed of the rendered source portraits")
    p.add_argument("--bf16", action="store_true", help="ours under bf16 autocast (NCSN++ only)")
    p.add_argument("--compile", action="store_true", help="ours through torch.compile (NCSN++ only)")
    p.add_argument("--graphs", action="store_true", help="ours replayed as CUDA graphs (GPU only)")
    p.add_argument("--one-sided-original", action="store_true",
                   help="the original loop with flowgrad's one-sided straightness at step 0 instead of its wrap-around "
                        "(isolates the other difference: the original returns the last controls, ours the best)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the report here")
    args = p.parse_args(argv)
    if args.world == "demo" and (args.bf16 or args.compile or args.full or args.clip):
        p.error("--bf16, --compile, --full and --clip are for --world ncsnpp")
    if args.graphs and not args.device.startswith("cuda"):
        p.error("--graphs needs a CUDA device")
    if args.n_images < 1 or args.steps < 1 or args.iterations < 1:
        p.error("--n-images, --steps and --iterations must be positive")
    return args


def build(args, device: torch.device) -> dict[str, Any]:
    """The velocity for each implementation, the guidance CLIP, the source images and the prompt."""
    if args.world == "demo":
        from flowgrad.demo.registry import get_attribute
        from flowgrad.models import load_guidance_clip, load_model

        attr = get_attribute(args.attr)
        base = load_model("demo", device=device)
        sources = render(args.n_images, seed=args.image_seed)[0].to(device)
        return {"original": base, "ours": base, "clip": load_guidance_clip("demo", device=device),
                "sources": sources, "prompt": attr.prompt, "attribute": attr, "model": "demo flow"}
    from bench_paper import model_config

    from flowgrad.models.rectified_flow import RectifiedFlowVelocity, build_random

    base = build_random(model_config(not args.full), seed=args.seed, device=device)
    ours = RectifiedFlowVelocity(base.net, name=base.name, autocast_dtype=torch.bfloat16 if args.bf16 else None,
                                 compile_backend="inductor" if args.compile else None)
    size = base.sample_shape[1:]
    faces = render(args.n_images, seed=args.image_seed)[0]
    sources = F.interpolate(faces, size=size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
    clip = random_clip(args.clip or "flowgrad-tiny-clip", seed=args.seed, device=device)
    return {"original": base, "ours": ours, "clip": clip, "sources": sources.to(device), "prompt": NCSNPP_PROMPT,
            "attribute": None, "model": f"random NCSN++ {tuple(base.sample_shape)}"}


def run_original(world: dict[str, Any], args) -> tuple[Tensor, float, list[list[float]]]:
    """The original loop, one image at a time; returns the edited images in [0, 1], seconds per image and each
    image's loss before each of its updates (the original never evaluated its last update)."""
    v, sources = world["original"], world["sources"]
    edits, losses = [], []
    t0 = time.perf_counter()
    for i in range(sources.shape[0]):
        source = sources[i:i + 1]
        clip_loss = ClipLoss(world["clip"], world["prompt"], source=source, alpha=args.alpha, replicas=args.replicas,
                             image_seeds=[args.seed + i])
        z0 = original_inversion(v, v.from_image(source), args.steps)
        result = original_optimization(v, z0, lambda x: clip_loss(v.to_image(x)).sum(), n_steps=args.steps,
                                       iterations=args.iterations, threshold=args.threshold, lr=args.lr,
                                       wrap=not args.one_sided_original)
        traj, _ = original_generate_traj(v, z0, u=result.controls, n_steps=args.steps)
        edits.append(v.to_image(traj[-1].to(source.device)).detach())
        losses.append([float(x) for x in result.losses])
    C.sync(sources.device)
    return torch.cat(edits), (time.perf_counter() - t0) / sources.shape[0], losses


def run_ours(world: dict[str, Any], args) -> tuple[Any, float, float]:
    """The engine on the whole batch; returns its result (edits in ``images``, in data space), seconds per
    image, and the first call's seconds (compilation and graph capture: a warm-up on the same batch that is
    not counted)."""
    v, sources = world["ours"], world["sources"]
    n = sources.shape[0]
    if args.graphs:
        v = GraphedVelocity(v)
    cfg = FlowGradConfig(n_steps=args.steps, iterations=args.iterations, lr=args.lr, threshold=args.threshold)

    def edit(iterations: int):
        clip_loss = ClipLoss(world["clip"], world["prompt"], source=sources, alpha=args.alpha,
                             replicas=args.replicas, image_seeds=[args.seed + i for i in range(n)])
        z0 = invert(v, v.from_image(sources), args.steps, method="euler")
        return optimize(v, z0, lambda x: clip_loss(v.to_image(x)),
                        config=dataclasses.replace(cfg, iterations=iterations))

    warm = 0.0
    if args.compile or args.graphs:
        t0 = time.perf_counter()
        edit(1)
        C.sync(sources.device)
        warm = time.perf_counter() - t0
    t0 = time.perf_counter()
    result = edit(args.iterations)
    C.sync(sources.device)
    return result, (time.perf_counter() - t0) / n, warm


def measure(world: dict[str, Any], edits: Tensor) -> dict[str, Any]:
    """Per image: CLIP score gain, L1 to the source, and (demo world) the judged change of the factor."""
    sources, clip, prompt = world["sources"], world["clip"], world["prompt"]
    with torch.no_grad():
        gain = (clip_score(clip, edits.float(), prompt) - clip_score(clip, sources, prompt)).double().cpu()
    l1 = (edits.float() - sources).abs().mean(dim=(1, 2, 3)).double().cpu()
    out = {"clip_gain": gain.tolist(), "l1": l1.tolist(), "clip_gain_mean": gain.mean().item(),
           "l1_mean": l1.mean().item()}
    attr = world["attribute"]
    if attr is not None and attr.factor is not None:
        from flowgrad.demo.world import judge

        before, after = judge(sources.cpu())[attr.factor], judge(edits.float().cpu())[attr.factor]
        judged = (attr.direction * (after - before)).double()
        out.update(judged_gain=judged.tolist(), judged_gain_mean=judged.mean().item(), factor=attr.factor)
    return out


def relative(ours: float, original: float) -> float:
    return (ours - original) / abs(original) if original != 0 else float("inf")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    C.set_tf32(False)   # float32 proper, as `flowgrad edit` runs
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    world = build(args, device)
    print(f"{card} | {world['model']} | prompt {world['prompt']!r} | {args.n_images} images, N={args.steps}, "
          f"{args.iterations} iterations, lr {args.lr}, threshold {args.threshold}, {args.replicas} replicas",
          flush=True)
    orig_edits, orig_s, orig_losses = run_original(world, args)
    print(f"original: {orig_s:.2f} s per image", flush=True)
    res, ours_s, warm = run_ours(world, args)
    ours_edits = world["ours"].to_image(res.images).detach()
    # the same augmentation draws per pass: until the paths part, pass j's loss is the same in both
    ours_losses = res.loss_history.double().cpu().T.tolist()
    passes = [[abs(a - b) for a, b in zip(o, u)] for o, u in zip(orig_losses, ours_losses)]
    print(f"ours: {ours_s:.2f} s per image" + (f" (first call {warm:.1f} s, not counted)" if warm else ""),
          flush=True)
    report: dict[str, Any] = {
        "card": card, "model": world["model"], "prompt": world["prompt"], "torch": torch.__version__,
        "settings": {k: v for k, v in vars(args).items() if k != "json"},
        "original": {**measure(world, orig_edits), "s_per_image": orig_s},
        "ours": {**measure(world, ours_edits), "s_per_image": ours_s, "first_call_s": warm,
                 "best_pass": res.best_iteration.tolist(), "losses": ours_losses},
        "original_losses": orig_losses,
        "passes_loss_abs_diff_max": [max(p[j] for p in passes) for j in range(len(passes[0]))],
        "images_same_path": sum(max(p) <= SAME_PATH for p in passes),
        "edits_max_abs_diff": (ours_edits.float() - orig_edits.float()).abs().max().item(),
    }
    o, u = report["original"], report["ours"]
    report["relative"] = {k: relative(u[k], o[k]) for k in ("clip_gain_mean", "l1_mean")}
    report["within_5_percent"] = all(abs(r) <= TOLERANCE for r in report["relative"].values())
    report["original_over_ours_s"] = orig_s / ours_s
    for name, r in (("original", o), ("ours", u)):
        judged = f", judged {r['factor']} {r['judged_gain_mean']:+.4f}" if "judged_gain_mean" in r else ""
        print(f"{name:9s} CLIP gain {r['clip_gain_mean']:+.4f}, L1 {r['l1_mean']:.4f}{judged}, "
              f"{r['s_per_image']:.2f} s/img")
    best = res.best_iteration.tolist()
    print(f"ours' best pass per image (0 = uncontrolled, {args.iterations} = after the last update, the original's "
          f"choice): {best}; loss of pass j, largest difference between the two over the images: "
          + " ".join(f"{x:.1e}" for x in report["passes_loss_abs_diff_max"])
          + f"; images whose passes all agree (<= {SAME_PATH:g}): {report['images_same_path']}/{args.n_images}")
    rel = report["relative"]
    print(f"ours vs original: CLIP gain {rel['clip_gain_mean']:+.1%}, L1 {rel['l1_mean']:+.1%} "
          f"(within 5%: {report['within_5_percent']}); largest pixel difference of the edits "
          f"{report['edits_max_abs_diff']:.3f}; original / ours time {report['original_over_ours_s']:.1f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
