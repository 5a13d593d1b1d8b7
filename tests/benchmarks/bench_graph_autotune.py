"""cuDNN's convolution algorithms inside the demo flow's CUDA graphs: heuristics vs benchmark mode at capture.

    python tests/benchmarks/bench_graph_autotune.py [--batches 64 32 16 1] [--repeats 30] [--jobs 6] [--attr old]
        [--settings heuristics 64 32 1] [--job-settings heuristics 64]

`GraphedVelocity` captures each graph with torch's global cuDNN setting, i.e. cuDNN's heuristics pick every
convolution's algorithm. A setting ``R`` here captures graphs of at least ``R`` rows with cuDNN's benchmark mode on
(the candidates timed during the capture's warm-up calls); ``heuristics`` is the shipped behaviour. torch keeps
the first algorithm it picks for a shape for the rest of the process, so each setting runs in a fresh process
of its own, on one GPU, side by side:

1. per batch bucket, the graphed forward (no grad) and VJP of the demo flow in float32 proper (as discovery runs
   it): seconds to capture both, GPU milliseconds per replay (CUDA events, median of --repeats) and a checksum;
2. ``discover-directions --attr ATTR --device cuda`` as a fresh process (the console script's path,
   ``cli.common.run_program``), the --job-settings alternated --jobs times: wall seconds, the job's own line,
   and the largest relative difference between the stored directions (ratios against the first setting).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))

SETTINGS = ("heuristics", "64", "32", "1")

_JOB = ("import bench_graph_autotune as b; b.benchmark_captures({rows}); "
        "from cli.common import run_program; from cli.discover import discover_directions; "
        "run_program(discover_directions)")


def benchmark_captures(min_rows: int | None) -> None:
    """From now on, capture graphs of at least ``min_rows`` rows in cuDNN's benchmark mode (None: never)."""
    import torch

    from flowgrad.cuda_graphs import GraphedVelocity

    if min_rows is None:
        return
    capture = GraphedVelocity._capture

    def patched(self, kind, args, rows):
        before = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = before or rows >= min_rows
        try:
            return capture(self, kind, args, rows)
        finally:
            torch.backends.cudnn.benchmark = before

    GraphedVelocity._capture = patched


def _rows(setting: str) -> int | None:
    return None if setting == "heuristics" else int(setting)


def buckets(setting: str, batches: list[int], repeats: int) -> None:
    """Child process: the bucket table's rows for one setting."""
    import torch

    from common import median, time_cuda
    from flowgrad.cuda_graphs import GraphedVelocity
    from flowgrad.models import load_model
    from flowgrad.velocity import strict_float32

    benchmark_captures(_rows(setting))
    dev = torch.device("cuda")
    flow = load_model("demo", device=dev)
    with strict_float32(dev):
        for b in batches:
            gen = torch.Generator(device=dev).manual_seed(b)
            x = torch.randn((b, *flow.sample_shape), device=dev, generator=gen)
            t = torch.full((b,), 0.6, device=dev)
            lam = torch.randn(x.shape, device=dev, generator=gen)
            g = GraphedVelocity(flow)
            t0 = time.perf_counter()
            with torch.no_grad():
                g(x, t)
            g.vjp(x, t, lam)
            torch.cuda.synchronize(dev)
            capture = time.perf_counter() - t0
            with torch.no_grad():
                fwd = median(time_cuda(lambda: g(x, t), dev, repeats))
            vjp = median(time_cuda(lambda: g.vjp(x, t, lam), dev, repeats))
            check = float(g.vjp(x, t, lam).double().abs().sum())
            print(f"{b:5d} | {setting:10s} | {capture:6.2f} | {fwd * 1e3:8.3f} | {vjp * 1e3:8.3f} | {check:.6e}",
                  flush=True)
            g.reset()


def fresh_jobs(attr: str, n: int, settings: list[str]) -> None:
    import numpy as np

    from directions.store import DirectionStore

    env = {**os.environ, "TQDM_DISABLE": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(HERE), os.environ.get("PYTHONPATH", "")])}
    walls: dict[str, list[float]] = {s: [] for s in settings}
    vectors = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(n):
            for setting in walls:
                store = Path(tmp) / f"{setting}{k}.h5"
                cmd = [sys.executable, "-c", _JOB.format(rows=_rows(setting)), "--attr", attr,
                       "--device", "cuda", "--out", str(store)]
                t0 = time.perf_counter()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp)
                wall = time.perf_counter() - t0
                if done.returncode:
                    sys.exit(f"{setting} job failed: {done.stderr.strip().splitlines()[-1:]}")
                walls[setting].append(wall)
                print(f"{setting:10s} wall {wall:6.2f} s | {done.stdout.strip().splitlines()[-1]}", flush=True)
                vectors[setting] = DirectionStore(store).read(attr).vector
    med = {s: float(np.median(w)) for s, w in walls.items()}
    base = settings[0]
    for s in settings[1:]:
        a, b = vectors[s], vectors[base]
        print(f"median wall: {base} {med[base]:.2f} s, {s} {med[s]:.2f} s ({med[base] / med[s]:.2f}x); "
              f"directions' max relative difference {float(np.abs(a - b).max() / np.abs(b).max()):.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", nargs="+", type=int, default=[64, 32, 16, 1])
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--jobs", type=int, default=6, help="fresh-process jobs per setting (0: skip them)")
    p.add_argument("--attr", default="old")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS),
                   help="settings of the bucket table")
    p.add_argument("--job-settings", nargs="+", choices=SETTINGS, default=["heuristics", "64"],
                   help="settings of the fresh-process jobs, alternated")
    p.add_argument("--child", choices=SETTINGS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        buckets(args.child, args.batches, args.repeats)
        return
    import torch

    if not torch.cuda.is_available():
        sys.exit("bench_graph_autotune.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    print("batch | setting    | capture s | forward ms | VJP ms | VJP checksum")
    for setting in args.settings:
        subprocess.run([sys.executable, __file__, "--child", setting, "--repeats", str(args.repeats),
                        "--batches", *map(str, args.batches)], check=True)
    if args.jobs:
        fresh_jobs(args.attr, args.jobs, args.job_settings)


if __name__ == "__main__":
    main()
