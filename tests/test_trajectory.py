"""Forward Euler trajectories and inversion against analytic ODEs and a reference solver."""

from __future__ import annotations

import math

import pytest
import torch
from fields import ConvField, CountingField, Linear

import flowgrad
from flowgrad import TimeGrid


def test_matches_reference_euler_loop_and_stores_states():
    field = ConvField()
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    u = 0.1 * torch.randn(5, 2, 3, 4, 4, dtype=torch.float64)
    traj = flowgrad.trajectory(field, z0, 5, u)
    x = z0
    for k in range(5):
        t = torch.full((2,), k / 5 * (1 - 1e-3) + 1e-3, dtype=torch.float64)
        y = x + u[k]
        v = field(y, t)
        assert torch.allclose(traj.velocities[k], v, rtol=1e-13, atol=1e-13)
        x = y + v / 5
        assert torch.allclose(traj.states[k + 1], x, rtol=1e-13, atol=1e-13)
    assert torch.equal(traj.states[0], z0)
    assert traj.states.shape == (6, 2, 3, 4, 4)


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_linear_ode_converges_to_exact_solution(n):
    """dx/dt = a x on a grid with steps = spacing: Euler error shrinks like 1/N towards x0·e^{a(1-eps)}."""
    a, eps = 1.3, 1e-3
    times = tuple(eps + k * (1 - eps) / n for k in range(n))
    grid = TimeGrid(times, ((1 - eps) / n,) * n)
    z0 = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    final = flowgrad.trajectory(Linear(a), z0, grid).final
    assert torch.allclose(final, z0 * (1 + a * (1 - eps) / n) ** n, rtol=1e-12)
    err = float((final - z0 * math.exp(a * (1 - eps))).abs().max() / z0.abs().max())
    assert err < 2.0 * a * a / n


def test_agrees_with_torchdiffeq_reference_solver():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    field = ConvField(hidden=6)
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    eps = 1e-3
    ref = torchdiffeq.odeint(lambda t, x: field(x, t.expand(x.shape[0])), z0,
                             torch.tensor([eps, 1.0], dtype=torch.float64), rtol=1e-10, atol=1e-10)[-1]
    errors = []
    for n in (20, 80):
        grid = TimeGrid(tuple(eps + k * (1 - eps) / n for k in range(n)), ((1 - eps) / n,) * n)
        errors.append(float((flowgrad.trajectory(field, z0, grid).final - ref).norm() / ref.norm()))
    assert errors[1] < errors[0] / 3  # first order
    assert errors[1] < 5e-2


def test_integrate_without_states_gives_same_final():
    field = ConvField()
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    full = flowgrad.integrate(field, z0, TimeGrid.uniform(7))
    light = flowgrad.integrate(field, z0, TimeGrid.uniform(7), keep_states=False)
    assert light.states.shape[0] == 2 and torch.equal(light.final, full.final)
    assert light.velocities is None


@pytest.mark.parametrize("method", ["euler", "heun"])
def test_inversion_error_shrinks_with_n(method):
    field = ConvField(hidden=6)
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    errors, euler = [], []
    for n in (10, 40, 160):
        x1 = flowgrad.trajectory(field, z0, n).final
        z = flowgrad.invert(field, x1, n, method=method)
        errors.append(float((z - z0).norm() / z0.norm()))
        euler.append(float((flowgrad.invert(field, x1, n, method="euler") - z0).norm() / z0.norm()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.6 * errors[1]
    assert errors[2] < 0.05
    if method == "heun":  # the trapezoid correction halves the round trip's error (see the linear closed form)
        assert all(e < 0.7 * e_euler for e, e_euler in zip(errors, euler)), (errors, euler)


def test_linear_euler_inversion_closed_form():
    """v = a x: forward multiplies by (1 + a h), Euler inversion by (1 - a h): z' = z0 (1 - a²h²)^N."""
    a, n = 0.8, 25
    z0 = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    x1 = flowgrad.trajectory(Linear(a), z0, n).final
    z = flowgrad.invert(Linear(a), x1, n)
    assert torch.allclose(z, z0 * (1 - (a / n) ** 2) ** n, rtol=1e-12)


def test_linear_heun_inversion_closed_form():
    """v = a x: the Euler guess is x (1 - a h) and the trapezoid step x - h/2 (a x + a x (1 - a h)) =
    x (1 - a h + a²h²/2); with the forward factor (1 + a h), z' = z0 ((1 + a h)(1 - a h + a²h²/2))^N."""
    a, n = 0.8, 25
    h = 1 / n
    z0 = torch.randn(1, 1, 3, 3, dtype=torch.float64)
    x1 = flowgrad.trajectory(Linear(a), z0, n).final
    z = flowgrad.invert(Linear(a), x1, n, method="heun")
    assert torch.allclose(z, z0 * ((1 + a * h) * (1 - a * h + (a * h) ** 2 / 2)) ** n, rtol=1e-12)


def test_fixed_point_inversion_undoes_the_euler_map():
    field = ConvField(hidden=6)
    z0 = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    x1 = flowgrad.trajectory(field, z0, 20).final
    z = flowgrad.invert(field, x1, 20, method="fixed-point", fixed_point_iterations=12)
    euler = flowgrad.invert(field, x1, 20, method="euler")
    assert float((z - z0).norm() / z0.norm()) < 1e-6 < float((euler - z0).norm() / z0.norm())
    recon, rmse = flowgrad.reconstruction_error(field, x1, z, 20)
    assert rmse.shape == (2,) and float(rmse.max()) < 1e-6
    assert torch.allclose(recon, x1, atol=1e-5)


def test_invert_rejects_bad_method():
    with pytest.raises(ValueError, match="method"):
        flowgrad.invert(Linear(1.0), torch.zeros(1, 1, 2, 2), 3, method="rk4")


def test_held_forward_reuses_each_stretch_first_velocity():
    """integrate(hold=...) evaluates v only at the held steps; controls still join every step."""
    field = ConvField()
    counting = CountingField(field)
    z0 = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    grid = TimeGrid.uniform(10)
    u = torch.randn((10, *z0.shape), dtype=torch.float64) * 0.05
    hold = [0, 3, 4, 8]
    traj = flowgrad.integrate(counting, z0, grid, u, hold=hold)
    assert counting.calls == len(hold)
    x = z0
    for k in range(10):  # reference loop
        y = x + u[k]
        if k in hold:
            v = field(y, torch.full((2,), grid.times[k], dtype=torch.float64))
        x = y + grid.steps[k] * v
        assert torch.allclose(traj.states[k + 1], x, atol=1e-14)
    # inside a stretch the held velocity does not change: zero bending for the straightness statistic
    assert torch.all(traj.velocity_diff_sq_norms[[0, 1, 4, 5, 6, 8]] == 0)
    # holding every step is the plain trajectory; a linear field held over one stretch has a closed form
    full = flowgrad.integrate(field, z0, grid, u)
    assert torch.equal(flowgrad.integrate(field, z0, grid, u, hold=range(10)).states, full.states)
    one = flowgrad.integrate(Linear(0.7), z0, grid, u, hold=[0]).final
    assert torch.allclose(one, z0 + u.sum(0) + 0.7 * (z0 + u[0]) * sum(grid.steps), atol=1e-12)
    with pytest.raises(ValueError, match="hold must include step 0"):
        flowgrad.integrate(field, z0, grid, u, hold=[2, 5])


def test_held_forward_per_image_mask_equals_each_image_held_alone():
    field = ConvField()
    counting = CountingField(field)
    z0 = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    grid = TimeGrid.uniform(8)
    u = torch.randn((8, *z0.shape), dtype=torch.float64) * 0.05
    holds = [[0, 2, 5], [0, 1, 2, 3, 4, 5, 6, 7], [0]]
    mask = torch.zeros((8, 3), dtype=torch.bool)
    for i, h in enumerate(holds):
        mask[h, i] = True
    traj = flowgrad.integrate(counting, z0, grid, u, hold=mask)
    assert counting.calls == 8  # one (sub-)batch per step where any image is evaluated
    for i, h in enumerate(holds):
        alone = flowgrad.integrate(field, z0[i:i + 1], grid, u[:, i:i + 1], hold=h)
        assert torch.allclose(traj.states[:, i], alone.states[:, 0], atol=1e-14)
    bad = mask.clone()
    bad[0, 1] = False
    with pytest.raises(ValueError, match="step 0 for every image"):
        flowgrad.integrate(field, z0, grid, u, hold=bad)
    with pytest.raises(ValueError, match="bool tensor of shape"):
        flowgrad.integrate(field, z0, grid, u, hold=mask[:4])
