"""CUDA graphs for the velocity (GraphedVelocity): eager fallback everywhere, equal results on a GPU."""

from __future__ import annotations

import pytest
import torch
from fields import ConvField, unrolled_gradients

import flowgrad
from flowgrad import TimeGrid
from flowgrad.cuda_graphs import GraphedVelocity, _bucket, graphs_available


def test_bucket_rounds_up_to_powers_of_two_capped_by_the_largest_batch():
    assert [_bucket(n, 16) for n in (1, 2, 3, 5, 8, 9, 16)] == [1, 2, 4, 8, 8, 16, 16]
    assert _bucket(12, 12) == 12 and _bucket(9, 12) == 12 and _bucket(20, 16) == 20


def test_cpu_calls_run_the_wrapped_velocity_and_gradients_stay_exact():
    field = ConvField()
    graphed = GraphedVelocity(field)
    assert not graphs_available("cpu")
    x, t = torch.randn(3, 3, 5, 5, dtype=torch.float64), torch.rand(3, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(graphed(x, t), field(x, t))
    lam = torch.randn_like(x)
    leaf = x.clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(field(leaf, t), leaf, lam)
    assert torch.allclose(graphed.vjp(x, t, lam), ref, atol=1e-14)
    # the engine takes the wrapper's vjp: gradients equal autograd through the unrolled loop
    grid = TimeGrid.uniform(6)
    u = torch.randn((6, *x.shape), dtype=torch.float64) * 0.1
    target = torch.randn_like(x)
    loss = lambda y: (y - target).square().flatten(1).mean(1)  # noqa: E731
    _, g = flowgrad.control_gradients(graphed, x, u, loss, grid)
    _, g_ref = unrolled_gradients(field, x, u, loss, grid)
    assert torch.allclose(g, g_ref, atol=1e-12)
    assert graphed.captures == 0 and graphed.replays == 0
    # attributes of the wrapped velocity are reachable
    assert graphed.c1 is field.c1


@pytest.mark.gpu
def test_graphs_replay_the_eager_forward_and_vjp_on_cuda():
    torch.backends.cudnn.deterministic = True
    field = ConvField(dtype=torch.float32).cuda()
    graphed = GraphedVelocity(field)
    x = torch.randn(8, 3, 16, 16, device="cuda")
    t = torch.rand(8, device="cuda")
    lam = torch.randn_like(x)
    with torch.no_grad():
        for n in (8, 5, 8):  # 5 pads to the 8-row graph
            assert torch.allclose(graphed(x[:n], t[:n]), field(x[:n], t[:n]), atol=1e-5)
        v1 = graphed(x, t)
        v2 = graphed(x * 2, t)  # new values through the same graph, earlier outputs untouched
        assert torch.allclose(v1, field(x, t), atol=1e-5) and torch.allclose(v2, field(x * 2, t), atol=1e-5)
    for n in (8, 3):
        leaf = x[:n].clone().requires_grad_(True)
        (ref,) = torch.autograd.grad(field(leaf, t[:n]), leaf, lam[:n])
        assert torch.allclose(graphed.vjp(x[:n], t[:n], lam[:n]), ref, atol=1e-5)
    assert graphed.captures == 3  # forward 8, vjp 8, vjp 4
    assert graphed.replays == 7
    graphed.reset()
    with torch.no_grad():
        assert torch.allclose(graphed(x, t), field(x, t), atol=1e-5)
    assert graphed.captures == 4


def _demo_problem():
    """Six demo latents on the GPU, an L1 loss to a random target and a short optimization config."""
    z0 = torch.randn(6, 3, 64, 64, device="cuda")
    target = torch.rand_like(z0) * 2 - 1
    loss = lambda x: (x - target).abs().flatten(1).mean(1)  # noqa: E731
    return z0, loss, flowgrad.FlowGradConfig(n_steps=12, iterations=3, lr=1.0)


@pytest.mark.gpu
def test_graphed_demo_optimization_equals_eager_on_cuda():
    from flowgrad.models import load_model

    velocity = load_model("demo", device="cuda")
    graphed = GraphedVelocity(velocity)
    z0, loss, cfg = _demo_problem()
    eager = flowgrad.optimize(velocity, z0, loss, config=cfg)
    fast = flowgrad.optimize(graphed, z0, loss, config=cfg)
    assert graphed.replays > 0
    assert torch.equal(eager.segment_counts, fast.segment_counts)
    assert torch.allclose(eager.best_loss, fast.best_loss, rtol=1e-4)
    assert torch.allclose(eager.images, fast.images, atol=1e-3)


@pytest.mark.gpu
def test_warm_up_thread_captures_the_graphs_the_job_replays_on_cuda():
    """cli.common.warm_cuda captures the forward and every VJP bucket; optimize() then only replays them."""
    from cli.common import warm_cuda
    from flowgrad.models import load_model

    velocity = load_model("demo", device="cuda")
    graphed = GraphedVelocity(velocity)
    thread = warm_cuda(torch.device("cuda"), graphed, 6)
    thread.join()
    assert graphed.captures == 5  # forward 6; VJPs in buckets 6, 4, 2, 1 (power-of-two subsets, capped at 6)
    z0, loss, cfg = _demo_problem()
    fast = flowgrad.optimize(graphed, z0, loss, config=cfg)
    eager = flowgrad.optimize(velocity, z0, loss, config=cfg)
    assert graphed.replays > 0 and graphed.captures == 5
    assert torch.allclose(eager.best_loss, fast.best_loss, rtol=1e-4)
    assert torch.allclose(eager.images, fast.images, atol=1e-3)
