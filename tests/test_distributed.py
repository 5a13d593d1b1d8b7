"""discover-directions under torchrun (gloo, 2 CPU processes) equals a one-process run."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from directions.store import DirectionStore

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--n-images", "4", "--batch-size", "1", "--steps", "4", "--iterations", "3", "--lr", "4",
        "--replicas", "1", "--device", "cpu"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", NCCL_NVLS_ENABLE="0")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


@pytest.mark.parametrize("aggregator", ["mean", "pc1", "joint"])
def test_torchrun_two_processes_equals_one_process(tmp_path, aggregator):
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    args = ["--attr", "smiling", "--aggregator", aggregator, "--t-window", "0.3", "1", *TINY]  # 2 of the 4 steps
    subprocess.run([sys.executable, "-m", "cli.discover", *args, "--out", str(one)], cwd=ROOT, env=_env(),
                   check=True, capture_output=True, timeout=300)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
                          "-m", "cli.discover", *args, "--out", str(two)],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = DirectionStore(one).read("smiling"), DirectionStore(two).read("smiling")
    rel = np.linalg.norm(a.vector.astype(np.float64) - b.vector) / np.linalg.norm(a.vector.astype(np.float64))
    assert rel <= 1e-5
    assert np.allclose(a.split_half_cosine, b.split_half_cosine, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert a.n_images == b.n_images >= 2
    for col in ("loss_before", "loss_after", "cosine_to_direction"):
        assert np.allclose(a.records[col], b.records[col], rtol=1e-5, atol=1e-7, equal_nan=True), col
    assert list(a.records["status"]) == list(b.records["status"])
    assert list(a.records["source"]) == list(b.records["source"])
    assert not Path(f"{two}.partial-smiling").exists()  # rank 0 cleaned up the checkpoint


def test_one_process_uses_the_requested_gpu(monkeypatch):
    """`--device cuda:N` in one process runs on GPU N (it ran on the current GPU, 0, before); CUDA is faked."""
    import torch

    from directions import distributed as dist

    current = {"index": 0}
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: current.update(index=torch.device(d).index))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current["index"])
    assert dist.init_from_env(torch.device("cuda", 1)) == torch.device("cuda", 1) and current["index"] == 1
    assert dist.init_from_env("cuda") == torch.device("cuda", 1)  # no index: the current GPU
    assert dist.init_from_env("cpu") == torch.device("cpu")


def test_process_group_leaves_together_and_skips_the_barrier_on_errors(monkeypatch):
    """After a successful command every rank meets at a barrier before the group is torn down (a rank that tore
    gloo down while rank 0 was still writing could abort); after an error, no barrier: the others may never come."""
    from directions import distributed as dist

    calls: list[str] = []
    monkeypatch.setattr(dist, "init_from_env", lambda device: calls.append("init") or "cpu")
    monkeypatch.setattr(dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(dist, "shutdown", lambda: calls.append("shutdown"))
    with dist.process_group("cpu"):
        calls.append("work")
    assert calls == ["init", "work", "barrier", "shutdown"]
    calls.clear()
    with pytest.raises(RuntimeError, match="rank failed"):
        with dist.process_group("cpu"):
            raise RuntimeError("rank failed")
    assert calls == ["init", "shutdown"]
