"""Engine benchmark (issue "engine"): segmented backprop, batched throughput, memory vs N.

Run from the repository root::

    python tests/benchmarks/bench_engine.py [--quick] [--out DIR] [--budget-seconds 150]

Net: NCSN++ with the paper preset's architecture (``rectified-flow-celebahq-256``) at a reduced size so
one run fits the budget: the paper network without its 256x256 level, i.e. 128x128 input, nf = 128,
ch_mult = the preset's first 6 levels (1, 1, 2, 2, 2, 2), attention at 16x16: 54.1M parameters and
133 GFLOP per forward per image (the paper model: 65.6M, 532 GFLOP); random weights (``build_random``),
float32 with PyTorch's default TF32 convolutions. ``--image-size`` / ``--nf`` change it.
Loss: per-image mean squared distance to a random target, so the numbers measure the engine.
N = 100 Euler steps.

1. Backprop at batch 8: time of ``backward_sweep`` exact (one VJP per step) vs segmented
   (``Segmentation.evenly(N // 10, N)`` and the natural straightness segmentation at threshold 5e-3,
   shared and per image), with each segmented gradient's cosine to the exact one (target: time ratio
   <= 0.2 for 10% segments). On random weights the field bends at every step, so the natural
   segmentation is nearly exact; it is reported as it is.
2. Throughput of one optimization iteration (forward, loss, straightness, backward with the fixed
   N // 10 segments, SGD step) in images/s at batch 1, 8, 32, against the original code's per-image
   loop (``original_flowgrad``, batch 1, the same segments) on the same net in the same process
   (target: >= 10x at batch 32). The original's gradient is checked against the engine's.
3. Peak GPU memory of ``control_gradients`` (exact) vs N in {50, 100, 200} at batch 4, next to the
   stored states (N+1)·B·C·H·W·4 bytes and the returned gradients N·B·C·H·W·4 bytes: what remains must
   not grow with N.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import common as C  # noqa: E402
from flowgrad import (Segmentation, TimeGrid, backward_sweep, control_gradients, integrate,  # noqa: E402
                      loss_and_adjoint, straightness_segments)
from flowgrad.models.rectified_flow import DEFAULT_PRESET, PRESETS, build_random  # noqa: E402
from original_flowgrad import original_optimization, segment_set_from_starts  # noqa: E402

NAME = "bench_engine"
LR = 10.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, budget_seconds=150.0)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--nf", type=int, default=128)
    parser.add_argument("--n-steps", type=int, default=100)
    parser.add_argument("--threshold", type=float, default=5e-3)
    parser.add_argument("--backprop-batch", type=int, default=8)
    parser.add_argument("--throughput-batches", default="1,8,32")
    parser.add_argument("--memory-steps", default="50,100,200")
    parser.add_argument("--memory-batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats of each backward sweep")
    args = parser.parse_args(argv)
    if args.quick:
        args.image_size, args.nf, args.n_steps = 16, 8, 20
        args.backprop_batch, args.throughput_batches = 2, "1,2,4"
        args.memory_steps, args.memory_batch, args.repeats = "4,8,12", 2, 1
    return args


def engine_config(image_size: int, nf: int) -> dict[str, Any]:
    """The paper preset as a nested dict at ``image_size`` (its top levels, down to 4x4) and ``nf``."""
    preset = PRESETS[DEFAULT_PRESET]
    levels = min(len(preset.ch_mult), int(math.log2(image_size // 4)) + 1)
    spec = preset.to_dict()
    spec["data"]["image_size"] = image_size
    spec["model"]["nf"] = nf
    spec["model"]["ch_mult"] = list(preset.ch_mult[:levels])
    spec["model"]["attn_resolutions"] = [16] if image_size >= 16 else [image_size // 2]
    return spec


def mse_loss(target: Tensor) -> Callable[[Tensor], Tensor]:
    """Per-image mean squared distance to ``target`` (B, C, H, W)."""
    return lambda x: (x - target[: x.shape[0]]).square().mean(dim=(1, 2, 3))


def engine_iteration(velocity, z0: Tensor, u: Tensor, loss_fn, grid: TimeGrid, segments: Segmentation,
                     threshold: float, timer: C.PhaseTimer) -> tuple[Tensor, int]:
    """One iteration of ``flowgrad.optimize`` with a fixed backward segmentation; returns (grads, VJPs).

    The natural per-image segmentation is still computed (as optimize does), so the host work matches.
    """
    with timer.phase("forward"):
        traj = integrate(velocity, z0, grid, u)
    with timer.phase("loss"):
        _, lam = loss_and_adjoint(loss_fn, traj.final)
    with timer.phase("segment"):
        straightness_segments(traj, threshold, per_image=True)
    with timer.phase("backward"):
        grads, n_vjps = backward_sweep(velocity, traj, lam, segments)
    with timer.phase("step"):
        u.sub_(grads, alpha=LR)
    return grads, n_vjps


def cosines(a: Tensor, b: Tensor) -> Tensor:
    """(B,) cosine between gradients (N, B, ...) per image."""
    a, b = a.transpose(0, 1).flatten(1).double(), b.transpose(0, 1).flatten(1).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=1)


# --------------------------------------------------------------------------- 1. backprop


def bench_backprop(velocity, args, device, budget: C.Budget, pool: Tensor, target: Tensor) -> dict[str, Any]:
    b, n = args.backprop_batch, args.n_steps
    z0, loss_fn = pool[:b], mse_loss(target)
    grid = TimeGrid.uniform(n)
    short = integrate(velocity, z0, TimeGrid.uniform(2))              # warm-up, and a VJP-time probe
    _, lam_short = loss_and_adjoint(loss_fn, short.final)
    backward_sweep(velocity, short, lam_short)
    _, t_two = C.time_host(lambda: backward_sweep(velocity, short, lam_short), device)
    t_vjp = t_two / 2
    traj, t_fwd = C.time_host(lambda: integrate(velocity, z0, grid, torch.zeros((n, *z0.shape), device=device)),
                              device)
    _, lam = loss_and_adjoint(loss_fn, traj.final)
    plans: list[tuple[str, Any]] = [
        ("exact", None),
        (f"evenly-{max(1, n // 10)}", Segmentation.evenly(max(1, n // 10), n)),
        ("natural-shared", straightness_segments(traj, args.threshold)),
        ("natural-per-image", straightness_segments(traj, args.threshold, per_image=True)),
    ]
    rows, exact = [], None
    for name, plan in plans:
        n_seg = n if plan is None else (len(plan) if isinstance(plan, Segmentation)
                                        else sum(len(p) for p in plan) / len(plan))
        repeats = 1 if name.startswith("natural") else args.repeats   # ~exact on random weights: once
        if not budget.allows(repeats * n_seg * t_vjp, f"backprop {name}", reserve=0.5):
            rows.append({"plan": name, "segments": n_seg, "status": "skipped (budget)"})
            continue

        def timed(plan: Any = plan, repeats: int = repeats) -> tuple[list[float], Tensor, int]:
            times, grads, n_vjps = [], None, 0
            for _ in range(repeats):
                (grads, n_vjps), dt = C.time_host(lambda: backward_sweep(velocity, traj, lam, plan), device)
                times.append(dt)
            return times, grads, n_vjps

        measured, status = C.attempt(timed, device)
        if status is not None:
            rows.append({"plan": name, "segments": n_seg, "status": status})
            continue
        times, grads, n_vjps = measured
        row = {"plan": name, "segments": n_seg, "n_vjps": n_vjps, "seconds": C.median(times), "all_s": times}
        if exact is None and plan is None:
            exact = grads
        if exact is not None:
            cos = cosines(grads, exact)
            row.update(cos_mean=cos.mean().item(), cos_min=cos.min().item())
        rows.append(row)
        del grads, measured
    t_exact = rows[0].get("seconds")
    for row in rows:
        if t_exact and "seconds" in row:
            row["ratio_to_exact"] = row["seconds"] / t_exact
    return {"batch": b, "n_steps": n, "threshold": args.threshold, "forward_s": t_fwd, "vjp_probe_s": t_vjp,
            "rows": rows}


# --------------------------------------------------------------------------- 2. throughput


def bench_throughput(velocity, args, device, budget: C.Budget, pool: Tensor, target: Tensor,
                     backprop: dict[str, Any]) -> dict[str, Any]:
    n = args.n_steps
    grid, segs = TimeGrid.uniform(n), Segmentation.evenly(max(1, n // 10), n)
    batches = [int(b) for b in args.throughput_batches.split(",")]
    # Per-image cost estimate from part 1 (batch-8 forward and VJP), scaled linearly in the batch.
    per_image = (backprop["forward_s"] + len(segs) * backprop["vjp_probe_s"]) / backprop["batch"]
    rows: list[dict[str, Any]] = []
    ours_b1_grads = None

    def run_ours(b: int) -> None:
        nonlocal ours_b1_grads
        estimate = max(b, 1) * per_image * 1.2 + 1.0
        if not budget.allows(estimate, f"throughput flowgrad batch {b}", reserve=0.12):
            rows.append({"impl": "flowgrad", "batch": b, "status": "skipped (budget)"})
            return
        z0, loss_fn = pool[:b], mse_loss(target)
        timer = C.PhaseTimer(device)

        def measure() -> tuple[Tensor, int]:
            u_warm = torch.zeros((2, *z0.shape), device=device)
            engine_iteration(velocity, z0, u_warm, loss_fn, TimeGrid.uniform(2), Segmentation.evenly(1, 2),
                             args.threshold, C.PhaseTimer(device))                         # warm-up
            u = torch.zeros((n, *z0.shape), device=device)
            return engine_iteration(velocity, z0, u, loss_fn, grid, segs, args.threshold, timer)

        measured, status = C.attempt(measure, device)
        if status is not None:
            rows.append({"impl": "flowgrad", "batch": b, "status": status})
            return
        grads, n_vjps = measured
        if b == 1:
            ours_b1_grads = grads.detach().clone()
        total = sum(timer.totals.values())
        rows.append({"impl": "flowgrad", "batch": b, "segments": len(segs), "n_vjps": n_vjps,
                     "iteration_s": total, "images_per_s": b / total, "phases": dict(timer.totals)})

    def run_original() -> dict[str, Any] | None:
        estimate = per_image * 2.5 + 1.0
        if not budget.allows(estimate, "throughput original batch 1", reserve=0.12):
            rows.append({"impl": "original", "batch": 1, "status": "skipped (budget)"})
            return None
        z0 = pool[:1]
        loss = lambda x: (x - target[:1]).square().mean()  # noqa: E731 - the original's scalar loss
        timer = C.PhaseTimer(device)

        def measure() -> Any:
            original_optimization(velocity, z0, loss, n_steps=2, iterations=1, threshold=args.threshold,
                                  lr=LR, segments=segment_set_from_starts([0], 2))          # warm-up
            return original_optimization(velocity, z0, loss, n_steps=n, iterations=1, threshold=args.threshold,
                                         lr=LR, segments=segment_set_from_starts(list(segs.starts), n),
                                         timer=timer)

        result, status = C.attempt(measure, device)
        if status is not None:
            rows.append({"impl": "original", "batch": 1, "status": status})
            return None
        total = sum(timer.totals.values())
        rows.append({"impl": "original", "batch": 1, "segments": len(segs), "n_vjps": result.n_vjps[0],
                     "iteration_s": total, "images_per_s": 1.0 / total, "phases": dict(timer.totals)})
        return {k: g.detach().clone() for k, g in result.gradients.items()}

    order = [b for b in batches if b == 1] + ["original"] + sorted(b for b in batches if b != 1)[::-1]
    original_grads = None
    for item in order:
        if item == "original":
            original_grads = run_original()
        else:
            run_ours(int(item))
    base = next((r for r in rows if r["impl"] == "original" and "images_per_s" in r), None)
    for row in rows:
        if base is not None and row["impl"] == "flowgrad" and "images_per_s" in row:
            row["speedup_vs_original"] = row["images_per_s"] / base["images_per_s"]
    agreement = None
    if original_grads is not None and ours_b1_grads is not None:
        stacked = torch.stack([original_grads[k] for k in range(n)])          # (N, 1, C, H, W)
        agreement = cosines(stacked, ours_b1_grads).min().item()
    rows.sort(key=lambda r: (r["impl"] != "original", r["batch"]))
    return {"n_steps": n, "segments": len(segs), "rows": rows, "original_vs_flowgrad_grad_cos": agreement}


# --------------------------------------------------------------------------- 3. memory


def bench_memory(velocity, args, device, budget: C.Budget, pool: Tensor, target: Tensor,
                 backprop: dict[str, Any]) -> dict[str, Any]:
    b = args.memory_batch
    z0, loss_fn = pool[:b], mse_loss(target)
    per_step = (backprop["forward_s"] / backprop["n_steps"] + backprop["vjp_probe_s"]) * b / backprop["batch"]
    sample_bytes = z0[0].numel() * z0.element_size()
    rows = []
    for n in [int(s) for s in args.memory_steps.split(",")]:
        if not budget.allows(n * per_step * 1.2 + 0.5, f"memory N={n}"):
            rows.append({"n_steps": n, "status": "skipped (budget)"})
            continue
        controls = torch.zeros((n, *z0.shape), device=device)
        C.free_memory(device)
        before = C.reset_peak_memory(device)
        measured, status = C.attempt(
            lambda: C.time_host(lambda: control_gradients(velocity, z0, controls, loss_fn, n), device), device)
        if status is not None:
            rows.append({"n_steps": n, "status": status})
            continue
        (result, seconds), measured = measured, None
        peak = C.peak_memory(device)
        states = (n + 1) * b * sample_bytes
        grads = n * b * sample_bytes
        row: dict[str, Any] = {"n_steps": n, "seconds": seconds, "n_vjps": result.n_vjps,
                               "states_bytes": states, "gradients_bytes": grads}
        if peak is not None and before is not None:
            delta = peak - before
            row.update(peak_bytes=peak, delta_bytes=delta, minus_states_bytes=delta - states,
                       minus_states_and_gradients_bytes=delta - states - grads)
        rows.append(row)
        del result, controls
    done = [r for r in rows if "minus_states_and_gradients_bytes" in r]
    summary: dict[str, Any] = {"batch": b, "rows": rows, "flat": None}
    if len(done) >= 2:
        growth = done[-1]["minus_states_and_gradients_bytes"] - done[0]["minus_states_and_gradients_bytes"]
        states_growth = done[-1]["states_bytes"] - done[0]["states_bytes"]
        summary.update(overhead_growth_bytes=growth, states_growth_bytes=states_growth,
                       flat=abs(growth) <= 0.05 * states_growth)
    return summary


# --------------------------------------------------------------------------- main


def targets(results: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    bp = {r["plan"]: r for r in results.get("backprop", {}).get("rows", [])}
    even = next((r for name, r in bp.items() if name.startswith("evenly")), {})
    if "ratio_to_exact" in even:
        out["backprop_ratio_evenly"] = even["ratio_to_exact"]
        out["backprop_ratio_le_0.2"] = even["ratio_to_exact"] <= 0.2
    rows = results.get("throughput", {}).get("rows", [])
    ours = [r for r in rows if r["impl"] == "flowgrad" and "speedup_vs_original" in r]
    if ours:
        largest = max(ours, key=lambda r: r["batch"])
        out["speedup_largest_batch"] = {"batch": largest["batch"], "speedup": largest["speedup_vs_original"],
                                        "ge_10x": largest["speedup_vs_original"] >= 10}
    mem = results.get("memory", {})
    if mem.get("flat") is not None:
        out["memory_flat_in_n"] = mem["flat"]
    return out


def tables(results: dict[str, Any]) -> str:
    parts = [f"targets: {results.get('targets')}"]
    if results.get("skipped"):
        parts.append(f"skipped: {results['skipped']}")
    bp = results.get("backprop")
    if bp:
        parts.append(f"[1] backprop at batch {bp['batch']}, N={bp['n_steps']} (forward {bp['forward_s']:.3f}s)")
        parts.append(C.format_table(bp["rows"], [
            ("plan", "plan", ""), ("segments", "segments", ".1f"), ("n_vjps", "VJPs", "d"),
            ("seconds", "backward s", ".3f"), ("ratio_to_exact", "vs exact", ".3f"),
            ("cos_mean", "cos mean", ".4f"), ("cos_min", "cos min", ".4f"), ("status", "status", "")]))
    tp = results.get("throughput")
    if tp:
        cos = tp["original_vs_flowgrad_grad_cos"]
        parts.append(f"[2] one iteration, N={tp['n_steps']}, {tp['segments']} segments; original-vs-flowgrad "
                     f"gradient cos {'-' if cos is None else format(cos, '.6f')}")
        parts.append(C.format_table(tp["rows"], [
            ("impl", "impl", ""), ("batch", "batch", "d"), ("iteration_s", "iter s", ".3f"),
            ("images_per_s", "img/s", ".3f"), ("speedup_vs_original", "x original", ".1f"),
            ("status", "status", "")]))
    mem = results.get("memory")
    if mem:
        mib = [dict(r, **{k: r[k] / 2 ** 20 for k in ("peak_bytes", "states_bytes", "gradients_bytes",
                                                      "minus_states_bytes", "minus_states_and_gradients_bytes")
                          if r.get(k) is not None}) for r in mem["rows"]]
        parts.append(f"[3] control_gradients memory at batch {mem['batch']} (MiB; flat: {mem['flat']})")
        parts.append(C.format_table(mib, [
            ("n_steps", "N", "d"), ("seconds", "s", ".2f"), ("peak_bytes", "peak", ".1f"),
            ("states_bytes", "states", ".1f"), ("gradients_bytes", "grads", ".1f"),
            ("minus_states_bytes", "peak-states", ".1f"),
            ("minus_states_and_gradients_bytes", "peak-states-grads", ".1f"), ("status", "status", "")]))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, out, budget, info = C.setup(args)
    spec = engine_config(args.image_size, args.nf)
    velocity = build_random(spec, seed=args.seed, device=device)
    params = sum(p.numel() for p in velocity.parameters())
    flops_fwd, flops_vjp = C.velocity_flops(velocity, velocity.sample_shape, device)
    results: dict[str, Any] = {
        "script": NAME, "quick": args.quick, "device": info,
        "config": {"model": spec, "parameters": params, "sample_shape": velocity.sample_shape,
                   "flops_forward_per_image": flops_fwd, "flops_vjp_per_image": flops_vjp,
                   "n_steps": args.n_steps, "threshold": args.threshold, "loss": "per-image MSE to a target",
                   "budget_seconds": args.budget_seconds, "tf32_conv": torch.backends.cudnn.allow_tf32},
    }
    print(f"net: NCSN++ {args.image_size}x{args.image_size} nf={args.nf} ch_mult={spec['model']['ch_mult']}, "
          f"{params / 1e6:.1f}M parameters, {flops_fwd / 1e9:.1f} GFLOP/forward", flush=True)
    max_batch = max([args.backprop_batch, args.memory_batch,
                     *(int(b) for b in args.throughput_batches.split(","))])
    gen = torch.Generator().manual_seed(args.seed)
    pool = torch.randn((max_batch, *velocity.sample_shape), generator=gen).to(device)
    target = torch.randn((max_batch, *velocity.sample_shape), generator=gen).to(device)

    def save() -> Path:
        results["skipped"] = budget.skipped
        results["elapsed_s"] = budget.elapsed()
        results["targets"] = targets(results)
        return C.write_json(out, NAME, results)

    results["backprop"] = bench_backprop(velocity, args, device, budget, pool, target)
    save()
    results["throughput"] = bench_throughput(velocity, args, device, budget, pool, target, results["backprop"])
    save()
    results["memory"] = bench_memory(velocity, args, device, budget, pool, target, results["backprop"])
    path = save()
    print(f"results: {path} ({budget.elapsed():.1f}s)")
    print(tables(results))
    return results


if __name__ == "__main__":
    main()
