"""The directions pipeline: aggregation, step resampling, composition, compatibility, sweeps and
batch discovery (with resume) through the Python API."""

from __future__ import annotations

import importlib
import json
import math
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import flowgrad
from directions.aggregate import METHODS, aggregate, natural_scale, split_half_cosine
from directions.apply import EditSpec, apply_controls, check_compatible, compose_controls, first_active_step, \
    resample_steps, uncontrolled_state
from directions.discover import BatchProgress, DiscoveryConfig, discover, partial_dir
from directions.store import Direction, DirectionStore
from directions.sweep import parse_strengths, sweep
from flowgrad import FlowGradConfig, TimeGrid, integrate
from flowgrad.clip_guidance import random_clip
from flowgrad.velocity import VelocityField

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
CONTRACT_ATTRS = ("prompt", "negative_prompt", "method", "n_images", "n_steps", "scale", "model_fingerprint",
                  "model", "clip", "image_shape", "time_window", "eps", "settings", "split_half_cosine",
                  "created_at", "flowgrad_version")
RECORD_COLUMNS = ("status", "loss_before", "loss_after", "clip_before", "clip_after", "control_norm",
                  "cosine_to_direction")


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _direction(name: str, vector: np.ndarray, **fields) -> Direction:
    return Direction.from_vector(name, np.asarray(vector, dtype=np.float32), f"a photo of {name}", **fields)


# --- aggregate -----------------------------------------------------------------------------------

def _consistent(n: int = 20, shape=(3, 2, 4, 4), noise: float = 0.05, seed: int = 0):
    """n controls = (positive gain) * d + small noise; returns (controls, unit d)."""
    rng = np.random.default_rng(seed)
    d = rng.standard_normal(shape)
    d /= np.linalg.norm(d)
    gains = rng.uniform(0.5, 1.5, size=n)
    x = gains[:, None, None, None, None] * d + noise * rng.standard_normal((n, *shape)) / math.sqrt(d.size)
    return x, d.ravel()


def test_mean_is_the_normalized_numpy_mean():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((7, 2, 3, 4, 4)) + 0.3
    agg = aggregate(x, "mean")
    flat = x.reshape(7, -1)
    expected = flat.mean(0) / np.linalg.norm(flat.mean(0))
    np.testing.assert_allclose(agg.unit, expected, rtol=1e-12, atol=1e-12)
    assert agg.scale == pytest.approx(float(np.median(flat @ expected)), rel=1e-12)
    np.testing.assert_allclose(agg.per_image_cosine,
                               flat @ expected / np.linalg.norm(flat, axis=1), rtol=1e-10)
    assert agg.inlier.dtype == bool and agg.inlier.all()


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_pc1_matches_the_shared_direction_and_is_sign_aligned(sign):
    x, d = _consistent(noise=0.1)
    x = sign * x
    agg = aggregate(x, "pc1")
    mean_unit = aggregate(x, "mean").unit
    assert _cos(agg.unit, mean_unit) > 0.99
    assert sign * _cos(agg.unit, d) > 0.99  # follows the controls, whichever way they point
    assert float(x.reshape(len(x), -1).mean(0) @ agg.unit) > 0
    assert agg.scale > 0 and agg.info["singular_values"][0] > 0


def test_centred_pca_finds_the_axis_of_variation():
    rng = np.random.default_rng(2)
    shape = (2, 3, 4, 4)
    base = 5.0 * rng.standard_normal(shape)       # a large common offset that PCA must ignore
    axis = rng.standard_normal(shape)
    axis /= np.linalg.norm(axis)
    t = rng.standard_normal(30)
    x = base + t[:, None, None, None, None] * axis + 0.01 * rng.standard_normal((30, *shape))
    agg = aggregate(x, "pca")
    assert abs(_cos(agg.unit, axis)) > 0.99
    assert abs(_cos(agg.unit, base)) < 0.3
    assert float(x.reshape(30, -1).mean(0) @ agg.unit) >= 0  # sign-aligned with the mean control
    assert agg.info["explained_variance_ratio"][0] > 0.9


def test_robust_flags_and_excludes_a_planted_outlier():
    x, d = _consistent(n=12, noise=0.05, seed=3)
    x[5] = -3.0 * x[5]  # one image pointing the opposite way, strongly
    agg = aggregate(x, "robust")
    expected = np.ones(12, dtype=bool)
    expected[5] = False
    np.testing.assert_array_equal(agg.inlier, expected)
    keep = x[expected].reshape(11, -1).mean(0)
    np.testing.assert_allclose(agg.unit, keep / np.linalg.norm(keep), rtol=1e-10, atol=1e-12)
    assert _cos(agg.unit, d) > 0.99
    assert _cos(aggregate(x, "mean").unit, d) < _cos(agg.unit, d)  # the outlier does hurt the mean
    assert agg.per_image_cosine[5] < -0.9
    assert agg.scale == pytest.approx(natural_scale(x[expected].reshape(11, -1), agg.unit))
    assert len(agg.info["loo_cosine"]) == 12


def test_probe_recovers_a_planted_separating_normal():
    rng = np.random.default_rng(4)
    n, steps, shape = 400, 3, (3, 2, 2)
    dim = int(np.prod(shape))
    w = rng.standard_normal(dim)
    latents = rng.standard_normal((n, dim))
    labels = latents @ w > 0
    controls = rng.standard_normal((n, steps, *shape))
    controls[:, 0] += w.reshape(shape)  # so that the controls project positively on the normal
    agg = aggregate(controls, "probe", latents=latents, labels=labels)
    assert _cos(agg.unit[:dim], w) > 0.95
    np.testing.assert_array_equal(agg.unit[dim:], 0.0)  # a control on the first Euler step only
    assert agg.info["positives"] == int(labels.sum())
    assert agg.info["probe_train_accuracy"] > 0.95
    # strength 1 = the labelled groups' mean separation along the normal, each half's normal on the other half
    seps = agg.info["held_out_separation"]
    assert len(seps) == 2 and agg.scale == pytest.approx(np.mean(seps))
    proj = latents @ agg.unit[:dim]
    assert agg.scale == pytest.approx(float(proj[labels].mean() - proj[~labels].mean()), rel=0.1)
    assert agg.scale > 1.0  # not the controls' step-0 projection (~0.1 here)


def test_probe_scale_is_measured_out_of_sample():
    """Labels unrelated to the latents, more dimensions than images: the separator's in-sample margin is
    large, the separation it finds on held-out latents is not, and strength 1 follows the held-out one."""
    rng = np.random.default_rng(7)
    latents = rng.standard_normal((60, 600))
    labels = rng.random(60) > 0.5
    controls = np.zeros((60, 2, 600))
    controls[:, 0] = 0.01
    agg = aggregate(controls, "probe", latents=latents, labels=labels)
    proj = latents @ agg.unit[:600]
    in_sample = float(proj[labels].mean() - proj[~labels].mean())
    assert agg.info["probe_train_accuracy"] == 1.0 and in_sample > 5.0
    assert agg.scale < 0.25 * in_sample
    assert np.mean(agg.info["held_out_separation"]) < 0  # noise: the separator does not carry over ...
    assert "does not separate held-out latents" in agg.info["probe_note"]  # ... and the direction says so


def test_probe_needs_latents_and_both_labels():
    x = np.ones((4, 1, 1, 2, 2))
    with pytest.raises(ValueError, match="needs latents and labels"):
        aggregate(x, "probe")
    with pytest.raises(ValueError, match="all labels equal"):
        aggregate(x, "probe", latents=np.random.default_rng(0).standard_normal((4, 4)), labels=np.ones(4))


def test_scale_falls_back_to_median_absolute_projection_when_median_is_not_positive():
    # three small controls against the mean and one large one with it: the median projection is negative
    controls = np.array([-1.0, -1.0, -1.0, 10.0]).reshape(4, 1, 1, 1, 1) * np.ones((1, 1, 1, 2, 2))
    agg = aggregate(controls, "mean")
    proj = controls.reshape(4, -1) @ agg.unit
    assert np.median(proj) < 0
    assert agg.scale == pytest.approx(float(np.median(np.abs(proj))))
    assert "scale_note" in agg.info


def test_natural_scale_is_the_median_projection():
    x = np.array([[1.0, 0.0], [3.0, 1.0], [10.0, -2.0], [-1.0, 5.0], [2.0, 2.0]])
    unit = np.array([1.0, 0.0])
    assert natural_scale(x, unit) == 2.0
    agg = aggregate(x.reshape(5, 1, 1, 1, 2), "mean")
    assert agg.scale == pytest.approx(float(np.median(x @ agg.unit)))


def test_split_half_cosine_separates_consistent_from_random_controls():
    x, _ = _consistent(n=20, noise=0.1)
    assert split_half_cosine(x, "mean") > 0.98
    rng = np.random.default_rng(6)
    random_controls = rng.standard_normal((20, 4, 3, 8, 8))
    assert abs(split_half_cosine(random_controls, "mean")) < 0.1
    assert math.isnan(split_half_cosine(x[:3], "mean"))  # too few images to split
    # the split is seeded: same seed, same answer; the halves depend on it
    assert split_half_cosine(random_controls, seed=3) == split_half_cosine(random_controls, seed=3)
    assert split_half_cosine(random_controls, seed=3) != split_half_cosine(random_controls, seed=4)


def test_unknown_aggregator_and_empty_input_raise():
    x = np.ones((3, 1, 1, 2, 2))
    with pytest.raises(ValueError, match="unknown aggregator 'median'"):
        aggregate(x, "median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no successfully optimized images"):
        aggregate(np.zeros((0, 1, 1, 2, 2)), "mean")
    with pytest.raises(ValueError, match="zero or not finite"):
        aggregate(np.zeros((3, 1, 1, 2, 2)), "mean")
    assert set(METHODS) == {"mean", "pc1", "pca", "probe", "robust"}


# --- resample_steps ------------------------------------------------------------------------------

def _vector(n: int, seed: int = 0, shape=(3, 4, 4)) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32))


def test_resample_identity_for_same_step_count():
    v = _vector(5)
    assert torch.equal(resample_steps(v, 5), v)


@pytest.mark.parametrize(("n", "m"), [(4, 8), (8, 4), (5, 7), (7, 3), (10, 1), (1, 6), (20, 100)])
def test_resample_preserves_the_total_offset(n, m):
    v = _vector(n, seed=n * 31 + m)
    out = resample_steps(v, m)
    assert out.shape == (m, *v.shape[1:]) and out.dtype == v.dtype
    torch.testing.assert_close(out.double().sum(0), v.double().sum(0), rtol=1e-5, atol=1e-5)


def test_resample_preserves_offsets_over_aligned_sub_intervals():
    v = _vector(4, seed=1)
    torch.testing.assert_close(resample_steps(resample_steps(v, 8), 4), v, rtol=1e-6, atol=1e-6)
    w = _vector(10, seed=2)
    out = resample_steps(w, 5)
    torch.testing.assert_close(out, w[0::2] + w[1::2], rtol=1e-6, atol=1e-6)
    # N = 6 -> M = 4: the grids meet at s = 1/2, so each half keeps its offset
    x = _vector(6, seed=3)
    y = resample_steps(x, 4)
    torch.testing.assert_close(y[:2].sum(0), x[:3].sum(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y[2:].sum(0), x[3:].sum(0), rtol=1e-5, atol=1e-5)


def test_resample_spreads_each_step_evenly():
    v = _vector(3, seed=4)
    up = resample_steps(v, 6)
    torch.testing.assert_close(up[0::2], v / 2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(up[1::2], v / 2, rtol=1e-6, atol=1e-7)
    # N = 2 -> M = 3: new steps cover [0, 2/3), [2/3, 4/3), [4/3, 2) in units of old steps
    w = _vector(2, seed=5)
    out = resample_steps(w, 3)
    torch.testing.assert_close(out[0], 2 / 3 * w[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[1], (w[0] + w[1]) / 3, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out[2], 2 / 3 * w[1], rtol=1e-6, atol=1e-7)


def test_resample_rejects_non_positive_step_count():
    with pytest.raises(ValueError, match="n_steps must be >= 1"):
        resample_steps(_vector(3), 0)


# --- compose_controls ----------------------------------------------------------------------------

def test_compose_adds_strengths_linearly():
    a = _direction("a", _vector(4, 10).numpy())
    b = _direction("b", _vector(4, 11).numpy())
    out = compose_controls([EditSpec(a, 1.5), EditSpec(b, -0.5)], 4)
    assert out.dtype == torch.float32 and out.shape == (4, 3, 4, 4)
    np.testing.assert_allclose(out.numpy(), 1.5 * a.vector - 0.5 * b.vector, rtol=1e-5, atol=1e-6)
    resampled = compose_controls([EditSpec(a, 2.0), EditSpec(b, 1.0)], 6)
    expected = 2.0 * resample_steps(torch.from_numpy(a.vector), 6) + resample_steps(torch.from_numpy(b.vector), 6)
    torch.testing.assert_close(resampled, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(compose_controls([EditSpec(a, 0.0)], 4).numpy(), 0.0)


def test_compose_project_out_removes_the_components():
    a = _direction("a", _vector(4, 20).numpy())
    b = _direction("b", _vector(4, 21).numpy())
    c = _direction("c", _vector(8, 22).numpy())  # another step count: resampled before projecting
    one = compose_controls([EditSpec(a, 1.0)], 4, project_out=[b]).double().ravel()
    b_unit = b.unit.astype(np.float64).ravel()
    b_unit /= np.linalg.norm(b_unit)
    assert abs(float(one.numpy() @ b_unit)) < 1e-5 * np.linalg.norm(a.vector)
    # only the component along b goes: the rest of a is untouched
    a_flat = a.vector.astype(np.float64).ravel()
    np.testing.assert_allclose(one.numpy(), a_flat - (a_flat @ b_unit) * b_unit, rtol=1e-5, atol=1e-6)

    two = compose_controls([EditSpec(a, 2.0)], 4, project_out=[b, c]).double().ravel().numpy()
    c4 = resample_steps(torch.from_numpy(c.vector), 4).double().ravel().numpy()
    for removed in (b.vector.astype(np.float64).ravel(), c4):
        assert abs(two @ removed) / np.linalg.norm(removed) < 1e-5 * np.linalg.norm(a.vector)
    basis, _ = np.linalg.qr(np.stack([b.vector.astype(np.float64).ravel(), c4], axis=1))
    np.testing.assert_allclose(two, 2 * a_flat - basis @ (basis.T @ (2 * a_flat)), rtol=1e-5, atol=1e-5)
    assert np.linalg.norm(two) > 0.5 * np.linalg.norm(2 * a_flat)  # random directions: most of a stays


def test_compose_rejects_mixed_image_shapes_and_nothing_to_apply():
    a = _direction("a", _vector(4, 30).numpy())
    small = _direction("small", _vector(4, 31, shape=(3, 2, 2)).numpy())
    with pytest.raises(ValueError, match="different image shapes"):
        compose_controls([EditSpec(a, 1.0), EditSpec(small, 1.0)], 4)
    with pytest.raises(ValueError, match="different image shapes"):
        compose_controls([EditSpec(a, 1.0)], 4, project_out=[small])
    with pytest.raises(ValueError, match="no direction"):
        compose_controls([], 4)


# --- check_compatible / apply / sweep on a tiny field ---------------------------------------------

class TinyField(VelocityField):
    """An affine field v(x, t) = conv1x1(x) + 0.1 t on (3, 8, 8) images: cheap and exactly affine."""

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x) + 0.1 * t.view(-1, 1, 1, 1)


def tiny_field(seed: int = 0, size: int = 8) -> TinyField:
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(3, 3, 1)
    with torch.no_grad():
        conv.weight.copy_(0.2 * torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(0.05 * torch.randn(conv.bias.shape, generator=gen))
    return TinyField(conv, (3, size, size), f"tiny-{seed}")


def test_check_compatible_refuses_other_shapes_and_other_models():
    field, other = tiny_field(0), tiny_field(1)
    assert field.fingerprint() != other.fingerprint()
    good = _direction("good", _vector(4, 40, shape=(3, 8, 8)).numpy(), model_fingerprint=field.fingerprint())
    check_compatible(good, field)
    check_compatible(replace(good, model_fingerprint=""), other)  # unknown provenance: allowed
    wrong_shape = _direction("wide", _vector(4, 41, shape=(3, 16, 16)).numpy())
    with pytest.raises(ValueError, match=r"shape \(3, 16, 16\).*\(3, 8, 8\)"):
        check_compatible(wrong_shape, field)
    with pytest.raises(ValueError, match=r"shape"):
        check_compatible(wrong_shape, field, force=True)  # --force never bridges a shape mismatch
    with pytest.raises(ValueError, match="another model") as err:
        check_compatible(good, other)
    assert "--force" in str(err.value) and "\n" not in str(err.value)
    check_compatible(good, other, force=True)


def test_apply_controls_matches_integrate_with_a_constant_control():
    field = tiny_field(2)
    z0 = 0.1 * torch.randn(2, 3, 8, 8)
    control = 0.01 * torch.randn(5, 3, 8, 8)
    got = apply_controls(field, z0, control, 5)
    expected = integrate(field, z0, TimeGrid.uniform(5), control.unsqueeze(1).expand(5, 2, 3, 8, 8).clone(),
                         keep_states=False).final
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(apply_controls(field, z0, None, 5),
                               integrate(field, z0, TimeGrid.uniform(5), keep_states=False).final)


def test_edits_branch_off_the_unedited_trajectory_at_their_first_active_step():
    field = tiny_field(2)
    z0 = 0.1 * torch.randn(2, 3, 8, 8)
    control = 0.01 * torch.randn(6, 3, 8, 8)
    control[:2] = 0
    assert first_active_step(control) == 2 and first_active_step(None) == 0
    assert first_active_step(torch.zeros(6, 3, 8, 8)) == 6
    branch = uncontrolled_state(field, z0, 6, 2)
    torch.testing.assert_close(branch, integrate(field, z0, TimeGrid.uniform(6), keep_states=True).states[2],
                               rtol=0, atol=0)
    for c in (control, None):
        torch.testing.assert_close(apply_controls(field, branch, c, 6, start_step=2),
                                   apply_controls(field, z0, c, 6), rtol=0, atol=0)
    with pytest.raises(ValueError, match="nonzero before step 3"):
        apply_controls(field, uncontrolled_state(field, z0, 6, 3), control, 6, start_step=3)


def test_sweep_strength_zero_is_the_unedited_image_and_edits_scale_linearly():
    field = tiny_field(3)
    z0 = 0.1 * torch.randn(3, 3, 8, 8)
    direction = _direction("d", 0.01 * _vector(4, 50, shape=(3, 8, 8)).numpy())
    judged = []

    def judge(images: torch.Tensor) -> dict[str, torch.Tensor]:
        judged.append(images.shape)
        return {"brightness": images.mean((1, 2, 3))}

    result = sweep(field, z0, direction, [-1.0, 0.0, 1.0, 2.0], 4, judge=judge)
    assert result.strengths == [-1.0, 0.0, 1.0, 2.0]
    assert result.images.shape == (4, 3, 3, 8, 8)
    assert set(result.metrics) == {"l1", "brightness"}  # no clip given: no clip curve
    assert all(v.shape == (4, 3) for v in result.metrics.values())
    assert judged == [(3, 3, 8, 8)] * 4
    # every strength's metrics are those of its own images (not the unedited ones), which differ per strength
    brightness = result.images.mean((2, 3, 4)).numpy()
    assert np.abs(brightness[[0, 2, 3]] - brightness[1]).min() > 1e-5
    np.testing.assert_allclose(result.metrics["brightness"], brightness, rtol=1e-6)
    l1 = (result.images - result.images[1]).abs().mean((2, 3, 4)).numpy()
    np.testing.assert_allclose(result.metrics["l1"], l1, rtol=1e-6)
    clip = random_clip("flowgrad-tiny-clip", seed=0)
    scored = sweep(field, z0, direction, [-1.0, 0.0, 1.0, 2.0], 4, clip=clip, prompt="a bright square")
    assert set(scored.metrics) == {"l1", "clip"}
    torch.testing.assert_close(scored.images, result.images, rtol=0, atol=0)
    with torch.no_grad():
        text = clip.encode_text(["a bright square"])[0]
        own = torch.stack([clip.encode_image(x) @ text for x in result.images]).numpy()
    assert np.abs(own[[0, 2, 3]] - own[1]).min() > 1e-6
    np.testing.assert_allclose(scored.metrics["clip"], own, rtol=1e-5, atol=1e-6)
    unedited = field.to_image(integrate(field, z0, TimeGrid.uniform(4), keep_states=False).final).clamp(0, 1)
    assert torch.equal(result.images[1], unedited)
    np.testing.assert_array_equal(result.metrics["l1"][1], 0.0)
    assert (result.metrics["l1"][[0, 2, 3]] > 0).all()
    # the field is affine and nothing is clamped here, so the change is linear in the strength
    assert result.images.min() > 0 and result.images.max() < 1
    np.testing.assert_allclose(result.metrics["l1"][0], result.metrics["l1"][2], rtol=1e-3)
    np.testing.assert_allclose(result.metrics["l1"][3], 2 * result.metrics["l1"][2], rtol=1e-3)
    np.testing.assert_allclose(result.metrics["brightness"][1], unedited.mean((1, 2, 3)).numpy(), rtol=1e-6)
    assert result.mean_metrics()["l1"][1] == 0.0 and len(result.mean_metrics()["brightness"]) == 4


def test_sweep_with_the_direction_projected_out_changes_nothing():
    field = tiny_field(4)
    z0 = 0.1 * torch.randn(2, 3, 8, 8)
    direction = _direction("d", 0.01 * _vector(4, 60, shape=(3, 8, 8)).numpy())
    result = sweep(field, z0, direction, [1.0, 3.0], 4, project_out=[direction])
    assert result.metrics["l1"].max() < 1e-6


def test_parse_strengths():
    assert parse_strengths("-1:1:3") == [-1.0, 0.0, 1.0]
    assert parse_strengths("0,0.5, 1") == [0.0, 0.5, 1.0]
    for bad in ("1:2", "a,b", "0:1:0"):
        with pytest.raises(ValueError, match="--strengths"):
            parse_strengths(bad)


# --- discover() on the demo model ----------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_models():
    if not (DEMO / "flow.pt").is_file() or not (DEMO / "tiny_clip.pt").is_file():
        pytest.skip("demo weights are not in data/demo")
    from flowgrad.models import load_guidance_clip, load_model

    return load_model("demo"), load_guidance_clip("demo")


def tiny_config(**changes) -> DiscoveryConfig:
    base = DiscoveryConfig(name="old", prompt="a photo of an old person",
                           negative_prompt="a photo of a young person", n_images=4, batch_size=2, replicas=1,
                           flowgrad=FlowGradConfig(n_steps=4, iterations=1, lr=0.2), keep_offsets=True)
    return replace(base, **changes)


@pytest.fixture(scope="module")
def discovered(demo_models, tmp_path_factory):
    velocity, clip = demo_models
    store = tmp_path_factory.mktemp("discover") / "dirs.h5"
    batches: list[int] = []
    # fixed augmentations: each image's "improved" decision compares passes on one objective, so all four
    # images keep their edit (with a fresh draw per pass, one step of this tiny setting is a coin toss)
    direction = discover(tiny_config(fixed_augmentations=True), velocity, clip, store,
                         progress=lambda p: batches.append(p.batch))
    return direction, store, batches


def test_discover_writes_a_direction_with_the_contract(discovered, demo_models):
    direction, store, batches = discovered
    velocity, _ = demo_models
    assert sorted(set(batches)) == [0, 1]
    assert not partial_dir(store, "old").exists()  # the checkpoint goes once the store has the result
    with DirectionStore(store).lock():  # and the job let go of the lock
        pass
    with h5py.File(store, "r") as f:
        assert f.attrs["format"] == "flowgrad-directions" and f.attrs["format_version"] == 1
        group = f["directions/old"]
        missing = [a for a in CONTRACT_ATTRS if a not in group.attrs]
        assert not missing, f"contract attributes missing: {missing}"
        assert group["vector"].dtype == np.float32 and group["vector"].shape == (4, 3, 64, 64)
        json.loads(group.attrs["settings"])
    d = DirectionStore(store).read("old", offsets=True)
    assert d.vector.shape == (4, 3, 64, 64) and d.image_shape == (3, 64, 64) and d.n_steps == 4
    np.testing.assert_array_equal(d.vector, direction.vector)
    assert d.scale == pytest.approx(float(np.linalg.norm(d.vector.astype(np.float64))), rel=1e-6)
    assert (d.prompt, d.negative_prompt, d.method) == ("a photo of an old person", "a photo of a young person",
                                                        "mean")
    ok = d.records["status"] == "ok"
    assert (d.model, d.clip) == ("demo", "demo") and d.n_images == int(ok.sum()) == 4
    assert d.model_fingerprint == velocity.fingerprint()
    assert d.time_window == (0.0, 1.0) and d.eps == pytest.approx(1e-3)
    assert d.flowgrad_version == flowgrad.__version__
    assert datetime.fromisoformat(d.created_at).tzinfo is not None
    assert d.settings["flowgrad"]["n_steps"] == 4 and d.settings["n_images"] == 4
    assert d.settings["model_fingerprint"] == velocity.fingerprint()
    for column in RECORD_COLUMNS:
        assert column in d.records and len(d.records[column]) == 4, column
    assert all(s == "ok" or s.startswith("skipped") for s in d.records["status"])
    assert (d.records["loss_after"] <= d.records["loss_before"] + 1e-6).all()  # best includes iteration 0
    assert np.isfinite(d.records["clip_before"]).all() and np.isfinite(d.records["clip_after"]).all()
    assert math.isfinite(d.split_half_cosine) and -1.0 <= d.split_half_cosine <= 1.0


def test_discover_mean_path_agrees_with_aggregate(discovered):
    """The all-reduce mean path of discover() gives what aggregate() gives on the stored controls."""
    _, store, _ = discovered
    d = DirectionStore(store).read("old", offsets=True)
    assert d.offsets is not None and d.offsets.shape == (4, 4, 3, 64, 64)
    ok = d.records["status"] == "ok"
    controls = d.offsets[ok].astype(np.float64)
    agg = aggregate(controls, "mean")
    np.testing.assert_allclose(d.vector, (agg.unit * agg.scale).reshape(d.vector.shape), rtol=1e-4, atol=1e-7)
    assert d.split_half_cosine == pytest.approx(split_half_cosine(controls, "mean", seed=0), abs=1e-6)
    flat = d.offsets.reshape(4, -1).astype(np.float64)
    np.testing.assert_allclose(d.records["control_norm"], np.linalg.norm(flat, axis=1), rtol=1e-5)
    cos = flat @ d.vector.ravel() / (np.linalg.norm(flat, axis=1) * np.linalg.norm(d.vector))
    np.testing.assert_allclose(d.records["cosine_to_direction"][ok], cos[ok], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("block_elements", [1 << 25, 96])
def test_mean_path_batch_by_batch_equals_aggregate_on_all_controls(monkeypatch, device, block_elements):
    """The batch-wise mean aggregation (uneven last batch, skipped images, batches split into blocks of rows,
    on the host or the GPU) equals aggregate() on all rows."""
    discover_module = importlib.import_module("directions.discover")
    monkeypatch.setattr(discover_module, "BLOCK_ELEMENTS", block_elements)  # 96: two rows of 48 per block
    cfg = tiny_config(n_images=11, batch_size=4, seed=3)
    rng = np.random.default_rng(5)
    controls = (rng.standard_normal((11, 4, 3, 2, 2)) + 0.5).astype(np.float32)
    ok = np.ones(11, dtype=bool)
    ok[[1, 6]] = False
    controls[6] = 1e3  # a skipped image must not enter any sum
    controls[1, 0, 0, 0, 0] = np.nan  # nor a non-finite one
    local = {b: ({"controls": controls[cfg.batch_indices(b)]}, {}) for b in range(cfg.n_batches)}
    unit, scale, cosine, half = discover_module._mean_direction(cfg, local, list(range(cfg.n_batches)), ok, 48,
                                                                torch.device(device))
    x = controls.reshape(11, -1).astype(np.float64)
    agg = aggregate(x[ok], "mean")
    np.testing.assert_allclose(unit, agg.unit, rtol=1e-12, atol=1e-14)
    assert scale == pytest.approx(agg.scale, rel=1e-12)
    assert half == pytest.approx(split_half_cosine(x[ok], "mean", seed=3), rel=1e-12)
    finite = np.arange(11) != 1
    np.testing.assert_allclose(cosine[finite], (x @ agg.unit / np.linalg.norm(x, axis=1))[finite], rtol=1e-12)
    assert cosine[1] == 0.0  # a NaN norm gives cosine 0, as before


@pytest.mark.parametrize("method", ["pc1", "probe"])
def test_discover_other_aggregators(discovered, demo_models, tmp_path, method):
    velocity, clip = demo_models
    mean_direction = DirectionStore(discovered[1]).read("old", offsets=True)
    d = discover(tiny_config(aggregator=method, fixed_augmentations=True), velocity, clip, tmp_path / "s.h5")
    assert d.method == method and DirectionStore(tmp_path / "s.h5").read("old").method == method
    # the per-image controls do not depend on the aggregator
    np.testing.assert_allclose(d.offsets, mean_direction.offsets, rtol=1e-5, atol=1e-7)
    if method == "pc1":
        controls = d.offsets[d.records["status"] == "ok"].astype(np.float64)
        agg = aggregate(controls, "pc1")
        np.testing.assert_allclose(d.vector.ravel(), agg.unit * agg.scale, rtol=1e-4, atol=1e-7)
        assert d.split_half_cosine == pytest.approx(split_half_cosine(controls, "pc1", seed=0), abs=1e-6)
    else:
        step0 = np.abs(d.vector[0]).sum()
        assert step0 > 0 and np.abs(d.vector[1:]).sum() == 0  # the probe normal lives in z0 space
        assert "probe_train_accuracy" in d.settings["aggregator_info"]
        info = d.settings["aggregator_info"]  # its own unit of edit when the held-out separation is positive
        own_unit = np.mean(info.get("held_out_separation", [0.0])) > 0
        assert d.settings["scale_statistic"].startswith("probe: the distance") == own_unit


def test_discover_from_a_folder_of_real_images(demo_models, tmp_path):
    """Real images are inverted, optimized and recorded with their file and their round-trip error."""
    from cli.images import load_image, to_pil
    from flowgrad.demo.render import render

    velocity, clip = demo_models
    folder = tmp_path / "faces"
    folder.mkdir()
    renders, _ = render(3, seed=11)
    for name, image in zip(("b", "a", "c"), renders):
        to_pil(image).save(folder / f"{name}.png")
    (folder / "notes.txt").write_text("not an image")
    d = discover(tiny_config(images=str(folder), n_images=3), velocity, clip, tmp_path / "s.h5", load_image=load_image)
    files = [folder / f"{n}.png" for n in "abc"]
    assert list(d.records["source"]) == [str(f) for f in files]
    x1 = velocity.from_image(torch.stack([load_image(f, 64) for f in files]))
    with torch.no_grad():
        z0 = flowgrad.invert(velocity, x1, 4)
        _, expected = flowgrad.reconstruction_error(velocity, x1, z0, 4)
    np.testing.assert_allclose(d.records["reconstruction_rmse"], expected.double().numpy(), rtol=1e-4)
    assert np.all(d.records["reconstruction_rmse"] > 0)
    assert d.vector.shape == (4, 3, 64, 64) and np.isfinite(d.vector).all()
    with pytest.raises(ValueError, match="--n-images 4 but only 3 images"):
        discover(tiny_config(images=str(folder)), velocity, clip, tmp_path / "t.h5", load_image=load_image)
    with pytest.raises(ValueError, match="no images"):
        discover(tiny_config(images=str(tmp_path)), velocity, clip, tmp_path / "u.h5", load_image=load_image)


def test_a_changed_image_folder_is_refused_on_resume_and_during_a_job(demo_models, tmp_path):
    """The job's files (names and sizes) are part of its settings: a resume after the folder changed is
    refused (it would mix images), and so is a batch that finds the folder changed during the run."""
    from cli.images import load_image, to_pil
    from flowgrad.demo.render import render

    velocity, clip = demo_models
    folder = tmp_path / "faces"
    folder.mkdir()
    renders, _ = render(5, seed=12)
    for i, image in enumerate(renders[:4]):
        to_pil(image).save(folder / f"f{i}.png")
    cfg = tiny_config(images=str(folder), n_images=4, keep_offsets=False)
    store = tmp_path / "s.h5"

    def stop_after_first_batch(p: BatchProgress) -> None:
        if p.batch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        discover(cfg, velocity, clip, store, load_image=load_image, progress=stop_after_first_batch)
    to_pil(renders[4]).save(folder / "a_new.png")  # sorts first: every later index would move
    with pytest.raises(ValueError, match="settings differ .* images_digest"):
        discover(cfg, velocity, clip, store, resume=True, load_image=load_image)
    (folder / "a_new.png").unlink()
    resumed = discover(cfg, velocity, clip, store, resume=True, load_image=load_image)
    assert list(resumed.records["source"]) == [str(folder / f"f{i}.png") for i in range(4)]
    assert len(resumed.settings["images_digest"]) == 64

    def change_the_folder(p: BatchProgress) -> None:
        if p.batch == 0 and not (folder / "a_new.png").exists():  # batch 1 then finds another folder
            to_pil(renders[4]).save(folder / "a_new.png")

    with pytest.raises(ValueError, match="changed during the job"):
        discover(cfg, velocity, clip, tmp_path / "t.h5", load_image=load_image, progress=change_the_folder)


def test_config_refuses_a_bad_name_or_window_and_discover_an_existing_name(discovered, demo_models):
    with pytest.raises(ValueError, match="name must be a non-empty str"):
        tiny_config(name=".")
    with pytest.raises(ValueError, match=r"probe puts its direction on the first step .* use --t-window 0 1"):
        tiny_config(aggregator="probe", flowgrad=FlowGradConfig(n_steps=4, iterations=1, t_window=(0.3, 1.0)))
    with pytest.raises(ValueError, match="t_start < t_end"):
        tiny_config(flowgrad=FlowGradConfig(n_steps=4, iterations=1, t_window=(0.001, 0.001)))
    _, store, _ = discovered
    before = (store.stat().st_mtime_ns, DirectionStore(store).names())
    calls: list[BatchProgress] = []
    with pytest.raises(ValueError, match="direction 'old' already exists"):
        discover(tiny_config(), *demo_models, store, overwrite=False, progress=calls.append)
    assert not calls  # refused before any work
    assert (store.stat().st_mtime_ns, DirectionStore(store).names()) == before
    assert not partial_dir(store, "old").exists()


def test_real_images_are_inverted_only_down_to_the_window(demo_models, tmp_path):
    """With a late window, real images make the shorter round trip t = 1 -> window start -> t = 1."""
    from cli.images import load_image, to_pil
    from flowgrad.demo.render import render

    velocity, clip = demo_models
    folder = tmp_path / "faces"
    folder.mkdir()
    for i, image in enumerate(render(3, seed=5)[0]):
        to_pil(image).save(folder / f"{i}.png")
    fg = FlowGradConfig(n_steps=8, iterations=1, lr=0.2, t_window=(0.5, 1.0))  # window from step 4
    cfg = tiny_config(images=str(folder), n_images=3, flowgrad=fg)
    assert cfg.start_step == 4 and replace(cfg, invert_to_window=False).start_step == 0
    assert replace(cfg, aggregator="joint", keep_offsets=False).start_step == 0
    assert replace(cfg, images=None).start_step == 0
    short = discover(cfg, velocity, clip, tmp_path / "s.h5", load_image=load_image)
    full = discover(replace(cfg, invert_to_window=False), velocity, clip, tmp_path / "f.h5", load_image=load_image)
    x1 = velocity.from_image(torch.stack([load_image(folder / f"{i}.png", 64) for i in range(3)]))
    grid = flowgrad.TimeGrid.uniform(8).sub(4)
    with torch.no_grad():
        _, expected = flowgrad.reconstruction_error(velocity, x1, flowgrad.invert(velocity, x1, grid), grid)
    np.testing.assert_allclose(short.records["reconstruction_rmse"], expected.double().numpy(), rtol=1e-4)
    assert np.all(short.records["reconstruction_rmse"] < full.records["reconstruction_rmse"])
    assert short.vector.shape == full.vector.shape == (8, 3, 64, 64)
    assert not short.vector[:4].any() and short.vector[4:].any()
    assert short.settings["invert_to_window"] is True and full.settings["invert_to_window"] is False


def test_discover_resumes_to_the_uninterrupted_result(discovered, demo_models, tmp_path):
    velocity, clip = demo_models
    reference = DirectionStore(discovered[1]).read("old", offsets=True)
    cfg = tiny_config(fixed_augmentations=True)  # the fixture's settings
    store = tmp_path / "s.h5"

    def interrupt(p: BatchProgress) -> None:
        if p.batch >= 1:  # batch 0 is saved by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        discover(cfg, velocity, clip, store, progress=interrupt)
    partial = partial_dir(store, "old")
    assert sorted(p.name for p in partial.glob("batch_*.npz")) == ["batch_000000.npz"]
    assert not store.exists()

    with pytest.raises(ValueError, match="pass --resume") as err:
        discover(cfg, velocity, clip, store)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="settings differ") as err:
        discover(replace(cfg, alpha=0.5), velocity, clip, store, resume=True)
    assert "alpha" in str(err.value) and "\n" not in str(err.value)
    assert sorted(p.name for p in partial.glob("batch_*.npz")) == ["batch_000000.npz"]

    batches: list[int] = []
    resumed = discover(cfg, velocity, clip, store, resume=True, progress=lambda p: batches.append(p.batch))
    assert set(batches) == {1}  # batch 0 came from the checkpoint
    assert not partial.exists()
    stored = DirectionStore(store).read("old", offsets=True)
    for got in (resumed.vector, stored.vector):
        rel = np.linalg.norm((got - reference.vector).astype(np.float64)) / np.linalg.norm(reference.vector)
        assert rel <= 1e-5
    np.testing.assert_allclose(stored.offsets, reference.offsets, rtol=1e-5, atol=1e-7)
    for column in RECORD_COLUMNS:
        np.testing.assert_array_equal(stored.records[column], reference.records[column]) \
            if stored.records[column].dtype.kind == "U" else \
            np.testing.assert_allclose(stored.records[column], reference.records[column], rtol=1e-5, atol=1e-7)
    assert stored.split_half_cosine == pytest.approx(reference.split_half_cosine, abs=1e-5)


class _MemoryLimited:
    """The demo flow, but any call with more than ``limit`` images raises an out-of-memory error."""

    def __init__(self, velocity, limit: int):
        self._velocity, self._limit = velocity, limit
        self.largest = 0

    def __getattr__(self, name):
        return getattr(self._velocity, name)

    def __call__(self, x, t):
        if x.shape[0] > self._limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        self.largest = max(self.largest, x.shape[0])
        return self._velocity(x, t)


def test_discover_halves_a_batch_on_out_of_memory_and_loses_nothing(demo_models, tmp_path, caplog):
    velocity, clip = demo_models
    limited = _MemoryLimited(velocity, limit=1)
    with caplog.at_level("WARNING", logger="directions.discover"):
        d = discover(tiny_config(batch_size=4), limited, clip, tmp_path / "s.h5")
    assert limited.largest == 1
    assert "out of memory with 4 images; continuing in halves of 2 and 2" in caplog.text
    assert "out of memory with 2 images" in caplog.text
    stored = DirectionStore(tmp_path / "s.h5").read("old", offsets=True)
    np.testing.assert_array_equal(stored.records["index"], [0, 1, 2, 3])  # every image, in order
    assert stored.offsets.shape == (4, 4, 3, 64, 64) and np.isfinite(stored.vector).all()
    np.testing.assert_array_equal(stored.vector, d.vector)
    assert not partial_dir(tmp_path / "s.h5", "old").exists()
    # each image draws its own augmentations, so the halves give what the whole batch gives
    whole = discover(tiny_config(batch_size=4), velocity, clip, tmp_path / "whole.h5")
    _assert_same_result(d, whole)


def _assert_same_result(d, reference) -> None:
    """Equal up to float rounding (the CPU's convolutions round differently for other batch sizes)."""
    rel = np.linalg.norm((d.vector - reference.vector).astype(np.float64)) / np.linalg.norm(reference.vector)
    assert rel <= 1e-4, rel
    np.testing.assert_array_equal(d.records["status"], reference.records["status"])
    np.testing.assert_allclose(d.records["loss_after"], reference.records["loss_after"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("joint", [False, True], ids=["mean", "joint"])
def test_discovery_does_not_depend_on_the_batch_size(joint_discovered, demo_models, tmp_path, joint):
    """Latents and CLIP augmentations are seeded per image: batches of 4 or 1 give the batches-of-2 result."""
    velocity, clip = demo_models
    config = joint_config if joint else tiny_config
    reference = joint_discovered[0] if joint else discover(config(), velocity, clip, tmp_path / "b2.h5")
    for batch_size in (4, 1):
        _assert_same_result(discover(config(batch_size=batch_size), velocity, clip, tmp_path / f"b{batch_size}.h5"),
                            reference)


def test_discover_out_of_memory_with_one_image_is_a_one_line_error(demo_models, tmp_path):
    velocity, clip = demo_models
    with pytest.raises(RuntimeError, match="out of CPU memory with a single image") as err:
        discover(tiny_config(), _MemoryLimited(velocity, limit=0), clip, tmp_path / "s.h5")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s.h5").exists()


# --- the joint method: one control shared by all images ------------------------------------------

def joint_config(**changes) -> DiscoveryConfig:
    base = {"aggregator": "joint", "keep_offsets": False, "replicas": 4,
            "flowgrad": FlowGradConfig(n_steps=4, iterations=2, lr=4.0, threshold=None)}
    return tiny_config(**(base | changes))


@pytest.fixture(scope="module")
def joint_discovered(demo_models, tmp_path_factory):
    velocity, clip = demo_models
    store = tmp_path_factory.mktemp("joint") / "dirs.h5"
    return discover(joint_config(), velocity, clip, store), store


def test_joint_first_step_is_minus_lr_times_the_mean_per_image_gradient(demo_models, tmp_path):
    """One SGD step on the shared control = -lr * (mean over all images of d loss_i / d u_i at u = 0),
    each per-image gradient computed independently by exact backprop with the same augmentation draws."""
    from directions.discover import _batch_inputs
    from directions.seeds import augment_seed
    from flowgrad.backprop import control_gradients
    from flowgrad.clip_guidance import ClipLoss

    velocity, clip = demo_models
    cfg = tiny_config(aggregator="joint", keep_offsets=False, replicas=4,
                      flowgrad=FlowGradConfig(n_steps=4, iterations=1, lr=4.0, threshold=None))
    d = discover(cfg, velocity, clip, tmp_path / "s.h5")
    assert d.method == "joint" and d.settings["aggregator_info"]["best_iteration"] == 1
    grads = []
    for b in range(cfg.n_batches):
        idx = list(cfg.batch_indices(b))
        z0, source, _, _, _ = _batch_inputs(cfg, velocity, idx, torch.device("cpu"), None)
        loss = ClipLoss(clip, cfg.prompt, negative_prompt=cfg.negative_prompt, source=source, alpha=cfg.alpha,
                        replicas=cfg.replicas, image_seeds=[augment_seed(cfg.seed, i, 0) for i in idx])
        res = control_gradients(velocity, z0, None, lambda x: loss(velocity.to_image(x)), 4)
        grads.append(res.gradients)
    expected = -4.0 * torch.cat(grads, 1).mean(1).numpy()
    rel = np.linalg.norm(d.vector - expected) / np.linalg.norm(expected)
    assert rel <= 1e-4
    assert d.scale == pytest.approx(float(np.linalg.norm(d.vector.astype(np.float64))), rel=1e-6)
    np.testing.assert_allclose(d.records["control_norm"], d.scale, rtol=1e-5)


def test_joint_direction_contract_and_records(joint_discovered):
    d, store = joint_discovered
    stored = DirectionStore(store).read("old")
    np.testing.assert_array_equal(stored.vector, d.vector)
    assert stored.method == "joint" and stored.n_images == 4 and stored.offsets is None
    for column in RECORD_COLUMNS:
        assert column in stored.records and len(stored.records[column]) == 4, column
    assert (stored.records["status"] == "ok").all()
    best = stored.settings["aggregator_info"]["best_iteration"]
    losses = stored.settings["aggregator_info"]["mean_loss_per_iteration"]
    assert best >= 1 and losses[best] == pytest.approx(min(losses)) and losses[best] < losses[0]
    assert stored.records["loss_after"].mean() == pytest.approx(losses[best], rel=1e-6)
    assert -1.0 <= stored.split_half_cosine <= 1.0
    assert np.isfinite(stored.records["cosine_to_direction"]).all()
    assert not partial_dir(store, "old").exists()


@pytest.mark.parametrize("fixed", [False, True], ids=["fresh-augmentations", "fixed-augmentations"])
def test_joint_resumes_to_the_uninterrupted_result(joint_discovered, demo_models, tmp_path, fixed):
    velocity, clip = demo_models
    cfg = joint_config(fixed_augmentations=fixed)
    reference = discover(cfg, velocity, clip, tmp_path / "ref.h5") if fixed else joint_discovered[0]
    if fixed:  # every pass scores the same augmentations, so the result is not the fresh draws' one
        assert not np.array_equal(reference.vector, joint_discovered[0].vector)
    store = tmp_path / "s.h5"

    def interrupt(p: BatchProgress) -> None:
        if p.iteration >= 2:  # the states after iterations 0 and 1 are saved by now
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        discover(cfg, velocity, clip, store, progress=interrupt)
    partial = partial_dir(store, "old")
    assert sorted(p.name for p in partial.glob("batch_*.npz")) == ["batch_000001.npz"]  # only the latest
    iterations: list[int] = []
    resumed = discover(cfg, velocity, clip, store, resume=True,
                       progress=lambda p: iterations.append(p.iteration))
    assert min(iterations) == 2  # iterations 0 and 1 came from the checkpoint
    rel = np.linalg.norm((resumed.vector - reference.vector).astype(np.float64)) / np.linalg.norm(reference.vector)
    assert rel <= 1e-5
    for column in ("loss_before", "loss_after", "clip_after", "cosine_to_direction"):
        np.testing.assert_allclose(resumed.records[column], reference.records[column], rtol=1e-5, atol=1e-7)
    assert resumed.split_half_cosine == pytest.approx(reference.split_half_cosine, abs=1e-5)


def test_joint_refuses_keep_offsets():
    with pytest.raises(ValueError, match="--keep-offsets") as err:
        joint_config(keep_offsets=True)
    assert "\n" not in str(err.value)


def test_joint_halves_a_batch_on_out_of_memory_and_gives_the_whole_batch_result(joint_discovered, demo_models,
                                                                                tmp_path, caplog):
    velocity, clip = demo_models
    limited = _MemoryLimited(velocity, limit=1)
    with caplog.at_level("WARNING", logger="directions.joint"):
        d = discover(joint_config(), limited, clip, tmp_path / "s.h5")
    assert limited.largest == 1
    # the inputs of both batches of 2, then each batch's first pass; later passes reuse the halves
    assert caplog.text.count("out of memory making 2 inputs; making them in halves of 1 and 1") == 2
    assert caplog.text.count("out of memory with 2 images; continuing in halves of 1 and 1") == 2
    stored = DirectionStore(tmp_path / "s.h5").read("old")
    np.testing.assert_array_equal(stored.records["index"], [0, 1, 2, 3])
    np.testing.assert_array_equal(stored.vector, d.vector)
    _assert_same_result(d, joint_discovered[0])  # every image's loss is its own: the halves give the whole
    for column in ("clip_before", "clip_after", "cosine_to_direction"):
        np.testing.assert_allclose(d.records[column], joint_discovered[0].records[column], rtol=1e-4, atol=1e-6)


def test_joint_out_of_memory_with_one_image_is_a_one_line_error(demo_models, tmp_path):
    velocity, clip = demo_models
    with pytest.raises(RuntimeError, match="out of CPU memory with a single image") as err:
        discover(joint_config(), _MemoryLimited(velocity, limit=0), clip, tmp_path / "s.h5")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "s.h5").exists()


def test_strict_float32_turns_tf32_off_for_a_float32_job_on_a_gpu_only():
    from directions.discover import strict_float32

    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    try:
        _check_strict_float32(strict_float32)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _check_strict_float32(strict_float32) -> None:
    flags = lambda: (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)  # noqa: E731
    with strict_float32("cuda:0", "float32"):
        assert flags() == (False, False)
    assert flags() == (True, True)  # restored
    for device, precision in (("cpu", "float32"), ("cuda", "bf16-autocast")):
        with strict_float32(device, precision):
            assert flags() == (True, True)
    with pytest.raises(KeyboardInterrupt), strict_float32(torch.device("cuda"), "float32"):
        raise KeyboardInterrupt
    assert flags() == (True, True)


def test_default_apply_steps_is_the_papers_n_unless_a_direction_is_finer():
    from directions.apply import APPLY_STEPS, default_apply_steps

    def made_with(n: int) -> Direction:
        return Direction.from_vector(f"d{n}", np.ones((n, 1, 2, 2), np.float32), "p")

    assert APPLY_STEPS == 100
    assert default_apply_steps([made_with(20)]) == 100  # discovery's few steps are not the sampling default
    assert default_apply_steps([made_with(20), made_with(150)]) == 150  # never coarser than a composed direction
    assert default_apply_steps([]) == 100
