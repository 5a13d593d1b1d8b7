"""Aggregators and time bands on the demo world: the issue's toy study, measured on the demo world.

The directions issue quotes a toy study (24×24 faces, 20 steps, 128 images): the mean of the per-image
controls transferred ~76–79% of per-image FlowGrad's attribute gain to new images with split-half cosine
0.98; the uncentred PC1 equalled the mean; the centred PC1 transferred poorly (66% of images moved the right
way); early steps (t < 0.3) carried the most effect per unit of control, late steps (t ≥ 0.7) the least.
This script measures the same things with the shipped code, one discovery job per attribute:

    python tests/benchmarks/study_aggregators.py [--attrs old smiling young] [--n-images 128] [--t-window 0 1]
        [--device cuda --cuda-graphs] [--out DIR]

1. Discovery with ``keep_offsets`` (the per-image controls), the settings of ``eval_directions.py``'s defaults
   unless given (20 steps, 6 iterations, lr 10, seed 0; ``--t-window 0 1`` by default here so that every
   step carries control, as in the toy study and the paper).
2. Every aggregator on the same controls of the images that improved: ``mean``, ``pc1`` (uncentred),
   ``pca`` (centred PC1), ``robust``, and ``probe`` when the window starts at t = 0 (InterFaceGAN-style normal
   on the latents, labelled as ``discover`` labels them). For each: cosine to the mean, split-half cosine,
   natural scale, and the edit at ``--strengths`` on 64 fresh faces (seed 777, never seen in discovery),
   judged: target gain, share moved the right way, max leak over the other factors, L1.
3. Per-image FlowGrad on the same 64 faces with the same settings: the transfer ratio (global gain /
   per-image gain).
4. Time bands of the mean direction: its steps with t in [0, 0.3), [0.3, 0.7) and [0.7, 1], each part
   rescaled to the same L2 norm (``--band-fraction`` of the whole strength-1 vector's norm) and applied
   alone: judged gain and CLIP score change per unit of control norm.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from directions.aggregate import aggregate, split_half_cosine  # noqa: E402
from directions.apply import apply_controls  # noqa: E402
from directions.discover import DiscoveryConfig, discover, probe_labels, sample_latents  # noqa: E402
from eval_directions import judged_change, judged_stats  # noqa: E402
from flowgrad import FlowGradConfig, optimize  # noqa: E402
from flowgrad.clip_guidance import ClipLoss, clip_score  # noqa: E402
from flowgrad.cuda_graphs import GraphedVelocity  # noqa: E402
from flowgrad.demo import world  # noqa: E402
from flowgrad.demo.registry import load_registry  # noqa: E402
from flowgrad.models import load_guidance_clip, load_model  # noqa: E402
from flowgrad.grid import TimeGrid  # noqa: E402
from flowgrad.velocity import strict_float32  # noqa: E402

BANDS = ((0.0, 0.3), (0.3, 0.7), (0.7, 1.0))


def band_mask(n_steps: int, lo: float, hi: float) -> np.ndarray:
    """(n_steps,) bool: the Euler steps whose start time lies in [lo, hi) (hi = 1 includes the last step)."""
    t = np.asarray(TimeGrid.uniform(n_steps).times, dtype=np.float64)
    return (t >= lo) & ((t < hi) if hi < 1.0 else (t <= hi))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--attrs", nargs="+", default=["old", "smiling", "young"])
    p.add_argument("--n-images", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--iterations", type=int, default=6)
    p.add_argument("--lr", type=float, default=10.0)
    p.add_argument("--t-window", nargs=2, type=float, default=(0.0, 1.0))
    p.add_argument("--off-axis-weight", type=float, default=0.0)
    p.add_argument("--strengths", nargs="+", type=float, default=[1.0, 2.0])
    p.add_argument("--eval-images", type=int, default=64)
    p.add_argument("--eval-seed", type=int, default=777)
    p.add_argument("--band-fraction", type=float, default=0.5,
                   help="norm of each band's rescaled part, as a fraction of the strength-1 vector's norm")
    p.add_argument("--cuda-graphs", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "study_aggregators.h5").unlink(missing_ok=True)
    velocity = load_model("demo", device=dev)
    if args.cuda_graphs:
        velocity = GraphedVelocity(velocity)
    clip = load_guidance_clip("demo", device=dev)
    registry = load_registry()
    fg = FlowGradConfig(n_steps=args.steps, iterations=args.iterations, lr=args.lr, t_window=tuple(args.t_window))
    report = {"card": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu", "settings": vars(args),
              "attributes": {}}
    z_eval = sample_latents(tuple(velocity.sample_shape), args.eval_seed, range(args.eval_images)).to(dev)
    before = velocity.to_image(apply_controls(velocity, z_eval, None, args.steps)).clamp(0, 1)
    jb = world.judge(before)

    for name in args.attrs:
        attr = registry[name]
        score_before = clip_score(clip, before, attr.prompt)

        def clip_gain(images: torch.Tensor) -> float:
            return float((clip_score(clip, images, attr.prompt) - score_before).mean())

        def edit(vector: np.ndarray, strength: float) -> dict:
            control = torch.from_numpy((vector * strength).astype(np.float32)).to(dev)
            _, after, stats = judged_change(velocity, z_eval, control, args.steps, attr, before, jb)
            return stats | {"clip_gain": clip_gain(after)}

        cfg = DiscoveryConfig(name=name, prompt=attr.prompt, negative_prompt=attr.negative_prompt,
                              n_images=args.n_images, batch_size=args.batch_size, flowgrad=fg,
                              off_axis_weight=args.off_axis_weight, keep_offsets=True)
        t0 = time.perf_counter()
        direction = discover(cfg, velocity, clip, out / "study_aggregators.h5", device=dev)
        ok = np.asarray(direction.records["status"]) == "ok"
        controls = np.asarray(direction.offsets, dtype=np.float64)[ok]
        entry: dict = {"discovery_s": round(time.perf_counter() - t0, 1), "images_ok": int(ok.sum()),
                       "aggregators": {}, "bands": {}}
        shape = controls.shape[1:]
        latents = sample_latents(tuple(velocity.sample_shape), cfg.seed, range(args.n_images)).numpy()
        probe_kw = {"latents": latents[ok].reshape(int(ok.sum()), -1),
                    "labels": probe_labels(np.asarray(direction.records["clip_before"])[ok])}  # as discover labels
        methods = ["mean", "pc1", "pca", "robust"] + (["probe"] if args.t_window[0] == 0.0 else [])
        mean_unit = None
        for method in methods:
            kw = probe_kw if method == "probe" else {}
            agg = aggregate(controls, method, **kw)
            if method == "mean":
                mean_unit = agg.unit
            row = {"scale": agg.scale, "cosine_to_mean": float(agg.unit @ mean_unit),
                   "split_half_cosine": split_half_cosine(controls, method, seed=cfg.seed, **kw),
                   "median_image_cosine": float(np.median(agg.per_image_cosine)),
                   "strengths": {}}
            vector = (agg.unit * agg.scale).reshape(shape)
            for s in args.strengths:
                row["strengths"][str(s)] = edit(vector, s)
            entry["aggregators"][method] = row
        # per-image FlowGrad on the evaluation faces, same settings
        loss = ClipLoss(clip, attr.prompt, negative_prompt=attr.negative_prompt, source=before, alpha=cfg.alpha,
                        replicas=cfg.replicas, seed=1, off_axis_weight=args.off_axis_weight)
        t0 = time.perf_counter()
        with strict_float32(dev):
            res = optimize(velocity, z_eval, lambda x: loss(velocity.to_image(x)), config=fg)
        edited = velocity.to_image(res.images).clamp(0, 1)
        entry["per_image"] = judged_stats(attr, before, edited, jb) | {
            "s": time.perf_counter() - t0,
            "clip_gain": clip_gain(edited)}
        # time bands of the mean direction, each rescaled to one norm
        mean_vec = (mean_unit * entry["aggregators"]["mean"]["scale"]).reshape(shape)
        norm = args.band_fraction * float(np.linalg.norm(mean_vec))
        for lo, hi in BANDS:
            part = np.where(band_mask(args.steps, lo, hi)[:, None, None, None], mean_vec, 0.0)
            share = float(np.linalg.norm(part) / np.linalg.norm(mean_vec))
            if share == 0.0:
                continue
            stats = edit(part * (norm / np.linalg.norm(part)), 1.0)
            entry["bands"][f"{lo}-{hi}"] = stats | {"norm_share_of_vector": share, "applied_norm": norm,
                                                    "gain_per_unit_norm": stats["target_gain_mean"] / norm,
                                                    "clip_gain_per_unit_norm": stats["clip_gain"] / norm}
        report["attributes"][name] = entry
        print(f"{name}: {entry['images_ok']}/{args.n_images} images ok, discovery {entry['discovery_s']} s; "
              f"per-image FlowGrad gain {entry['per_image']['target_gain_mean']:+.3f} / "
              f"{100 * entry['per_image']['target_moved_right_way']:.1f}% / leak "
              f"{entry['per_image']['max_other_abs_change']:.3f}", flush=True)
        pi = entry["per_image"]["target_gain_mean"]
        for method, row in entry["aggregators"].items():
            cells = " | ".join(
                f"s{s}: {st['target_gain_mean']:+.3f} ({st['target_gain_mean'] / pi:.0%} of per-image) "
                f"{100 * st['target_moved_right_way']:.1f}% leak {st['max_other_abs_change']:.3f} "
                f"({st['worst_other']})" for s, st in row["strengths"].items())
            print(f"  {method:7s} cos-to-mean {row['cosine_to_mean']:+.3f} split-half {row['split_half_cosine']:.3f} "
                  f"scale {row['scale']:.3f} | {cells}", flush=True)
        for band, st in entry["bands"].items():
            print(f"  band t {band:8s} share of norm {st['norm_share_of_vector']:.2f}: "
                  f"gain {st['target_gain_mean']:+.3f} "
                  f"({st['gain_per_unit_norm']:+.4f} per unit), CLIP {st['clip_gain']:+.4f}, "
                  f"{100 * st['target_moved_right_way']:.1f}% right way, leak {st['max_other_abs_change']:.3f}",
                  flush=True)
    (out / "study_aggregators.json").write_text(json.dumps(report, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
