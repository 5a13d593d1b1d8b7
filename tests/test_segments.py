"""Straightness statistic and segmentation rule."""

from __future__ import annotations

import math

import pytest
import torch
from fields import ConvField

import flowgrad
from flowgrad import Segmentation, TimeGrid
from flowgrad.segments import segment_steps


class PiecewiseConstant(torch.nn.Module):
    """v(x, t) = c_i on t-pieces: a trajectory made of straight pieces."""

    def __init__(self, breaks, values):
        super().__init__()
        self.breaks = breaks
        self.values = values

    def forward(self, x, t):
        idx = sum(int(float(t[0]) >= b) for b in self.breaks)
        return torch.full_like(x, self.values[idx])


def test_straight_pieces_are_found():
    n = 20
    grid = TimeGrid.uniform(n)
    field = PiecewiseConstant([0.3, 0.7], [1.0, -2.0, 0.5])
    traj = flowgrad.trajectory(field, torch.zeros(2, 1, 2, 2), n)
    seg = flowgrad.straightness_segments(traj, 5e-3)
    first_b = next(k for k, t in enumerate(grid.times) if t >= 0.3)
    second_b = next(k for k, t in enumerate(grid.times) if t >= 0.7)
    # a jump between steps k-1 and k closes a segment after k-1 and leaves step k on its own
    assert seg.starts == (0, first_b, first_b + 1, second_b, second_b + 1)
    assert sum(seg.lengths) == n
    # inside a straight piece the segmented gradient equals the exact one (J = 0 here: exactly)
    loss = lambda x: x.flatten(1).sum(1)  # noqa: E731
    a = flowgrad.control_gradients(field, torch.zeros(2, 1, 2, 2), None, loss, n, segments=seg)
    b = flowgrad.control_gradients(field, torch.zeros(2, 1, 2, 2), None, loss, n)
    assert torch.equal(a.gradients, b.gradients)
    assert a.n_vjps == 5 and b.n_vjps == n


def test_no_wrap_around_at_step_zero():
    """The original code compared v_0 with v_{N-1} (index -1); the first step is one-sided here."""
    n = 10
    # velocity constant on [0, 0.9), then a huge jump on the last step
    field = PiecewiseConstant([0.9], [1.0, 100.0])
    traj = flowgrad.trajectory(field, torch.zeros(1, 1, 1, 1), n)
    d = flowgrad.straightness(traj)
    assert d[0, 0] == 0.0
    assert d[-1, 0] > 0 and d[-2, 0] > 0


def test_straightness_formula():
    field = ConvField()
    traj = flowgrad.trajectory(field, torch.randn(2, 3, 4, 4, dtype=torch.float64), 6)
    v = traj.velocities
    d = flowgrad.straightness(traj)
    for k in range(6):
        for b in range(2):
            nb = [(v[j, b] - v[k, b]).square().sum() for j in (k - 1, k + 1) if 0 <= j < 6]
            expected = max(nb) / v[k, b].square().sum()
            assert math.isclose(float(d[k, b]), float(expected), rel_tol=1e-10)


def test_accumulation_rule():
    assert segment_steps([0.001] * 10, 0.0035) == Segmentation((0, 4, 8), (4, 4, 2))
    assert segment_steps([0.0] * 5, 0.0) == Segmentation((0,), (5,))
    assert segment_steps([0.1, 0.0, 0.2], 0.0) == Segmentation((0, 1), (1, 2))
    assert segment_steps([1.0] * 4, math.inf) == Segmentation((0,), (4,))
    assert segment_steps([math.inf, 0.0, 0.0], 1.0) == Segmentation((0, 1), (1, 2))


def test_segmentation_validation():
    with pytest.raises(ValueError):
        Segmentation((1, 2), (1, 1))
    with pytest.raises(ValueError):
        Segmentation((0, 3), (2, 1))
    with pytest.raises(ValueError):
        Segmentation.from_starts([2, 4], 6)
    assert Segmentation.evenly(3, 10).lengths == (3, 4, 3)
    assert len(Segmentation.evenly(26, 100)) == 26
    with pytest.raises(ValueError, match="threshold"):
        flowgrad.straightness_segments(flowgrad.trajectory(ConvField(), torch.randn(1, 3, 2, 2,
                                       dtype=torch.float64), 3), -1.0)


def test_nonfinite_velocity_never_merges():
    class Broken(torch.nn.Module):
        def forward(self, x, t):
            out = torch.ones_like(x)
            out[1] = float("nan")
            return out

    traj = flowgrad.trajectory(Broken(), torch.zeros(2, 1, 2, 2), 6)
    per_image = flowgrad.straightness_segments(traj, 5e-3, per_image=True)
    assert len(per_image[0]) == 1 and len(per_image[1]) == 6


def test_time_grid():
    g = TimeGrid.uniform(4, eps=1e-3)
    assert g.times[0] == 1e-3 and g.steps == (0.25,) * 4
    assert math.isclose(g.times[3], 1e-3 + 0.75 * (1 - 1e-3))
    assert g.end_time == 1.0
    with pytest.raises(ValueError, match="strictly increasing"):
        TimeGrid((0.1, 0.1), (0.5, 0.5))
    with pytest.raises(ValueError, match="n_steps"):
        TimeGrid.uniform(0)
    with pytest.raises(ValueError, match="time window"):
        g.window_mask(0.5, 0.2)
    assert g.window_mask(0.0, 0.5).tolist() == [True, True, False, False]
