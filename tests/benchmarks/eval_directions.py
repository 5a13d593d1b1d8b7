"""Edit quality of discovered directions on the demo world, measured with the factor judge.

For each attribute: discover a direction with the given settings (or reuse one from --store), apply it at
strength 1 to 64 fresh samples never seen in discovery, and judge every factor before/after. Optionally also
run per-image FlowGrad on the same 64 images for comparison (attribute gain, L1, time per image).

    python tests/benchmarks/eval_directions.py --attrs old smiling --out bench_out [--per-image] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from directions.apply import EditSpec, apply_controls, compose_controls, default_apply_steps  # noqa: E402
from directions.discover import DiscoveryConfig, discover, sample_latents  # noqa: E402
from directions.store import DirectionStore  # noqa: E402
from flowgrad import FlowGradConfig, optimize  # noqa: E402
from flowgrad.clip_guidance import ClipLoss, clip_score  # noqa: E402
from flowgrad.cuda_graphs import GraphedVelocity  # noqa: E402
from flowgrad.demo import world  # noqa: E402
from flowgrad.demo.registry import load_registry, preserve_pairs  # noqa: E402
from flowgrad.models import load_guidance_clip, load_model  # noqa: E402
from flowgrad.velocity import strict_float32  # noqa: E402

EVAL_SEED = 777  # apply-time samples: disjoint from discovery's seed-0 latents


def judged_change(velocity, z0, control, n_steps, attr, before, jb):
    """Apply ``control`` to z0 and compare the judged factors with the unedited ``before`` (judged ``jb``)."""
    after = velocity.to_image(apply_controls(velocity, z0, control, n_steps)).clamp(0, 1)
    return before, after, judged_stats(attr, before, after, jb)


def judged_stats(attr, before, after, jb) -> dict:
    """Target gain, share moved the right way, per-factor leakage and L1 of ``after`` vs ``before``."""
    ja = world.judge(after)
    delta = {k: (ja[k] - jb[k]).numpy() for k in jb}
    target = delta[attr.factor] * attr.direction
    others = {k: float(np.abs(v).mean()) for k, v in delta.items() if k != attr.factor}
    extra = {}
    if set(np.unique(jb[attr.factor].numpy())) <= {0.0, 1.0}:  # binary target: flips among images that can flip
        can = (jb[attr.factor].numpy() == (0.0 if attr.direction > 0 else 1.0))
        extra["eligible"] = int(can.sum())
        extra["eligible_flipped"] = float((target[can] > 0).mean()) if can.any() else float("nan")
    return {
        **extra,
        "target_gain_mean": float(target.mean()),
        "target_moved_right_way": float((target > 0).mean()),
        "max_other_abs_change": max(others.values()), "worst_other": max(others, key=others.get),
        "other_abs_change": others,
        "l1": float((after - before).abs().mean()),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--attrs", nargs="+", default=["old", "smiling"])
    p.add_argument("--store", default=None, help="Reuse directions from this store (skip discovery).")
    p.add_argument("--n-images", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="Euler steps of discovery (and of per-image FlowGrad).")
    p.add_argument("--apply-steps", type=int, default=None,
                   help="Euler steps the directions are applied with [default: apply-directions' own, 100 or the "
                        "direction's when it has more; before 2026-11-28 this script applied with --steps].")
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--lr", type=float, default=10.0)
    p.add_argument("--alpha", type=float, default=0.7)
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--aggregator", default="mean")
    p.add_argument("--preserve-weight", type=float, default=0.0,
                   help="Weight of the preservation term (the registry's 'preserve' attributes); 0: off.")
    p.add_argument("--off-axis-weight", type=float, default=0.0,
                   help="Weight of the guidance loss's off-axis term (0: off).")
    p.add_argument("--fixed-augmentations", action="store_true",
                   help="Reuse each batch's CLIP augmentations in every pass (discovery and per-image).")
    p.add_argument("--preserve", nargs="*", default=None,
                   help="Attributes to preserve instead of each attribute's registry list.")
    p.add_argument("--t-window", nargs=2, type=float, default=(0.3, 1.0))
    p.add_argument("--strengths", nargs="+", type=float, default=[1.0])
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--per-image", action="store_true", help="Also run per-image FlowGrad on the eval images.")
    p.add_argument("--project-out", nargs="*", default=[],
                   help="Directions (discovered first, or read from --store) projected out of every edit.")
    p.add_argument("--eval-seed", type=int, default=EVAL_SEED,
                   help="Seed of the apply-time samples (use another one when tuning settings).")
    p.add_argument("--random-control", action="store_true",
                   help="Also apply a random direction with the same per-step norm (a leakage baseline).")
    p.add_argument("--threshold", type=float, default=5e-3)
    p.add_argument("--coarse-forward", action="store_true", help="Discovery and per-image FlowGrad with "
                   "the coarsened forward (velocity once per backward segment).")
    p.add_argument("--cuda-graphs", action="store_true", help="Run the velocity through CUDA graphs.")
    p.add_argument("--per-image-only", action="store_true",
                   help="Only per-image FlowGrad on the eval images (no direction; implies --per-image).")
    p.add_argument("--no-tf32", action="store_true",
                   help="Apply directions without TF32 too (discovery and per-image FlowGrad always run in float32 "
                        "proper, as discover-directions and flowgrad edit do); default: torch's, as apply-directions.")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    dev = torch.device(args.device)
    if args.no_tf32:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    velocity = load_model("demo", device=dev)
    if args.cuda_graphs:
        velocity = GraphedVelocity(velocity)
    clip = load_guidance_clip("demo", device=dev)
    registry = load_registry()
    store = DirectionStore(args.store or out / "eval_directions.h5")
    report = {"card": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "settings": vars(args),
              "cudnn_tf32": torch.backends.cudnn.allow_tf32,
              "attributes": {}}

    def keep_pairs(attr):
        names = attr.preserve if args.preserve is None else [n for n in args.preserve if n != attr.name]
        return preserve_pairs(names, registry)

    def get_direction(name: str):
        attr = registry[name]
        if args.store is not None:
            return store.read(name)
        cfg = DiscoveryConfig(name=name, prompt=attr.prompt, negative_prompt=attr.negative_prompt,
                              n_images=args.n_images, batch_size=args.batch_size, flowgrad=fg, alpha=args.alpha,
                              replicas=args.replicas, aggregator=args.aggregator,
                              preserve=keep_pairs(attr), preserve_weight=args.preserve_weight,
                              off_axis_weight=args.off_axis_weight,
                              fixed_augmentations=args.fixed_augmentations)
        return discover(cfg, velocity, clip, store.path, device=dev)

    fg = FlowGradConfig(n_steps=args.steps, iterations=args.iterations, lr=args.lr, t_window=tuple(args.t_window),
                        threshold=args.threshold, coarse_forward=args.coarse_forward)
    others = [get_direction(n) for n in args.project_out]
    if others:
        report["project_out"] = list(args.project_out)
    for name in args.attrs:
        attr = registry[name]
        z0 = sample_latents(tuple(velocity.sample_shape), args.eval_seed, range(args.eval_images)).to(dev)
        entry = {"strengths": {}}
        direction = None
        if not args.per_image_only:
            t0 = time.perf_counter()
            direction = get_direction(name)
            entry.update(discovery_s=round(time.perf_counter() - t0, 2),
                         split_half_cosine=direction.split_half_cosine, scale=direction.scale)
            if "status" in direction.records:
                entry["images_ok"] = int((np.asarray(direction.records["status"]) == "ok").sum())
        # apply as apply-directions does; with --per-image-only the unedited faces are per-image FlowGrad's
        steps = args.apply_steps or (args.steps if direction is None else default_apply_steps([direction]))
        entry["apply_steps"] = steps
        before = velocity.to_image(apply_controls(velocity, z0, None, steps)).clamp(0, 1)
        jb = world.judge(before)
        for s in ([] if args.per_image_only else args.strengths):
            t0 = time.perf_counter()
            control = compose_controls([EditSpec(direction, s)], steps, project_out=others).to(dev)
            _, after, stats = judged_change(velocity, z0, control, steps, attr, before, jb)
            stats["apply_s_per_image"] = (time.perf_counter() - t0) / args.eval_images
            entry["strengths"][str(s)] = stats
            if args.random_control:
                gen = torch.Generator().manual_seed(12345)
                noise = torch.randn(control.shape, generator=gen).to(dev)
                per_step = control.flatten(1).norm(dim=1) / noise.flatten(1).norm(dim=1).clamp_min(1e-12)
                noise = noise * per_step.view(-1, *([1] * (control.ndim - 1)))
                _, _, rstats = judged_change(velocity, z0, noise, steps, attr, before, jb)
                entry.setdefault("random_control", {})[str(s)] = rstats
        if args.per_image or args.per_image_only:
            if steps != args.steps:  # per-image FlowGrad runs (and is judged) at its own step count
                before = velocity.to_image(apply_controls(velocity, z0, None, args.steps)).clamp(0, 1)
                jb = world.judge(before)
            keep = keep_pairs(attr) if args.preserve_weight > 0 else ()
            loss = ClipLoss(clip, attr.prompt, negative_prompt=attr.negative_prompt, source=before,
                            alpha=args.alpha, replicas=args.replicas, seed=1, preserve=keep,
                            preserve_weight=args.preserve_weight, off_axis_weight=args.off_axis_weight,
                            fixed_augmentations=args.fixed_augmentations)
            t0 = time.perf_counter()
            with strict_float32(dev):  # as flowgrad edit runs it
                res = optimize(velocity, z0, lambda x: loss(velocity.to_image(x)), config=fg)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            per_image_s = (time.perf_counter() - t0) / args.eval_images
            edited = velocity.to_image(res.images).clamp(0, 1)
            clip_gain = clip_score(clip, edited, attr.prompt) - clip_score(clip, before, attr.prompt)
            entry["per_image_flowgrad"] = judged_stats(attr, before, edited, jb) | {
                "s_per_image": per_image_s, "clip_gain": float(clip_gain.mean()),
                "timings": res.timings, "segments_per_iteration": float(res.segment_counts.float().mean())}
        report["attributes"][name] = entry
        print(name, json.dumps(entry, indent=None, default=float)[:600], flush=True)
    (out / "eval_directions.json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    print(f"{'attr':12} {'strength':>8} {'gain':>7} {'right%':>7} {'maxleak':>8} {'worst':>16} {'L1':>6}")
    for name, e in report["attributes"].items():
        if "images_ok" in e:
            print(f"{name:12} discovery: {e['images_ok']} images ok, scale {e['scale']:.3f}, "
                  f"split-half cosine {e['split_half_cosine']:.3f}; applied with {e['apply_steps']} steps")
        for s, st in e["strengths"].items():
            print(f"{name:12} {s:>8} {st['target_gain_mean']:7.3f} {100 * st['target_moved_right_way']:6.1f}% "
                  f"{st['max_other_abs_change']:8.3f} {st['worst_other']:>16} {st['l1']:6.3f}"
                  + (f"  eligible flipped {100 * st['eligible_flipped']:.1f}% of {st['eligible']}"
                     if "eligible" in st else ""))
        for s, st in e.get("random_control", {}).items():
            print(f"{name:12} {'rand ' + s:>8} {st['target_gain_mean']:7.3f} "
                  f"{100 * st['target_moved_right_way']:6.1f}% {st['max_other_abs_change']:8.3f} "
                  f"{st['worst_other']:>16} {st['l1']:6.3f}")
        if "per_image_flowgrad" in e:
            pi = e["per_image_flowgrad"]
            print(f"{name:12} {'per-img':>8} {pi['target_gain_mean']:7.3f} {100 * pi['target_moved_right_way']:6.1f}% "
                  f"{pi['max_other_abs_change']:8.3f} {'':>16} {pi['l1']:6.3f}  {pi['s_per_image']:.3f}s/img  "
                  f"CLIP gain {pi['clip_gain']:+.4f}")


if __name__ == "__main__":
    main()
