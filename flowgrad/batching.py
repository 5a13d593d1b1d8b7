"""Per-image work in batches that fit: halve the batch on out-of-memory and go on.

Applying a direction, sweeping strengths or inverting many images integrates every image at once. When
that does not fit in GPU memory, :func:`map_batches` retries the failed batch in halves (down to one
image) and keeps the smaller size for the rest, so rows already done are kept and nothing is lost.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = ["OutOfMemory", "in_halves", "map_batches", "release_memory"]

log = logging.getLogger(__name__)

T = TypeVar("T")

OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
"""The error torch raises when a device runs out of memory."""


def release_memory(velocity=None) -> None:
    """After an out-of-memory: drop ``velocity``'s captured CUDA graphs (they hold the failed size's memory)
    and return the allocator's cached blocks, so that a smaller batch can fit."""
    from .cuda_graphs import GraphedVelocity

    if isinstance(velocity, GraphedVelocity):
        velocity.reset()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def in_halves(fn: Callable[[list[Any]], T], items: Sequence[Any], join: Callable[[T, T], T], *, velocity=None,
              too_large: Exception | None = None, on_halve: Callable[[int, int], None] | None = None) -> T:
    """``fn(items)``; after an out-of-memory, ``join(fn(first half), fn(second half))``, halving recursively.

    Both halves run at once (a caller that must store the whole batch gets it complete). Between the
    failed attempt and the halves, ``velocity``'s memory is released (:func:`release_memory`) and
    ``on_halve(n, first_half)`` is called (e.g. to log). A single item that does not fit raises
    ``too_large`` (default: the out-of-memory error itself).
    """
    items = list(items)
    try:
        return fn(items)
    except OutOfMemory:
        if len(items) == 1:
            if too_large is None:
                raise
            raise too_large from None
    release_memory(velocity)  # outside the handler, so the failed attempt's tensors are freed first
    h = len(items) // 2
    if on_halve is not None:
        on_halve(len(items), h)
    again = {"velocity": velocity, "too_large": too_large, "on_halve": on_halve}
    return join(in_halves(fn, items[:h], join, **again), in_halves(fn, items[h:], join, **again))


def map_batches(fn: Callable[[Tensor], Tensor], x: Tensor, *, batch_size: int | None = None,
                velocity=None) -> Tensor:
    """``fn`` over the rows of ``x`` (B, ...) in consecutive batches, outputs joined in order along dim 0.

    ``fn`` must treat rows independently (integrating a velocity that treats images independently
    does). The first batch has ``batch_size`` rows (default: all of them). A batch that runs out of
    memory is retried in halves, and the halved size is kept for the remaining rows; finished rows are
    never recomputed. If a single row does not fit, the out-of-memory error is raised.

    Args:
        fn: maps a (b, ...) slice of ``x`` to a (b, ...) tensor.
        x: the rows.
        batch_size: rows per batch to start with (None: all).
        velocity: the velocity ``fn`` integrates; its CUDA graphs are dropped after an out-of-memory
            (see :func:`release_memory`).
    """
    n = x.shape[0]
    size = n if batch_size is None else max(1, min(int(batch_size), n))
    outs: list[Tensor] = []
    i = 0
    while i < n:
        try:
            outs.append(fn(x[i:i + size]))
            i += size
            continue
        except OutOfMemory:
            if size == 1:
                raise
        # outside the handler, so the failed attempt's tensors are freed first
        release_memory(velocity)
        log.warning("out of memory with %d images per batch; continuing with %d", size, size // 2)
        size //= 2
    if not outs:
        return fn(x)
    return outs[0] if len(outs) == 1 else torch.cat(outs)
