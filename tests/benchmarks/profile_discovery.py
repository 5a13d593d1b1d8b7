"""Where the time of the demo world's default discovery job goes (GPU or CPU).

    python tests/benchmarks/profile_discovery.py [--device cuda] [--batch-sizes 16 32] [--top 25]

Loads the demo flow and tiny CLIP once, runs one warm-up job, then times the default job (32 images,
20 steps, 6 iterations) at each batch size and prints a cProfile of the first timed run.
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

from directions.discover import DiscoveryConfig, discover  # noqa: E402
from flowgrad.demo.registry import load_registry  # noqa: E402
from flowgrad.models import load_guidance_clip, load_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attr", default="old")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 32])
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    dev = torch.device(args.device)
    velocity, clip = load_model("demo", device=dev), load_guidance_clip("demo", device=dev)
    attr = load_registry()[args.attr]
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    with tempfile.TemporaryDirectory() as tmp:
        def job(bs: int, n: int = 32, tag: str = "") -> float:
            cfg = DiscoveryConfig(name=f"{args.attr}{tag}{bs}", prompt=attr.prompt,
                                  negative_prompt=attr.negative_prompt, n_images=n, batch_size=bs)
            t0 = time.perf_counter()
            discover(cfg, velocity, clip, Path(tmp) / "d.h5", device=dev)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0

        job(16, n=16, tag="warm")
        for i, bs in enumerate(args.batch_sizes):
            if i == 0:
                prof = cProfile.Profile()
                prof.enable()
                seconds = job(bs)
                prof.disable()
            else:
                seconds = job(bs)
            print(f"{card}: default job, batch size {bs}: {seconds:.2f} s", flush=True)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
