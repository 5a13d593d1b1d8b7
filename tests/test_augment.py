"""Differentiable augmentations: gradients, semantics of each op, per-sample independence."""

from __future__ import annotations

import pytest
import torch

from flowgrad.augment import (
    POLICY_OPS, AugmentParams, apply_augment, diff_augment, gaussian_blur, parse_policy, sample_augment_params,
    sample_augment_params_each,
)


def params_for(op: str, rows: list[list[float]]) -> AugmentParams:
    return AugmentParams(policy=(op,), **{op: torch.tensor(rows, dtype=torch.float32)})


@pytest.mark.parametrize("op", POLICY_OPS)
def test_each_op_passes_gradcheck(op):
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    params = sample_augment_params([op], 2, torch.Generator().manual_seed(3))
    assert torch.autograd.gradcheck(lambda t: apply_augment(t, params), (x,))


def test_full_policy_passes_gradcheck_and_keeps_shape():
    x = torch.rand(3, 3, 8, 10, dtype=torch.float64, requires_grad=True)
    params = sample_augment_params("color,translation,resize,cutout", 3,
                                   torch.Generator().manual_seed(0))
    out = apply_augment(x, params)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.autograd.gradcheck(lambda t: apply_augment(t, params), (x,))


def test_rows_act_independently_on_their_sample():
    x = torch.rand(4, 3, 16, 16)
    params = sample_augment_params(POLICY_OPS, 4, torch.Generator().manual_seed(1))
    batch = apply_augment(x, params)
    alone = torch.cat([apply_augment(x[i:i + 1], params.select(i)) for i in range(4)])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-6)
    x2 = x.clone()
    x2[0] = torch.rand(3, 16, 16)
    again = apply_augment(x2, params)
    assert torch.equal(again[1:], batch[1:]) and not torch.equal(again[0], batch[0])


def test_generator_makes_draws_reproducible_and_fresh():
    x = torch.rand(2, 3, 16, 16)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    first, second = diff_augment(x, POLICY_OPS, g1), diff_augment(x, POLICY_OPS, g1)
    assert torch.equal(first, diff_augment(x, POLICY_OPS, g2))
    assert torch.equal(second, diff_augment(x, POLICY_OPS, g2))
    assert not torch.equal(first, second)


def test_each_sample_draws_from_its_own_generator():
    gens = lambda *seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    params = sample_augment_params_each(POLICY_OPS, 3, gens(1, 2, 3))
    assert len(params) == 9 and params.policy == POLICY_OPS
    for i, seed in enumerate((1, 2, 3)):  # rows 3i..3i+2 are what generator i alone draws
        alone = sample_augment_params(POLICY_OPS, 3, torch.Generator().manual_seed(seed))
        for op in POLICY_OPS:
            assert torch.equal(getattr(params.select(slice(3 * i, 3 * i + 3)), op), getattr(alone, op))
    other = sample_augment_params_each(POLICY_OPS, 3, gens(9, 2))  # the neighbour changed: sample 1 did not
    assert torch.equal(other.select(slice(3, 6)).color, params.select(slice(3, 6)).color)
    assert len(sample_augment_params_each("color", 2, [])) == 0


def test_neutral_parameters_are_identity():
    x = torch.rand(2, 3, 12, 12)
    color = params_for("color", [[0.5, 0.5, 0.5]] * 2)  # +0 brightness, x1 saturation/contrast
    torch.testing.assert_close(apply_augment(x, color), x, rtol=0, atol=1e-6)
    resize = params_for("resize", [[0.5]] * 2)  # zoom 1.0
    torch.testing.assert_close(apply_augment(x, resize), x, rtol=0, atol=1e-5)
    assert torch.equal(apply_augment(x, AugmentParams(policy=())), x)


def test_brightness_shifts_by_half_at_the_top_of_its_range():
    x = torch.rand(1, 3, 6, 6)
    out = apply_augment(x, params_for("color", [[1.0 - 1e-7, 0.5, 0.5]]))
    torch.testing.assert_close(out, x + 0.5, rtol=0, atol=1e-5)


def test_saturation_scales_the_deviation_from_the_channel_mean_by_2u():
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    mean_c = x.mean(dim=1, keepdim=True)  # per pixel, over the channels
    out = apply_augment(x, params_for("color", [[0.5, 0.0, 0.5], [0.5, 0.75, 0.5], [0.5, 1.0 - 1e-7, 0.5]]))
    for i, factor in enumerate((0.0, 1.5, 2.0)):  # u = 0: gray; u -> 1: twice the colour
        torch.testing.assert_close(out[i], (x[i] - mean_c[i]) * factor + mean_c[i], rtol=0, atol=1e-6)
    assert torch.allclose(out[0], out[0, :1].expand(3, 6, 6), rtol=0, atol=1e-12)


def test_contrast_scales_the_deviation_from_the_image_mean_by_u_plus_half():
    x = torch.rand(3, 3, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)  # per image, over C, H, W
    out = apply_augment(x, params_for("color", [[0.5, 0.5, 0.0], [0.5, 0.5, 0.25], [0.5, 0.5, 1.0 - 1e-7]]))
    for i, factor in enumerate((0.5, 0.75, 1.5)):
        torch.testing.assert_close(out[i], (x[i] - mean[i]) * factor + mean[i], rtol=0, atol=1e-6)


def test_translation_shifts_by_whole_pixels_with_zero_fill():
    x = torch.rand(1, 3, 16, 16)  # max shift round(16 / 8) = 2, so 5 possible shifts per axis
    down_one = (1 + 2 + 0.5) / 5
    centre = (0 + 2 + 0.5) / 5
    out = apply_augment(x, params_for("translation", [[down_one, centre]]))
    assert torch.equal(out[:, :, 1:], x[:, :, :-1])
    assert torch.equal(out[:, :, 0], torch.zeros_like(out[:, :, 0]))
    left_two = apply_augment(x, params_for("translation", [[centre, 0.0]]))
    assert torch.equal(left_two[..., :-2], x[..., 2:])
    assert not left_two[..., -2:].any()


def test_cutout_zeroes_a_half_size_square_clipped_at_borders():
    x = torch.rand(2, 3, 16, 16) + 0.1  # strictly positive, so zeros come from the cutout
    out = apply_augment(x, params_for("cutout", [[0.5, 0.5], [0.0, 0.0]]))
    zero = out == 0
    assert int(zero[0, 0].sum()) == 8 * 8  # centred square of side 16 / 2
    assert int(zero[1, 0].sum()) == 4 * 4  # centre at the corner: a quarter remains
    assert torch.equal(zero[:, 0], zero[:, 1])  # same square in every channel
    assert torch.equal(out[~zero], x[~zero])


def test_resize_zoom_out_leaves_zero_border_and_zoom_in_does_not():
    x = torch.rand(2, 3, 20, 20) + 0.1
    out = apply_augment(x, params_for("resize", [[0.0], [1.0 - 1e-7]]))  # zoom 0.8 and 1.2
    assert not out[0, :, 0].any() and not out[0, :, :, -1].any()
    assert (out[1] > 0).all()


@pytest.fixture()
def determinism_restored():
    """The test may switch torch.use_deterministic_algorithms; the previous setting comes back after."""
    before = torch.are_deterministic_algorithms_enabled()
    yield
    torch.use_deterministic_algorithms(before)


def test_deterministic_resize_is_grid_sample_as_matrix_products(determinism_restored, monkeypatch):
    """Under deterministic algorithms the resize op runs as two matrix products, without grid_sample: same
    values and gradients as grid_sample (float64), non-square images included."""
    x = torch.rand(4, 3, 18, 26, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    params = params_for("resize", [[0.0], [0.3], [0.5], [1.0 - 1e-7]])
    weights = torch.rand(x.shape, dtype=torch.float64)
    results = []
    grid_sample_calls = []
    grid_sample = torch.nn.functional.grid_sample

    def counted(*args, **kwargs):
        grid_sample_calls.append(torch.are_deterministic_algorithms_enabled())
        return grid_sample(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "grid_sample", counted)
    for mode in (True, False):
        torch.use_deterministic_algorithms(mode)
        leaf = x.clone().requires_grad_(True)
        out = apply_augment(leaf, params)
        (grad,) = torch.autograd.grad((out * weights).sum(), leaf)
        results.append((out.detach(), grad))
    assert grid_sample_calls == [False]  # the deterministic pass did not call grid_sample
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-12)
    assert not torch.equal(results[1][0], x)  # the zooms did move pixels


def test_policy_parsing_and_validation():
    assert parse_policy("color, cutout") == ("color", "cutout")
    assert parse_policy(["resize"]) == ("resize",)
    assert parse_policy("") == ()
    with pytest.raises(ValueError, match="unknown op"):
        parse_policy("color,flip")
    with pytest.raises(TypeError, match="policy"):
        parse_policy(3)
    with pytest.raises(TypeError, match="CPU torch.Generator"):
        sample_augment_params(POLICY_OPS, 2, generator=0)
    params = sample_augment_params(POLICY_OPS, 3, torch.Generator())
    with pytest.raises(ValueError, match="rows"):
        apply_augment(torch.rand(2, 3, 8, 8), params)
    assert len(params) == 3 and len(params.select(slice(1, 3))) == 2


def test_gaussian_blur_matches_torchvision_and_takes_one_sigma_per_image():
    import torchvision.transforms.functional as tvf

    images = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    for sigma in (0.4, 0.6):
        ref = tvf.gaussian_blur(images, kernel_size=5, sigma=sigma)
        assert torch.allclose(gaussian_blur(images, sigma, radius=2), ref, atol=1e-6)
    assert torch.equal(gaussian_blur(images, 0.0), images)
    sigmas = torch.tensor([0.0, 0.3, 0.6, 0.8, 1.2, 0.1])
    batched = gaussian_blur(images, sigmas)
    for i, s in enumerate(sigmas.tolist()):
        assert torch.allclose(batched[i:i + 1], gaussian_blur(images[i:i + 1], s, radius=4), atol=1e-6)
