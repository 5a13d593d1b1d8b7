"""The hand-written VJP sweep against autograd, finite differences and closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from fields import ConvField, CountingField, Linear, MLPField, unrolled_gradients

import flowgrad
from flowgrad import Segmentation, TimeGrid, control_gradients


def quadratic_loss(target: torch.Tensor):
    return lambda x: (x - target).square().flatten(1).sum(1) + torch.sin(x).flatten(1).sum(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("field_cls,shape", [(ConvField, (3, 6, 6)), (MLPField, (2, 3, 3))])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_exact_gradients_match_unrolled_autograd(field_cls, shape, dtype, tol):
    field = field_cls(dtype=dtype)
    n, b = 12, 3
    z0 = torch.randn(b, *shape, dtype=dtype)
    u = 0.1 * torch.randn(n, b, *shape, dtype=dtype)
    loss = quadratic_loss(torch.randn(b, *shape, dtype=dtype))
    res = control_gradients(field, z0, u, loss, n)
    ref_losses, ref_grads = unrolled_gradients(field, z0, u, loss, TimeGrid.uniform(n))
    assert res.gradients.shape == (n, b, *shape)
    assert rel(res.losses, ref_losses) <= tol
    assert rel(res.gradients, ref_grads) <= tol
    for k in range(n):  # every step individually, not just the total
        assert rel(res.gradients[k], ref_grads[k]) <= 10 * tol


def test_controls_none_means_zero_controls():
    field = ConvField()
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    loss = quadratic_loss(torch.zeros_like(z0))
    a = control_gradients(field, z0, None, loss, 5)
    b = control_gradients(field, z0, torch.zeros(5, *z0.shape, dtype=torch.float64), loss, 5)
    assert torch.equal(a.gradients, b.gradients) and torch.equal(a.losses, b.losses)


class _FlowGradLoss(torch.autograd.Function):
    """Total loss as a function of the controls, with our sweep as its backward (for gradcheck)."""

    @staticmethod
    def forward(ctx, u, field, z0, loss, n):
        res = control_gradients(field, z0, u, loss, n)
        ctx.save_for_backward(res.gradients)
        return res.losses.sum()

    @staticmethod
    def backward(ctx, grad_out):
        (g,) = ctx.saved_tensors
        return grad_out * g, None, None, None, None


def test_gradcheck_float64():
    field = ConvField(hidden=4)
    z0 = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    loss = quadratic_loss(torch.randn_like(z0))
    u = (0.1 * torch.randn(4, *z0.shape, dtype=torch.float64)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda uu: _FlowGradLoss.apply(uu, field, z0, loss, 4), (u,),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 40])
def test_linear_field_closed_form(n):
    """v = a·x: x_N = x_0 ∏(1 + a h_k) + Σ_j u_j ∏_{k≥j}(1 + a h_k), and d x_N/d u_j = ∏_{k≥j}(1 + a h_k)."""
    a = -0.7
    grid = TimeGrid.uniform(n)
    z0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    u = torch.randn(n, *z0.shape, dtype=torch.float64)
    w = torch.randn_like(z0)
    res = control_gradients(Linear(a), z0, u, lambda x: (w * x).flatten(1).sum(1), n)
    factors = [1.0 + a * h for h in grid.steps]
    tail = [math.prod(factors[j:]) for j in range(n)]
    x_n = z0 * math.prod(factors) + sum(u[j] * tail[j] for j in range(n))
    assert torch.allclose(res.trajectory.final, x_n, rtol=1e-12, atol=1e-12)
    expected = torch.stack([w * tail[j] for j in range(n)])
    assert torch.allclose(res.gradients, expected, rtol=1e-12, atol=1e-14)


def test_segments_linear_field_closed_form():
    """On v = a·x a segment [s, s+n) is one Euler step of length n·h: gradient (1 + a n h)·λ."""
    a, n = 0.5, 10
    seg = Segmentation.from_starts([0, 3, 4, 9], n)
    z0 = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    w = torch.randn_like(z0)
    res = control_gradients(Linear(a), z0, None, lambda x: (w * x).flatten(1).sum(1), n, segments=seg)
    h = 1.0 / n
    lam = w.clone()
    expected = torch.empty(n, *z0.shape, dtype=torch.float64)
    for s, length in reversed(list(zip(seg.starts, seg.lengths))):
        lam = lam * (1 + a * length * h)
        expected[s:s + length] = lam
    assert torch.allclose(res.gradients, expected, rtol=1e-13)
    assert res.n_vjps == len(seg)


def test_number_of_vjps_equals_number_of_segments():
    field = CountingField(ConvField())
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    loss = quadratic_loss(torch.zeros_like(z0))
    seg = Segmentation.from_starts([0, 5, 6, 13], 20)
    res = control_gradients(field, z0, None, loss, 20, segments=seg)
    assert field.vjp_calls == 4 == res.n_vjps
    assert field.calls == 20 + 4  # forward pass + one VJP per segment
    # controls inside a segment share its gradient
    for s, length in zip(seg.starts, seg.lengths):
        for k in range(s, s + length):
            assert torch.equal(res.gradients[k], res.gradients[s])


def _per_image_runs(field, z0, u, loss_fn, n, segments_for):
    out = []
    for i in range(z0.shape[0]):
        res = control_gradients(field, z0[i:i + 1], u[:, i:i + 1], lambda x: loss_fn(x, i), n,
                                segments=segments_for(i))
        out.append(res.gradients[:, 0])
    return torch.stack(out, 1)


def test_batched_gradients_equal_batch_of_one_runs():
    field = ConvField()
    n, b = 15, 4
    z0 = torch.randn(b, 3, 5, 5, dtype=torch.float64)
    u = 0.2 * torch.randn(n, b, 3, 5, 5, dtype=torch.float64)
    targets = torch.randn_like(z0)
    batch_loss = quadratic_loss(targets)

    def single_loss(x, i):
        return quadratic_loss(targets[i:i + 1])(x)

    exact = control_gradients(field, z0, u, batch_loss, n).gradients
    assert rel(exact, _per_image_runs(field, z0, u, single_loss, n, lambda i: None)) < 1e-13

    # per-image segmentations: each image gets exactly what a batch of one would get
    traj = flowgrad.trajectory(field, z0, n, u)
    per_image = flowgrad.straightness_segments(traj, 0.05, per_image=True)
    assert len({s.starts for s in per_image}) > 1, "test needs images with different segmentations"
    batched = control_gradients(field, z0, u, batch_loss, n, segments=per_image).gradients
    singles = _per_image_runs(field, z0, u, single_loss, n, lambda i: per_image[i])
    assert rel(batched, singles) < 1e-13
    for i in range(b):  # and each image's own segmentation is what a batch of one would compute
        own = flowgrad.straightness_segments(flowgrad.trajectory(field, z0[i:i + 1], n, u[:, i:i + 1]), 0.05)
        assert own == per_image[i]

    # a shared segmentation gives the same per-image gradients as batch-of-one runs with that segmentation
    shared = flowgrad.straightness_segments(traj, 0.05)
    batched = control_gradients(field, z0, u, batch_loss, n, segments=shared).gradients
    assert rel(batched, _per_image_runs(field, z0, u, single_loss, n, lambda i: shared)) < 1e-13


def test_shared_segmentation_is_at_least_as_fine_as_each_images_own():
    field = ConvField()
    z0 = torch.randn(5, 3, 5, 5, dtype=torch.float64)
    traj = flowgrad.trajectory(field, z0, 30)
    shared = flowgrad.straightness_segments(traj, 0.02)
    for own in flowgrad.straightness_segments(traj, 0.02, per_image=True):
        assert len(shared) >= len(own)
    # every shared segment keeps each image's accumulated straightness within one step of the threshold
    d = flowgrad.straightness(traj)
    for s, length in zip(shared.starts, shared.lengths):
        if length > 1:
            assert float(d[s:s + length - 1].sum(0).max()) <= 0.02


def test_segmented_gradient_approximates_exact_on_a_smooth_field():
    field = ConvField(hidden=8)
    field.c2.weight.data *= 0.2  # a gently curved field
    z0 = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    loss = quadratic_loss(torch.randn_like(z0))
    n = 50
    traj = flowgrad.trajectory(field, z0, n)
    exact = control_gradients(field, z0, None, loss, n).gradients
    cosines, counts = [], []
    for threshold in (5e-2, 5e-3, 5e-4):
        seg = flowgrad.straightness_segments(traj, threshold)
        approx = control_gradients(field, z0, None, loss, n, segments=seg).gradients
        cosines.append(float(torch.nn.functional.cosine_similarity(exact.flatten(), approx.flatten(), dim=0)))
        counts.append(len(seg))
    assert counts[0] < counts[1] < counts[2] < n
    assert cosines[0] < cosines[1] < cosines[2]  # finer segmentation, closer to exact
    assert cosines[1] > 0.97


def test_bad_arguments_give_clear_errors():
    field = ConvField()
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    loss = quadratic_loss(torch.zeros_like(z0))
    with pytest.raises(ValueError, match="controls must have shape"):
        control_gradients(field, z0, torch.zeros(3, 2, 3, 4, 4, dtype=torch.float64), loss, 5)
    with pytest.raises(ValueError, match="per-image losses"):
        control_gradients(field, z0, None, lambda x: x.sum(), 5)
    with pytest.raises(ValueError, match="same shape as x"):
        control_gradients(lambda x, t: x[:, :1], z0, None, loss, 5)
    with pytest.raises(ValueError, match="covers 4 steps"):
        control_gradients(field, z0, None, loss, 5, segments=Segmentation.uniform(4))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        control_gradients(field, z0[0], None, loss, 5)


@pytest.mark.parametrize("per_image", [False, True])
def test_backward_sweep_with_stop_equals_the_full_sweep_from_that_step_on(per_image):
    field = CountingField(ConvField())
    grid = flowgrad.TimeGrid.uniform(16)
    z0 = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    controls = 0.1 * torch.randn(16, *z0.shape, dtype=torch.float64)
    traj = flowgrad.integrate(field, z0, grid, controls)
    lam = torch.randn_like(z0)
    segments = flowgrad.straightness_segments(traj, 5e-3, per_image=per_image)
    full, n_full = flowgrad.backward_sweep(field, traj, lam, segments)
    for stop in (0, 5, 11, 16):
        part, n_part = flowgrad.backward_sweep(field, traj, lam, segments, stop=stop)
        torch.testing.assert_close(part[stop:], full[stop:], rtol=0, atol=0)
        assert torch.all(part[:stop] == 0)
        assert n_part <= n_full and (stop != 16 or n_part == 0)
    assert flowgrad.backward_sweep(field, traj, lam, segments, stop=5)[1] < n_full
    with pytest.raises(ValueError, match="stop must be an int"):
        flowgrad.backward_sweep(field, traj, lam, segments, stop=17)


def test_integrate_resumes_from_an_uncontrolled_prefix_exactly():
    field = ConvField()
    grid = flowgrad.TimeGrid.uniform(12)
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    controls = 0.1 * torch.randn(12, *z0.shape, dtype=torch.float64)
    controls[:4] = 0
    full = flowgrad.integrate(field, z0, grid, controls, keep_velocities=True)
    prefix = flowgrad.integrate(field, z0, grid.sub(0, 4), keep_velocities=True)
    resumed = flowgrad.integrate(field, z0, grid, controls, keep_velocities=True, prefix=prefix)
    for name in ("states", "velocities", "velocity_sq_norms", "velocity_diff_sq_norms", "last_velocity"):
        assert torch.equal(getattr(resumed, name), getattr(full, name)), name
    bad = controls.clone()
    bad[2] = 1.0
    with pytest.raises(ValueError, match="controls of the first 4 steps must be zero"):
        flowgrad.integrate(field, z0, grid, bad, prefix=prefix)
    with pytest.raises(ValueError, match="another z0"):
        flowgrad.integrate(field, z0 + 1, grid, controls, prefix=prefix)
    with pytest.raises(ValueError, match="must cover the first K < 13 steps"):
        flowgrad.integrate(field, z0, flowgrad.TimeGrid.uniform(13), None, prefix=prefix)
    # a held (coarse) integration after the prefix starts afresh at step 4: the held run of the rest of the grid
    mask = torch.zeros(12, 2, dtype=torch.bool)
    mask[[0, 2, 6, 9], 0] = True
    mask[[0, 7], 1] = True
    held = flowgrad.integrate(field, z0, grid, controls, prefix=prefix, hold=mask)
    assert mask[4].sum() == 0  # the caller's mask is left alone
    rest_mask = mask[4:].clone()
    rest_mask[0] = True
    rest = flowgrad.integrate(field, full.states[4], grid.sub(4), controls[4:], hold=rest_mask)
    assert torch.equal(held.states[:5], full.states[:5])
    torch.testing.assert_close(held.states[4:], rest.states, rtol=0, atol=1e-14)
    assert not torch.allclose(held.final, full.final)  # it did hold the velocity
    assert grid.sub(4).times == grid.times[4:] and grid.sub(2, 5).steps == grid.steps[2:5]
    with pytest.raises(ValueError, match="sub-grid"):
        grid.sub(5, 5)
