"""Demo flow training: reproducible in one process, data-parallel under torchrun (gloo, CPU processes)."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as tdist

from cli_helpers import ROOT, assert_cli_error, digest, invoke, subprocess_env
from flowgrad.demo.nets import DemoUNet, UNetConfig
from flowgrad.demo.train import CALIBRATION, TrainConfig, sample_t, train_flow

TINY = UNetConfig(channels=(8, 8), time_dim=16, attention_heads=2, groups=4)
"""About 20k parameters: a training step takes milliseconds on one CPU thread."""

TORCHRUN_TIMEOUT_S = 120.0

WORKER = '''
import json, sys, types

import torch
import torch.distributed as tdist

from flowgrad.demo import train as tr
from flowgrad.demo.nets import UNetConfig

torch.set_num_threads(1)
out, settings = sys.argv[1], json.loads(sys.argv[2])
tdist.init_process_group("gloo")
rank = tdist.get_rank()
if settings["clock"]:  # a fake clock: the n-th reading is n * (rank + 1) seconds
    readings = iter(range(1, 1_000))
    tr.time = types.SimpleNamespace(perf_counter=lambda: (rank + 1) * float(next(readings)))
res = tr.train_flow(tr.TrainConfig(**settings["cfg"]), UNetConfig.from_dict(settings["arch"]), pool=settings["pool"])
torch.save({"state_dict": res.model.state_dict(), "steps": res.steps, "seconds": res.seconds}, f"{out}/rank{rank}.pt")
tdist.destroy_process_group()
'''
"""Runs train_flow under an already-launched torchrun process; each rank saves what it returned."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str]) -> str:
    """Run torchrun with ``nproc`` CPU processes and return its stdout; a hang kills every worker."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                             "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *args],
                            cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=TORCHRUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.terminate()  # torchrun stops its workers (they run in sessions of their own)
        proc.communicate(timeout=60)
        raise AssertionError(f"torchrun did not finish in {TORCHRUN_TIMEOUT_S:.0f} s (ranks out of step?)") from None
    assert proc.returncode == 0, stderr[-3000:]
    return stdout


def _train_under_torchrun(tmp_path: Path, nproc: int, cfg: TrainConfig, pool: int,
                          clock: bool = False) -> list[dict]:
    """What every rank's train_flow returned (state dict, steps, seconds), in rank order."""
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    settings = {"cfg": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "arch": TINY.to_dict(),
                "pool": pool, "clock": clock}
    _torchrun(nproc, [str(worker), str(tmp_path), json.dumps(settings)])
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(nproc)]


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_flow_tiny_learns_and_is_reproducible():
    cfg = TrainConfig(steps=5, batch_size=4, warmup=2, seed=3)
    losses: list[float] = []
    first = train_flow(cfg, TINY, callback=lambda step, m: losses.extend([m["loss"]] if "loss" in m else []))
    second = train_flow(cfg, TINY)
    torch.manual_seed(cfg.seed)
    init = DemoUNet(TINY).state_dict()
    assert first.steps == second.steps == 5
    assert losses and all(math.isfinite(x) for x in losses)
    assert _equal(first.model.state_dict(), second.model.state_dict())
    assert not _equal(first.model.state_dict(), init)


def test_t_sampling_late_weights_later_times():
    gen = torch.Generator().manual_seed(0)
    uniform = sample_t(200_000, "uniform", gen)
    late = sample_t(200_000, "late", gen)
    assert abs(float(uniform.mean()) - 0.5) < 0.005
    assert abs(float(late[0::2].mean()) - 0.5) < 0.005        # even rows: U(0, 1)
    assert abs(float(late[1::2].mean()) - 2 / 3) < 0.005      # odd rows: density 2t, mean 2/3
    assert abs(float((late[1::2] < 0.5).float().mean()) - 0.25) < 0.005
    with pytest.raises(ValueError, match="t_sampling"):
        TrainConfig(t_sampling="early")
    cfg = TrainConfig(steps=3, batch_size=4, warmup=1, seed=3)
    plain = train_flow(cfg, TINY).model.state_dict()
    later = train_flow(replace(cfg, t_sampling="late"), TINY).model.state_dict()
    assert not _equal(plain, later)


def test_train_flow_with_pool_is_reproducible():
    cfg = TrainConfig(steps=5, batch_size=4, warmup=2, seed=3)
    first, second = train_flow(cfg, TINY, pool=16), train_flow(cfg, TINY, pool=16)
    assert _equal(first.model.state_dict(), second.model.state_dict())


def test_process_group_of_one_equals_plain_call():
    """Rank 0 of a process group draws exactly what a single process draws; DDP over one rank changes nothing."""
    cfg = TrainConfig(steps=4, batch_size=2, warmup=2, seed=5)
    plain = train_flow(cfg, TINY, pool=16).model.state_dict()
    tdist.init_process_group("gloo", store=tdist.HashStore(), rank=0, world_size=1)
    try:
        grouped = train_flow(cfg, TINY, pool=16).model.state_dict()
    finally:
        tdist.destroy_process_group()
    assert _equal(grouped, plain)


def test_torchrun_two_processes_agree_on_steps_and_weights(tmp_path):
    """Each rank's fake clock gives it another step count; all must take rank 0's (or DDP would hang).

    Rank 0 reads 1, 2, 3 s at the start, step 20 and step 70: 1/50 s per step and 0.5 s left, so 25 more
    steps; rank 1 reads 2, 4, 6 s: no time left, so alone it would stop at step 70.
    """
    cfg = TrainConfig(steps=1_000, batch_size=2, warmup=10, seed=1, max_seconds=2.5)
    expected = CALIBRATION[1] + 25
    rank0, rank1 = _train_under_torchrun(tmp_path, 2, cfg, pool=8, clock=True)
    assert rank0["steps"] == rank1["steps"] == expected
    assert rank0["seconds"] == rank1["seconds"] == 3.0  # rank 0's four readings span 1 .. 4 s
    assert _equal(rank0["state_dict"], rank1["state_dict"])
    alone = train_flow(replace(cfg, steps=expected, max_seconds=None), TINY, pool=8).model.state_dict()
    assert not _equal(rank0["state_dict"], alone)  # rank 1 drew other data


def test_cli_torchrun_flow_rank_zero_writes_a_reproducible_record(tmp_path):
    out = tmp_path / "w"
    stdout = _torchrun(2, ["-m", "cli.main", "demo", "train", "--part", "flow", "--steps", "2", "--batch-size", "2",
                        "--pool", "8", "--device", "cpu", "--out", str(out)])
    assert stdout.count("flow: 2 steps") == 1  # rank 0 alone talks
    record = json.loads((out / "train_flow.json").read_text())
    assert record["world_size"] == 2 and record["global_batch_size"] == 4 and record["batch_size"] == 2
    assert record["card"].startswith("2x ")
    assert record["command"] == ("torchrun --nproc-per-node 2 --no-python flowgrad demo train --part flow "
                                 "--steps 2 --batch-size 2 --lr 0.0003 --seed 0 --pool 8")
    assert record["sha256"] == digest(out / "flow.pt")
    assert sorted(p.name for p in out.iterdir()) == ["flow.pt", "train_flow.json"]


def test_cli_refuses_other_parts_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    result = invoke("flowgrad", "demo", "train", "--part", "clip", "--device", "cpu", "--out", tmp_path / "w")
    assert_cli_error(result, "only --part flow trains data-parallel")


@pytest.mark.parametrize("part, expected", [
    ("flow", "flowgrad demo train --part flow --steps 2 --batch-size 2 --lr 0.0003 --seed 0"),
    ("judge", "flowgrad demo train --part judge --steps 2 --batch-size 2 --lr 0.001 --seed 0 --blur 0.8"),
])
def test_cli_single_process_record_is_unchanged(tmp_path, part, expected):
    """The record's command reproduces the part (the judge's includes its --blur)."""
    out = tmp_path / "w"
    result = invoke("flowgrad", "demo", "train", "--part", part, "--steps", "2", "--batch-size", "2",
                    "--device", "cpu", "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    record = json.loads((out / f"train_{part}.json").read_text())
    assert record["command"] == expected
    assert record["world_size"] == 1 and record["global_batch_size"] == 2 and "x " not in record["card"][:4]


def test_cli_clip_continues_from_init_with_its_provenance(tmp_path):
    """--init for the CLIP: training starts from the given weights, and the record names them."""
    init = ROOT / "data" / "demo" / "tiny_clip.pt"
    common = ["--part", "clip", "--steps", "1", "--batch-size", "2", "--lr", "1e-9", "--device", "cpu"]
    result = invoke("flowgrad", "demo", "train", *common, "--init", init, "--out", tmp_path / "a")
    assert result.exit_code == 0, (result.stderr, result.exception)
    fresh = invoke("flowgrad", "demo", "train", *common, "--out", tmp_path / "b")
    assert fresh.exit_code == 0, (fresh.stderr, fresh.exception)
    start, cont, scratch = (torch.load(f, weights_only=True)
                            for f in (init, tmp_path / "a" / "tiny_clip.pt", tmp_path / "b" / "tiny_clip.pt"))
    key = "visual.conv1.weight"
    assert torch.allclose(cont[key].float(), start[key].float(), atol=1e-3)  # one step at lr 1e-9: unchanged
    assert not torch.allclose(scratch[key].float(), start[key].float(), atol=1e-3)
    record = json.loads((tmp_path / "a" / "train_clip.json").read_text())
    assert record["command"].endswith(f"--init '<tiny_clip.pt sha256 {digest(init)}>'")
    config = ROOT / "data" / "demo" / "flowgrad-tiny-clip.json"  # the folder loads as a data folder's demo/
    assert (tmp_path / "b" / config.name).read_bytes() == config.read_bytes()
    assert record["previous_stage"]["sha256"] == digest(init)


@pytest.mark.parametrize("part, init, message", [
    ("judge", "tiny_clip.pt", "--init continues one part: use it with --part flow or --part clip"),
    ("clip", "flow.pt", "is not a tiny CLIP state dict"),
    ("flow", "tiny_clip.pt", "is not a demo flow payload"),
])
def test_cli_init_of_the_wrong_kind_is_refused(tmp_path, part, init, message):
    result = invoke("flowgrad", "demo", "train", "--part", part, "--steps", "1", "--batch-size", "2", "--device", "cpu",
                    "--init", ROOT / "data" / "demo" / init, "--out", tmp_path / "w")
    assert_cli_error(result, message)
    assert not (tmp_path / "w" / f"train_{part}.json").exists()


def test_train_clip_and_judge_take_real_steps():
    """The other two trainers run end to end for a few steps (finite loss, weights move, reproducible)."""
    from flowgrad.demo.train import train_clip, train_judge
    from flowgrad.demo.world import CLIP_CONFIG

    config = str(ROOT / "data" / "demo" / CLIP_CONFIG)
    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, seed=2)
    losses: list[float] = []
    clip = train_clip(cfg, config, callback=lambda step, m: losses.extend([m["loss"]] if "loss" in m else []))
    again = train_clip(cfg, config)
    assert clip.steps == 2 and losses and all(math.isfinite(x) for x in losses)
    assert _equal(clip.model.state_dict(), again.model.state_dict())
    judge = train_judge(cfg)
    assert judge.steps == 2
    assert all(torch.isfinite(p).all() for p in judge.model.parameters())


def test_judge_blur_augmentation_is_reproducible():
    """--blur changes what the judge trains on (so its weights), reproducibly."""
    from flowgrad.demo.train import train_judge

    cfg = TrainConfig(steps=2, batch_size=4, warmup=1, seed=3)
    plain, blurred, again = train_judge(cfg), train_judge(cfg, blur=0.8), train_judge(cfg, blur=0.8)
    assert _equal(blurred.model.state_dict(), again.model.state_dict())
    assert not _equal(plain.model.state_dict(), blurred.model.state_dict())
