"""Cost of the end of a discovery job: checkpoint writes, reloads and the mean aggregation.

Run from the repository root:
``python tests/benchmarks/bench_aggregate.py [--images 512 1024] [--steps 20] [--devices cpu cuda]``.
Writes synthetic per-image controls of the demo world's shape (steps, 3, 64, 64) batch by batch into a real
job checkpoint, reloads them as ``discover`` does, and times in one process, side by side:

* the shipped mean aggregation (``directions.discover._mean_direction``: float64 one block of rows at a time,
  on each of ``--devices``; a job uses its own device), and
* an earlier one, kept here as the reference: every control of the rank converted into one float64 NumPy
  matrix, then the sums, projections and split halves taken on that matrix,

and checks that they give the same unit direction, scale, per-image cosines and split-half cosine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from directions.checkpoint import JobCheckpoint  # noqa: E402
from directions.discover import DiscoveryConfig  # noqa: E402

discover_module = importlib.import_module("directions.discover")  # the package re-exports discover()


def one_matrix_mean(cfg: DiscoveryConfig, local: dict, ok: np.ndarray):
    """The previous aggregation: one float64 (n, D) matrix of every control (single process)."""
    x = np.concatenate([local[b][0]["controls"] for b in sorted(local)]).reshape(len(ok), -1).astype(np.float64)
    total = x[ok].sum(0)
    unit = total / np.linalg.norm(total)
    proj = x @ unit
    norms = np.linalg.norm(x, axis=1)
    cos = np.divide(proj, norms, out=np.zeros_like(proj), where=norms > 0)
    scale = float(np.median(proj[ok]))
    perm = np.random.default_rng(cfg.seed).permutation(int(ok.sum()))
    ok_pos = np.flatnonzero(ok)
    halves = [x[ok_pos[perm[: len(perm) // 2]]].sum(0), x[ok_pos[perm[len(perm) // 2:]]].sum(0)]
    half = float(halves[0] @ halves[1] / (np.linalg.norm(halves[0]) * np.linalg.norm(halves[1])))
    return unit, scale, cos, half


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    args = parser.parse_args()
    shape = (args.steps, 3, 64, 64)
    rng = np.random.default_rng(0)
    card = torch.cuda.get_device_name() if "cuda" in args.devices else "-"
    print(f"host CPU threads {torch.get_num_threads()}, GPU {card}; controls of shape {shape} per image, "
          f"batch {args.batch_size}")
    for n in args.images:
        cfg = DiscoveryConfig(name="bench", prompt="p", n_images=n, batch_size=args.batch_size)
        with tempfile.TemporaryDirectory() as tmp:
            ckpt = JobCheckpoint.open(Path(tmp) / "ckpt", {"bench": n}, resume=False)
            write = 0.0
            for b in range(cfg.n_batches):
                m = len(cfg.batch_indices(b))
                arrays = {"controls": (rng.standard_normal((m, *shape), dtype=np.float32) + 0.05)}
                start = time.perf_counter()
                ckpt.save_batch(b, arrays, {"status": ["ok"] * m})
                write += time.perf_counter() - start
            start = time.perf_counter()
            local = {b: ckpt.load_batch(b) for b in range(cfg.n_batches)}
            load = time.perf_counter() - start
        ok = np.ones(n, dtype=bool)
        ok[::17] = False  # some skipped images
        start = time.perf_counter()
        ref = one_matrix_mean(cfg, local, ok)
        t_ref = time.perf_counter() - start
        timings, same = [], True
        for device in args.devices:
            dev = torch.device(device)
            for _ in range(2 if dev.type == "cuda" else 1):  # on a GPU the first call pays CUDA's start-up
                start = time.perf_counter()
                new = discover_module._mean_direction(cfg, local, list(range(cfg.n_batches)), ok,
                                                      int(np.prod(shape)), dev)
                seconds = time.perf_counter() - start
            timings.append(f"blocks on {device} {seconds:.2f} s ({t_ref / seconds:.1f}x)")
            same &= bool(np.allclose(new[0], ref[0], rtol=1e-10, atol=1e-14) and np.isclose(new[1], ref[1], rtol=1e-10)
                         and np.allclose(new[2], ref[2], rtol=1e-10) and np.isclose(new[3], ref[3], rtol=1e-10))
        print(f"{n} images: checkpoint writes {write:.2f} s, reload {load:.2f} s; mean aggregation "
              f"one float64 matrix {t_ref:.2f} s, {', '.join(timings)}; same result: {same}")


if __name__ == "__main__":
    main()
