"""Where the fixed cost of one `discover-directions` command goes (imports, loading, first CUDA calls).

    python tests/benchmarks/startup_discovery.py [--device cuda] [--no-graphs]

Prints seconds for: importing torch, the CLI's modules, loading the demo flow and the tiny CLIP, a first
(cold) default job and a second (warm) one, so the command's wall time can be split into fixed cost and work.
"""

from __future__ import annotations

import time

T0 = time.perf_counter()
import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

T_TORCH = time.perf_counter()
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from directions.discover import DiscoveryConfig, discover  # noqa: E402
from flowgrad.demo.registry import load_registry  # noqa: E402
from flowgrad.cuda_graphs import GraphedVelocity  # noqa: E402
from flowgrad.models import load_guidance_clip, load_model  # noqa: E402

T_IMPORTS = time.perf_counter()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-graphs", action="store_true", help="Plain velocity (discover-directions wraps it in "
                   "CUDA graphs on a GPU unless --no-cuda-graphs).")
    args = p.parse_args()
    dev = torch.device(args.device)
    marks = {"import torch": T_TORCH - T0, "import flowgrad/directions": T_IMPORTS - T_TORCH}

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    t = time.perf_counter()
    if dev.type == "cuda":
        torch.zeros(1, device=dev)
        sync()
    marks["CUDA context"] = time.perf_counter() - t
    t = time.perf_counter()
    velocity = load_model("demo", device=dev)
    if dev.type == "cuda" and not args.no_graphs:
        velocity = GraphedVelocity(velocity)
    sync()
    marks["load demo flow"] = time.perf_counter() - t
    t = time.perf_counter()
    clip = load_guidance_clip("demo", device=dev)
    sync()
    marks["load tiny CLIP (imports open_clip)"] = time.perf_counter() - t
    attr = load_registry()["old"]
    with tempfile.TemporaryDirectory() as tmp:
        for tag in ("first job (cold)", "second job (warm)"):
            cfg = DiscoveryConfig(name=f"old{len(marks)}", prompt=attr.prompt, negative_prompt=attr.negative_prompt)
            t = time.perf_counter()
            discover(cfg, velocity, clip, Path(tmp) / "d.h5", device=dev)
            sync()
            marks[tag] = time.perf_counter() - t
    card = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"{card}, torch {torch.__version__}, {'eager' if args.no_graphs else 'CUDA graphs'}")
    for k, v in marks.items():
        print(f"{k:40s} {v:6.2f} s")


if __name__ == "__main__":
    main()
