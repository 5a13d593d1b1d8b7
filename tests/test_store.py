"""The HDF5 direction store: file contract, round trips, corruption, locking, kill -9 atomicity."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import select
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import h5py
import numpy as np
import pytest

from directions.store import (FORMAT, FORMAT_VERSION, Direction, DirectionStore, StoreError,
                              StoreLockedError)

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (3, 2, 4, 4)  # (n_steps, C, H, W)
CHILD_TIMEOUT_S = 30.0


def make_direction(name: str = "smile", seed: int = 0, *, offsets: bool = False,
                   **fields) -> Direction:
    rng = np.random.default_rng(seed)
    vector = rng.standard_normal(SHAPE).astype(np.float32)
    defaults = dict(prompt=f"a photo of {name}", flowgrad_version="test",
                    created_at="2024-01-02T03:04:05+00:00")
    if offsets:
        defaults["offsets"] = rng.standard_normal((3, *SHAPE)).astype(np.float32)
    return Direction.from_vector(name=name, vector=vector, **(defaults | fields))


def full_direction() -> Direction:
    rng = np.random.default_rng(7)
    return make_direction(
        "smile", 7, offsets=True,
        negative_prompt="a neutral face", method="pca", n_images=3,
        model_fingerprint=hashlib.sha256(b"weights").hexdigest(), model="rf-celeba-hq:256",
        clip="ViT-B-32/openai", time_window=(0.25, 0.75), eps=1e-2,
        settings={"lr": 0.5, "steps": (1, 2), "flowgrad": {"alpha": 0.7, "segments": "auto"},
                  "explained_variance": float("nan")},
        split_half_cosine=0.73,
        records={
            "seed": np.array([1, 2, 3], dtype=np.int64),
            "source": ["img_ä.png", "", "日本.jpg"],
            "loss_before": np.array([1.5, np.nan, 0.25]),
            "control_norm": rng.standard_normal(3).astype(np.float32),
            "kept": np.array([True, False, True]),
            "status": ["ok", "skipped: NaN", "failed: CLIP\u00a0error"],
        },
    )


def file_bytes(path: Path) -> bytes:
    return path.read_bytes()


def spawn(code: str, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-c", code, *args], cwd=ROOT, env=env, text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_line(proc: subprocess.Popen, timeout: float = CHILD_TIMEOUT_S) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        pytest.fail(f"child printed nothing within {timeout}s; stderr: {proc.stderr.read()}")
    line = proc.stdout.readline()
    if not line:
        proc.wait()
        pytest.fail(f"child exited ({proc.returncode}) early; stderr: {proc.stderr.read()}")
    return line.strip()


def kill9(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=CHILD_TIMEOUT_S)
    assert proc.returncode == -signal.SIGKILL


def assert_same(a: Direction, b: Direction) -> None:
    assert a.vector.dtype == b.vector.dtype == np.float32
    assert a.vector.tobytes() == b.vector.tobytes()
    for key in ("name", "scale", "prompt", "negative_prompt", "method", "n_images",
                "model_fingerprint", "model", "clip", "time_window", "eps", "settings",
                "created_at", "flowgrad_version"):
        assert getattr(a, key) == getattr(b, key), key
    assert (math.isnan(a.split_half_cosine) and math.isnan(b.split_half_cosine)) or \
        a.split_half_cosine == b.split_half_cosine
    assert list(a.records) == list(b.records)
    for column in a.records:
        assert a.records[column].dtype == b.records[column].dtype, column
        np.testing.assert_array_equal(a.records[column], b.records[column])


# --- round trips ---------------------------------------------------------------------------------

def test_round_trip_every_field(tmp_path):
    original = full_direction()
    store = DirectionStore(tmp_path / "dirs.h5")
    store.write(original)
    back = store.read("smile", offsets=True)
    assert_same(original, back)
    assert back.offsets.tobytes() == original.offsets.tobytes()
    assert back.records["source"].tolist() == ["img_ä.png", "", "日本.jpg"]
    assert back.records["status"].dtype.kind == "U"
    assert np.isnan(back.records["loss_before"][1])
    assert back.records["control_norm"].dtype == np.float32
    assert back.records["kept"].dtype == np.bool_
    assert back.time_window == (0.25, 0.75) and back.settings["flowgrad"]["alpha"] == 0.7
    assert back.settings["steps"] == [1, 2] and back.settings["explained_variance"] is None
    assert back.n_steps == 3 and back.image_shape == (2, 4, 4)
    assert store.read("smile").offsets is None  # offsets only on request
    assert math.isclose(float(np.linalg.norm(back.unit)), 1.0, rel_tol=1e-5)


def test_defaults_filled_on_write_and_nan_cosine(tmp_path):
    import flowgrad

    direction = make_direction(created_at="", flowgrad_version="")
    store = DirectionStore(tmp_path / "d.h5")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    store.write(direction)
    back = store.read("smile")
    created = datetime.fromisoformat(back.created_at)
    assert created.utcoffset() == timedelta(0)
    assert before <= created <= datetime.now(timezone.utc) + timedelta(seconds=1)
    assert back.flowgrad_version == flowgrad.__version__
    assert math.isnan(back.split_half_cosine)
    assert back.records == {} and back.negative_prompt == ""


def test_contract_readable_with_h5py_alone(tmp_path):
    path = tmp_path / "dirs.h5"
    original = full_direction()
    DirectionStore(path).write(original)
    with h5py.File(path, "r") as f:
        assert f.attrs["format"] == "flowgrad-directions" == FORMAT
        assert f.attrs["format_version"] == 1 == FORMAT_VERSION
        assert isinstance(f.attrs["format_version"], np.integer)
        group = f["/directions/smile"]
        vector = f["/directions/smile/vector"]
        assert vector.dtype == np.float32 and vector.shape == SHAPE
        assert vector[()].tobytes() == original.vector.tobytes()
        attrs = group.attrs
        assert attrs["prompt"] == "a photo of smile"
        assert attrs["negative_prompt"] == "a neutral face"
        assert attrs["method"] == "pca" and attrs["model"] == "rf-celeba-hq:256"
        assert attrs["clip"] == "ViT-B-32/openai"
        assert h5py.check_string_dtype(attrs.get_id("prompt").dtype).encoding == "utf-8"
        assert isinstance(attrs["n_images"], np.integer) and attrs["n_images"] == 3
        assert isinstance(attrs["n_steps"], np.integer) and attrs["n_steps"] == SHAPE[0]
        assert isinstance(attrs["scale"], np.floating)
        assert math.isclose(attrs["scale"], float(np.linalg.norm(original.vector)), rel_tol=1e-6)
        assert attrs["model_fingerprint"] == hashlib.sha256(b"weights").hexdigest()
        assert attrs["created_at"] == "2024-01-02T03:04:05+00:00"
        assert attrs["flowgrad_version"] == "test"
        assert json.loads(attrs["settings"]) == original.settings
        assert attrs["split_half_cosine"] == pytest.approx(0.73)
        assert attrs["image_shape"].tolist() == [2, 4, 4] and attrs["image_shape"].dtype.kind == "i"
        assert attrs["time_window"].tolist() == [0.25, 0.75]
        assert attrs["eps"] == pytest.approx(1e-2)
        table = group["records"]
        assert list(table.attrs["columns"]) == ["seed", "source", "loss_before", "control_norm",
                                                "kept", "status"]
        assert table["seed"].dtype == np.int64 and table["loss_before"].dtype == np.float64
        assert table["control_norm"].dtype == np.float32 and table["kept"].dtype == np.bool_
        info = h5py.check_string_dtype(table["status"].dtype)
        assert info.encoding == "utf-8" and info.length is None  # variable-length UTF-8
        assert table["source"].asstr()[()].tolist() == ["img_ä.png", "", "日本.jpg"]
        assert all(table[c].shape == (3,) for c in table.attrs["columns"])
        offsets = group["offsets"]
        assert offsets.dtype == np.float32 and offsets.shape == (3, *SHAPE)
        assert offsets.compression == "gzip" and offsets.chunks == (1, *SHAPE)


# --- several directions, overwrite, delete -------------------------------------------------------

def _raw(path: Path, name: str) -> tuple:
    with h5py.File(path, "r") as f:
        group = f[f"directions/{name}"]
        attrs = {k: (v.tolist() if isinstance(v, np.ndarray) else v)
                 for k, v in group.attrs.items()}
        offsets = group["offsets"][()].tobytes() if "offsets" in group else None
        comp = group["offsets"].compression if "offsets" in group else None
        return group["vector"][()].tobytes(), json.dumps(attrs, default=str), offsets, comp


def test_several_directions_overwrite_one_keeps_others_bitwise(tmp_path):
    path = tmp_path / "dirs.h5"
    store = DirectionStore(path)
    for i, name in enumerate(["age", "glasses", "smile"]):
        store.write(make_direction(name, i, offsets=True))
    before = {name: _raw(path, name) for name in ("age", "smile")}
    store.write(make_direction("glasses", 99, prompt="new prompt"))
    assert store.names() == ["age", "glasses", "smile"]
    assert {name: _raw(path, name) for name in ("age", "smile")} == before
    assert before["age"][3] == "gzip"
    assert store.read("glasses").prompt == "new prompt"
    assert store.read("glasses", offsets=True).offsets is None
    assert [d.name for d in store.read_all()] == ["age", "glasses", "smile"]
    assert all(d.offsets is None for d in store.read_all())


def test_overwrite_false_refuses_and_keeps_file(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("smile", 1))
    before = file_bytes(store.path)
    with pytest.raises(StoreError, match="already exists.*overwrite=True"):
        store.write(make_direction("smile", 2), overwrite=False)
    assert file_bytes(store.path) == before
    store.write(make_direction("other", 2), overwrite=False)
    assert store.names() == ["other", "smile"]


def test_delete(tmp_path):
    path = tmp_path / "d.h5"
    store = DirectionStore(path)
    store.write(make_direction("a", 1, offsets=True))
    store.write(make_direction("b", 2))
    kept = _raw(path, "a")
    store.delete("b")
    assert store.names() == ["a"] and _raw(path, "a") == kept
    with pytest.raises(StoreError, match=r"no direction 'b' in .*it holds: a"):
        store.delete("b")
    store.delete("a")
    assert store.exists() and store.names() == [] and store.read_all() == []


def test_file_mode_kept_and_no_temp_left(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a"))
    os.chmod(store.path, 0o640)
    store.write(make_direction("b"))
    assert store.path.stat().st_mode & 0o777 == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.h5", "d.h5.lock"]


# --- read errors ---------------------------------------------------------------------------------

def test_a_store_reached_through_a_symlink_is_updated_where_it_lives(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "links").mkdir()
    real = tmp_path / "real" / "store.h5"
    DirectionStore(real).write(make_direction("smile"))
    link = tmp_path / "links" / "link.h5"
    link.symlink_to(real)
    via_link = DirectionStore(link)
    via_link.write(make_direction("age", seed=1))
    assert link.is_symlink() and DirectionStore(real).names() == ["age", "smile"]
    assert via_link.lock_path == DirectionStore(real).lock_path  # one lock for every path to the file
    assert not list((tmp_path / "links").glob(".*tmp")) and not list((tmp_path / "real").glob(".*tmp"))


def _one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message and message
    return message


def test_unknown_name_lists_names(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a"))
    store.write(make_direction("b"))
    with pytest.raises(StoreError) as exc:
        store.read("smile")
    assert _one_line(exc).endswith("no direction 'smile' in " f"{store.path}; it holds: a, b")


def test_missing_file(tmp_path):
    store = DirectionStore(tmp_path / "nope.h5")
    assert not store.exists()
    for call in (store.names, store.read_all, lambda: store.read("x")):
        with pytest.raises(StoreError) as exc:
            call()
        assert _one_line(exc) == f"no such store: {store.path}"


def test_newer_version_refused_with_upgrade_hint(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a"))
    with h5py.File(store.path, "r+") as f:
        f.attrs["format_version"] = np.int64(2)
    before = file_bytes(store.path)
    for call in (store.names, lambda: store.read("a"),
                 lambda: store.write(make_direction("b"))):
        with pytest.raises(StoreError) as exc:
            call()
        assert _one_line(exc) == (f"{store.path} was written by a newer flowgrad "
                                  "(format_version 2); upgrade: pip install -U flowgrad")
    assert file_bytes(store.path) == before


@pytest.mark.parametrize("fmt", [None, "anndata", b"flowgrad-directions-x"])
def test_missing_or_foreign_format_refused(tmp_path, fmt):
    path = tmp_path / "foreign.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.arange(3))
        if fmt is not None:
            f.attrs["format"] = fmt
    before = file_bytes(path)
    with pytest.raises(StoreError) as exc:
        DirectionStore(path).names()
    assert "is not a flowgrad direction store" in _one_line(exc)
    assert ("'format' is missing" if fmt is None else "format is") in str(exc.value)
    with pytest.raises(StoreError):  # a writer never clobbers a foreign HDF5 file
        DirectionStore(path).write(make_direction())
    assert file_bytes(path) == before


def test_truncated_file_refused_and_not_modified(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a", offsets=True))
    data = file_bytes(store.path)
    store.path.write_bytes(data[: len(data) * 2 // 3])
    truncated = file_bytes(store.path)
    stat = store.path.stat()
    with pytest.raises(StoreError) as exc:
        store.read("a")
    message = _one_line(exc)
    assert message.startswith(f"{store.path} is not a readable flowgrad direction store "
                              "(corrupt or truncated HDF5: truncated file")
    with pytest.raises(StoreError):
        store.write(make_direction("b"))
    assert file_bytes(store.path) == truncated
    assert store.path.stat().st_mtime_ns == stat.st_mtime_ns


@pytest.mark.parametrize("content", [b"", b"hello, not hdf5\n" * 50])
def test_not_hdf5(tmp_path, content):
    path = tmp_path / "notes.h5"
    path.write_bytes(content)
    with pytest.raises(StoreError) as exc:
        DirectionStore(path).read_all()
    assert _one_line(exc) == (f"{path} is not a readable flowgrad direction store (corrupt or "
                              "truncated HDF5: file signature not found)")
    assert path.read_bytes() == content


def test_random_corruption_only_raises_store_error(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a", 1, offsets=True, records={"s": ["x", "y"], "n": [1, 2]}))
    store.write(make_direction("b", 2))
    original = file_bytes(store.path)
    rng = random.Random(0)
    outcomes = {"ok": 0, "StoreError": 0}
    for _ in range(60):
        damaged = bytearray(original)
        at = rng.randrange(len(damaged) - 8)
        damaged[at:at + 8] = bytes(rng.randrange(256) for _ in range(8))
        store.path.write_bytes(bytes(damaged))
        try:
            for name in store.names():
                store.read(name, offsets=True)
            outcomes["ok"] += 1
        except StoreError as exc:
            assert "\n" not in str(exc)
            outcomes["StoreError"] += 1
    assert outcomes["StoreError"] > 0  # anything other than StoreError propagates and fails


def test_missing_required_attribute_named(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a"))
    with h5py.File(store.path, "r+") as f:
        del f["directions/a"].attrs["scale"]
        del f["directions/a"].attrs["clip"]
    with pytest.raises(StoreError) as exc:
        store.read("a")
    assert "missing required attribute(s) scale, clip" in _one_line(exc)


def test_inconsistent_shape_attrs_refused(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a"))
    with h5py.File(store.path, "r+") as f:
        f["directions/a"].attrs["n_steps"] = np.int64(7)
    with pytest.raises(StoreError, match="n_steps=7.*disagree with vector shape"):
        store.read("a")


# --- validation on write -------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, error, words", [
    (dict(name=""), ValueError, "name must be a non-empty str"),
    (dict(name="a/b"), ValueError, "name must be a non-empty str without '/'"),
    (dict(vector=np.zeros((2, 3, 4), np.float32)), ValueError, "vector must be 4-D"),
    (dict(vector=np.zeros((1, 1, 2, 2), np.int64)), TypeError, "vector must be a floating-point"),
    (dict(vector=np.full((1, 1, 2, 2), np.nan, np.float32)), ValueError, "4 NaN/inf"),
    (dict(scale=0.0), ValueError, "scale must be finite and > 0"),
    (dict(scale=float("inf")), ValueError, "scale must be finite and > 0"),
    (dict(records={"a": [1, 2], "b": ["x"]}), ValueError, "equal length"),
    (dict(records={"a": np.zeros((2, 2))}), ValueError, "records['a'] must be 1-D"),
    (dict(records={"a": ["x", 1]}), TypeError, "mixes str and non-str"),
    (dict(offsets=np.zeros((2, 9, 2, 4, 4), np.float32)), ValueError, "offsets must have shape"),
    (dict(time_window=(0.8, 0.2)), ValueError, "time_window must satisfy"),
    (dict(model_fingerprint="abc"), ValueError, "model_fingerprint must be"),
    (dict(settings={"f": object()}), TypeError, "settings must be JSON-serializable"),
    (dict(n_images=-1), ValueError, "n_images must be an int >= 0"),
    (dict(method=""), ValueError, "method must name the aggregator"),
])
def test_invalid_direction_refused(kwargs, error, words):
    fields = dict(name="smile", vector=np.ones(SHAPE, np.float32), scale=1.0, prompt="p") | kwargs
    with pytest.raises(error, match=words.replace("[", r"\[").replace("(", r"\(")):
        Direction(**fields)


def test_write_revalidates_mutated_vector(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a"))
    before = file_bytes(store.path)
    direction = make_direction("b")
    direction.vector[0, 0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="vector must be finite"):
        store.write(direction)
    assert file_bytes(store.path) == before
    with pytest.raises(TypeError, match="direction must be a Direction"):
        store.write({"name": "x"})


def test_missing_directory_clear_error(tmp_path):
    store = DirectionStore(tmp_path / "no" / "such" / "d.h5")
    with pytest.raises(StoreError, match="check that the directory exists"):
        store.write(make_direction())


# --- locking -------------------------------------------------------------------------------------

HOLD_LOCK = """
import sys
from directions.store import DirectionStore
with DirectionStore(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_second_writer_refused_while_another_process_holds_lock(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a"))
    child = spawn(HOLD_LOCK, str(store.path))
    try:
        assert read_line(child) == "locked"
        before = file_bytes(store.path)
        start = time.monotonic()
        with pytest.raises(StoreLockedError) as exc:
            store.write(make_direction("b"))
        assert time.monotonic() - start < 1.0
        assert _one_line(exc) == (f"direction store {store.path} is locked by another writer "
                                  f"(pid {child.pid} holds {store.path}.lock); wait for that job "
                                  "to finish and retry")
        with pytest.raises(StoreLockedError):
            store.delete("a")
        with pytest.raises(StoreLockedError):
            with store.lock():
                pass
        assert store.names() == ["a"]  # readers need no lock
        assert file_bytes(store.path) == before
    finally:
        child.stdin.close()
        child.wait(timeout=CHILD_TIMEOUT_S)
    store.write(make_direction("b"))
    assert store.names() == ["a", "b"]


def test_lock_reentrant_in_thread_refused_in_other_thread(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    errors: list[BaseException] = []

    def other_thread() -> None:
        try:
            store.write(make_direction("t"))
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion below
            errors.append(exc)

    with store.lock():
        with store.lock():
            store.write(make_direction("a"))
        store.write(make_direction("b"))
        store.delete("a")
        thread = threading.Thread(target=other_thread)
        thread.start()
        thread.join()
    assert len(errors) == 1 and isinstance(errors[0], StoreLockedError)
    assert "another thread of this process" in str(errors[0])
    assert store.names() == ["b"]
    with store.lock():  # released after the outermost exit
        pass


HOLD_H5PY = """
import sys, h5py
f = h5py.File(sys.argv[1], "r+")
print("open", flush=True)
sys.stdin.read()
"""


@pytest.mark.skipif(os.environ.get("HDF5_USE_FILE_LOCKING", "").upper() == "FALSE",
                    reason="HDF5 file locking is disabled by HDF5_USE_FILE_LOCKING=FALSE")
def test_h5py_file_lock_translated(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    store.write(make_direction("a"))
    child = spawn(HOLD_H5PY, str(store.path))
    try:
        assert read_line(child) == "open"
        for call in (store.names, lambda: store.write(make_direction("b"))):
            with pytest.raises(StoreLockedError) as exc:
                call()
            assert _one_line(exc) == (f"direction store {store.path} is locked by another writer "
                                      "(HDF5 file lock held by another process); wait for that "
                                      "job to finish and retry")
    finally:
        child.stdin.close()
        child.wait(timeout=CHILD_TIMEOUT_S)
    assert store.names() == ["a"]


# --- kill -9 in the middle of a write ------------------------------------------------------------

HANG_BEFORE_RENAME = """
import os, sys, time
import numpy as np
from directions.store import Direction, DirectionStore

def hang(src, dst):
    print("ready", src, flush=True)
    time.sleep(60)

os.replace = hang  # the new file is fully written, fsynced, but not yet renamed
vector = np.ones((3, 2, 4, 4), np.float32)
DirectionStore(sys.argv[1]).write(Direction.from_vector("a", vector, "replaced!",
                                                        flowgrad_version="t"))
"""


def test_kill9_before_rename_leaves_store_intact(tmp_path):
    store = DirectionStore(tmp_path / "d.h5")
    originals = [make_direction("a", 1, offsets=True), make_direction("b", 2)]
    for direction in originals:
        store.write(direction)
    before = file_bytes(store.path)
    child = spawn(HANG_BEFORE_RENAME, str(store.path))
    line = read_line(child)
    assert line.startswith("ready ")
    temp = Path(line.split(" ", 1)[1])
    assert temp.parent == tmp_path and temp.name.startswith(".d.h5.writing-") and temp.exists()
    kill9(child)
    assert file_bytes(store.path) == before
    for original, back in zip(originals, store.read_all()):
        assert_same(original, back)
    assert store.read("a").prompt == "a photo of a"
    store.write(make_direction("c", 3))  # the lock died with the writer; the stale temp is cleaned
    assert not temp.exists()
    assert store.names() == ["a", "b", "c"]


WRITE_LOOP = """
import sys
import numpy as np
from directions.store import Direction, DirectionStore
store = DirectionStore(sys.argv[1])
for i in range(10_000):
    rng = np.random.default_rng(i)
    vector = rng.standard_normal((3, 2, 16, 16)).astype(np.float32)
    offsets = rng.standard_normal((4, 3, 2, 16, 16)).astype(np.float32)
    store.write(Direction.from_vector(f"d{i:04d}", vector, "p", offsets=offsets,
                                      flowgrad_version="t", records={"i": [i] * 4}))
    print(i, flush=True)
"""


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kill9_at_random_point_of_write_loop(tmp_path, seed):
    path = tmp_path / "d.h5"
    child = spawn(WRITE_LOOP, str(path))
    assert read_line(child) == "0"
    time.sleep(random.Random(seed).uniform(0.0, 0.3))
    kill9(child)
    store = DirectionStore(path)
    names = store.names()
    assert names == [f"d{i:04d}" for i in range(len(names))] and len(names) >= 1
    for i, name in enumerate(names):
        direction = store.read(name, offsets=True)
        rng = np.random.default_rng(i)
        assert direction.vector.tobytes() == rng.standard_normal((3, 2, 16, 16)).astype(
            np.float32).tobytes()
        assert direction.offsets.tobytes() == rng.standard_normal((4, 3, 2, 16, 16)).astype(
            np.float32).tobytes()
        assert direction.records["i"].tolist() == [i] * 4
