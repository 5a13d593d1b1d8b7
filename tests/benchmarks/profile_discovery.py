"""Where the time of the demo world's default discovery job goes (GPU or CPU).

    python tests/benchmarks/profile_discovery.py [--device cuda] [--batch-sizes 16 32] [--top 25]
        [--modes eager graphs graphs+coarse]

Loads the demo flow and tiny CLIP once, then for each mode (eager: the plain velocity; graphs: wrapped in
CUDA graphs as `discover-directions` does on a GPU; +coarse: with --coarse-forward) runs one warm-up job and
times the default job (32 images, 20 steps, 6 iterations) at each batch size, side by side in one process;
prints a cProfile of the first timed run.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import dataclasses  # noqa: E402

from directions.discover import DiscoveryConfig, discover  # noqa: E402
from flowgrad.cuda_graphs import GraphedVelocity  # noqa: E402
from flowgrad.demo.registry import load_registry  # noqa: E402
from flowgrad.models import load_guidance_clip, load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attr", default="old")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32])
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--modes", nargs="+", default=["eager"], choices=["eager", "graphs", "graphs+coarse", "coarse"])
    args = p.parse_args()
    dev = torch.device(args.device)
    base, clip = load_model("demo", device=dev), load_guidance_clip("demo", device=dev)
    attr = load_registry()[args.attr]
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    prof = None
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            velocity = GraphedVelocity(base) if "graphs" in mode else base

            def job(bs: int, n: int = 32, tag: str = "") -> float:
                cfg = DiscoveryConfig(name=f"{args.attr}{tag}{bs}{mode}", prompt=attr.prompt,
                                      negative_prompt=attr.negative_prompt, n_images=n, batch_size=bs)
                cfg = dataclasses.replace(cfg, flowgrad=dataclasses.replace(
                    cfg.flowgrad, coarse_forward="coarse" in mode))
                t0 = time.perf_counter()
                d = discover(cfg, velocity, clip, Path(tmp) / "d.h5", device=dev)
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                ok = d.records["status"] == "ok"
                gain = float((d.records["clip_after"][ok] - d.records["clip_before"][ok]).mean())
                return seconds, gain

            job(16, n=16, tag="warm")
            for bs in args.batch_sizes:
                if prof is None:
                    prof = cProfile.Profile()
                    prof.enable()
                    seconds, gain = job(bs)
                    prof.disable()
                else:
                    seconds, gain = job(bs)
                extra = f", {velocity.captures} graphs" if isinstance(velocity, GraphedVelocity) else ""
                print(f"{card}: default job, {mode}, batch size {bs}: {seconds:.2f} s (CLIP gain {gain:+.4f}{extra})",
                      flush=True)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
