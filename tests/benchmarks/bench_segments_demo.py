"""Straightness segmentation on a trained, curved field: the demo flow.

Per image: natural segment count at a threshold, backward time (segmented vs exact), and the cosine of
the segmented gradient to the exact one, with the CLIP guidance loss of an attribute.

    python tests/benchmarks/bench_segments_demo.py [--steps 100] [--batch 4] [--thresholds 5e-3 2e-3]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import flowgrad  # noqa: E402
from directions.discover import sample_latents  # noqa: E402
from flowgrad.clip_guidance import ClipLoss  # noqa: E402
from flowgrad.demo.registry import get_attribute  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--attr", default="old")
    p.add_argument("--thresholds", nargs="+", type=float, default=[5e-3, 2e-3, 1e-3])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = p.parse_args()
    dev = torch.device(args.device)
    v = flowgrad.load_model("demo", device=dev)
    clip = flowgrad.load_guidance_clip("demo", device=dev)
    attr = get_attribute(args.attr)
    z0 = sample_latents(tuple(v.sample_shape), 5, range(args.batch)).to(dev)
    traj = flowgrad.trajectory(v, z0, args.steps, keep_velocities=False)
    source = v.to_image(traj.final).clamp(0, 1)
    loss = ClipLoss(clip, attr.prompt, negative_prompt=attr.negative_prompt, source=source, replicas=4, seed=0)
    params = loss.sample_params(args.batch)  # the same augmentations for every backward pass

    def loss_fn(x):
        return loss(v.to_image(x), params)

    losses, lam = flowgrad.loss_and_adjoint(loss_fn, traj.final)
    t0 = time.perf_counter()
    exact, n_exact = flowgrad.backward_sweep(v, traj, lam, None)
    t_exact = time.perf_counter() - t0
    rows = []
    for th in args.thresholds:
        segs = flowgrad.straightness_segments(traj, th, per_image=True)
        t0 = time.perf_counter()
        approx, n_calls = flowgrad.backward_sweep(v, traj, lam, segs)
        t_seg = time.perf_counter() - t0
        cos = torch.nn.functional.cosine_similarity(exact.transpose(0, 1).flatten(1),
                                                    approx.transpose(0, 1).flatten(1), dim=1)
        rows.append({"threshold": th, "segments_per_image": [len(s) for s in segs], "vjp_calls": n_calls,
                     "backward_s": t_seg, "vs_exact_time": t_seg / t_exact, "cosine_per_image": cos.tolist()})
    report = {"device": str(dev), "card": torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu",
              "n_steps": args.steps, "batch": args.batch, "attr": args.attr, "exact_backward_s": t_exact,
              "rows": rows}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "bench_segments_demo.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"demo flow, N={args.steps}, batch {args.batch}, CLIP loss '{attr.prompt}', {report['card']}; "
          f"exact backward {t_exact:.2f}s ({n_exact} VJPs)")
    print(f"{'threshold':>9} {'segments/img':>16} {'time vs exact':>13} {'cos min':>8} {'cos mean':>8}")
    for r in rows:
        c = r["cosine_per_image"]
        print(f"{r['threshold']:9.0e} {str(r['segments_per_image']):>16} {r['vs_exact_time']:13.3f} "
              f"{min(c):8.4f} {sum(c) / len(c):8.4f}")


if __name__ == "__main__":
    main()
