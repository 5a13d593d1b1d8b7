"""Where NCSN++ 256's forward and VJP spend their GPU time, and what bounds their TFLOP/s.

    python tests/benchmarks/profile_ncsnpp.py [--batch 32] [--configs eager,eager-bench,compile-bench]
        [--profile compile-bench] [--top 30] [--budget-seconds 540]

Random weights of the paper's NCSN++ (``rectified-flow-celebahq-256``), bf16 autocast (as the fastest
variants of ``bench_paper.py``). A config name is ``eager`` or ``compile`` plus optional suffixes:
``-bench`` (``torch.backends.cudnn.benchmark = True``: cuDNN times its algorithms per shape instead of
using its heuristics), ``-sepfir`` / ``-convfir`` (FIR up/down-sampling as separable shifted-slice sums /
as depthwise convolutions; default: the library's ``auto``, separable only when compiled; the same numbers,
see ``flowgrad.models.ncsnpp_layers``), ``-cl`` (channels_last weights and inputs), ``-forcelayout`` (inductor's
``force_layout_optimization``: channels_last inside the compiled graph), ``-autotune``
(``torch.compile(mode="max-autotune-no-cudagraphs")``), ``-gn32`` (GroupNorm in float32 as plain
autocast does, instead of the library's bf16-in/bf16-out ``GroupNorm.keep_half``), ``-coord`` (inductor's
``coordinate_descent_tuning``: block sizes of its Triton pointwise/reduction kernels tuned by measurement),
``-mm1x1`` (inductor's ``conv_1x1_as_mm``: 1×1 convolutions as matmuls it can fuse into), ``-graphs`` (the
forward and the VJP replayed as CUDA graphs by ``flowgrad.cuda_graphs.GraphedVelocity``). Each config: forward
and VJP (forward + backward w.r.t. the input) at ``--batch``, CUDA events, median of 3, TFLOP/s from torch's
FLOP counter, and the smallest per-image cosine of its input gradient to strict float32 (eager, no TF32;
first 4 images). Then, for each ``--profile`` config, a ``torch.profiler`` kernel table of one forward +
one VJP: GPU time per kernel, grouped into tensor-core convolutions/matmuls, cuDNN's NCHW<->NHWC
transposes, depthwise FIR convolutions and everything else (normalisation, activations, adds, copies),
which gives the bound: at the measured speed of the tensor-core kernels alone, with everything else free,
what TFLOP/s the network could reach.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import common as C  # noqa: E402
from flowgrad.cuda_graphs import GraphedVelocity  # noqa: E402
from flowgrad.models import ncsnpp_layers as layers  # noqa: E402
from flowgrad.models.rectified_flow import DEFAULT_PRESET, RectifiedFlowVelocity, build_random  # noqa: E402

TENSOR_CORE = re.compile(r"xmma|gemm|cutlass|implicit|wgmma|sm90|sm80|nhwc|fprop|dgrad|wgrad|conv", re.I)
DEPTHWISE = re.compile(r"depthwise|grouped_direct", re.I)
TRANSPOSE = re.compile(r"nchwToNhwc|nhwcToNchw", re.I)   # cuDNN's layout conversions (names contain "nhwc")


def parse(name: str) -> dict:
    parts = name.split("-")
    if parts[0] not in ("eager", "compile") or not set(parts[1:]) <= {"bench", "sepfir", "convfir", "autotune", "cl",
                                                                "forcelayout", "gn32", "coord", "mm1x1",
                                                                "graphs"}:
        raise SystemExit(f"--configs: cannot parse {name!r} "
                         "(eager|compile[-bench][-sepfir|-convfir][-cl][-autotune][-forcelayout][-gn32][-coord][-mm1x1]"
                         "[-graphs])")
    return {"name": name, "compiled": parts[0] == "compile", "bench": "bench" in parts,
            "fir": "separable" if "sepfir" in parts else "conv" if "convfir" in parts else "auto",
            "autotune": "autotune" in parts, "cl": "cl" in parts, "forcelayout": "forcelayout" in parts,
            "gn32": "gn32" in parts, "coord": "coord" in parts, "mm1x1": "mm1x1" in parts,
            "graphs": "graphs" in parts}


def make_velocity(base, cfg: dict) -> RectifiedFlowVelocity | GraphedVelocity:
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    torch.backends.cudnn.benchmark = cfg["bench"]
    inductor_config.force_layout_optimization = cfg["forcelayout"]
    inductor_config.coordinate_descent_tuning = cfg["coord"]
    inductor_config.conv_1x1_as_mm = cfg["mm1x1"]
    for m in base.net.modules():
        if isinstance(m, layers.Resample):
            m.impl = cfg["fir"]
        if isinstance(m, layers.GroupNorm):
            m.keep_half = not cfg["gn32"]
    base.net.to(memory_format=torch.channels_last if cfg["cl"] else torch.contiguous_format)
    v = RectifiedFlowVelocity(base.net, name=base.name, autocast_dtype=torch.bfloat16, channels_last=cfg["cl"])
    if cfg["compiled"]:
        mode = "max-autotune-no-cudagraphs" if cfg["autotune"] else None
        v._call = torch.compile(v._run, mode=mode)
    return GraphedVelocity(v) if cfg["graphs"] else v


def input_vjp(v, x: torch.Tensor, t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """(dv/dx)^T lam: through the wrapper's graphed VJP, or autograd on an eager/compiled velocity."""
    if isinstance(v, GraphedVelocity):
        return v.vjp(x, t, lam)
    leaf = x.detach().requires_grad_(True)
    return torch.autograd.grad(v(leaf, t), leaf, grad_outputs=lam)[0]


def fp32_input_gradient(base, x, t, lam) -> torch.Tensor:
    """Input gradient of the network in strict float32 (eager, TF32 off): the precision reference."""
    v = RectifiedFlowVelocity(base.net, name=base.name)
    C.set_tf32(False)
    try:
        leaf = x.detach().requires_grad_(True)
        return torch.autograd.grad(v(leaf, t), leaf, grad_outputs=lam)[0].detach()
    finally:
        C.set_tf32(True)


def kernel_table(v, x, t, lam, top: int) -> dict:
    from torch.profiler import ProfilerActivity, profile

    def step() -> None:
        with torch.no_grad():
            v(x, t)
        input_vjp(v, x, t, lam)

    step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            k = kernels.setdefault(e.name, [0.0, 0])
            k[0] += e.device_time_total / 1e6 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e6
            k[1] += 1
    total = sum(s for s, _ in kernels.values())
    groups = {"tensor-core conv/matmul": 0.0, "cuDNN layout transposes": 0.0, "depthwise conv (FIR)": 0.0,
              "other": 0.0}
    for name, (s, _) in kernels.items():
        if TRANSPOSE.search(name):
            groups["cuDNN layout transposes"] += s
        elif DEPTHWISE.search(name):
            groups["depthwise conv (FIR)"] += s
        elif TENSOR_CORE.search(name) and not name.startswith("triton"):
            groups["tensor-core conv/matmul"] += s
        else:
            groups["other"] += s
    rows = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:top]
    return {"gpu_s": total, "groups_s": groups,
            "top": [{"kernel": n[:140], "s": s, "calls": c, "share": s / total} for n, (s, c) in rows]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--configs", default="eager,eager-sepfir,compile-convfir,compile,compile-cl")
    p.add_argument("--profile", default="eager,compile,compile-cl")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--budget-seconds", type=float, default=540)
    p.add_argument("--out", default=os.environ.get("OUT") or "bench_out")
    args = p.parse_args()
    start = time.perf_counter()
    device = torch.device("cuda")
    C.set_tf32(True)
    base = build_random(DEFAULT_PRESET, seed=0, device=device)
    flops = C.velocity_flops(base, base.sample_shape, device)
    info = C.device_info(device)
    print(f"{info['device_name']} | torch {info['torch']} | cuDNN {info.get('cudnn')} | batch {args.batch} bf16 | "
          f"{flops[0] / 1e9:.1f} / {flops[1] / 1e9:.1f} GFLOP per image (forward / VJP)", flush=True)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn((args.batch, *base.sample_shape), generator=gen).to(device)
    t = torch.full((args.batch,), 0.5, device=device)
    lam = torch.randn(x.shape, generator=gen).to(device)
    results = {"device": info, "batch": args.batch, "flops": flops, "configs": [], "profiles": {}}
    reference = None
    strict = fp32_input_gradient(base, x[:4], t[:4], lam[:4])
    for name in args.configs.split(","):
        cfg = parse(name)
        if time.perf_counter() - start > args.budget_seconds * (0.55 if cfg["compiled"] else 0.85):
            print(f"{name}: skipped (budget)", flush=True)
            results["configs"].append({"name": name, "status": "skipped (budget)"})
            continue
        v = make_velocity(base, cfg)

        def forward() -> torch.Tensor:
            with torch.no_grad():
                return v(x, t)

        def vjp() -> torch.Tensor:
            return input_vjp(v, x, t, lam)

        t0 = time.perf_counter()
        out, g = forward().float(), vjp().float()
        torch.cuda.synchronize()
        first = time.perf_counter() - t0
        if reference is None:
            reference = (out, g)
        rel = [((a - b).norm() / b.norm()).item() for a, b in zip((out, g), reference)]
        cos = torch.nn.functional.cosine_similarity(g[:4].flatten(1), strict.flatten(1), dim=1).min().item()
        tf = C.median(C.time_cuda(forward, device, 3))
        tv = C.median(C.time_cuda(vjp, device, 3))
        row = {"name": name, "first_call_s": first, "forward_s": tf, "vjp_s": tv,
               "forward_tflops": args.batch * flops[0] / tf / 1e12, "vjp_tflops": args.batch * flops[1] / tv / 1e12,
               "rel_diff_forward": rel[0], "rel_diff_vjp": rel[1], "min_grad_cosine_to_fp32": cos}
        results["configs"].append(row)
        print(f"{name:28s} forward {tf * 1e3:7.1f} ms {row['forward_tflops']:6.1f} TFLOP/s | VJP {tv * 1e3:7.1f} ms "
              f"{row['vjp_tflops']:6.1f} TFLOP/s | first call {first:5.1f} s | rel. diff to "
              f"{args.configs.split(',')[0]} {rel[0]:.1e} / {rel[1]:.1e} | grad cos to fp32 {cos:.5f}", flush=True)
        if name in args.profile.split(","):
            table = kernel_table(v, x, t, lam, args.top)
            results["profiles"][name] = table
            tc = table["groups_s"]["tensor-core conv/matmul"]
            bound = args.batch * (flops[0] + flops[1]) / tc / 1e12
            table["tensor_core_only_bound_tflops"] = bound
            print(f"  profile of one forward + one VJP: {table['gpu_s'] * 1e3:.1f} ms of kernels; " + ", ".join(
                f"{k} {s * 1e3:.1f} ms ({s / table['gpu_s']:.0%})" for k, s in table["groups_s"].items()) +
                f"; all FLOPs at the tensor-core kernels' speed: {bound:.0f} TFLOP/s", flush=True)
            for r in table["top"]:
                print(f"    {r['s'] * 1e3:7.2f} ms {r['share']:5.1%} x{r['calls']:<4d} {r['kernel']}", flush=True)
        v = None  # free the graphs and compiled code before the next config
    results["elapsed_s"] = time.perf_counter() - start
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "profile_ncsnpp.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
