"""CUDA graphs for a frozen velocity: replay its forward and its VJP instead of launching every kernel.

FlowGrad calls the same network hundreds of times per edit on tensors of one shape. On a GPU a small
network (the demo flow) or a small batch spends most of each call launching kernels from Python;
:class:`GraphedVelocity` captures one call per input shape in a CUDA graph and replays it, so a
call costs one launch plus two copies.

Two graphs per shape: the forward ``v(y, t)`` (used under ``torch.no_grad``, as :func:`integrate`
calls it) and the vector-Jacobian product ``(∂v/∂y)ᵀ λ`` (used by :func:`backward_sweep` through
:meth:`GraphedVelocity.vjp`). Any other call (gradients enabled, CPU tensors, during another
capture) runs the wrapped velocity eagerly, so the wrapper is always safe to use.

Batch buckets: per-image segmentation makes VJPs over varying subsets of a batch. Each batch size is
rounded up to a power of two (capped at the largest batch seen) and the padding rows are computed
and dropped, so a job needs a handful of graphs instead of one per subset size. This relies on the
velocity treating images independently (true of both bundled model families; pass
``pad_batches=False`` for a velocity that mixes images).

Graphs share one memory pool; a capture costs a few eager calls (warm-up on a side stream, then the
capture). The pool stays allocated between calls (eagerly, a VJP's activations are freed after each
call), so memory left for everything else (the CLIP loss) is smaller by about one VJP's activations.
:meth:`GraphedVelocity.reset` frees it (discovery does so before retrying a batch that ran out of
memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .backprop import jt_product
from .velocity import Velocity

__all__ = ["GraphedVelocity", "graphs_available"]


def graphs_available(device: torch.device | str) -> bool:
    """True when CUDA graphs can run on ``device`` (a CUDA device of a CUDA build)."""
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[Tensor, ...]
    output: Tensor


def _bucket(n: int, cap: int) -> int:
    """Smallest power of two >= n, but at most ``cap`` (never below n)."""
    return max(n, min(1 << (n - 1).bit_length(), cap))


class GraphedVelocity:
    """Wraps a frozen velocity so its forward and VJP replay CUDA graphs.

    Every attribute of the wrapped velocity (``sample_shape``, ``to_image``, ``fingerprint``, ...) is
    reachable through the wrapper. Results equal the eager velocity's up to the nondeterminism of the
    GPU kernels themselves (the same kernels run).

    Args:
        velocity: v(x, t) with frozen weights (no parameter requires grad).
        warmup: eager calls on a side stream before each capture (lets cuDNN/cuBLAS pick algorithms
            and allocate workspaces outside the graph).
        pad_batches: round batch sizes up to powers of two (see the module docstring).
        max_graphs: captures kept at most; further shapes run eagerly.
    """

    def __init__(self, velocity: Velocity, *, warmup: int = 2, pad_batches: bool = True,
                 max_graphs: int = 24) -> None:
        self.velocity = velocity
        self.warmup = int(warmup)
        self.pad_batches = bool(pad_batches)
        self.max_graphs = int(max_graphs)
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None
        self._max_batch = 0
        self.captures = 0
        """Number of graphs captured so far (for tests and benchmarks)."""
        self.replays = 0
        """Number of calls served by a graph."""

    def __getattr__(self, name: str):
        # Only called for attributes the wrapper itself lacks.
        if name == "velocity":  # not yet set (e.g. during unpickling)
            raise AttributeError(name)
        return getattr(self.velocity, name)

    def __repr__(self) -> str:
        return f"GraphedVelocity({self.velocity!r}, graphs={len(self._graphs)})"

    def reset(self) -> None:
        """Drop every captured graph and its memory."""
        self._graphs.clear()
        self._pool = None
        self._max_batch = 0
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ----------------------------------------------------------------------------------------- calls

    def _usable(self, x: Tensor) -> bool:
        return x.is_cuda and not torch.cuda.is_current_stream_capturing()

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        if not self._usable(x) or (torch.is_grad_enabled() and x.requires_grad):
            return self.velocity(x, t)
        with torch.no_grad():
            out = self._replay("forward", (x, t.expand(x.shape[0])))
        return self.velocity(x, t) if out is None else out

    def vjp(self, y: Tensor, t: Tensor, lam: Tensor) -> Tensor:
        """(∂v/∂y)ᵀ λ at ``y`` (B, C, H, W), one graph replay on CUDA; eager autograd otherwise."""
        if self._usable(y):
            out = self._replay("vjp", (y.detach(), t.expand(y.shape[0]), lam.detach()))
            if out is not None:
                return out
        return jt_product(self.velocity, y, t, lam)

    # ------------------------------------------------------------------------------------- capture

    def _replay(self, kind: str, args: tuple[Tensor, ...]) -> Tensor | None:
        n = args[0].shape[0]
        self._max_batch = max(self._max_batch, n)
        rows = _bucket(n, self._max_batch) if self.pad_batches else n
        key = (kind, rows, *((tuple(a.shape[1:]), a.dtype, a.device) for a in args))
        entry = self._graphs.get(key)
        if entry is None:
            if len(self._graphs) >= self.max_graphs:
                return None
            entry = self._capture(kind, args, rows)
            self._graphs[key] = entry
        for static, a in zip(entry.inputs, args):
            static[:n].copy_(a)
        entry.graph.replay()
        self.replays += 1
        return entry.output[:n].clone()

    def _body(self, kind: str, inputs: tuple[Tensor, ...]):
        velocity = self.velocity
        if kind == "forward":
            def run() -> Tensor:
                with torch.no_grad():
                    return velocity(*inputs)
        else:
            y, t, lam = inputs

            def run() -> Tensor:
                return jt_product(velocity, y, t, lam)
        return run

    def _capture(self, kind: str, args: tuple[Tensor, ...], rows: int) -> _Graph:
        # Static inputs hold the first call's values (padding rows repeat its first row: finite data).
        inputs = tuple(torch.cat([a, a[:1].expand(rows - a.shape[0], *a.shape[1:])]) if rows > a.shape[0]
                       else a.clone() for a in args)
        run = self._body(kind, inputs)
        side = torch.cuda.Stream(device=args[0].device)
        side.wait_stream(torch.cuda.current_stream(args[0].device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                run()
        torch.cuda.current_stream(args[0].device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = run()
        self._pool = graph.pool()
        self.captures += 1
        return _Graph(graph=graph, inputs=inputs, output=output)

