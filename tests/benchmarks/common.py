"""Shared helpers of the benchmark scripts: arguments, device, timing, budget, memory, JSON, tables.

Timing convention: every measured region is bracketed by ``torch.cuda.synchronize()`` on CUDA (so
host clocks measure finished GPU work) or timed with CUDA events (:func:`time_cuda`); each script
warms up before timing and reports medians.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

__all__ = [
    "attempt", "Budget", "PhaseTimer", "REPO_ROOT", "add_common_args", "device_info", "format_table", "free_memory",
    "is_oom", "jsonable", "median", "peak_memory", "reset_peak_memory", "set_tf32", "setup", "sync",
    "time_cuda", "time_host", "velocity_flops", "write_json",
]

GIB = 1024 ** 3


def add_common_args(parser: argparse.ArgumentParser, budget_seconds: float) -> None:
    """The options every benchmark script takes."""
    parser.add_argument("--quick", action="store_true",
                        help="tiny configuration that runs on a CPU in seconds (smoke test)")
    parser.add_argument("--out", default=None,
                        help="folder for the JSON results (default: $OUT if set, else ./bench_out)")
    parser.add_argument("--budget-seconds", type=float, default=budget_seconds,
                        help="wall-clock budget of the whole script; work that would exceed it is skipped")
    parser.add_argument("--device", default="auto", help="'auto' (CUDA when available), 'cpu' or 'cuda'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 in --quick)")


def setup(args: argparse.Namespace) -> tuple[torch.device, Path, Budget, dict[str, Any]]:
    """Resolve device and output folder, start the budget clock, print card name and torch version."""
    budget = Budget(args.budget_seconds)
    if args.threads is not None or args.quick:
        torch.set_num_threads(args.threads or 1)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but torch.cuda.is_available() is False")
    out = Path(args.out or os.environ.get("OUT") or "bench_out")
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    info = device_info(device)
    print(f"device: {info['device_name']} | torch {info['torch']} | cuda {info['cuda']} | "
          f"python {info['python']}", flush=True)
    return device, out, budget, info


def device_info(device: torch.device) -> dict[str, Any]:
    """Card name, torch / CUDA / cuDNN versions and precision flags."""
    info: dict[str, Any] = {
        "device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
        "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
        "device_name": platform.processor() or platform.machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=torch.cuda.get_device_name(device),
                    capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / GIB,
                    cudnn=torch.backends.cudnn.version())
    return info


def velocity_flops(velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   sample_shape: Sequence[int], device: torch.device) -> tuple[float, float]:
    """FLOPs of one forward and of one VJP (its forward included) per image, counted by torch.

    Uses ``torch.utils.flop_counter.FlopCounterMode`` on a batch of one (a multiply-add counts 2).
    """
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *sample_shape, device=device)
    t = torch.full((1,), 0.5, device=device)
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        velocity(x, t)
    leaf = x.clone().requires_grad_(True)
    with FlopCounterMode(display=False) as vjp:
        out = velocity(leaf, t)
        out.backward(torch.ones_like(out))   # .backward: FlopCounterMode rejects autograd.grad
    return float(fwd.get_total_flops()), float(vjp.get_total_flops())


def set_tf32(enabled: bool) -> None:
    """TF32 for cuDNN convolutions and cuBLAS matmuls (legacy flags, which torch.compile reads too)."""
    torch.backends.cudnn.allow_tf32 = enabled
    torch.backends.cuda.matmul.allow_tf32 = enabled


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_host(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run ``fn`` once; seconds between a synchronize before and after (host clock)."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def time_cuda(fn: Callable[[], Any], device: torch.device, repeats: int) -> list[float]:
    """Seconds of each of ``repeats`` calls: CUDA events on a GPU, synchronized host clock otherwise."""
    if device.type != "cuda":
        return [time_host(fn, device)[1] for _ in range(repeats)]
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


class PhaseTimer:
    """Accumulates synchronized wall time per named phase (``with timer.phase("forward"): ...``)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        sync(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            sync(self.device)
            self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def reset(self) -> None:
        self.totals = {}


class Budget:
    """Wall-clock budget of a script, started at construction."""

    def __init__(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"--budget-seconds must be positive, got {seconds}")
        self.seconds = float(seconds)
        self.start = time.perf_counter()
        self.skipped: list[str] = []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return self.seconds - self.elapsed()

    def allows(self, estimate_s: float, what: str, *, reserve: float = 0.0, safety: float = 1.25) -> bool:
        """True if ``estimate_s`` (times ``safety``) fits the remaining budget; else records a skip.

        ``reserve`` is the fraction of the whole budget kept for later sections.
        """
        available = self.remaining() - reserve * self.seconds
        if estimate_s * safety <= available:
            return True
        self.skipped.append(f"{what}: needs ~{estimate_s:.1f}s, {max(available, 0):.1f}s available")
        return False


def is_oom(exc: BaseException) -> bool:
    """True for an out-of-memory error (CUDA caching allocator, cuDNN / cuBLAS workspace, CPU allocator)."""
    if isinstance(exc, (torch.cuda.OutOfMemoryError, MemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "alloc_failed" in text)


def attempt(fn: Callable[[], Any], device: torch.device) -> tuple[Any, str | None]:
    """Run one measurement; (result, None), or (None, "OOM" / "error: ...") after freeing memory.

    On a GPU a failing variant must not end the run: the remaining ones are still measured. On a CPU
    (the ``--quick`` smoke test) errors other than out-of-memory are re-raised so that they fail loudly.
    """
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001 - recorded in the results, the run goes on
        if not is_oom(exc) and device.type != "cuda":
            raise
        status = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    free_memory(device)
    return None, status


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def reset_peak_memory(device: torch.device) -> int | None:
    """Reset the peak counter; returns the bytes allocated now (None on a CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory(device: torch.device) -> int | None:
    """Peak bytes allocated since the last reset (None on a CPU)."""
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def jsonable(obj: Any) -> Any:
    """Plain JSON values: tensors to lists, non-finite floats to None, tuples to lists."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.detach().cpu().tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, (bool, int, str)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return jsonable(obj.item())
    return str(obj)


def write_json(out: Path, name: str, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` to ``out/name.json`` atomically (safe to call after every section)."""
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(jsonable(payload), indent=2, allow_nan=False), encoding="utf-8")
    tmp.replace(path)
    return path


def _cell(value: Any, fmt: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table; ``columns`` are (key, header, format spec)."""
    header = [h for _, h, _ in columns]
    body = [[_cell(row.get(key), fmt) for key, _, fmt in columns] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(lines)
