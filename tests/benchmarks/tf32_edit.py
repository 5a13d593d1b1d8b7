"""Does TF32 make a FlowGrad edit irreproducible? The same edit twice with TF32 and twice in float32, side by side.

Renders demo faces, inverts them, and runs the same optimization (same seeds) four times per mode (eager, and
CUDA graphs on a GPU): TF32, float32, TF32, float32. Prints, per mode, how far the two runs of each arithmetic
are apart (the largest L2 of the difference over the smallest edit's L2, and the largest pixel difference), how far
TF32 is from float32, the best iteration of each image, and the seconds per run. On a CPU TF32 does nothing, so
every pair is equal there (a smoke run).

    python3 tests/benchmarks/tf32_edit.py --device cuda              # 8 faces, 100 steps, 10 iterations
    python3 tests/benchmarks/tf32_edit.py --device cpu --faces 2 --steps 4 --iterations 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from flowgrad import FlowGradConfig, invert, optimize  # noqa: E402
from flowgrad.clip_guidance import ClipLoss  # noqa: E402
from flowgrad.cuda_graphs import GraphedVelocity  # noqa: E402
from flowgrad.demo.render import render  # noqa: E402
from flowgrad.models import load_guidance_clip, load_model  # noqa: E402


def _set_tf32(on: bool) -> None:
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = on


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--faces", type=int, default=8)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--iterations", type=int, default=10)
    p.add_argument("--lr", type=float, default=1.0, help="flowgrad edit's default for the demo")
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--prompt", default="a photo of a smiling person")
    p.add_argument("--json", default=None, help="Also write the results here.")
    args = p.parse_args()
    dev = torch.device(args.device)
    base = load_model("demo", device=dev)
    clip = load_guidance_clip("demo", device=dev)
    images = render(args.faces, seed=3)[0].to(dev)
    cfg = FlowGradConfig(n_steps=args.steps, iterations=args.iterations, lr=args.lr, threshold=5e-3)
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(card, flush=True)
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    report: dict = {"card": card, "settings": vars(args), "modes": {}}
    try:
        for graphs in ((False, True) if dev.type == "cuda" else (False,)):
            mode = "graphs" if graphs else "eager"
            runs: dict[str, list] = {"tf32": [], "fp32": []}
            for tf32 in (True, False, True, False):
                _set_tf32(tf32)
                v = GraphedVelocity(base) if graphs else base  # captured under this run's arithmetic
                loss = ClipLoss(clip, args.prompt, source=images, alpha=0.7, replicas=args.replicas, seed=0)
                t = time.perf_counter()
                z0 = invert(v, v.from_image(images), cfg.grid)
                res = optimize(v, z0, lambda x: loss(v.to_image(x)), config=cfg)
                edited = v.to_image(res.images).clamp(0, 1)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                runs["tf32" if tf32 else "fp32"].append((edited, res.best_iteration.tolist(),
                                                         time.perf_counter() - t))
            entry = {}
            for key, ((a, ia, ta), (b, ib, tb)) in runs.items():
                size = (a - images).flatten(1).norm(dim=1).min().clamp_min(1e-12)
                entry[key] = {"runs_apart": float((a - b).flatten(1).norm(dim=1).max() / size),
                              "max_pixel_diff": float((a - b).abs().max()), "best_iterations": [ia, ib],
                              "seconds": [round(ta, 2), round(tb, 2)]}
                print(f"{mode} {key}: two runs {entry[key]['runs_apart']:.2e} apart (max pixel "
                      f"{entry[key]['max_pixel_diff']:.2e}), best iterations {ia} / {ib}, {ta:.1f} / {tb:.1f} s",
                      flush=True)
            entry["tf32_vs_fp32_max_pixel_diff"] = float((runs["tf32"][1][0] - runs["fp32"][1][0]).abs().max())
            print(f"{mode} TF32 vs float32: max pixel {entry['tf32_vs_fp32_max_pixel_diff']:.2e}", flush=True)
            report["modes"][mode] = entry
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
