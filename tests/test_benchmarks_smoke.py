"""The GPU benchmark scripts run end to end on a CPU (--quick), and the original-code baseline is faithful.

The two scripts run in parallel subprocesses (one CPU thread each) once per module; the baseline is
checked against the engine on tiny float64 fields.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fields import ConvField

import flowgrad
from flowgrad import Segmentation, TimeGrid, Trajectory
from flowgrad.segments import segment_steps, straightness

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "tests" / "benchmarks"
sys.path.insert(0, str(BENCH))

import original_flowgrad as orig  # noqa: E402

SCRIPTS = ("bench_engine", "bench_paper")


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _run_demo_bench(script: str, *args: str) -> subprocess.CompletedProcess:
    """Run a benchmark script on the CPU with the committed demo weights (skip without them); it must succeed."""
    if not (ROOT / "data" / "demo" / "flow.pt").is_file():
        pytest.skip("demo weights are not in data/demo")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=ROOT, env=env, text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, dict]]:
    out = tmp_path_factory.mktemp("bench_out")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    procs = {name: subprocess.Popen([sys.executable, str(BENCH / f"{name}.py"), "--quick", "--device", "cpu",
                                     "--out", str(out)], cwd=ROOT, env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name in SCRIPTS}
    results = {}
    for name, proc in procs.items():
        log, _ = proc.communicate(timeout=240)
        path = out / f"{name}.json"
        data = json.loads(path.read_text()) if path.exists() else {}
        results[name] = (proc.returncode, log, data)
    return results


def _check_run(runs: dict, name: str) -> tuple[str, dict]:
    code, log, data = runs[name]
    assert code == 0, log[-3000:]
    lines = log.strip().splitlines()
    assert lines[0].startswith("device: ") and "torch " in lines[0]
    assert data["script"] == name and data["quick"] is True
    assert data["device"]["device"] == "cpu" and data["device"]["torch"] == torch.__version__
    return log, data


def test_engine_quick_run(runs: dict) -> None:
    log, data = _check_run(runs, "bench_engine")
    cfg = data["config"]
    assert cfg["parameters"] > 0 and _finite(cfg["flops_forward_per_image"])
    assert cfg["flops_vjp_per_image"] == pytest.approx(2 * cfg["flops_forward_per_image"], rel=0.05)

    bp = data["backprop"]
    plans = {r["plan"]: r for r in bp["rows"]}
    assert set(plans) == {"exact", "evenly-2", "natural-shared", "natural-per-image"}
    for row in plans.values():
        assert _finite(row["seconds"]) and row["seconds"] > 0
        assert _finite(row["cos_mean"]) and -1.0 <= row["cos_min"] <= row["cos_mean"] <= 1.0 + 1e-9
    assert plans["exact"]["n_vjps"] == bp["n_steps"] and plans["exact"]["cos_min"] == pytest.approx(1.0)
    assert plans["exact"]["ratio_to_exact"] == 1.0
    assert plans["evenly-2"]["n_vjps"] == 2
    assert plans["evenly-2"]["ratio_to_exact"] < 0.6        # 2 VJPs instead of 20
    assert data["targets"]["backprop_ratio_evenly"] == plans["evenly-2"]["ratio_to_exact"]

    tp = data["throughput"]
    rows = {(r["impl"], r["batch"]): r for r in tp["rows"]}
    assert set(rows) == {("original", 1), ("flowgrad", 1), ("flowgrad", 2), ("flowgrad", 4)}
    for (impl, _), row in rows.items():
        assert _finite(row["images_per_s"]) and row["images_per_s"] > 0
        assert row["iteration_s"] == pytest.approx(sum(row["phases"].values()))
        assert row["n_vjps"] == tp["segments"]
        if impl == "flowgrad":
            base = rows[("original", 1)]["images_per_s"]
            assert row["speedup_vs_original"] == pytest.approx(row["images_per_s"] / base)
    assert tp["original_vs_flowgrad_grad_cos"] > 0.9999   # the baseline computes the same gradient

    mem = data["memory"]
    sample = math.prod(cfg["sample_shape"]) * 4
    assert [r["n_steps"] for r in mem["rows"]] == [4, 8, 12]
    for row in mem["rows"]:
        assert row["states_bytes"] == (row["n_steps"] + 1) * mem["batch"] * sample
        assert row["n_vjps"] == row["n_steps"] and _finite(row["seconds"])
        assert "peak_bytes" not in row          # no CUDA allocator statistics on a CPU
    assert data["skipped"] == [] and _finite(data["elapsed_s"])
    assert log.strip().splitlines()[-1].lstrip().startswith("12 ")   # the memory table ends the output


def test_paper_quick_run(runs: dict) -> None:
    log, data = _check_run(runs, "bench_paper")
    micro = {r["config"]: r for r in data["micro"]}
    assert {"b1-tf32", "b1-bf16-cl", "b2-tf32-cl", "b2-fp32"} <= set(micro)
    for row in micro.values():
        for key in ("forward_s", "vjp_s", "forward_tflops", "vjp_tflops"):
            assert _finite(row[key]) and row[key] > 0, (row["config"], key)

    base = data["baseline"]
    assert base["batch"] == 1 and base["natural_segments"] >= 1
    for key in ("inversion_s", "forward_s", "loss_s", "vjp_s"):
        assert _finite(base[key]) and base[key] > 0, key
    assert set(base["iteration_s"]) == {"2", "3", "natural (derived)"}
    assert base["backward_s"]["2"] == pytest.approx(2 / 3 * base["backward_s"]["3"])

    variants = {v["name"]: v for v in data["variants"]}
    assert set(variants) == {"b1-tf32", "b2-bf16-cl"}
    for v in variants.values():
        for key in ("inversion_s_per_image", "forward_s_per_image", "loss_s_per_image", "iteration_images_per_s",
                    "forward_tflops", "vjp_tflops", "ours_over_floor", "baseline_over_ours_edit"):
            assert _finite(v[key]) and v[key] > 0, (v["name"], key)
        assert set(v["iteration_s_per_image"]) == {"2", "3", "natural (derived)"}
        assert v["iteration_s_per_image"]["2"] < v["edit_s_per_image_extrapolated"]["2"]
        assert v["peak_memory_gib"] is None
    assert variants["b2-bf16-cl"]["channels_last"] and variants["b2-bf16-cl"]["precision"] == "bf16"

    check = data["gradient_check"]
    assert len(check["cos_bf16"]) == check["batch"] == 2
    assert check["cos_tf32_min"] == pytest.approx(1.0, abs=1e-6)     # TF32 does nothing on a CPU
    assert 0.99 <= check["cos_bf16_min"] < 1.0 and check["bf16_ge_0.99"] is True

    apply = data["apply"]
    assert _finite(apply["apply_s_per_image"]) and apply["ours_edit_over_apply"] > 1
    assert _finite(apply["baseline_edit_over_apply"])
    # A real image adds its inversion to the apply; both ratios divide the same edit time (no timing
    # comparison here: on a busy 2-core machine two sub-second timings can come out in either order).
    assert _finite(apply["apply_real_s_per_image"]) and apply["apply_real_s_per_image"] > 0
    assert apply["ours_edit_over_apply_real"] * apply["apply_real_s_per_image"] == pytest.approx(
        apply["ours_edit_over_apply"] * apply["apply_s_per_image"], rel=1e-6)
    lines = log.strip().splitlines()                     # the variants table ends the output
    assert lines[-5].split()[:2] == ["variant", "B"] and lines[-1].split()[0] == "b2-bf16-cl"


# --------------------------------------------------------------------------- the baseline is faithful


def _mse(target: torch.Tensor):
    return lambda x: (x - target).square().mean()


def test_original_gradients_equal_engine_with_same_segments() -> None:
    field = ConvField(dtype=torch.float64)
    z0 = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    target = torch.randn_like(z0)
    n, starts = 12, [0, 3, 7, 8]
    result = orig.original_optimization(field, z0, _mse(target), n_steps=n, iterations=1, lr=10.0,
                                        segments=orig.segment_set_from_starts(starts, n))
    ours = flowgrad.control_gradients(field, z0, None, lambda x: (x - target).square().mean((1, 2, 3)), n,
                                      segments=Segmentation.from_starts(starts, n))
    assert result.n_vjps == [len(starts)]
    assert result.losses[0] == pytest.approx(ours.losses.item(), rel=1e-7)   # float32 times there
    grads = torch.stack([result.gradients[k] for k in range(n)])
    torch.testing.assert_close(grads, ours.gradients, rtol=1e-6, atol=1e-8)
    assert torch.equal(grads[3], grads[6]) and not torch.equal(grads[6], grads[7])   # re-assigned per segment


def test_original_returns_last_controls_not_best() -> None:
    field = ConvField(dtype=torch.float64)
    z0 = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    result = orig.original_optimization(field, z0, _mse(torch.zeros_like(z0)), n_steps=6, iterations=1, lr=3.0)
    # The only evaluated forward pass had zero controls (the best), yet the stepped controls come back.
    assert result.best_loss == pytest.approx(result.losses[0])
    for k in range(6):
        torch.testing.assert_close(result.controls[k], -3.0 * result.gradients[k])
    assert any(result.controls[k].abs().max() > 0 for k in range(6))


def test_original_straightness_wraps_around_at_step_zero() -> None:
    preds = [torch.ones(1, 2, 2, 2) for _ in range(5)] + [2 * torch.ones(1, 2, 2, 2)]
    segs = orig.original_straightness(preds, threshold=0.5)
    # d_0 compares v_0 with v_5 (Python's preds[-1]): 1 > 0.5 closes a segment at once.
    assert segs == {"indices": [0, 1, 5], "length": {0: 1, 1: 4, 5: 1}}
    sq = torch.tensor([[p.square().sum().item()] for p in preds], dtype=torch.float64)
    diff = torch.tensor([[(b - a).square().sum().item()] for a, b in zip(preds, preds[1:])], dtype=torch.float64)
    traj = Trajectory(grid=TimeGrid.uniform(6), states=torch.zeros(7, 1, 2, 2, 2), controls=None, velocities=None,
                      velocity_sq_norms=sq, velocity_diff_sq_norms=diff)
    # flowgrad's rule is one-sided at step 0, so the first segment runs on to the bend.
    assert segment_steps(straightness(traj)[:, 0].tolist(), 0.5) == Segmentation((0, 5), (5, 1))
    # wrap=False (the quality benchmark's switch) gives flowgrad's segmentation
    assert orig.original_straightness(preds, threshold=0.5, wrap=False) == {"indices": [0, 5],
                                                                            "length": {0: 5, 5: 1}}


def test_original_inversion_equals_flowgrad_euler() -> None:
    field = ConvField(dtype=torch.float64)
    x1 = torch.randn(1, 3, 5, 5, dtype=torch.float64)
    ours = flowgrad.invert(field, x1, 9, method="euler")
    torch.testing.assert_close(orig.original_inversion(field, x1, 9), ours, rtol=1e-12, atol=1e-12)


def test_original_refuses_batches() -> None:
    with pytest.raises(ValueError, match="one image"):
        orig.original_optimization(ConvField(dtype=torch.float64), torch.zeros(2, 3, 4, 4, dtype=torch.float64),
                                   lambda x: x.sum(), n_steps=3, iterations=1)


@pytest.mark.slow
def test_eval_directions_tiny_run(tmp_path: Path) -> None:
    """eval_directions.py end to end on the demo world with tiny settings (about 30 s on CPU)."""
    proc = _run_demo_bench("eval_directions.py", "--attrs", "glasses", "--project-out", "smiling", "--n-images", "2",
                           "--batch-size", "2", "--steps", "4", "--iterations", "2", "--replicas", "1",
                           "--eval-images", "4", "--strengths", "1", "2", "--random-control", "--per-image",
                           "--device", "cpu", "--out", str(tmp_path))
    report = json.loads((tmp_path / "eval_directions.json").read_text())
    assert report["card"] == "cpu" and report["project_out"] == ["smiling"]
    entry = report["attributes"]["glasses"]
    assert set(entry["strengths"]) == {"1.0", "2.0"} and set(entry["random_control"]) == {"1.0", "2.0"}
    for stats in [*entry["strengths"].values(), *entry["random_control"].values()]:
        assert 0 <= stats["eligible"] <= 4  # glasses is binary: images without glasses can flip
        assert stats["worst_other"] != "glasses" and len(stats["other_abs_change"]) == 19
        assert all(_finite(stats[k]) for k in ("target_gain_mean", "max_other_abs_change", "l1"))
        assert stats["max_other_abs_change"] == max(stats["other_abs_change"].values())
    assert _finite(entry["per_image_flowgrad"]["s_per_image"]) and entry["per_image_flowgrad"]["s_per_image"] > 0
    assert "glasses" in proc.stdout and "rand 1.0" in proc.stdout


def test_tf32_edit_benchmark_on_a_cpu_is_reproducible(tmp_path: Path) -> None:
    """tf32_edit.py on a CPU (TF32 does nothing there): both pairs of runs, and TF32 vs float32, are equal."""
    proc = _run_demo_bench("tf32_edit.py", "--device", "cpu", "--faces", "2", "--steps", "4", "--iterations", "2",
                           "--replicas", "1", "--json", str(tmp_path / "r.json"))
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["card"] == "cpu" and set(report["modes"]) == {"eager"}
    eager = report["modes"]["eager"]
    for key in ("tf32", "fp32"):
        assert eager[key]["runs_apart"] == 0 and eager[key]["max_pixel_diff"] == 0
        first, second = eager[key]["best_iterations"]
        assert first == second and len(first) == 2 and max(first) > 0  # the edits did something
    assert eager["tf32_vs_fp32_max_pixel_diff"] == 0
    assert "eager TF32 vs float32" in proc.stdout


def test_aggregate_benchmark_tiny_run() -> None:
    """bench_aggregate.py runs on a real checkpoint and its two aggregations agree (uneven last batch)."""
    cmd = [sys.executable, str(BENCH / "bench_aggregate.py"), "--images", "45", "--batch-size", "8", "--steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("45 images:") and line.endswith("same result: True"), line


@pytest.mark.slow
def test_robust_clip_fine_tune_writes_a_loadable_data_copy(tmp_path: Path) -> None:
    """robust_clip.py train: two adversarial steps, then the copy loads (sha256 checked) and is checked."""
    if not (ROOT / "data" / "demo" / "tiny_clip.pt").is_file():
        pytest.skip("demo weights are not in data/demo")
    out = tmp_path / "data"
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(BENCH / "robust_clip.py"), "train", "--steps", "2", "--batch-size", "8", "--n", "16",
           "--eps", "1", "--out", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, text=True, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    committed = json.loads((ROOT / "data" / "demo" / "manifest.json").read_text())["files"]["tiny_clip.pt"]
    entry = json.loads((out / "demo" / "manifest.json").read_text())["files"]["tiny_clip.pt"]
    assert entry["fine_tuned_from"] == committed["sha256"] != entry["sha256"]
    assert entry["robust_eps"] == 1.0 and entry["steps"] == 2
    lines = [ln for ln in proc.stdout.splitlines() if "gradient cosine" in ln]
    assert [ln.split(":")[0] for ln in lines] == ["old", "smiling"]  # the copy loaded (sha256 matched) and ran
    assert (out / "demo" / "flow.pt").read_bytes() == (ROOT / "data" / "demo" / "flow.pt").read_bytes()


def test_clip_gradient_check_on_the_committed_clip() -> None:
    """The committed tiny CLIP tells old from young, its margin rises when the renderer ages a face (or adds a
    smile), and its pixel gradient points, if weakly, along the renderer's true change (cosine > 0)."""
    import robust_clip

    torch.manual_seed(0)
    result = robust_clip.check(None, 24, torch.device("cpu"))
    assert set(result) == {"old", "smiling"}
    assert result["old"]["zero_shot"] >= 0.9 and result["old"]["margin_response"] > 0.1
    assert result["smiling"]["margin_response"] > 0.05
    assert 0 < result["old"]["gradient_cosine"] < 0.2 and 0 < result["smiling"]["gradient_cosine"] < 0.2


def test_study_aggregators_tiny_run(tmp_path: Path) -> None:
    """study_aggregators.py on a CPU: every aggregator on the same controls, the bands partition the vector."""
    _run_demo_bench("study_aggregators.py", "--device", "cpu", "--attrs", "smiling", "--n-images", "8",
                    "--batch-size", "8", "--eval-images", "4", "--steps", "5", "--iterations", "1", "--strengths", "1",
                    "--out", str(tmp_path))
    entry = json.loads((tmp_path / "study_aggregators.json").read_text())["attributes"]["smiling"]
    aggs = entry["aggregators"]
    assert set(aggs) == {"mean", "pc1", "pca", "robust", "probe"}  # window [0, 1]: the probe runs too
    assert aggs["mean"]["cosine_to_mean"] == pytest.approx(1.0)
    assert all(-1.0 - 1e-9 <= a["cosine_to_mean"] <= 1.0 + 1e-9 for a in aggs.values())
    assert {"target_gain_mean", "max_other_abs_change", "clip_gain"} <= set(aggs["mean"]["strengths"]["1.0"])
    assert "target_gain_mean" in entry["per_image"]
    shares = [b["norm_share_of_vector"] for b in entry["bands"].values()]
    assert len(shares) == 3 and sum(x * x for x in shares) == pytest.approx(1.0, rel=1e-6)  # disjoint steps
    assert len({round(b["applied_norm"], 9) for b in entry["bands"].values()}) == 1  # one norm for every band


def test_quality_vs_original_reports_both_implementations_on_the_same_images(tmp_path: Path) -> None:
    """quality_vs_original.py, tiny settings: both worlds report CLIP gain, L1 and time per implementation; on a
    random NCSN++ (every step bends, so both back-propagate exactly) ours reproduces the original's edit."""
    tiny = ("--n-images", "2", "--steps", "4", "--iterations", "2", "--replicas", "2", "--device", "cpu")
    _run_demo_bench("quality_vs_original.py", "--world", "demo", "--attr", "old", *tiny,
                    "--json", str(tmp_path / "demo.json"))
    demo = json.loads((tmp_path / "demo.json").read_text())
    for name in ("original", "ours"):
        r = demo[name]
        assert len(r["clip_gain"]) == len(r["l1"]) == len(r["judged_gain"]) == 2 and r["factor"] == "age"
        assert all(_finite(r[k]) for k in ("clip_gain_mean", "l1_mean", "judged_gain_mean", "s_per_image"))
        assert r["l1_mean"] > 0  # the edits changed the images
    assert demo["within_5_percent"] == all(abs(x) <= 0.05 for x in demo["relative"].values())
    proc = _run_demo_bench("quality_vs_original.py", "--world", "ncsnpp", *tiny, "--json", str(tmp_path / "n.json"))
    ncsnpp = json.loads((tmp_path / "n.json").read_text())
    assert ncsnpp["model"].startswith("random NCSN++") and ncsnpp["ours"]["l1_mean"] > 0
    assert ncsnpp["edits_max_abs_diff"] < 1e-4 and ncsnpp["within_5_percent"]
    assert "ours vs original" in proc.stdout
