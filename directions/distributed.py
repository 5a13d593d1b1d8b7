"""Spreading discovery over processes started by ``torchrun`` (no home-made launcher).

``torchrun --nproc-per-node K discover-directions ...`` sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous variables; :func:`init_from_env` joins the process group (NCCL on GPUs, gloo on CPU).
Batches go to ranks round-robin; the mean aggregator meets through an all-reduce of partial sums,
other aggregators gather the per-image controls. Without torchrun everything here is a no-op.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as tdist

__all__ = ["init_from_env", "rank_and_world", "barrier", "all_reduce_sum", "all_gather", "nullcontext",
           "local_device", "shutdown"]

nullcontext = contextlib.nullcontext


def _active() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def init_from_env(device: str | torch.device = "auto") -> torch.device:
    """Join torchrun's process group if its environment is present; returns this rank's device.

    ``device``: "auto", "cpu", "cuda" or "cuda:N" (a torch.device too). Under torchrun each rank takes
    the GPU of its local rank; in one process "cuda:N" is that GPU (made the current one).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    requested = None if str(device) == "auto" else torch.device(device)
    use_cuda = torch.cuda.is_available() and (requested is None or requested.type == "cuda")
    if use_cuda and world == 1 and requested is not None and requested.index is not None:
        torch.cuda.set_device(requested)
    if world > 1 and not _active():
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")  # never NVLink multicast on shared hosts
        if use_cuda:
            torch.cuda.set_device(local)
        tdist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        return torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    return torch.device("cpu")


def local_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def rank_and_world() -> tuple[int, int]:
    if _active():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def barrier() -> None:
    if _active():
        tdist.barrier()


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Element-wise sum of a float64 array over all ranks (identity in one process)."""
    if not _active():
        return array
    backend = tdist.get_backend()
    t = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float64))
    if backend == "nccl":
        t = t.to(local_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.cpu().numpy()


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in one process)."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto") -> Iterator[torch.device]:
    """Join torchrun's group for the duration of a command and leave it cleanly."""
    dev = init_from_env(device)
    try:
        yield dev
    except BaseException:
        shutdown()  # no barrier: the other ranks may never reach it
        raise
    # Leave together: a rank that tears down gloo while rank 0 is still writing its files can abort in gloo's
    # teardown ("terminate called without an active exception", seen once in CI under load).
    barrier()
    shutdown()


def shutdown() -> None:
    if _active():
        tdist.destroy_process_group()
