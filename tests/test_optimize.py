"""FlowGrad optimization: best-so-far tracking, NaN isolation, windows, optimizers."""

from __future__ import annotations

import math

import pytest
import torch
from fields import ConvField, CountingField, unrolled_gradients

import flowgrad
from flowgrad import FlowGradConfig


def convex_loss(target):
    return lambda x: (x - target).square().flatten(1).mean(1)


def test_best_so_far_decreases_and_returned_controls_reproduce_images(capsys):
    field = ConvField()
    z0 = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    target = torch.randn_like(z0)
    seen = []
    res = flowgrad.optimize(field, z0, convex_loss(target), n_steps=20, iterations=8, lr=0.05,
                            threshold=5e-3, callback=seen.append)
    hist = res.loss_history
    assert hist.shape == (9, 3)
    best_so_far = torch.cummin(hist, 0).values
    assert torch.all(res.best_loss < hist[0] * 0.5)
    assert torch.equal(res.best_loss, best_so_far[-1])
    # the returned controls and images are those of the best iteration
    replay = flowgrad.trajectory(field, z0, 20, res.controls).final
    assert torch.allclose(replay, res.images, atol=1e-12)
    assert torch.allclose(convex_loss(target)(res.images), res.best_loss, rtol=1e-10)
    assert [info.iteration for info in seen] == list(range(9))
    assert res.segment_counts.shape == (8, 3) and int(res.segment_counts.min()) >= 1
    assert res.status == ("ok", "ok", "ok")
    assert set(res.timings) == {"forward", "loss", "backward"}
    assert capsys.readouterr().out == ""  # the library never prints


def test_keeps_best_not_last_when_the_step_size_diverges():
    field = ConvField()
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    res = flowgrad.optimize(field, z0, convex_loss(torch.zeros_like(z0)), n_steps=10, iterations=6,
                            lr=40.0, threshold=None)
    hist = res.loss_history
    assert float(hist[-1].min()) > float(hist.min(0).values.max())  # diverged at the end
    assert torch.equal(res.best_loss, hist.min(0).values)
    for b in range(2):
        assert res.best_iteration[b] == int(hist[:, b].argmin())


@pytest.mark.parametrize("segmentation", ["per-image", "shared"])
@pytest.mark.parametrize("where", ["loss", "latent"])
def test_nonfinite_loss_on_one_image_never_poisons_the_others(segmentation, where):
    """A NaN loss, or a NaN latent (a NaN trajectory), freezes that image; the others get exactly the
    results of a batch without it — also when the segmentation is shared by the batch."""
    field = ConvField()
    z0 = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    target = torch.randn_like(z0)
    if where == "latent":
        z0[1, 0, 0, 0] = math.nan

    def loss(x):
        out = (x - target).square().flatten(1).mean(1)
        bad = torch.zeros_like(out)
        bad[1] = math.nan
        return out + bad

    res = flowgrad.optimize(field, z0, loss, n_steps=12, iterations=4, lr=1.0, threshold=5e-2,
                            segmentation=segmentation)
    assert res.status[1] == "nonfinite@0" and res.status[0] == res.status[2] == "ok"
    assert math.isnan(float(res.best_loss[1]))
    assert torch.all(res.controls[:, 1] == 0)
    keep = [0, 2]
    ref = flowgrad.optimize(field, z0[keep], convex_loss(target[keep]), n_steps=12, iterations=4, lr=1.0,
                            threshold=5e-2, segmentation=segmentation)
    assert torch.all(ref.segment_counts < 12)  # the threshold merges steps: segmentation matters here
    assert torch.allclose(res.best_loss[keep], ref.best_loss, rtol=1e-12)
    assert torch.allclose(res.controls[:, keep], ref.controls, atol=1e-12)


def test_batch_results_equal_single_image_runs():
    field = ConvField()
    z0 = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    target = torch.randn_like(z0)
    batch = flowgrad.optimize(field, z0, convex_loss(target), n_steps=15, iterations=3, lr=1.0)
    for i in range(3):
        single = flowgrad.optimize(field, z0[i:i + 1], convex_loss(target[i:i + 1]), n_steps=15,
                                   iterations=3, lr=1.0)
        assert torch.allclose(batch.controls[:, i], single.controls[:, 0], atol=1e-12)
        assert torch.equal(batch.segment_counts[:, i], single.segment_counts[:, 0])


def test_time_window_and_adam():
    field = ConvField()
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    res = flowgrad.optimize(field, z0, convex_loss(torch.randn_like(z0)), n_steps=10, iterations=3,
                            lr=0.05, optimizer="adam", t_window=(0.0, 0.45))
    mask = flowgrad.TimeGrid.uniform(10).window_mask(0.0, 0.45)
    assert torch.all(res.controls[~mask] == 0)
    assert torch.all(res.controls[mask].flatten(1).abs().sum(1) > 0)
    assert torch.all(res.best_loss < res.initial_loss)
    # Adam's first step, by hand (torch's defaults: bias-corrected m = g, v = g^2, eps 1e-8): lr * g / (|g| + eps),
    # i.e. about lr * sign(g) per entry (SGD would step lr * g); controls outside the window get no gradient
    lr = 1e-3
    loss = convex_loss(torch.randn_like(z0))
    grid = flowgrad.TimeGrid.uniform(10)
    _, g = unrolled_gradients(field, z0, torch.zeros(10, *z0.shape, dtype=z0.dtype), loss, grid)
    g = g * mask.view(-1, 1, 1, 1, 1)
    one = flowgrad.optimize(field, z0, loss, n_steps=10, iterations=1, lr=lr, threshold=None, optimizer="adam",
                            t_window=(0.0, 0.45))
    assert torch.all(one.best_iteration == 1)  # a small step against the gradient lowers the loss
    torch.testing.assert_close(one.controls, -lr * g / (g.abs() + 1e-8), rtol=1e-6, atol=1e-12)
    assert torch.all(one.controls[mask].abs().flatten() > 0.99 * lr)


def test_config_validation():
    with pytest.raises(ValueError, match="lr"):
        FlowGradConfig(lr=-1.0)
    with pytest.raises(ValueError, match="optimizer"):
        FlowGradConfig(optimizer="lbfgs")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="t_window"):
        FlowGradConfig(t_window=(0.8, 0.2))
    with pytest.raises(ValueError, match=r"the time window \[0.9, 1\] holds none of the 4 steps"):
        FlowGradConfig(n_steps=4, t_window=(0.9, 1.0))
    assert FlowGradConfig(n_steps=4, t_window=(0.5, 1.0)).first_window_step == 2
    cfg = FlowGradConfig(n_steps=5, iterations=1, lr=0.1, threshold=None)
    field = ConvField()
    z0 = torch.randn(1, 3, 3, 3, dtype=torch.float64)
    res = flowgrad.optimize(field, z0, convex_loss(torch.zeros_like(z0)), config=cfg)
    assert res.config == cfg and res.loss_history.shape == (2, 1)


def test_coarse_forward_integrates_the_steps_before_the_window_once():
    """The stretch before the time window is the same in every pass: coarse passes start from its exact end
    state too (they do not re-integrate it at segment starts)."""
    times: list[float] = []

    class Recording(ConvField):
        def forward(self, x, t):
            if not torch.is_grad_enabled():
                times.append(float(t[0]))
            return super().forward(x, t)

    field = Recording()
    z0 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    cfg = FlowGradConfig(n_steps=20, iterations=4, lr=0.05, threshold=5e-2, t_window=(0.5, 1.0),
                         coarse_forward=True)
    res = flowgrad.optimize(field, z0, convex_loss(torch.randn_like(z0)), config=cfg)
    first = cfg.first_window_step
    before = [t for t in times if t < cfg.grid.times[first]]
    assert len(before) == first  # the prefix, integrated once
    assert torch.all(res.best_loss < res.initial_loss)
    replay = flowgrad.trajectory(ConvField(), z0, 20, res.controls).final
    torch.testing.assert_close(replay, res.images, rtol=0, atol=1e-12)


def test_coarse_forward_calls_the_velocity_per_segment_and_returns_full_trajectory_results():
    field = CountingField(ConvField())
    z0 = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    target = torch.randn_like(z0)
    loss = convex_loss(target)
    cfg = FlowGradConfig(n_steps=20, iterations=6, lr=0.05, threshold=5e-2, segmentation="shared",
                         coarse_forward=True)
    res = flowgrad.optimize(field, z0, loss, config=cfg)
    segments = int(res.segment_counts[0, 0])
    assert 1 < segments < 20 and torch.all(res.segment_counts == segments)  # the first pass's, kept
    plain = field.calls - field.vjp_calls
    # full first and final passes, coarse ones in between, one more full pass if a coarse one was best
    assert plain in (20 * 2 + 5 * segments, 20 * 3 + 5 * segments)
    assert torch.all(res.best_loss < res.initial_loss * 0.7)
    # never worse than the full passes it evaluated (the first and the final one)
    assert torch.all(res.best_loss <= res.loss_history[[0, -1]].min(0).values)
    # the returned images and losses are those of the full 20-step ODE with the returned controls
    replay = flowgrad.trajectory(field, z0, 20, res.controls).final
    assert torch.allclose(replay, res.images, atol=1e-12)
    assert torch.allclose(loss(res.images), res.best_loss, rtol=1e-10)
    # and it ends close to the full-forward optimization
    full = flowgrad.optimize(ConvField(), z0, loss, config=FlowGradConfig(
        n_steps=20, iterations=6, lr=0.05, threshold=5e-2, segmentation="shared"))
    assert abs(res.best_loss.mean() / full.best_loss.mean() - 1) < 0.1
    assert torch.all(res.best_loss < full.initial_loss * 0.7)
    with pytest.raises(ValueError, match="coarse_forward needs a straightness threshold"):
        FlowGradConfig(threshold=None, coarse_forward=True)



def _reference_flowgrad(field, z0, loss, n_steps, iterations, lr, threshold, t_window):
    """The FlowGrad loop written plainly: full trajectory and full backward sweep every pass."""
    grid = flowgrad.TimeGrid.uniform(n_steps)
    mask = grid.window_mask(*t_window).view(-1, 1, 1, 1, 1).to(z0.dtype)
    u = torch.zeros((n_steps, *z0.shape), dtype=z0.dtype)
    best_loss = torch.full((z0.shape[0],), math.inf, dtype=torch.float64)
    best_u = u.clone()
    for it in range(iterations + 1):
        traj = flowgrad.integrate(field, z0, grid, u)
        losses, lam = flowgrad.loss_and_adjoint(loss, traj.final)
        better = losses.double() < best_loss
        best_loss[better] = losses.double()[better]
        best_u[:, better] = u[:, better]
        if it < iterations:
            segments = flowgrad.straightness_segments(traj, threshold, per_image=True)
            grads, _ = flowgrad.backward_sweep(field, traj, lam, segments)
            u = u - lr * grads * mask
    return best_u, best_loss


@pytest.mark.parametrize("t_window", [(0.35, 1.0), (0.2, 0.7)])
def test_steps_before_a_late_window_are_integrated_once_and_not_swept(t_window):
    z0 = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    loss = convex_loss(torch.randn_like(z0))
    field = CountingField(ConvField())
    res = flowgrad.optimize(field, z0, loss, n_steps=20, iterations=4, lr=0.05, threshold=5e-3,
                            t_window=t_window)
    ref_field = CountingField(ConvField())
    ref_u, ref_loss = _reference_flowgrad(ref_field, z0, loss, 20, 4, 0.05, 5e-3, t_window)
    torch.testing.assert_close(res.controls, ref_u, rtol=0, atol=1e-13)
    torch.testing.assert_close(res.best_loss, ref_loss, rtol=1e-13, atol=0)
    first = int(flowgrad.TimeGrid.uniform(20).window_mask(*t_window).nonzero()[0])
    assert field.calls - field.vjp_calls == first + 5 * (20 - first)  # the prefix once, then 5 passes
    assert ref_field.calls - ref_field.vjp_calls == 5 * 20
    assert field.vjp_calls < ref_field.vjp_calls  # segments wholly before the window are not swept


@pytest.mark.parametrize("t_window", [(0.35, 1.0), (0.0, 1.0)])
def test_a_given_initial_pass_replaces_the_first_forward_pass_bit_for_bit(t_window):
    z0 = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    loss = convex_loss(torch.randn_like(z0))
    cfg = FlowGradConfig(n_steps=20, iterations=3, lr=0.05, threshold=5e-3, t_window=t_window)
    plain = flowgrad.optimize(CountingField(ConvField()), z0, loss, config=cfg)
    field = CountingField(ConvField())
    start = flowgrad.initial_pass(field, z0, cfg)
    assert field.calls == 20 and field.vjp_calls == 0
    assert torch.equal(start.final, flowgrad.integrate(ConvField(), z0, cfg.grid, keep_states=False).final)
    field.calls = field.vjp_calls = 0
    given = flowgrad.optimize(field, z0, loss, config=cfg, initial=start)
    first = int(cfg.grid.window_mask(*t_window).nonzero()[0])
    assert field.calls - field.vjp_calls == 3 * (20 - first)  # no prefix and no first pass: only passes 2..4
    for name in ("controls", "images", "best_loss", "loss_history", "segment_counts"):
        assert torch.equal(getattr(given, name), getattr(plain, name)), name


def test_an_initial_pass_that_does_not_match_the_optimization_is_refused():
    z0 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    loss = convex_loss(torch.randn_like(z0))
    field = ConvField()
    cfg = FlowGradConfig(n_steps=10, iterations=1, lr=0.05, t_window=(0.3, 1.0))
    start = flowgrad.initial_pass(field, z0, cfg)
    cases = [
        (dict(config=FlowGradConfig(n_steps=12, iterations=1, lr=0.05, t_window=(0.3, 1.0))), "another time grid"),
        (dict(config=FlowGradConfig(n_steps=10, iterations=1, lr=0.05)), "another time window"),
        (dict(config=cfg, z0=z0 + 1), "another z0"),
        (dict(config=cfg, controls=torch.ones((10, *z0.shape), dtype=z0.dtype)), "nonzero initial controls"),
        (dict(config=cfg, initial=start.trajectory), "must be an InitialPass"),
    ]
    for kwargs, message in cases:
        kwargs = {"initial": start, "z0": z0, **kwargs}
        with pytest.raises((ValueError, TypeError), match=message):
            flowgrad.optimize(field, kwargs.pop("z0"), loss, **kwargs)


@pytest.mark.parametrize("start_step", [7, 4])
def test_starting_at_a_later_step_equals_the_run_from_the_latents(start_step):
    """A state at step K (e.g. an image inverted only down to the window) optimizes like its latents would."""
    z0 = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    loss = convex_loss(torch.randn_like(z0))
    cfg = FlowGradConfig(n_steps=20, iterations=3, lr=0.05, threshold=None, t_window=(0.35, 1.0))
    plain = flowgrad.optimize(ConvField(), z0, loss, config=cfg)
    xk = flowgrad.integrate(ConvField(), z0, cfg.grid.sub(0, start_step), keep_states=False).final
    field = CountingField(ConvField())
    start = flowgrad.initial_pass(field, xk, cfg, start_step=start_step)
    later = flowgrad.optimize(field, xk, loss, config=cfg, initial=start, start_step=start_step)
    assert later.controls.shape == plain.controls.shape and not later.controls[:7].any()
    torch.testing.assert_close(later.controls, plain.controls, rtol=0, atol=1e-12)
    torch.testing.assert_close(later.images, plain.images, rtol=0, atol=1e-12)
    torch.testing.assert_close(later.best_loss, plain.best_loss, rtol=1e-12, atol=0)
    assert field.calls - field.vjp_calls == (7 - start_step) + 4 * (20 - 7)  # nothing before step K
    again = flowgrad.optimize(ConvField(), xk, loss, config=cfg, start_step=start_step,
                              controls=torch.zeros((20, *z0.shape), dtype=z0.dtype))
    torch.testing.assert_close(again.controls, plain.controls, rtol=0, atol=1e-12)


def test_a_start_step_inside_the_window_or_out_of_range_is_refused():
    z0 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    loss = convex_loss(torch.randn_like(z0))
    cfg = FlowGradConfig(n_steps=10, iterations=1, lr=0.05, t_window=(0.3, 1.0))  # first window step: 3
    for kwargs, message in [(dict(start_step=4), "starts at step 3, before start_step 4"),
                            (dict(start_step=10), r"start_step must be an integer in \[0, 9\]"),
                            (dict(start_step=-1), "start_step must be an integer"),
                            (dict(start_step=2, controls=torch.ones((10, *z0.shape), dtype=z0.dtype)),
                             "zero before start_step 2")]:
        with pytest.raises(ValueError, match=message):
            flowgrad.optimize(ConvField(), z0, loss, config=cfg, **kwargs)
    start = flowgrad.initial_pass(ConvField(), z0, cfg)
    with pytest.raises(ValueError, match="another time grid"):
        flowgrad.optimize(ConvField(), z0, loss, config=cfg, initial=start, start_step=2)
