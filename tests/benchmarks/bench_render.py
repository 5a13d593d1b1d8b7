"""Throughput of the demo-world renderer on one CPU core.

Run from the repository root: ``PYTHONPATH=. python tests/benchmarks/bench_render.py [--batch 256]
[--repeats 5] [--threads 1]``.
Prints images/s for rendering (factors sampled) at 64x64 with supersample 2, by wall clock and per
CPU-second of this process (the latter is steadier on a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import time

import torch

from flowgrad.demo.render import render


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--supersample", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    render(args.batch, seed=-1, size=args.size, supersample=args.supersample)  # warm-up
    wall, cpu = [], []
    for r in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        render(args.batch, seed=r, size=args.size, supersample=args.supersample)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    best, median = min(wall), sorted(wall)[len(wall) // 2]
    print(f"threads={args.threads} batch={args.batch} size={args.size} supersample={args.supersample}: "
          f"wall best {args.batch / best:.0f} images/s, median {args.batch / median:.0f} images/s; "
          f"per CPU-second best {args.batch / min(cpu):.0f}, median {args.batch / sorted(cpu)[len(cpu) // 2]:.0f}")


if __name__ == "__main__":
    main()
