"""The renderer as an oracle editor: what a perfect age edit reads as through the factor judge.

Re-renders held-out images with only ``age`` raised (clamped at 1) and reports the judged age gain next to
the true mean change, and the largest judged change of every other factor (continuous factors as predicted,
binary ones thresholded like eval_directions.py).

    python tests/benchmarks/oracle_age.py [--n 512] [--deltas 0.2 0.3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

from flowgrad.demo import judge, render_factors, sample_factors  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--seed", type=int, default=4242 + 10**9, help="held-out seed (training uses < 1e9)")
    p.add_argument("--deltas", type=float, nargs="+", default=[0.2, 0.3])
    args = p.parse_args()
    torch.set_num_threads(2)
    factors = sample_factors(args.n, args.seed)
    before = judge(render_factors(factors, args.seed))
    for d in args.deltas:
        edited = dict(factors)
        edited["age"] = (factors["age"] + d).clamp(max=1.0)
        after = judge(render_factors(edited, args.seed))
        true = float((edited["age"] - factors["age"]).mean())
        others = {k: float((after[k] - before[k]).abs().mean()) for k in before if k != "age"}
        worst = max(others, key=others.get)
        print(f"age +{d}: true mean change {true:+.3f}, judged gain {float((after['age'] - before['age']).mean()):+.3f}, "
              f"max other change {others[worst]:.3f} ({worst})")


if __name__ == "__main__":
    main()
