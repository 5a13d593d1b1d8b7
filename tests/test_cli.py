"""The command-line tools end to end: discover -> apply -> sweep -> inspect, flowgrad edit, and the
reliability acceptance criteria (kill -9 + --resume, one writer at a time, one-line errors that
never lose a stored direction)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from cli_helpers import (ROOT, TINY_DISCOVERY, assert_cli_error, assert_one_line_error, digest, invoke,
                         run_script, start_script, subprocess_env)
from directions.store import Direction, DirectionStore

DEMO = ROOT / "data" / "demo"
CHILD_TIMEOUT_S = 120.0

pytestmark = pytest.mark.skipif(not (DEMO / "flow.pt").is_file(), reason="demo weights are not in data/demo")


def synthetic(name: str, like: Direction, seed: int, *, shape: tuple[int, ...] | None = None) -> Direction:
    """A random direction as long as ``like`` and stamped with its model (so apply accepts it), of
    another (n_steps, C, H, W) shape if asked."""
    vector = np.random.default_rng(seed).standard_normal(shape or like.vector.shape).astype(np.float32)
    vector *= np.linalg.norm(like.vector) / np.linalg.norm(vector)
    return Direction.from_vector(name, vector, f"a photo of {name}", model=like.model, clip=like.clip,
                                 model_fingerprint=like.model_fingerprint, n_images=1,
                                 created_at="2024-01-01T00:00:00+00:00", flowgrad_version="test")


@pytest.fixture(scope="module")
def base_store(tmp_path_factory) -> Path:
    """A store with the direction "old", discovered by the CLI with tiny settings."""
    store = tmp_path_factory.mktemp("cli") / "dirs.h5"
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--out", store)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return store


@pytest.fixture()
def store(base_store, tmp_path) -> Path:
    """A private copy of the discovered store (tests may add to it)."""
    copy = tmp_path / "dirs.h5"
    shutil.copy(base_store, copy)
    return copy


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.mode == "RGB"
        return np.asarray(im)


# --- the happy path -----------------------------------------------------------------------------

def test_discover_directions_writes_the_direction(base_store):
    d = DirectionStore(base_store).read("old")
    assert DirectionStore(base_store).names() == ["old"]
    assert d.prompt == "a photo of an old person" and d.negative_prompt == "a photo of a young person"
    assert d.vector.shape == (4, 3, 64, 64) and len(d.records["status"]) == 4
    assert d.n_images == int((d.records["status"] == "ok").sum()) >= 1
    assert d.settings["n_images"] == 4 and d.settings["batch_size"] == 2 and d.settings["replicas"] == 1
    assert d.settings["flowgrad"]["iterations"] == 1 and d.settings["precision"] == "float32"
    assert not Path(f"{base_store}.partial-old").exists()


def test_apply_directions_writes_pngs_grid_and_metrics(store, tmp_path):
    out = tmp_path / "out"
    result = invoke("apply-directions", "--directions", store, "--attr", "old", "--strength", "1",
                    "--samples", "2", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "edited 2 image(s) with old=1" in result.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "metrics.json", "sample-0_before.png", "sample-0_edited.png",
                     "sample-1_before.png", "sample-1_edited.png"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["edits"] == {"old": 1.0} and metrics["project_out"] == []
    assert metrics["n_steps"] == 100 and metrics["images"] == ["sample-0", "sample-1"]  # the default, not the 4 stored
    assert metrics["reconstruction_rmse"] is None
    assert len(metrics["l1_change"]) == 2 and min(metrics["l1_change"]) > 0
    assert png(out / "grid.png").shape == (2 * (128 + 2) + 2, 2 * (128 + 2) + 2, 3)  # 2 rows x 2, upscaled 2x

    # the PNGs are the stored 4-step direction resampled to 100 steps and applied at strength 1 to the seeded samples
    from directions.apply import apply_controls, resample_steps
    from directions.discover import sample_latents
    from flowgrad.models import load_model

    velocity = load_model("demo")
    direction = DirectionStore(store).read("old")
    z0 = sample_latents((3, 64, 64), 1, range(2))  # --seed defaults to 1
    with torch.no_grad():
        control = resample_steps(torch.from_numpy(direction.vector), 100)
        before = velocity.to_image(apply_controls(velocity, z0, None, 100)).clamp(0, 1)
        after = velocity.to_image(apply_controls(velocity, z0, control, 100)).clamp(0, 1)
    for i in range(2):
        for label, image in (("before", before[i]), ("edited", after[i])):
            expected = (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.int16)
            assert np.abs(png(out / f"sample-{i}_{label}.png").astype(np.int16) - expected).max() <= 1
    np.testing.assert_allclose(metrics["l1_change"], (after - before).abs().flatten(1).mean(1).numpy(), rtol=1e-4)


def test_apply_directions_composes_and_projects_out(store, tmp_path):
    old = DirectionStore(store).read("old")
    DirectionStore(store).write(Direction.from_vector("twin", old.vector, old.prompt, model=old.model,
                                                      model_fingerprint=old.model_fingerprint))
    DirectionStore(store).write(synthetic("smiling", old, seed=1))

    def l1(*args: str) -> list[float]:
        out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
        result = invoke("apply-directions", "--directions", store, *args, "--samples", "2", "--device", "cpu",
                        "--out", out)
        assert result.exit_code == 0, (result.stderr, result.exception)
        return json.loads((out / "metrics.json").read_text())

    cancelled = l1("--attr", "old=1", "--attr", "twin=-1")
    assert cancelled["edits"] == {"old": 1.0, "twin": -1.0}
    assert cancelled["l1_change"] == [0.0, 0.0]
    assert max(l1("--attr", "old", "--project-out", "twin")["l1_change"]) < 1e-5
    twice, once = l1("--attr", "old=0.5", "--attr", "old=0.5"), l1("--attr", "old=1")
    assert twice["edits"] == once["edits"] == {"old": 1.0}  # a repeated name adds up, as applied
    np.testing.assert_allclose(twice["l1_change"], once["l1_change"], rtol=1e-5)
    both = l1("--attr", "old=1.5", "--attr", "smiling=0.5", "--project-out", "twin")
    assert both["edits"] == {"old": 1.5, "smiling": 0.5} and both["project_out"] == ["twin"]
    only_smiling = l1("--attr", "smiling=0.5", "--project-out", "old")
    assert min(both["l1_change"]) > 0
    np.testing.assert_allclose(both["l1_change"], only_smiling["l1_change"], rtol=1e-4, atol=1e-7)


def test_plot_sweep_writes_figure_csv_and_json_with_judged_factors(store, tmp_path):
    out = tmp_path / "sweep.png"
    result = invoke("plot-sweep", "--directions", store, "--attr", "old", "--strengths", "-1:1:3",
                    "--samples", "2", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 500
    with open(out.with_suffix(".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 6
    assert {"strength", "image", "l1", "clip", "age", "smile", "glasses"} <= set(rows[0])
    assert [float(r["strength"]) for r in rows] == [-1.0, -1.0, 0.0, 0.0, 1.0, 1.0]
    assert {r["image"] for r in rows} == {"sample-0", "sample-1"}
    assert all(float(r["l1"]) == 0.0 for r in rows if float(r["strength"]) == 0.0)
    assert all(float(r["l1"]) > 0.0 for r in rows if float(r["strength"]) != 0.0)
    assert all(0.0 <= float(r["age"]) <= 1.0 for r in rows)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["direction"] == "old" and report["strengths"] == [-1.0, 0.0, 1.0]
    assert {"l1", "clip", "age"} <= set(report["mean"]) and len(report["mean"]["age"]) == 3
    assert len(report["per_image"]) == 6
    # every strength's CLIP score and judged factors are those of its own edited images, made here from the
    # seeded samples with the direction's control on every step (strength 0: none)
    assert report["n_steps"] == 100
    from directions.apply import EditSpec, compose_controls
    from directions.discover import sample_latents
    from flowgrad import TimeGrid, integrate
    from flowgrad.clip_guidance import clip_score
    from flowgrad.demo import world
    from flowgrad.models import load_guidance_clip, load_model

    old = DirectionStore(store).read("old")
    velocity, clip = load_model("demo"), load_guidance_clip(old.clip or "demo")
    z0 = sample_latents(tuple(velocity.sample_shape), 1, range(2))
    grid = TimeGrid.uniform(100, old.eps)  # the default: 100 steps, the 4-step direction resampled
    by_strength = {}
    for strength in (-1.0, 0.0, 1.0):
        control = compose_controls([EditSpec(old, strength)], 100).unsqueeze(1).expand(-1, 2, -1, -1, -1)
        with torch.no_grad():
            images = velocity.to_image(integrate(velocity, z0, grid, control.contiguous(),
                                                 keep_states=False).final).clamp(0, 1)
            by_strength[strength] = {"clip": clip_score(clip, images, old.prompt),
                                     **{k: world.judge(images)[k] for k in ("age", "smile", "glasses")}}
    for r in rows:
        own = by_strength[float(r["strength"])]
        i = int(r["image"].removeprefix("sample-"))
        for key in ("clip", "age", "smile", "glasses"):
            assert float(r[key]) == pytest.approx(float(own[key][i]), abs=2e-4), (r, key)
    for key in ("clip", "age"):  # the edit moves them: a metric of the unedited images would not match
        assert (by_strength[1.0][key] - by_strength[0.0][key]).abs().max() > 1e-3, key
        assert (by_strength[-1.0][key] - by_strength[0.0][key]).abs().max() > 1e-3, key


def test_inspect_lists_directions_and_pairwise_cosines(store):
    single = invoke("flowgrad", "inspect", store)
    assert single.exit_code == 0, (single.stderr, single.exception)
    assert "1 direction(s)" in single.stdout and "[old]" in single.stdout
    n_ok = int((DirectionStore(store).read("old").records["status"] == "ok").sum())
    assert f"images={n_ok}/4 " in single.stdout
    assert "loss terms: off-axis 0.5" in single.stdout  # old's registry recipe
    assert "pairwise cosines" not in single.stdout

    old = DirectionStore(store).read("old")
    other = synthetic("other", old, seed=2)
    DirectionStore(store).write(other)
    DirectionStore(store).write(synthetic("small", old, seed=3, shape=(4, 3, 32, 32)))
    result = invoke("flowgrad", "inspect", store)
    assert result.exit_code == 0, (result.stderr, result.exception)
    text = result.stdout
    assert "3 direction(s)" in text and "[old]" in text and "[other]" in text and "[small]" in text
    assert "pairwise cosines" in text
    rows = {line.split()[0]: line.split()[1:] for line in text.split("pairwise cosines")[1].splitlines()[2:]
            if line.strip()}
    assert list(rows) == ["old", "other", "small"]  # sorted by name
    assert [rows[n][i] for i, n in enumerate(rows)] == ["1.000"] * 3
    cos = float(old.vector.ravel().astype(np.float64) @ other.vector.ravel()
                / (np.linalg.norm(old.vector) * np.linalg.norm(other.vector)))
    assert rows["old"][1] == rows["other"][0] == f"{cos:.3f}"
    assert rows["old"][2] == rows["small"][0] == "n/a"  # other image shape: no cosine


# --- reliability ---------------------------------------------------------------------------------

def _wait_for_batch(partial: Path, proc: subprocess.Popen) -> int:
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while time.monotonic() < deadline:
        done = len(list(partial.glob("batch_*.npz"))) if partial.is_dir() else 0
        if done:
            return done
        if proc.poll() is not None:
            pytest.fail(f"discover-directions ended (exit {proc.returncode}) before its first batch: "
                        f"{proc.stderr.read()}")
        time.sleep(0.01)
    proc.kill()
    pytest.fail("no batch checkpoint appeared in time")


def test_kill_9_then_resume_equals_the_uninterrupted_run(base_store, tmp_path):
    args = ["--attr", "old", "--n-images", "6", "--batch-size", "2", "--steps", "4", "--iterations", "1",
            "--replicas", "1", "--aggregator", "mean", "--device", "cpu"]
    killed = tmp_path / "killed.h5"
    keep = synthetic("keep", DirectionStore(base_store).read("old"), seed=4)
    DirectionStore(killed).write(keep)
    before = DirectionStore(killed).read("keep").vector.tobytes()

    proc = start_script("discover-directions", *args, "--out", killed)
    try:
        partial = tmp_path / "killed.h5.partial-old"
        _wait_for_batch(partial, proc)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=CHILD_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert 1 <= len(list(partial.glob("batch_*.npz"))) < 3  # killed mid-job
    assert DirectionStore(killed).names() == ["keep"]
    assert DirectionStore(killed).read("keep").vector.tobytes() == before

    again = invoke("discover-directions", *args, "--out", killed)  # without --resume: refused
    assert_cli_error(again, "--resume")
    changed = invoke("discover-directions", *args, "--seed", "3", "--out", killed, "--resume")
    assert_cli_error(changed, "settings differ", "seed")
    assert 1 <= len(list(partial.glob("batch_*.npz"))) < 3  # the refused jobs touched nothing
    resumed = invoke("discover-directions", *args, "--out", killed, "--resume")
    assert resumed.exit_code == 0, (resumed.stderr, resumed.exception)
    assert not partial.exists()

    reference = tmp_path / "reference.h5"
    plain = invoke("discover-directions", *args, "--out", reference)
    assert plain.exit_code == 0, (plain.stderr, plain.exception)
    got, want = DirectionStore(killed).read("old"), DirectionStore(reference).read("old")
    rel = np.linalg.norm((got.vector - want.vector).astype(np.float64)) / np.linalg.norm(want.vector)
    assert rel <= 1e-5
    assert got.records["source"].tolist() == want.records["source"].tolist()
    np.testing.assert_allclose(got.records["loss_after"], want.records["loss_after"], rtol=1e-5, atol=1e-7)
    assert DirectionStore(killed).names() == ["keep", "old"]
    assert DirectionStore(killed).read("keep").vector.tobytes() == before


def test_a_second_concurrent_writer_is_refused(store, tmp_path):
    before = digest(store)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom directions.store import DirectionStore\n"
         "with DirectionStore(sys.argv[1]).lock():\n    print('locked', flush=True)\n    sys.stdin.read()\n",
         str(store)],
        env=subprocess_env(), cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = invoke("discover-directions", "--attr", "young", *TINY_DISCOVERY, "--out", store)
        line = assert_cli_error(result, "locked")
        assert f"pid {holder.pid}" in line
        assert not Path(f"{store}.partial-young").exists()
        # readers need no lock: applying still works while a job holds the store
        applied = invoke("apply-directions", "--directions", store, "--attr", "old", "--samples", "1",
                         "--device", "cpu", "--out", tmp_path / "out")
        assert applied.exit_code == 0, (applied.stderr, applied.exception)
    finally:
        holder.stdin.close()
        holder.wait(timeout=CHILD_TIMEOUT_S)
        holder.stdout.close()
    assert digest(store) == before


# --- one-line errors that lose nothing ------------------------------------------------------------

def _images(folder: Path) -> dict[str, Path]:
    """Bad inputs of every kind, plus a good RGB image."""
    rng = np.random.default_rng(0)
    paths = {}
    paths["gray"] = folder / "gray.png"
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8), "L").save(paths["gray"])
    paths["rgba"] = folder / "rgba.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 4), dtype=np.uint8), "RGBA").save(paths["rgba"])
    paths["text"] = folder / "notes.png"
    paths["text"].write_text("this is not an image\n")
    paths["missing"] = folder / "missing.png"
    paths["rgb"] = folder / "face.png"
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB").save(paths["rgb"])
    paths["gray16"] = folder / "gray16.tif"  # big-endian 16-bit grayscale: once converted silently (saturated)
    Image.new("I;16B", (64, 64)).save(paths["gray16"])
    paths["keyed"] = folder / "keyed.png"  # RGB with a transparent colour (tRNS)
    Image.new("RGB", (64, 64), (10, 20, 30)).save(paths["keyed"], transparency=(10, 20, 30))
    return paths


APPLY_ERRORS = {
    "grayscale": (["{gray}"], ["grayscale", "gray.png"]),
    "rgba": (["{rgba}"], ["alpha channel", "rgba.png"]),
    "grayscale-16-bit": (["{gray16}"], ["grayscale", "I;16B"]),
    "transparent-colour": (["{keyed}"], ["transparent colour", "keyed.png"]),
    "nan-strength": (["--samples", "1", "--attr", "old=nan"], ["strength must be a finite number"]),
    "not-an-image": (["{text}"], ["notes.png is not a readable image"]),
    "missing-image": (["{missing}"], ["no such image file", "missing.png"]),
    "samples-and-images": (["{rgb}", "--samples", "2"], ["not both"]),
    "unknown-direction": (["--samples", "1", "--attr", "nosuch"], ["no direction 'nosuch'", "old"]),
    "wrong-shape": (["--samples", "1", "--attr", "small"], ["'small'", "(3, 32, 32)", "(3, 64, 64)"]),
}


def test_strengths_follow_the_last_equals_sign_and_names_may_contain_one():
    from cli.apply import parse_edits

    assert parse_edits(("old", "age=old", "age=old=1.5", "young=-2"), 0.5) == [
        ("old", 0.5), ("age=old", 0.5), ("age=old", 1.5), ("young", -2.0)]


def test_an_image_is_read_upright_by_its_exif_orientation(tmp_path):
    from cli.images import load_image

    wide = np.zeros((64, 96, 3), dtype=np.uint8)
    wide[:, :48] = 255  # left half white as stored; a 90-degree turn puts it on top or at the bottom
    im = Image.fromarray(wide)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": shown 64 wide, 96 tall
    im.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    notices: list[str] = []
    x = load_image(tmp_path / "phone.jpg", 64, notices=notices)
    assert notices == ["phone.jpg: 64x96 center-cropped and resized to 64x64"]
    rows = x.mean(dim=(0, 2))
    assert abs(float(rows[:16].mean() - rows[-16:].mean())) > 0.5  # the halves are now top and bottom


@pytest.mark.parametrize("case", list(APPLY_ERRORS))
def test_apply_errors_are_one_line_and_lose_nothing(store, tmp_path, case):
    old = DirectionStore(store).read("old")
    DirectionStore(store).write(synthetic("small", old, seed=5, shape=(4, 3, 32, 32)))
    before = digest(store)
    paths = _images(tmp_path)
    extra, fragments = APPLY_ERRORS[case]
    attr = [] if "--attr" in extra else ["--attr", "old"]
    args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in extra]
    result = invoke("apply-directions", "--directions", store, *attr, *args, "--device", "cpu",
                    "--out", tmp_path / "out")
    assert_cli_error(result, *fragments)
    assert not (tmp_path / "out" / "metrics.json").exists()
    assert digest(store) == before
    assert DirectionStore(store).read("old").vector.tobytes() == old.vector.tobytes()


def test_zero_steps_and_an_empty_strength_list_are_refused(store, tmp_path):
    for argv in (["apply-directions", "--directions", store, "--attr", "old", "--samples", "1", "--steps", "0"],
                 ["plot-sweep", "--directions", store, "--attr", "old", "--samples", "1", "--steps", "0"]):
        assert_cli_error(invoke(*argv, "--device", "cpu", "--out", tmp_path / "o"), "n_steps must be >= 1, got 0")
    result = invoke("plot-sweep", "--directions", store, "--attr", "old", "--samples", "1", "--strengths", ",",
                    "--device", "cpu", "--out", tmp_path / "o.png")
    assert_cli_error(result, "--strengths must look like")
    assert not list(tmp_path.glob("o*"))


def test_a_direction_of_another_model_is_refused_unless_forced(store, tmp_path):
    old = DirectionStore(store).read("old")
    DirectionStore(store).write(Direction.from_vector("other", old.vector, old.prompt, model=old.model, clip=old.clip,
                                                      model_fingerprint="f" * 64, n_images=1,
                                                      created_at="2024-01-01T00:00:00+00:00", flowgrad_version="t"))
    before = digest(store)
    commands = {"apply-directions": ["--out", tmp_path / "apply"],
                "plot-sweep": ["--strengths", "0:1:2", "--out", tmp_path / "sweep.png"]}
    for name, args in commands.items():
        result = invoke(name, "--directions", store, "--attr", "other", "--samples", "1", "--device", "cpu", *args)
        assert_cli_error(result, "'other' was made with another model", "ffffffffffff", "--force")
        result = invoke(name, "--directions", store, "--attr", "other", "--samples", "1", "--device", "cpu",
                        "--force", *args)
        assert result.exit_code == 0, (name, result.stderr, result.exception)
    assert (tmp_path / "apply" / "metrics.json").is_file() and (tmp_path / "sweep.png").is_file()
    assert digest(store) == before


def test_sweep_refuses_a_direction_of_another_shape(store, tmp_path):
    DirectionStore(store).write(synthetic("small", DirectionStore(store).read("old"), seed=6, shape=(4, 3, 32, 32)))
    before = digest(store)
    result = invoke("plot-sweep", "--directions", store, "--attr", "small", "--samples", "1", "--device", "cpu",
                    "--out", tmp_path / "sweep.png")
    assert_cli_error(result, "(3, 32, 32)")
    assert digest(store) == before and not (tmp_path / "sweep.png").exists()


def test_unknown_attribute_is_one_line_and_loses_nothing(store):
    before = digest(store)
    result = invoke("discover-directions", "--attr", "nosuchattr", *TINY_DISCOVERY, "--out", store)
    assert_cli_error(result, "unknown attribute 'nosuchattr'", "old")
    assert digest(store) == before
    assert DirectionStore(store).names() == ["old"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _future_version(path: Path) -> None:
    with h5py.File(path, "a") as f:
        f.attrs["format_version"] = np.int64(2)


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(range(256)) * 8)


@pytest.mark.parametrize(("damage", "fragment"), [(_truncate, "not a readable flowgrad direction store"),
                                                  (_garbage, "not a readable flowgrad direction store"),
                                                  (_future_version, "newer flowgrad (format_version 2)")],
                         ids=["truncated", "garbage", "future-version"])
def test_damaged_stores_are_refused_by_every_command_and_left_alone(store, tmp_path, damage, fragment):
    vector = DirectionStore(store).read("old").vector.tobytes()
    damage(store)
    before = digest(store)
    runs = {
        "inspect": invoke("flowgrad", "inspect", store),
        "apply": invoke("apply-directions", "--directions", store, "--attr", "old", "--samples", "1",
                        "--device", "cpu", "--out", tmp_path / "out"),
        "sweep": invoke("plot-sweep", "--directions", store, "--attr", "old", "--samples", "1",
                        "--device", "cpu", "--out", tmp_path / "sweep.png"),
        "discover": invoke("discover-directions", "--attr", "young", *TINY_DISCOVERY, "--out", store),
    }
    for name, result in runs.items():
        line = assert_cli_error(result, fragment)
        assert str(store.name) in line, name
    assert digest(store) == before  # nobody "repaired" (overwrote) the file
    assert not Path(f"{store}.partial-young").exists()
    if damage is _future_version:  # the direction is still there for a newer flowgrad
        with h5py.File(store, "r") as f:
            assert f["directions/old/vector"][()].tobytes() == vector
        with h5py.File(store, "a") as f:
            f.attrs["format_version"] = np.int64(1)
        assert DirectionStore(store).read("old").vector.tobytes() == vector


def test_errors_in_a_real_process_print_exactly_one_line(store, tmp_path):
    """The console scripts themselves (not CliRunner): real stderr, real exit status."""
    gray = _images(tmp_path)["gray"]
    before = digest(store)
    proc = run_script("apply-directions", gray, "--directions", store, "--attr", "old", "--device", "cpu",
                      "--out", tmp_path / "out", cwd=tmp_path)
    assert proc.returncode == 1
    assert_one_line_error(proc.returncode, proc.stderr, "grayscale")
    _truncate(store)
    broken = digest(store)
    proc = run_script("flowgrad", "inspect", store, cwd=tmp_path)
    assert_one_line_error(proc.returncode, proc.stderr, "not a readable flowgrad direction store")
    assert digest(store) == broken != before


@pytest.mark.parametrize("argv, fragment", [
    (["discover-directions", "--attr", "old", "--batch-size", "x"], "'--batch-size': 'x' is not a valid integer"),
    (["apply-directions", "--bogus"], ("No such option", "--bogus")),  # click 8.2 and 8.3+ quote it differently
    (["plot-sweep", "--strengths"], "'--strengths' requires an argument"),
    (["flowgrad", "nosuch"], "No such command 'nosuch'"),
    (["flowgrad", "demo", "train", "--blur", "-1"], "'--blur': -1.0 is not in the range"),
    (["flowgrad", "edit"], "Missing argument 'IMAGE'"),
    (["flowgrad", "edit", "face.png", "--prompt", "a smile", "--replicas", "0"],
     "'--replicas': 0 is not in the range"),
])
def test_usage_errors_are_one_line(argv, fragment):
    result = invoke(*argv)
    assert_cli_error(result, *((fragment,) if isinstance(fragment, str) else fragment), "(see --help)")


@pytest.mark.parametrize("option, value, fragment", [
    ("--lr", "0", "lr must be a positive number, got 0.0"),
    ("--threshold", "-1", "threshold must be None or >= 0, got -1.0"),
    ("--threshold", "nan", "threshold must be None or >= 0, got nan"),
])
def test_explicit_bad_numbers_are_refused_not_replaced_by_defaults(option, value, fragment, tmp_path):
    for command in (["flowgrad", "edit", tmp_path / "none.png", "--prompt", "a smile"], ["discover-directions",
                                                                                         "--attr", "old"]):
        result = invoke(*command, option, value, "--device", "cpu", "--out", tmp_path / "out")
        assert_cli_error(result, fragment)
    assert not (tmp_path / "out").exists()
    result = invoke("flowgrad", "demo", "train", "--part", "judge", "--steps", "0", "--out", tmp_path / "w")
    assert_cli_error(result, "steps must be a positive integer, got 0")


# --- flowgrad edit and demo evaluate --------------------------------------------------------------

EDIT_KEYS = {"prompt", "negative_prompt", "alpha", "model", "clip", "clip_score_original",
             "clip_score_reconstruct", "clip_score_optimized", "l1_optimized_vs_original", "reconstruction_rmse",
             "loss_before", "loss_best", "best_iteration", "status", "segments_per_iteration", "n_steps",
             "iterations", "lr", "threshold", "wall_time_s"}


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, Path]:
    from flowgrad.demo.render import render

    from cli.images import to_pil

    folder = tmp_path_factory.mktemp("renders")
    images, _ = render(2, seed=3)
    square, wide = folder / "face.png", folder / "wide.png"
    to_pil(images[0]).save(square)
    to_pil(images[1]).resize((96, 64)).save(wide)
    return {"square": square, "wide": wide}


def _edit(image: Path, out: Path):
    """A tiny edit; 3 iterations, as with 1 the demo's edit of either rendered image keeps the unedited pass."""
    return invoke("flowgrad", "edit", image, "--prompt", "a photo of a smiling person", "--steps", "4",
                  "--iterations", "3", "--replicas", "1", "--device", "cpu", "--out", out)


def _assert_edited(out: Path) -> dict:
    """An optimization that improved on the unedited pass wrote its own image as optimized.png, not the
    reconstruction (the unedited pass)."""
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["best_iteration"] > 0 and metrics["loss_best"] < metrics["loss_before"], metrics
    diff = np.abs(png(out / "optimized.png").astype(np.int16) - png(out / "reconstruct.png").astype(np.int16))
    assert diff.max() > 1
    return metrics


def test_discover_from_a_folder_of_images_with_a_time_window(rendered, tmp_path):
    folder = tmp_path / "faces"
    folder.mkdir()
    for path in rendered.values():
        shutil.copy(path, folder / path.name)
    store = tmp_path / "dirs.h5"
    result = invoke("discover-directions", "--images", folder, "--prompt", "a photo of an old person",
                    "--negative", "a photo of a young person", "--name", "faces-old", "--t-window", "0.5", "1",
                    "--batch-size", "2", "--steps", "4", "--iterations", "2", "--replicas", "2",
                    "--device", "cpu", "--out", store)  # no --n-images: the folder's 2 (fewer than the default)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert re.search(r"^faces-old: [0-2]/2 images ok( \(\d no improvement\))?, CLIP score gain", result.stdout,
                     re.M), result.stdout
    too_many = invoke("discover-directions", "--images", folder, "--prompt", "a photo of an old person",
                      "--n-images", "3", "--device", "cpu", "--out", tmp_path / "other.h5")
    assert_cli_error(too_many, "--n-images 3 but only 2 images")
    d = DirectionStore(store).read("faces-old")
    assert d.prompt == "a photo of an old person" and d.negative_prompt == "a photo of a young person"
    assert d.time_window == (0.5, 1.0) and d.settings["images"] == str(folder.resolve())
    # t_k = eps + k/4: steps 0 and 1 lie before t = 0.5 and keep no control
    assert not d.vector[:2].any() and np.abs(d.vector[2:]).sum() > 0
    assert list(d.records["source"]) == [str(folder.resolve() / "face.png"), str(folder.resolve() / "wide.png")]
    assert all(0 < r < 0.2 for r in d.records["reconstruction_rmse"])  # inverted only down to t = 0.5


def test_apply_directions_inverts_real_images(store, rendered, tmp_path):
    twin = tmp_path / "other" / "face.png"  # same file name in another folder
    twin.parent.mkdir()
    shutil.copy(rendered["square"], twin)
    out = tmp_path / "out"
    result = invoke("apply-directions", rendered["square"], twin, rendered["wide"], "--directions", store,
                    "--attr", "old", "--steps", "4", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "notice: wide.png: 96x64 center-cropped and resized to 64x64" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["images"] == ["face", "face-2", "wide"]  # no output overwrites another
    for label in metrics["images"]:
        assert png(out / f"{label}_before.png").shape == (64, 64, 3)
        assert png(out / f"{label}_edited.png").shape == (64, 64, 3)
    rmse = metrics["reconstruction_rmse"]
    assert len(rmse) == 3 and all(0 <= r < 0.5 for r in rmse) and rmse[0] == pytest.approx(rmse[1])
    assert png(out / "grid.png").shape == (3 * 130 + 2, 3 * 130 + 2, 3)  # originals, before, after
    # inverted down to the direction's first step (t >= 0.3: step 2 of 4) only, and the reported error is
    # that shorter round trip's, which lands closer than inverting to t = eps and back
    from cli.images import load_image
    from flowgrad import TimeGrid, invert, reconstruction_error
    from flowgrad.models import load_model

    assert metrics["branch_step"] == 2
    velocity = load_model("demo")
    x1 = velocity.from_image(load_image(rendered["square"], 64).unsqueeze(0))
    with torch.no_grad():
        tail = TimeGrid.uniform(4).sub(2)
        _, part = reconstruction_error(velocity, x1, invert(velocity, x1, tail), tail)
        _, full = reconstruction_error(velocity, x1, invert(velocity, x1, 4), 4)
    assert rmse[0] == pytest.approx(float(part), rel=1e-4) and float(part) < float(full)


def test_edit_writes_the_three_images_and_metrics(rendered, tmp_path):
    out = tmp_path / "edit"
    result = _edit(rendered["square"], out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "notice:" not in result.stdout
    for name in ("original.png", "reconstruct.png", "optimized.png"):
        assert png(out / name).shape == (64, 64, 3)
    np.testing.assert_array_equal(png(out / "original.png"), png(rendered["square"]))
    metrics = json.loads((out / "metrics.json").read_text())
    assert EDIT_KEYS <= set(metrics), EDIT_KEYS - set(metrics)
    assert metrics["prompt"] == "a photo of a smiling person" and metrics["n_steps"] == 4
    assert metrics["iterations"] == 3 and metrics["status"] == "ok" and metrics["deterministic"] is False
    assert len(metrics["segments_per_iteration"]) == 3
    _assert_edited(out)
    for key in ("clip_score_original", "clip_score_reconstruct", "clip_score_optimized",
                "l1_optimized_vs_original"):
        assert np.isfinite(metrics[key]), key
    # the reconstruction (the optimization's first pass) is the 4-step round trip, computed here on its own
    from cli.images import load_image, to_pil
    from flowgrad import invert, reconstruction_error
    from flowgrad.models import load_model

    velocity = load_model("demo")
    x1 = velocity.from_image(load_image(rendered["square"], 64).unsqueeze(0))
    with torch.no_grad():
        recon, expected = reconstruction_error(velocity, x1, invert(velocity, x1, 4), 4)
    assert 0 < metrics["reconstruction_rmse"] == pytest.approx(float(expected), rel=1e-4)
    own = np.asarray(to_pil(velocity.to_image(recon).clamp(0, 1)[0]), dtype=np.int16)
    assert np.abs(png(out / "reconstruct.png").astype(np.int16) - own).max() <= 1
    # the optimized image is the best pass of the same optimization, run here through the library
    from flowgrad import optimize
    from flowgrad.clip_guidance import ClipLoss
    from flowgrad.models import load_guidance_clip

    original = load_image(rendered["square"], 64).unsqueeze(0)
    loss = ClipLoss(load_guidance_clip("demo"), "a photo of a smiling person", source=original, alpha=0.7,
                    replicas=1, seed=0)
    with torch.no_grad():
        z0 = invert(velocity, x1, 4)
    res = optimize(velocity, z0, lambda x: loss(velocity.to_image(x)), n_steps=4, iterations=3, lr=1.0,
                   threshold=5e-3)
    assert int(res.best_iteration[0]) == metrics["best_iteration"]
    assert metrics["loss_best"] == pytest.approx(float(res.best_loss[0]), rel=1e-5)
    own = np.asarray(to_pil(velocity.to_image(res.images).clamp(0, 1)[0]), dtype=np.int16)
    assert np.abs(png(out / "optimized.png").astype(np.int16) - own).max() <= 1


def test_edit_optimizes_in_float32_proper(rendered, tmp_path, monkeypatch):
    """On a GPU, TF32 made two runs of one edit up to 0.54 apart in a pixel (RESULTS 4.1), so the edit runs under
    strict_float32 with the model's precision, from before any graph is captured to the end of the optimization."""
    import contextlib

    import flowgrad
    import flowgrad.velocity

    seen, inside = [], []
    real_strict, real_optimize = flowgrad.velocity.strict_float32, flowgrad.optimize

    @contextlib.contextmanager
    def spy(device, precision="float32"):
        seen.append((torch.device(device).type, precision))
        inside.append(True)
        try:
            with real_strict(device, precision):
                yield
        finally:
            inside.pop()

    def optimize(*args, **kwargs):
        assert inside, "the optimization ran outside strict_float32"
        return real_optimize(*args, **kwargs)

    monkeypatch.setattr(flowgrad.velocity, "strict_float32", spy)
    monkeypatch.setattr(flowgrad, "optimize", optimize)
    result = _edit(rendered["square"], tmp_path / "edit")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert seen == [("cpu", "float32")]
    assert json.loads((tmp_path / "edit" / "metrics.json").read_text())["tf32"] is False


def test_edit_with_a_time_window_inverts_only_down_to_it(rendered, tmp_path):
    out = tmp_path / "edit"
    result = invoke("flowgrad", "edit", rendered["square"], "--prompt", "a photo of a smiling person", "--steps", "4",
                    "--iterations", "3", "--replicas", "1", "--t-window", "0.5", "1", "--device", "cpu",
                    "--deterministic", "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert not torch.are_deterministic_algorithms_enabled()  # only for the command's duration
    metrics = _assert_edited(out)
    assert metrics["t_window"] == [0.5, 1.0] and metrics["inverted_to_step"] == 2
    assert metrics["deterministic"] is True
    from cli.images import load_image
    from flowgrad import TimeGrid, invert, reconstruction_error
    from flowgrad.models import load_model

    velocity = load_model("demo")
    x1 = velocity.from_image(load_image(rendered["square"], 64).unsqueeze(0))
    grid = TimeGrid.uniform(4).sub(2)
    with torch.no_grad():
        _, expected = reconstruction_error(velocity, x1, invert(velocity, x1, grid), grid)
    assert 0 < metrics["reconstruction_rmse"] == pytest.approx(float(expected), rel=1e-4)
    for window, message in [(("0.9", "1"), "holds none of the 4 steps"), (("0.8", "0.2"), "t_window")]:
        result = invoke("flowgrad", "edit", rendered["square"], "--prompt", "a smile", "--steps", "4",
                        "--t-window", *window, "--device", "cpu", "--out", tmp_path / "bad")
        assert_cli_error(result, message)
    assert not (tmp_path / "bad").exists()


def test_edit_resizes_an_image_of_another_size_with_a_notice(rendered, tmp_path):
    out = tmp_path / "edit"
    result = _edit(rendered["wide"], out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert "notice: wide.png: 96x64 center-cropped and resized to 64x64" in result.stdout
    assert png(out / "original.png").shape == (64, 64, 3)
    assert EDIT_KEYS <= set(json.loads((out / "metrics.json").read_text()))
    _assert_edited(out)


def test_edit_refuses_a_grayscale_image(tmp_path):
    gray = _images(tmp_path)["gray"]
    assert_cli_error(_edit(gray, tmp_path / "edit"), "grayscale")
    assert not (tmp_path / "edit").exists()


@pytest.mark.slow
def test_demo_evaluate_small(tmp_path):
    """`flowgrad demo evaluate --n 16 --steps 4` (about 7 s on one CPU thread)."""
    out = tmp_path / "report.json"
    result = invoke("flowgrad", "demo", "evaluate", "--n", "16", "--steps", "4", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(out.read_text())
    assert {"judge", "judge_blur_shift", "clip_zero_shot_renders", "flow", "clip_zero_shot_flow_samples", "card",
            "seconds"} <= set(report)
    assert {"age", "smile", "glasses"} <= set(report["judge"])
    assert set(report["judge_blur_shift"]) == set(report["judge"])
    assert result.stdout.strip() == out.read_text().strip()


# --- real-model inputs: one-line errors (issue "real models") -------------------------------------
NCSNPP_DATA = ROOT / "tests" / "data" / "ncsnpp"


def _bad_model_files(tmp_path: Path) -> dict[str, Path]:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    other = tmp_path / "other_arch.pth"
    torch.save({"model": {"module.conv.weight": torch.zeros(3, 3)}, "ema": {}, "step": 0}, other)
    return {"text": text, "other": other}


@pytest.mark.parametrize("case,extra,fragment", [
    ("text", [], "notes.pth"),
    ("other", [], "other_arch.pth"),
    ("config", ["--model-config", "rectified-flow-celebahq-256"], "small_rf_checkpoint.pth"),
    ("missing", [], "RectifiedFlow"),
])
def test_edit_with_a_bad_model_file_is_one_line(rendered, tmp_path, case, extra, fragment):
    files = _bad_model_files(tmp_path) | {"config": NCSNPP_DATA / "small_rf_checkpoint.pth",
                                          "missing": tmp_path / "nowhere.pth"}
    result = invoke("flowgrad", "edit", str(rendered["square"]), "--prompt", "a photo of a smiling person",
                    "--model", f"ncsnpp:{files[case]}", *extra, "--steps", "2", "--iterations", "1",
                    "--device", "cpu", "--out", str(tmp_path / "edit"))
    assert_cli_error(result, fragment)
    assert not (tmp_path / "edit").exists()


def test_edit_with_a_missing_clip_file_says_where_to_put_it(rendered, tmp_path):
    missing = tmp_path / "vit_b32.bin"
    result = invoke("flowgrad", "edit", str(rendered["square"]), "--prompt", "a photo of a smiling person",
                    "--clip", f"ViT-B-32-quickgelu:{missing}", "--steps", "2", "--iterations", "1",
                    "--device", "cpu", "--out", str(tmp_path / "edit"))
    assert_cli_error(result, str(missing))


def test_edit_runs_an_ncsnpp_checkpoint_under_bf16(rendered, tmp_path):
    """`flowgrad edit --model ncsnpp:... --model-config ... --bf16` on the small reference checkpoint."""
    out = tmp_path / "edit"
    result = invoke("flowgrad", "edit", str(rendered["square"]), "--prompt", "a photo of a smiling person",
                    "--model", f"ncsnpp:{NCSNPP_DATA / 'small_rf_checkpoint.pth'}",
                    "--model-config", str(NCSNPP_DATA / "small_config.json"), "--bf16", "--replicas", "1",
                    "--steps", "2", "--iterations", "1", "--device", "cpu", "--out", str(out))
    assert result.exit_code == 0, (result.stderr, result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["precision"] == "bf16-autocast" and metrics["model"].startswith("ncsnpp:")
    assert metrics["compile_backend"] is None
    assert all(math.isfinite(metrics[k]) for k in ("clip_score_original", "clip_score_optimized",
                                                   "l1_optimized_vs_original"))
    assert {p.name for p in out.iterdir()} >= {"original.png", "reconstruct.png", "optimized.png", "metrics.json"}


def test_bf16_with_the_demo_flow_is_a_one_line_error(tmp_path):
    result = invoke("discover-directions", "--attr", "old", "--bf16", "--n-images", "2", "--device", "cpu",
                    "--out", str(tmp_path / "d.h5"))
    assert_cli_error(result, "bf16 autocast is for NCSN++ models")
    assert not (tmp_path / "d.h5").exists()


def test_discover_with_preserve_records_the_pairs_and_changes_the_direction(base_store, tmp_path):
    store = tmp_path / "kept.h5"
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--preserve-weight", "2",
                    "--out", store)
    assert result.exit_code == 0, (result.stderr, result.exception)
    kept = DirectionStore(store).read("old")
    plain = DirectionStore(base_store).read("old")
    pairs = kept.settings["preserve"]
    assert kept.settings["preserve_weight"] == 2.0 and plain.settings["preserve"] == []
    # the registry's list for "old", each distinction once (dark_hair would repeat blond reversed)
    assert ["a photo of a person with red hair", "a photo of a person with black hair"] in pairs
    assert all(p != "a photo of an old person" for p, _ in pairs) and len(pairs) == 7
    assert not np.allclose(kept.vector, plain.vector)
    explicit = tmp_path / "explicit.h5"
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--preserve-weight", "1",
                    "--preserve", "smiling", "--out", explicit)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert DirectionStore(explicit).read("old").settings["preserve"] == [
        ["a photo of a smiling person", "a photo of a serious person"]]


def test_the_summary_line_counts_the_skipped_images_by_reason():
    from cli.discover import skipped_note

    assert skipped_note(["ok", "ok"]) == ""
    statuses = ["ok", "skipped: no improvement", "skipped: nonfinite@3", "skipped: no improvement"]
    assert skipped_note(statuses) == " (2 no improvement, 1 nonfinite)"
    assert skipped_note(np.array(statuses)) == " (2 no improvement, 1 nonfinite)"  # as the store reads them


def test_discover_uses_the_attribute_recipe_unless_options_are_given(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    (data / "demo").symlink_to(ROOT / "data" / "demo")
    (data / "attributes.toml").write_text(
        '[old]\nprompt = "a photo of an old person"\nnegative_prompt = "a photo of a young person"\n'
        'discovery = { n_images = 3, lr = 4, off_axis_weight = 0.25, iterations = 2, t_window = [0.5, 1], steps = 6,'
        ' aggregator = "robust" }\n')
    monkeypatch.setenv("FLOWGRAD_DATA", str(data))
    no_n = [a for i, a in enumerate(TINY_DISCOVERY)
            if not {"--n-images", "--iterations", "--steps", "--batch-size", "--replicas", "--aggregator"}
            & set(TINY_DISCOVERY[max(i - 1, 0):i + 1])]
    assert len(no_n) == len(TINY_DISCOVERY) - 12  # (4 replicas: an improvement is not left to one augmented copy)
    store = tmp_path / "d.h5"
    result = invoke("discover-directions", "--attr", "old", *no_n, "--out", store)
    assert result.exit_code == 0, (result.stderr, result.exception)
    d = DirectionStore(store).read("old")
    s = d.settings
    assert (s["n_images"], s["flowgrad"]["lr"], s["off_axis_weight"]) == (3, 4.0, 0.25)
    assert s["batch_size"] == 16  # not given, on the CPU
    assert (s["flowgrad"]["iterations"], s["flowgrad"]["t_window"]) == (2, [0.5, 1.0])
    assert (s["flowgrad"]["n_steps"], d.n_steps, s["aggregator"], d.method) == (6, 6, "robust", "robust")
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--lr", "2", "--off-axis-weight", "0",
                    "--t-window", "0.25", "1", "--aggregator", "mean", "--name", "explicit", "--out", store)
    assert result.exit_code == 0, (result.stderr, result.exception)
    s = DirectionStore(store).read("explicit").settings
    assert (s["n_images"], s["flowgrad"]["lr"], s["off_axis_weight"]) == (4, 2.0, 0.0)
    assert s["flowgrad"]["t_window"] == [0.25, 1.0] and s["flowgrad"]["iterations"] == 1
    assert (s["flowgrad"]["n_steps"], s["aggregator"]) == (4, "mean")
    result = invoke("discover-directions", "--prompt", "a red face", *TINY_DISCOVERY, "--replicas", "4",
                    "--name", "plain", "--out", store)
    assert result.exit_code == 0, (result.stderr, result.exception)
    s = DirectionStore(store).read("plain").settings  # no attribute: the built-in defaults
    assert (s["flowgrad"]["lr"], s["off_axis_weight"], s["flowgrad"]["t_window"]) == (10.0, 0.0, [0.3, 1.0])
    assert s["aggregator"] == "mean"


def test_default_batch_size_is_the_whole_job_for_the_demo_model_on_a_gpu():
    from cli.discover import GPU_DEMO_BATCH, default_batch_size

    cuda = torch.device("cuda", 0)
    assert default_batch_size(torch.device("cpu"), "demo", 64) == 16
    assert default_batch_size(cuda, "demo", 64) == 64 == GPU_DEMO_BATCH
    assert default_batch_size(cuda, "demo", 200) == 64 and default_batch_size(cuda, "demo", 5) == 5
    assert default_batch_size(cuda, "demo", 64, world=2) == 32  # every torchrun process gets images
    assert default_batch_size(cuda, "demo", 5, world=2) == 3
    assert default_batch_size(cuda, "ncsnpp:rf.pth", 64) == 16  # a large network: the memory-safe default


def test_discover_preserve_errors_are_one_line(tmp_path):
    store = tmp_path / "d.h5"
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--preserve-weight", "1",
                    "--preserve", "nosuch", "--out", store)
    assert_cli_error(result, "unknown attribute 'nosuch'")
    result = invoke("discover-directions", "--prompt", "a red face", *TINY_DISCOVERY, "--preserve-weight", "1",
                    "--out", store)
    assert_cli_error(result, "--preserve ATTR")
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--preserve-weight", "-1",
                    "--out", store)
    assert_cli_error(result, "--preserve-weight")
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--off-axis-weight", "-0.5",
                    "--out", store)
    assert_cli_error(result, "--off-axis-weight must be >= 0")
    result = invoke("discover-directions", "--attr", "smiling", *TINY_DISCOVERY, "--t-window", "0.8", "1",
                    "--out", store)
    assert_cli_error(result, "the time window [0.8, 1] holds none of the 4 steps")
    assert not store.exists()


def test_discover_joint_refuses_keep_offsets_and_adam_in_one_line(tmp_path):
    store = tmp_path / "d.h5"
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--aggregator", "joint",
                    "--keep-offsets", "--out", store)
    assert_cli_error(result, "--keep-offsets", "joint")
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--aggregator", "joint",
                    "--optimizer", "adam", "--out", store)
    assert_cli_error(result, "joint uses SGD")
    assert not store.exists() and not (tmp_path / "d.h5.partial-old").exists()


def test_compile_with_the_demo_flow_is_a_one_line_error(tmp_path):
    result = invoke("discover-directions", "--attr", "old", "--compile", "--n-images", "2", "--device", "cpu",
                    "--out", str(tmp_path / "d.h5"))
    assert_cli_error(result, "torch.compile is for NCSN++ models")
    assert not (tmp_path / "d.h5").exists()


def test_an_existing_direction_is_kept_unless_overwrite_is_given(store):
    before = digest(store)
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--out", store)
    assert_cli_error(result, "direction 'old' already exists", "--overwrite")
    assert digest(store) == before and not Path(f"{store}.partial-old").exists()
    assert DirectionStore(store).read("old").settings["seed"] == 0
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--seed", "1", "--overwrite",
                    "--replicas", "4", "--lr", "10", "--out", store)  # (one pass at old's lr 12 improves none here)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert DirectionStore(store).names() == ["old"] and DirectionStore(store).read("old").settings["seed"] == 1


def test_long_prompts_get_distinct_default_names():
    from cli.discover import _slug

    a, b = (_slug(f"a photo of a person with very long blond hair and {x}") for x in ("glasses", "a beard"))
    assert a != b and len(a) <= 48 and a.startswith("a_photo_of_a_person_with_very_long_blond")
    assert _slug("a photo of an old person") == "a_photo_of_an_old_person" and _slug("!!!") == "direction"


def test_discover_deterministic_gives_the_same_direction_and_restores_the_mode(base_store, tmp_path):
    store = tmp_path / "det.h5"
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--deterministic", "--out", store)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert not torch.are_deterministic_algorithms_enabled()  # the command's mode ends with it
    det, ref = DirectionStore(store).read("old"), DirectionStore(base_store).read("old")
    # on the CPU only the resize augmentation's arithmetic differs (matrix products instead of grid_sample):
    # float32 rounding, and not zero (the mode was on during the job)
    rel = np.linalg.norm((det.vector - ref.vector).astype(np.float64)) / np.linalg.norm(ref.vector)
    assert 0 < rel <= 1e-4, rel
    assert list(det.records["status"]) == list(ref.records["status"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="GPU kernels are what --deterministic pins down")
def test_discover_deterministic_on_a_gpu_is_bitwise_repeatable(tmp_path):
    args = ["--attr", "old", "--n-images", "32", "--batch-size", "16", "--steps", "8", "--iterations", "2",
            "--aggregator", "mean", "--device", "cuda", "--deterministic"]
    vectors = []
    for run in range(2):  # fresh processes: cuBLAS reads its workspace setting when it starts
        out = tmp_path / f"run{run}.h5"
        done = run_script("discover-directions", *args, "--out", out, timeout=300)
        assert done.returncode == 0, done.stderr
        vectors.append(DirectionStore(out).read("old").vector)
    np.testing.assert_array_equal(vectors[0], vectors[1])


def test_discover_coarse_forward_is_recorded_and_needs_a_threshold(base_store, tmp_path):
    store = tmp_path / "coarse.h5"
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--iterations", "3", "--steps", "8",
                    "--coarse-forward", "--out", store)
    assert result.exit_code == 0, (result.stderr, result.exception)
    coarse = DirectionStore(store).read("old")
    assert coarse.settings["flowgrad"]["coarse_forward"] is True
    assert DirectionStore(base_store).read("old").settings["flowgrad"]["coarse_forward"] is False
    assert np.isfinite(coarse.vector).all() and np.linalg.norm(coarse.vector) > 0
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--coarse-forward", "--threshold",
                    "0", "--out", tmp_path / "d.h5")
    assert_cli_error(result, "coarse_forward needs a straightness threshold")
    result = invoke("discover-directions", "--attr", "old", *TINY_DISCOVERY, "--coarse-forward", "--aggregator",
                    "joint", "--out", tmp_path / "d.h5")
    assert_cli_error(result, "drop --coarse-forward")
    assert not (tmp_path / "d.h5").exists()


_QUICK_EXIT_PROGRAM = """
import atexit, logging, sys
import click
atexit.register(lambda: print("teardown ran", file=sys.stderr))  # the interpreter's teardown, skipped by os._exit
import cli.common as common
from cli.common import CliError, Command
common._quick_exit_allowed = lambda: True  # as after a CUDA run
@click.command(cls=Command)
@click.argument("out")
@click.option("--fail", is_flag=True)
def prog(out, fail):
    open(out, "w").write("done")
    logging.getLogger("flowgrad").warning("a log line")
    print("summary line", end="")  # stdout is a pipe: block-buffered until flushed
    if fail:
        raise CliError("bad input")
common.run_program(prog)
print("never reached")
"""


@pytest.mark.parametrize("fail", [False, True])
def test_run_program_leaves_quickly_only_after_success_with_output_flushed(tmp_path, fail):
    """After success with CUDA in use the process ends with os._exit(0) (no teardown), its buffered output
    flushed first; an error exits the usual way (with teardown) with its one-line message and code 1."""
    out = tmp_path / "out.txt"
    logging_setup = "logging.basicConfig(stream=sys.stderr)\n"
    code = _QUICK_EXIT_PROGRAM.replace("common._quick", logging_setup + "common._quick", 1)
    env = {k: v for k, v in subprocess_env().items() if k != "PYTHONUNBUFFERED"}  # buffered, as in a shell pipe
    run = subprocess.run([sys.executable, "-c", code, str(out), *(["--fail"] if fail else [])], capture_output=True,
                         text=True, cwd=ROOT, env=env, timeout=120)
    assert out.read_text() == "done"
    assert run.stdout == "summary line" and "a log line" in run.stderr and "never reached" not in run.stdout
    if fail:
        assert run.returncode == 1 and "error: bad input" in run.stderr and "teardown ran" in run.stderr
    else:
        assert run.returncode == 0 and "teardown ran" not in run.stderr


def test_run_program_exits_the_usual_way_on_cpu_and_when_asked(tmp_path, monkeypatch):
    import click

    import cli.common as common

    @click.command(cls=common.Command)
    def prog() -> None:
        pass

    monkeypatch.setattr(sys, "argv", ["prog"])
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv(common.ORDERLY_EXIT_ENV, raising=False)
    monkeypatch.setitem(common._RUN, "compiled", False)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    assert not common._quick_exit_allowed()  # CPU: the interpreter's teardown is cheap
    with pytest.raises(SystemExit) as exc:
        common.run_program(prog)
    assert exc.value.code == 0
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert common._quick_exit_allowed()
    monkeypatch.setenv(common.ORDERLY_EXIT_ENV, "1")
    assert not common._quick_exit_allowed()
    monkeypatch.delenv(common.ORDERLY_EXIT_ENV)
    monkeypatch.setenv("WORLD_SIZE", "2")  # a torchrun worker leaves through the process group's teardown
    assert not common._quick_exit_allowed()
    monkeypatch.delenv("WORLD_SIZE")
    common.model_kwargs(bf16=False, compile_model=True)  # --compile: its worker pool shuts down in atexit
    assert not common._quick_exit_allowed()
