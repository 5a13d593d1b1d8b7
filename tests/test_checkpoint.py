"""Resumable discovery jobs: atomic batch files, resume checks, kill -9 safety."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from directions.checkpoint import JobCheckpoint, normalize_records, normalize_settings

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"prompt": "a smiling face", "lr": 0.5, "batch_size": 3,
            "flowgrad": {"alpha": 0.7, "steps": [1, 2]}}
CHILD_TIMEOUT_S = 30.0


def batch_content(index: int, size: int = 3) -> tuple[dict, dict]:
    """Deterministic per-image results of batch ``index`` (what a job would compute)."""
    seeds = np.arange(index * size, (index + 1) * size)
    offsets = np.stack([np.random.default_rng(int(s)).standard_normal((2, 1, 4, 4))
                        for s in seeds]).astype(np.float32)
    losses = offsets.reshape(size, -1).mean(axis=1).astype(np.float64)
    losses[seeds % 4 == 1] = np.nan
    status = ["ok" if s % 4 != 1 else "skipped: NaN" for s in seeds]
    return ({"offsets": offsets},
            {"seed": seeds.astype(np.int64), "loss": losses, "status": status,
             "kept": seeds % 4 != 1, "source": [f"img_{s}_é.png" for s in seeds]})


def test_save_load_round_trip(tmp_path):
    checkpoint = JobCheckpoint.open(tmp_path / "job", SETTINGS, resume=False)
    arrays, records = batch_content(0)
    kept_arrays, kept_records = checkpoint.save_batch(0, arrays, records)
    assert checkpoint.done_batches() == [0]
    back_arrays, back_records = checkpoint.load_batch(0)
    # what save_batch returns is what load_batch reads back: same columns, order, dtypes and values
    for kept, back in ((kept_arrays, back_arrays), (kept_records, back_records)):
        assert list(kept) == list(back)
        for key in back:
            assert kept[key].dtype == back[key].dtype and kept[key].shape == back[key].shape, key
            np.testing.assert_array_equal(kept[key], back[key])
    assert back_arrays["offsets"].dtype == np.float32
    assert back_arrays["offsets"].tobytes() == arrays["offsets"].tobytes()
    assert list(back_records) == ["seed", "loss", "status", "kept", "source"]
    assert back_records["seed"].dtype == np.int64 and back_records["kept"].dtype == np.bool_
    np.testing.assert_array_equal(back_records["loss"], records["loss"])  # NaN-aware
    assert back_records["status"].dtype.kind == "U"
    assert back_records["status"].tolist() == records["status"]
    assert back_records["source"].tolist() == records["source"]
    assert sorted(os.listdir(tmp_path / "job")) == ["batch_000000.npz", "settings.json"]


def test_load_all_concatenates_in_batch_order(tmp_path):
    checkpoint = JobCheckpoint.open(tmp_path / "job", SETTINGS, resume=False)
    for index in (2, 0, 1):
        checkpoint.save_batch(index, *batch_content(index))
    arrays, records = checkpoint.load_all()
    assert checkpoint.done_batches() == [0, 1, 2]
    assert records["seed"].tolist() == list(range(9))
    expected = np.concatenate([batch_content(i)[0]["offsets"] for i in range(3)])
    assert arrays["offsets"].tobytes() == expected.tobytes()
    assert records["source"].tolist() == [f"img_{s}_é.png" for s in range(9)]
    assert JobCheckpoint.open(tmp_path / "empty", SETTINGS, resume=True).load_all() == ({}, {})


class Interrupted(Exception):
    pass


def run_job(directory: Path, n_batches: int, *, resume: bool, stop_after: int | None = None):
    """The discovery loop's checkpoint pattern: skip finished batches, save each new one."""
    checkpoint = JobCheckpoint.open(directory, SETTINGS, resume=resume)
    computed = []
    for index in range(n_batches):
        if index in checkpoint.done_batches():
            continue
        checkpoint.save_batch(index, *batch_content(index))
        computed.append(index)
        if stop_after is not None and len(computed) == stop_after:
            raise Interrupted
    return checkpoint.load_all(), computed


def test_resumed_job_equals_uninterrupted(tmp_path):
    (full_arrays, full_records), _ = run_job(tmp_path / "a", 5, resume=False)
    with pytest.raises(Interrupted):
        run_job(tmp_path / "b", 5, resume=False, stop_after=2)
    (arrays, records), computed = run_job(tmp_path / "b", 5, resume=True)
    assert computed == [2, 3, 4]  # finished batches are not recomputed
    assert arrays["offsets"].tobytes() == full_arrays["offsets"].tobytes()
    assert list(records) == list(full_records)
    for column in records:
        assert records[column].dtype == full_records[column].dtype
        np.testing.assert_array_equal(records[column], full_records[column])


def test_ranks_share_one_checkpoint_concurrently(tmp_path):
    directory = tmp_path / "job"
    errors: list[BaseException] = []

    def rank(r: int, world: int = 3) -> None:
        try:
            checkpoint = JobCheckpoint.open(directory, SETTINGS, resume=True)
            for index in range(r, 12, world):
                checkpoint.save_batch(index, *batch_content(index))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    arrays, records = JobCheckpoint.open(directory, SETTINGS, resume=True).load_all()
    assert records["seed"].tolist() == list(range(36))
    expected = np.concatenate([batch_content(i)[0]["offsets"] for i in range(12)])
    assert arrays["offsets"].tobytes() == expected.tobytes()


def test_unfinished_job_refused_without_resume(tmp_path):
    directory = tmp_path / "dirs.h5.partial-smile"
    JobCheckpoint.open(directory, SETTINGS, resume=False).save_batch(0, *batch_content(0))
    with pytest.raises(ValueError) as exc:
        JobCheckpoint.open(directory, SETTINGS, resume=False)
    assert str(exc.value) == (f"an unfinished job exists at {directory}; pass --resume to "
                              f"continue it or delete {directory}")
    assert JobCheckpoint.open(directory, SETTINGS, resume=True).done_batches() == [0]


def test_settings_mismatch_names_differing_keys(tmp_path):
    directory = tmp_path / "job"
    JobCheckpoint.open(directory, SETTINGS, resume=False).save_batch(0, *batch_content(0))
    changed = SETTINGS | {"lr": 0.25, "seed": 3, "flowgrad": {"alpha": 0.9, "steps": [1, 2]}}
    with pytest.raises(ValueError) as exc:
        JobCheckpoint.open(directory, changed, resume=True)
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"settings differ from the unfinished job at {directory} in: ")
    assert "flowgrad.alpha (stored 0.7, now 0.9)" in message
    assert "lr (stored 0.5, now 0.25)" in message and "seed (stored <absent>, now 3)" in message
    assert "prompt" not in message and "steps" not in message and "batch_size" not in message
    # JSON-normalized comparison: a tuple equals the stored list, key order is irrelevant
    same = {"flowgrad": {"steps": (1, 2), "alpha": 0.7}, "batch_size": np.int64(3),
            "lr": 0.5, "prompt": "a smiling face"}
    assert JobCheckpoint.open(directory, same, resume=True).done_batches() == [0]


def test_resume_without_checkpoint_starts_fresh(tmp_path):
    checkpoint = JobCheckpoint.open(tmp_path / "new", SETTINGS, resume=True)
    assert checkpoint.done_batches() == []
    assert (tmp_path / "new" / "settings.json").is_file()


def test_stray_temp_files_ignored_and_removed_at_the_end(tmp_path):
    directory = tmp_path / "job"
    checkpoint = JobCheckpoint.open(directory, SETTINGS, resume=False)
    checkpoint.save_batch(0, *batch_content(0))
    full = (directory / "batch_000000.npz").read_bytes()
    half = directory / ".batch_000001.npz.0123abcd.tmp"  # a killed writer's half-written batch
    half.write_bytes(full[: len(full) // 2])
    assert checkpoint.done_batches() == [0]
    with pytest.raises(ValueError, match="batch 1 is not in checkpoint"):
        checkpoint.load_batch(1)
    assert checkpoint.load_all()[1]["seed"].tolist() == [0, 1, 2]
    resumed = JobCheckpoint.open(directory, SETTINGS, resume=True)
    assert half.exists()  # open() never deletes temps: another rank may be writing one
    assert resumed.done_batches() == [0]
    resumed.remove()
    assert not directory.exists()


def test_corrupt_batch_file_reports_how_to_fix(tmp_path):
    checkpoint = JobCheckpoint.open(tmp_path / "job", SETTINGS, resume=False)
    checkpoint.save_batch(0, *batch_content(0))
    path = tmp_path / "job" / "batch_000000.npz"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="batch_000000.npz is unreadable .*delete it to recompute"):
        checkpoint.load_batch(0)


def test_remove_deletes_only_own_files(tmp_path):
    directory = tmp_path / "job"
    checkpoint = JobCheckpoint.open(directory, SETTINGS, resume=False)
    checkpoint.save_batch(0, *batch_content(0))
    checkpoint.remove()
    assert not directory.exists()
    checkpoint = JobCheckpoint.open(directory, SETTINGS, resume=False)
    checkpoint.save_batch(0, *batch_content(0))
    (directory / "notes.txt").write_text("mine")
    checkpoint.remove()
    assert os.listdir(directory) == ["notes.txt"]


@pytest.mark.parametrize("call, error, words", [
    (lambda c: c.save_batch(-1, {}, {}), ValueError, "index must be an int >= 0"),
    (lambda c: c.save_batch(0, {"x": np.array([object()])}, {}), ValueError, "non-object dtype"),
    (lambda c: c.save_batch(0, {"x": np.float32(1)}, {}), ValueError, "leading per-image axis"),
    (lambda c: c.save_batch(0, {}, {"a": [1, 2], "b": [1]}), ValueError, "equal length"),
    (lambda c: c.save_batch(0, {}, {"a": ["x", 2]}), TypeError, "mixes str and non-str"),
    (lambda c: c.save_batch(0, {}, {"a": [b"x"]}), TypeError, "decode bytes to str"),
])
def test_invalid_batch_refused(tmp_path, call, error, words):
    checkpoint = JobCheckpoint.open(tmp_path / "job", SETTINGS, resume=False)
    with pytest.raises(error, match=words):
        call(checkpoint)
    assert checkpoint.done_batches() == []


def test_normalize_helpers():
    assert normalize_settings({"a": (1, 2), "b": np.float32(0.5), "c": np.arange(2), 3: "x"}) \
        == {"a": [1, 2], "b": 0.5, "c": [0, 1], "3": "x"}
    assert normalize_settings({"a": float("inf"), "b": {"c": [np.float64("nan"), 1.0]},
                               "d": np.array([np.nan])}) == {"a": None, "b": {"c": [None, 1.0]},
                                                             "d": [None]}
    with pytest.raises(TypeError, match="settings must be JSON-serializable"):
        normalize_settings({"a": {1, 2}})
    columns = normalize_records({"s": np.array(["a", "b"], dtype=object), "n": [1.5, 2.0]})
    assert columns["s"].dtype.kind == "U" and columns["n"].dtype == np.float64


SAVE_LOOP = """
import sys
import numpy as np
from directions.checkpoint import JobCheckpoint
checkpoint = JobCheckpoint.open(sys.argv[1], {"job": 1}, resume=True)
for index in range(100_000):
    rng = np.random.default_rng(index)
    checkpoint.save_batch(index, {"x": rng.standard_normal((4, 64, 64)).astype(np.float32)},
                          {"index": [index] * 4, "status": ["ok " * index] * 4})
    print(index, flush=True)
"""


def read_line(proc: subprocess.Popen) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], CHILD_TIMEOUT_S)
    if not ready:
        proc.kill()
        pytest.fail("child printed nothing in time")
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        pytest.fail(f"child exited ({proc.returncode}) early: {proc.stderr.read()}")
    return line.strip()


@pytest.mark.parametrize("seed", [0, 1])
def test_kill9_mid_save_loop_leaves_only_complete_batches(tmp_path, seed):
    directory = tmp_path / "job"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, "-c", SAVE_LOOP, str(directory)], cwd=ROOT, env=env,
                             text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert read_line(child) == "0"
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=CHILD_TIMEOUT_S)
    assert child.returncode == -signal.SIGKILL
    checkpoint = JobCheckpoint.open(directory, {"job": 1}, resume=True)
    done = checkpoint.done_batches()
    assert done == list(range(len(done))) and len(done) >= 1
    for index in done:
        arrays, records = checkpoint.load_batch(index)
        expected = np.random.default_rng(index).standard_normal((4, 64, 64)).astype(np.float32)
        assert arrays["x"].tobytes() == expected.tobytes()
        assert records["index"].tolist() == [index] * 4
        assert records["status"].tolist() == ["ok " * index] * 4
    checkpoint.remove()
    assert not directory.exists()  # temps of the killed writer are removed with the rest
