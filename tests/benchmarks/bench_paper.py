"""The paper's edit settings on a GPU (issues "real models" and "GPU performance").

Run from the repository root::

    python tests/benchmarks/bench_paper.py [--quick] [--out DIR] [--budget-seconds 150] [--compile]

Setting (FlowGrad, CelebA-HQ 256 edits): NCSN++ ``rectified-flow-celebahq-256`` (65.6M parameters,
random weights), a ViT-B-32 open_clip model with random weights, CLIP loss with 20 augmented
replicas and alpha 0.7 (L1 to the source image), SGD lr 10, N = 100 Euler steps, 10 iterations,
straightness threshold 5e-3, plus fixed backward segmentations of 10 and 26 segments (random weights
bend at every step, so the natural segmentation is ~N segments; real checkpoints give ~26).

Sections, each skipped (and listed) when the remaining budget cannot hold it:

1. micro: NCSN++ forward and VJP alone at several batch sizes, fp32 (no TF32) / TF32 / bf16 autocast,
   channels_last off/on (and ``torch.compile`` with ``--compile``), in TFLOP/s.
2. baseline: the original code's per-image loop (``original_flowgrad``, batch 1, TF32, eager) with
   26 segments; ``--timed-iterations`` iterations timed, its fixed-step inversion timed once.
3. variants ``bB-PRECISION[-cl]`` (``--variants``): inversion (Euler, N steps), one optimization
   iteration (forward trajectory, CLIP loss + adjoint, straightness segmentation, backward with 26
   segments, SGD step) and a backward with 10 segments on the same trajectory. Per phase seconds per
   image, images/s, peak memory, TFLOP/s of forward and VJP phases, baseline/ours and ours/floor
   (floor: the NCSN++ work of the phase at ``--floor-tflops`` = 760 TFLOP/s, the bf16 dense peak).
   Full-edit figures (inversion + I iterations + final forward) are EXTRAPOLATED from the timed
   iteration(s) to ``--iterations`` and labelled so; the natural segmentation's backward is DERIVED
   from the measured per-VJP time.
4. gradient check: cosine of bf16 and TF32 control gradients to strict fp32 ones (same inputs, same
   augmentations; target >= 0.99).
5. apply: one forward trajectory with a fixed (stored) control per image (a sampled image; a real one
   adds its inversion) vs one optimization per image, ours and the baseline's (target >= 100x); the apply
   runs the best variant's own velocity (compiled / graphed when it is).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import Tensor  # noqa: E402

import common as C  # noqa: E402
from flowgrad import (Segmentation, TimeGrid, backward_sweep, control_gradients, integrate, invert,  # noqa: E402
                      loss_and_adjoint, straightness_segments)
from flowgrad.clip_guidance import ClipLoss, random_clip  # noqa: E402
from flowgrad.cuda_graphs import GraphedVelocity  # noqa: E402
from flowgrad.models.ncsnpp_layers import GroupNorm  # noqa: E402
from flowgrad.models.rectified_flow import DEFAULT_PRESET, PRESETS, RectifiedFlowVelocity, build_random  # noqa: E402
from original_flowgrad import original_inversion, original_optimization, segment_set_from_starts  # noqa: E402

NAME = "bench_paper"
PAPER_GFLOP = (532.0, 1064.0)
"""The brief's NCSN++ 256 cost per image: forward, VJP (GFLOP); the script counts its own and reports both."""
DEFAULT_VARIANTS = ("b1-tf32,b16-bf16-cl,b16-tf32,b8-bf16-cl,b8-tf32,b1-bf16,b16-bf16,b16-tf32-cl,"
                    "b8-bf16,b32-bf16-cl,b64-bf16-cl,b8-tf32-cl,b1-bf16-cl,b1-tf32-cl,b32-tf32")
PROMPT = "a photo of a smiling face"
PRECISIONS = ("fp32", "tf32", "bf16")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    C.add_common_args(parser, budget_seconds=150.0)
    parser.add_argument("--n-steps", type=int, default=100)
    parser.add_argument("--iterations", type=int, default=10, help="iterations of one edit (extrapolated)")
    parser.add_argument("--timed-iterations", type=int, default=1, help="iterations actually timed")
    parser.add_argument("--threshold", type=float, default=5e-3)
    parser.add_argument("--segments", default="10,26", help="fixed segment counts: timed backward, headline")
    parser.add_argument("--lr", type=float, default=10.0)
    parser.add_argument("--alpha", type=float, default=0.7)
    parser.add_argument("--replicas", type=int, default=20)
    parser.add_argument("--clip", default="ViT-B-32")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma-separated bB-{fp32,tf32,bf16}[-cl], in priority order")
    parser.add_argument("--micro-batches", default="1,8,32")
    parser.add_argument("--micro-repeats", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile in the micro section")
    parser.add_argument("--floor-tflops", type=float, default=760.0)
    parser.add_argument("--check-batch", type=int, default=2, help="batch of the bf16-vs-fp32 gradient check")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_steps, args.replicas, args.clip, args.segments = 10, 2, "flowgrad-tiny-clip", "2,3"
        args.micro_batches, args.micro_repeats = "1,2", 1
        if args.variants == DEFAULT_VARIANTS:
            args.variants = "b1-tf32,b2-bf16-cl"
    return args


SUFFIXES = ("compile", "graphs", "coarse", "gn32")
"""Variant suffixes: ``-compile`` torch.compile (inductor); ``-graphs`` CUDA graphs (GraphedVelocity);
``-coarse`` the coarsened forward (velocity evaluated once per backward segment, ``--coarse-forward``);
``-gn32`` GroupNorm in float32 under bf16 autocast, as plain autocast does (the library keeps it in bf16:
``ncsnpp_layers.GroupNorm.keep_half``)."""


def parse_variant(spec: str) -> dict[str, Any]:
    """``b16-bf16-cl`` -> {"name", "batch": 16, "precision": "bf16", "channels_last": True, "compiled": False,
    "graphs": False, "coarse": False}; suffixes (any order, after the precision/cl part): see SUFFIXES."""
    parts = spec.strip().split("-")
    flags = {k: False for k in SUFFIXES}
    while parts and parts[-1] in SUFFIXES:
        flags[parts.pop()] = True
    if len(parts) not in (2, 3) or not parts[0].startswith("b") or not parts[0][1:].isdigit() \
            or parts[1] not in PRECISIONS or (len(parts) == 3 and parts[2] != "cl"):
        raise SystemExit(f"--variants: cannot parse {spec!r}; expected bB-{{fp32,tf32,bf16}}[-cl][-compile]"
                         "[-graphs][-coarse][-gn32], e.g. b16-bf16-cl")
    return {"name": spec.strip(), "batch": int(parts[0][1:]), "precision": parts[1], "channels_last": len(parts) == 3,
            "compiled": flags["compile"], "graphs": flags["graphs"], "coarse": flags["coarse"], "gn32": flags["gn32"]}


def model_config(quick: bool) -> Any:
    if not quick:
        return DEFAULT_PRESET
    spec = PRESETS[DEFAULT_PRESET].to_dict()
    spec["data"]["image_size"] = 16
    spec["model"].update(nf=8, ch_mult=[2, 2, 2], attn_resolutions=[16])
    return spec


class Models:
    """One NCSN++ network shared by velocity wrappers of each precision / memory format."""

    def __init__(self, base: RectifiedFlowVelocity) -> None:
        self.base = base
        self.net = base.net
        self.channels_last = False

    def velocity(self, precision: str, channels_last: bool, compiled: bool = False,
                 gn32: bool = False) -> RectifiedFlowVelocity:
        """Set TF32 for ``precision``, convert the weights' memory format, wrap with autocast if bf16;
        ``compiled``: the wrapper's forward goes through ``torch.compile`` (compiled on first use);
        ``gn32``: GroupNorm in float32 under autocast (the library's default keeps bf16 inputs in bf16)."""
        C.set_tf32(precision != "fp32")
        for m in self.net.modules():
            if isinstance(m, GroupNorm):
                m.keep_half = not gn32
        if channels_last != self.channels_last:
            self.net.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            self.channels_last = channels_last
        return RectifiedFlowVelocity(self.net, name=self.base.name, channels_last=channels_last,
                                     autocast_dtype=torch.bfloat16 if precision == "bf16" else None,
                                     compile_backend="inductor" if compiled else None)  # as `--compile` does


class CostModel:
    """Predicts forward / VJP seconds at (precision, channels_last, batch) from what was measured."""

    def __init__(self, flops: tuple[float, float]) -> None:
        self.flops = flops
        self.seen: dict[tuple[str, bool, int], tuple[float, float]] = {}

    def add(self, precision: str, channels_last: bool, batch: int, fwd: float, vjp: float) -> None:
        self.seen[(precision, channels_last, batch)] = (fwd, vjp)

    def predict(self, precision: str, channels_last: bool, batch: int) -> tuple[float, float]:
        if (precision, channels_last, batch) in self.seen:
            return self.seen[(precision, channels_last, batch)]
        candidates = [(k, v) for k, v in self.seen.items() if k[0] == precision] or list(self.seen.items())
        if not candidates:   # nothing measured yet: assume 20 TFLOP/s
            return batch * self.flops[0] / 20e12, batch * self.flops[1] / 20e12
        # Per-image time at the largest measured batch <= batch (never cheaper than what was seen).
        key, (fwd, vjp) = max(candidates, key=lambda kv: (kv[0][2] <= batch, kv[0][2] if kv[0][2] <= batch
                                                           else -kv[0][2]))
        slower = {("bf16", "tf32"): 2.0, ("bf16", "fp32"): 6.0, ("tf32", "fp32"): 3.0}.get((key[0], precision), 1.0)
        scale = batch / key[2] * slower
        return fwd * scale, vjp * scale


# --------------------------------------------------------------------------- 1. micro


def bench_micro(models: Models, args, device, budget: C.Budget, cost: CostModel) -> list[dict[str, Any]]:
    batches = [int(b) for b in args.micro_batches.split(",")]
    middle = batches[len(batches) // 2]
    configs = []
    for b in batches:
        for precision, cl in (("tf32", False), ("tf32", True), ("bf16", False), ("bf16", True)):
            configs.append((b, precision, cl, False))
        if b == middle:
            configs.append((b, "fp32", False, False))
            if args.compile:
                configs += [(b, "bf16", False, True), (b, "tf32", False, True)]
    shape = models.base.sample_shape
    f_fwd, f_vjp = cost.flops
    rows = []
    for b, precision, cl, compiled in configs:
        name = f"b{b}-{precision}{'-cl' if cl else ''}{'-compile' if compiled else ''}"
        fwd, vjp = cost.predict(precision, cl, b)
        estimate = (args.micro_repeats + 1) * (fwd + vjp) + (60.0 if compiled else 0.0)
        if not budget.allows(estimate, f"micro {name}", reserve=0.7):
            rows.append({"config": name, "status": "skipped (budget)"})
            continue
        fn: Callable[[Tensor, Tensor], Tensor] = models.velocity(precision, cl, compiled)
        x = torch.randn((b, *shape), device=device)
        t = torch.full((b,), 0.5, device=device)
        lam = torch.randn_like(x)

        def forward() -> None:
            with torch.no_grad():
                fn(x, t)

        def vjp_call() -> None:
            leaf = x.detach().requires_grad_(True)
            torch.autograd.grad(fn(leaf, t), leaf, grad_outputs=lam)

        def measure() -> tuple[float, float, float, float]:
            _, warm_fwd = C.time_host(forward, device)
            _, warm_vjp = C.time_host(vjp_call, device)
            return (warm_fwd, warm_vjp, C.median(C.time_cuda(forward, device, args.micro_repeats)),
                    C.median(C.time_cuda(vjp_call, device, args.micro_repeats)))

        measured, status = C.attempt(measure, device)
        if status is not None:
            rows.append({"config": name, "batch": b, "status": status})
            continue
        warm_fwd, warm_vjp, t_fwd, t_vjp = measured
        if not compiled:
            cost.add(precision, cl, b, t_fwd, t_vjp)
        row = {"config": name, "batch": b, "precision": precision, "channels_last": cl, "compiled": compiled,
               "forward_s": t_fwd, "vjp_s": t_vjp, "forward_tflops": b * f_fwd / t_fwd / 1e12,
               "vjp_tflops": b * f_vjp / t_vjp / 1e12}
        if compiled:
            row.update(compile_forward_s=warm_fwd, compile_vjp_s=warm_vjp)
        rows.append(row)
        del x, lam
    models.velocity("tf32", False)
    return rows


# --------------------------------------------------------------------------- 2. baseline


def make_clip_loss(clip, velocity, sources: Tensor, args) -> ClipLoss:
    return ClipLoss(clip, PROMPT, source=sources, alpha=args.alpha, replicas=args.replicas, seed=args.seed)


def bench_baseline(models: Models, clip, args, device, budget: C.Budget, cost: CostModel,
                   sources: Tensor, segs: dict[int, Segmentation]) -> dict[str, Any]:
    n, k_head = args.n_steps, max(segs)
    fwd, vjp = cost.predict("tf32", False, 1)
    estimate = 1.6 * (2 * n * fwd + k_head * vjp) * args.timed_iterations + 3 * (fwd + vjp) + 2.0
    if not budget.allows(estimate, "baseline", reserve=0.4):
        return {"status": "skipped (budget)"}
    velocity = models.velocity("tf32", False)
    clip_loss = make_clip_loss(clip, velocity, sources[:1], args)

    def loss(x: Tensor) -> Tensor:
        clip.encode_text([PROMPT])        # the original ran the text tower on every call (clip_model(img, text))
        return clip_loss(velocity.to_image(x)).sum()

    x1 = velocity.from_image(sources[:1])
    timer = C.PhaseTimer(device)

    def measure() -> Any:
        original_inversion(velocity, x1, 2)                                               # warm-up
        original_optimization(velocity, x1, loss, n_steps=2, iterations=1, threshold=args.threshold,
                              lr=args.lr, segments=segment_set_from_starts([0], 2))
        z0 = original_inversion(velocity, x1, n, timer=timer)
        return original_optimization(velocity, z0, loss, n_steps=n, iterations=args.timed_iterations,
                                     threshold=args.threshold, lr=args.lr, timer=timer,
                                     segments=segment_set_from_starts(list(segs[k_head].starts), n))

    result, status = C.attempt(measure, device)
    if status is not None:
        return {"status": status}
    it = args.timed_iterations
    per_iter = {k: v / it for k, v in timer.totals.items() if k != "inversion"}
    t_vjp = per_iter["backward"] / k_head
    natural = sum(len(s["indices"]) for s in result.straightness_segments) / it
    row: dict[str, Any] = {
        "name": "original b1", "batch": 1, "precision": "tf32", "timed_iterations": it,
        "inversion_s": timer.totals["inversion"], "forward_s": per_iter["forward"], "loss_s": per_iter["loss"],
        "step_s": per_iter.get("step", 0.0), "natural_segments": natural,
        "vjp_s": t_vjp, "backward_s": {str(k): k * t_vjp for k in segs}, "backward_measured": str(k_head),
    }
    row["backward_s"]["natural (derived)"] = natural * t_vjp
    row["iteration_s"] = {key: row["forward_s"] + row["loss_s"] + row["step_s"] + value
                          for key, value in row["backward_s"].items()}
    row["edit_s_extrapolated"] = {key: row["inversion_s"] + args.iterations * value + row["forward_s"]
                                  for key, value in row["iteration_s"].items()}
    return row


# --------------------------------------------------------------------------- 3. variants


def bench_variant(models: Models, clip, spec: dict[str, Any], args, device, budget: C.Budget, cost: CostModel,
                  sources: Tensor, segs: dict[int, Segmentation], baseline: dict[str, Any]) -> dict[str, Any]:
    b, precision, cl = spec["batch"], spec["precision"], spec["channels_last"]
    n, k_head = args.n_steps, max(segs)
    row: dict[str, Any] = dict(spec)
    fwd, vjp = cost.predict(precision, cl, b)
    estimate = (2 * n * fwd + sum(segs) * vjp) * args.timed_iterations + 3 * (fwd + vjp) + 1.0
    if spec.get("compiled"):
        estimate += 120.0  # compiling forward (with and without grad) and backward inside the warm-up
    if not budget.allows(estimate, f"variant {spec['name']}"):
        row["status"] = "skipped (budget)"
        return row
    velocity = models.velocity(precision, cl, compiled=spec.get("compiled", False), gn32=spec.get("gn32", False))
    if spec.get("graphs"):
        velocity = GraphedVelocity(velocity)
    hold = list(segs[k_head].starts) if spec.get("coarse") else None
    clip_loss = make_clip_loss(clip, velocity, sources[:b], args)
    loss_fn = lambda x: clip_loss(velocity.to_image(x))  # noqa: E731
    x1 = velocity.from_image(sources[:b])
    C.free_memory(device)
    C.reset_peak_memory(device)
    timer = C.PhaseTimer(device)

    def measure() -> tuple[dict[int, float], float, int | None]:
        warm = integrate(velocity, invert(velocity, x1, 2), TimeGrid.uniform(2))        # warm-up
        _, lam = loss_and_adjoint(loss_fn, warm.final)
        backward_sweep(velocity, warm, lam)
        del warm, lam
        with timer.phase("inversion"):
            z0 = invert(velocity, x1, n, method="euler")
        grid = TimeGrid.uniform(n)
        u = torch.zeros((n, *z0.shape), device=device)
        other: dict[int, float] = {}
        natural = 0.0
        if hold is not None:  # a full forward too: the coarse edit's first and final passes are full
            with timer.phase("full forward"):
                integrate(velocity, z0, grid, u, keep_states=False)
        for _ in range(args.timed_iterations):
            with timer.phase("forward"):
                traj = integrate(velocity, z0, grid, u, hold=hold)
            with timer.phase("loss"):
                _, lam = loss_and_adjoint(loss_fn, traj.final)
            with timer.phase("segment"):
                natural += sum(len(s) for s in straightness_segments(traj, args.threshold, per_image=True)) / b
            with timer.phase("backward"):
                grads, _ = backward_sweep(velocity, traj, lam, segs[k_head])
            with timer.phase("step"):
                u.sub_(grads, alpha=args.lr)
            del grads
            for k in segs:
                if k != k_head:
                    _, dt = C.time_host(lambda: backward_sweep(velocity, traj, lam, segs[k]), device)
                    other[k] = other.get(k, 0.0) + dt
            del traj, lam
        return other, natural, C.peak_memory(device)

    measured, status = C.attempt(measure, device)
    if status is not None:
        row["status"] = status
        return row
    other, natural, peak = measured
    it = args.timed_iterations
    per = {k: v / it for k, v in timer.totals.items() if k not in ("inversion", "full forward")}
    full_forward = timer.totals.get("full forward", per["forward"])
    n_evals = len(hold) if hold is not None else n
    t_vjp = per["backward"] / k_head
    if not any(spec.get(k) for k in SUFFIXES):
        cost.add(precision, cl, b, per["forward"] / n, t_vjp)
    backward = {str(k_head): per["backward"], **{str(k): v / it for k, v in other.items()}}
    backward["natural (derived)"] = natural / it * t_vjp
    base_iter = per["forward"] + per["loss"] + per["segment"] + per["step"]
    iteration = {key: base_iter + value for key, value in backward.items()}
    f_fwd, f_vjp = cost.flops
    row.update(
        timed_iterations=it, natural_segments=natural / it, peak_memory_gib=None if peak is None else peak / C.GIB,
        inversion_s_per_image=timer.totals["inversion"] / b, forward_s_per_image=per["forward"] / b,
        loss_s_per_image=per["loss"] / b, segment_s_per_image=per["segment"] / b,
        backward_s_per_image={k: v / b for k, v in backward.items()},
        iteration_s_per_image={k: v / b for k, v in iteration.items()},
        iteration_images_per_s=b / iteration[str(k_head)],
        # coarse: the first pass is full, and besides the full final pass a full re-run of the best controls
        # (when a coarse pass produced them) is counted, i.e. the worst case
        edit_s_per_image_extrapolated={
            k: (timer.totals["inversion"] + args.iterations * v + full_forward + per["loss"]
                + (2 * full_forward - per["forward"] if hold is not None else 0.0)) / b
            for k, v in iteration.items()},
        velocity_evaluations_per_forward=n_evals,
        full_forward_s_per_image=full_forward / b,
        forward_tflops=b * n_evals * f_fwd / per["forward"] / 1e12,
        vjp_tflops=b * k_head * f_vjp / per["backward"] / 1e12,
        floor_iteration_s_per_image=(n * f_fwd + k_head * f_vjp) / (args.floor_tflops * 1e12),
    )
    row["ours_over_floor"] = row["iteration_s_per_image"][str(k_head)] / row["floor_iteration_s_per_image"]
    if "iteration_s" in baseline:
        row["baseline_over_ours"] = {k: baseline["iteration_s"][k] / v for k, v in row["iteration_s_per_image"].items()
                                     if k in baseline["iteration_s"]}
        row["baseline_over_ours_edit"] = baseline["edit_s_extrapolated"][str(k_head)] / \
            row["edit_s_per_image_extrapolated"][str(k_head)]
    return row


# --------------------------------------------------------------------------- 4. gradient check


def bench_gradient_check(models: Models, clip, args, device, budget: C.Budget, cost: CostModel,
                         sources: Tensor, segs: dict[int, Segmentation]) -> dict[str, Any]:
    b, n, k_head = args.check_batch, args.n_steps, max(segs)
    estimate = sum((lambda f, v: n * f + k_head * v)(*cost.predict(p, False, b)) for p in PRECISIONS) + 2.0
    if not budget.allows(estimate, "gradient check"):
        return {"status": "skipped (budget)"}
    z0 = torch.randn((b, *models.base.sample_shape), generator=torch.Generator().manual_seed(args.seed + 1))
    z0 = z0.to(device)

    def measure() -> dict[str, Tensor]:
        grads = {}
        for precision in PRECISIONS:
            velocity = models.velocity(precision, False)
            clip_loss = make_clip_loss(clip, velocity, sources[:b], args)    # same seed: same augmentations
            params = clip_loss.sample_params(b)
            result = control_gradients(velocity, z0, None, lambda x: clip_loss(velocity.to_image(x), params), n,
                                       segments=segs[k_head])
            grads[precision] = result.gradients.transpose(0, 1).flatten(1).double()
        return grads

    grads, status = C.attempt(measure, device)
    models.velocity("tf32", False)
    if status is not None:
        return {"status": status}
    ref = grads["fp32"]
    out: dict[str, Any] = {"batch": b, "segments": k_head, "reference": "fp32 (no TF32)"}
    for precision in ("tf32", "bf16"):
        cos = torch.nn.functional.cosine_similarity(grads[precision], ref, dim=1)
        out[f"cos_{precision}_min"] = cos.min().item()
        out[f"cos_{precision}"] = cos.tolist()
    out["bf16_ge_0.99"] = out["cos_bf16_min"] >= 0.99
    return out


# --------------------------------------------------------------------------- 5. apply a stored direction


def bench_apply(models: Models, args, device, budget: C.Budget, cost: CostModel, variants: list[dict[str, Any]],
                baseline: dict[str, Any], segs: dict[int, Segmentation]) -> dict[str, Any]:
    done = [v for v in variants if "iteration_images_per_s" in v]
    if not done:
        return {"status": "skipped (no measured variant)"}
    best = max(done, key=lambda v: v["iteration_images_per_s"])
    b, precision, cl, n = best["batch"], best["precision"], best["channels_last"], args.n_steps
    fwd, _ = cost.predict(precision, cl, b)
    if not budget.allows(8 * n * fwd + 1.0, "apply"):
        return {"status": "skipped (budget)"}
    # The same velocity as the variant's edit (compiled / graphed alike: compiled code is reused).
    velocity = models.velocity(precision, cl, compiled=best.get("compiled", False), gn32=best.get("gn32", False))
    if best.get("graphs"):
        velocity = GraphedVelocity(velocity)
    gen = torch.Generator().manual_seed(args.seed + 2)
    z0 = torch.randn((b, *velocity.sample_shape), generator=gen).to(device)
    direction = 0.01 * torch.randn((n, *velocity.sample_shape), generator=gen).to(device)
    controls = direction.unsqueeze(1).expand(n, *z0.shape)     # as directions.apply.apply_controls does

    def sample() -> Tensor:
        return integrate(velocity, z0, TimeGrid.uniform(n), controls, keep_states=False).final

    def measure() -> tuple[list[float], list[float]]:
        integrate(velocity, z0, TimeGrid.uniform(2), controls[:2], keep_states=False)         # warm-up
        generated = [C.time_host(sample, device)[1] for _ in range(2)]
        x1 = sample()
        real = [C.time_host(lambda: (invert(velocity, x1, n, method="euler"), sample()), device)[1]
                for _ in range(2)]
        return generated, real

    times, status = C.attempt(measure, device)
    models.velocity("tf32", False)
    if status is not None:
        return {"variant": best["name"], "status": status}
    apply_s, apply_real_s = C.median(times[0]) / b, C.median(times[1]) / b
    k = str(max(segs))
    edit_s = best["edit_s_per_image_extrapolated"][k]
    out = {"variant": best["name"], "batch": b, "apply_s_per_image": apply_s,
           "apply_real_s_per_image": apply_real_s, "ours_edit_s_per_image": edit_s,
           "ours_edit_over_apply": edit_s / apply_s, "ours_edit_over_apply_real": edit_s / apply_real_s}
    if "edit_s_extrapolated" in baseline:
        out["baseline_edit_s_per_image"] = baseline["edit_s_extrapolated"][k]
        out["baseline_edit_over_apply"] = baseline["edit_s_extrapolated"][k] / apply_s
        out["baseline_edit_over_apply_real"] = baseline["edit_s_extrapolated"][k] / apply_real_s
    out["ge_100x_vs_ours"] = out["ours_edit_over_apply"] >= 100
    if "baseline_edit_over_apply" in out:
        out["ge_100x_vs_original"] = out["baseline_edit_over_apply"] >= 100
    return out


# --------------------------------------------------------------------------- report


def variant_table(rows: list[dict[str, Any]], baseline: dict[str, Any], k: str) -> str:
    flat = []
    if "iteration_s" in baseline:
        flat.append({"name": "original", "batch": 1, "inv": baseline["inversion_s"], "fwd": baseline["forward_s"],
                     "bwd": baseline["backward_s"][k], "loss": baseline["loss_s"], "iter": baseline["iteration_s"][k],
                     "ips": 1.0 / baseline["iteration_s"][k], "edit": baseline["edit_s_extrapolated"][k],
                     "base": 1.0})
    for r in rows:
        if "iteration_s_per_image" not in r:
            flat.append({"name": r["name"], "batch": r["batch"], "status": r.get("status")})
            continue
        flat.append({"name": r["name"], "batch": r["batch"], "inv": r["inversion_s_per_image"],
                     "fwd": r["forward_s_per_image"], "bwd": r["backward_s_per_image"][k],
                     "loss": r["loss_s_per_image"], "iter": r["iteration_s_per_image"][k],
                     "ips": r["iteration_images_per_s"], "edit": r["edit_s_per_image_extrapolated"][k],
                     "ftf": r["forward_tflops"], "vtf": r["vjp_tflops"], "mem": r["peak_memory_gib"],
                     "base": r.get("baseline_over_ours", {}).get(k), "floor": r["ours_over_floor"]})
    return C.format_table(flat, [
        ("name", "variant", ""), ("batch", "B", "d"), ("inv", "inv s/img", ".3f"), ("fwd", "fwd s/img", ".3f"),
        ("bwd", f"bwd{k} s/img", ".3f"), ("loss", "clip s/img", ".3f"), ("iter", "iter s/img", ".3f"),
        ("ips", "iter img/s", ".2f"), ("edit", "edit s/img*", ".2f"), ("ftf", "fwd TF/s", ".1f"),
        ("vtf", "vjp TF/s", ".1f"), ("mem", "peak GiB", ".1f"), ("base", "base/ours", ".1f"),
        ("floor", "ours/floor", ".1f"), ("status", "status", "")])


def report(results: dict[str, Any], args) -> str:
    k = str(max(int(s) for s in args.segments.split(",")))
    parts = ["micro: NCSN++ forward / VJP alone (median seconds per call, TFLOP/s)",
             C.format_table(results.get("micro", []), [
                 ("config", "config", ""), ("forward_s", "fwd s", ".4f"), ("forward_tflops", "fwd TF/s", ".1f"),
                 ("vjp_s", "vjp s", ".4f"), ("vjp_tflops", "vjp TF/s", ".1f"), ("status", "status", "")])]
    check = results.get("gradient_check", {})
    parts.append(f"gradient check vs fp32: tf32 min cos {check.get('cos_tf32_min')}, bf16 min cos "
                 f"{check.get('cos_bf16_min')} (>= 0.99: {check.get('bf16_ge_0.99')}) {check.get('status', '')}")
    ap = results.get("apply", {})
    parts.append(f"apply a stored direction ({ap.get('variant')}): {ap.get('apply_s_per_image')} s/img sampled, "
                 f"{ap.get('apply_real_s_per_image')} s/img real (inversion + forward); one edit / apply = "
                 f"{ap.get('ours_edit_over_apply')} / {ap.get('ours_edit_over_apply_real')} (ours), "
                 f"{ap.get('baseline_edit_over_apply')} / {ap.get('baseline_edit_over_apply_real')} (original) "
                 f"{ap.get('status', '')}")
    if results.get("skipped"):
        parts.append(f"skipped: {results['skipped']}")
    parts.append(f"variants: one iteration with {k} segments timed ({args.timed_iterations} timed); "
                 f"* edit = inversion + {args.iterations} iterations + final forward, EXTRAPOLATED; "
                 f"N={args.n_steps}, {args.replicas} CLIP replicas")
    parts.append(variant_table(results.get("variants", []), results.get("baseline", {}), k))
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, out, budget, info = C.setup(args)
    base = build_random(model_config(args.quick), seed=args.seed, device=device)
    models = Models(base)
    C.set_tf32(True)
    flops = C.velocity_flops(base, base.sample_shape, device)
    clip = random_clip(args.clip, seed=args.seed, device=device)
    cost = CostModel(flops)
    n = args.n_steps
    segs = {int(k): Segmentation.evenly(int(k), n) for k in args.segments.split(",")}
    variants = [parse_variant(s) for s in args.variants.split(",")]
    max_batch = max([v["batch"] for v in variants] + [args.check_batch])
    sources = torch.rand((max_batch, 3, *base.sample_shape[1:]),
                         generator=torch.Generator().manual_seed(args.seed)).to(device)
    params = sum(p.numel() for p in base.parameters())
    print(f"NCSN++ {base.sample_shape}: {params / 1e6:.1f}M parameters, {flops[0] / 1e9:.1f} GFLOP forward, "
          f"{flops[1] / 1e9:.1f} GFLOP VJP per image (brief: {PAPER_GFLOP}); CLIP {clip.name}", flush=True)
    results: dict[str, Any] = {
        "script": NAME, "quick": args.quick, "device": info,
        "config": {"model": model_config(args.quick), "parameters": params, "sample_shape": base.sample_shape,
                   "flops_forward_per_image": flops[0], "flops_vjp_per_image": flops[1],
                   "paper_gflop_forward_vjp": PAPER_GFLOP, "clip": clip.name, "prompt": PROMPT,
                   "replicas": args.replicas, "alpha": args.alpha, "lr": args.lr, "n_steps": n,
                   "iterations": args.iterations, "timed_iterations": args.timed_iterations,
                   "threshold": args.threshold, "segments": sorted(segs), "floor_tflops": args.floor_tflops,
                   "budget_seconds": args.budget_seconds},
        "variants": [],
    }

    def save() -> Path:
        results["skipped"] = budget.skipped
        results["elapsed_s"] = budget.elapsed()
        return C.write_json(out, NAME, results)

    results["micro"] = bench_micro(models, args, device, budget, cost)
    save()
    results["baseline"] = bench_baseline(models, clip, args, device, budget, cost, sources, segs)
    save()
    for i, spec in enumerate(variants):
        results["variants"].append(bench_variant(models, clip, spec, args, device, budget, cost, sources, segs,
                                                 results["baseline"]))
        save()
        if i == min(1, len(variants) - 1):
            results["gradient_check"] = bench_gradient_check(models, clip, args, device, budget, cost, sources,
                                                             segs)
            results["apply"] = bench_apply(models, args, device, budget, cost, results["variants"],
                                           results["baseline"], segs)
            save()
    path = save()
    print(f"results: {path} ({budget.elapsed():.1f}s)")
    print(report(results, args))
    return results


if __name__ == "__main__":
    main()
