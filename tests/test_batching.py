"""map_batches: per-image work in batches that fit, halved on out-of-memory; applying directions through it."""

from __future__ import annotations

import pytest
import torch
from fields import ConvField

from directions.apply import apply_controls, uncontrolled_state
from flowgrad.batching import OutOfMemory, in_halves, map_batches


class _Limited:
    """Calls ``fn`` (or a velocity); any call with more than ``limit`` rows raises an out-of-memory error."""

    def __init__(self, fn, limit: int):
        self.fn, self.limit, self.sizes = fn, limit, []

    def __call__(self, x, *rest):
        self.sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise OutOfMemory("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.fn(x, *rest)


def test_a_batch_that_runs_out_of_memory_is_halved_and_the_rest_keeps_the_smaller_size(caplog):
    x = torch.arange(30.0).view(10, 3)
    fn = _Limited(lambda r: r * 2 + r.sum(1, keepdim=True), limit=3)
    with caplog.at_level("WARNING", logger="flowgrad.batching"):
        out = map_batches(fn, x)
    assert torch.equal(out, x * 2 + x.sum(1, keepdim=True))  # every row, in order
    assert fn.sizes == [10, 5, 2, 2, 2, 2, 2]  # rows done are never recomputed
    assert "out of memory with 10 images per batch; continuing with 5" in caplog.text
    assert "out of memory with 5 images per batch; continuing with 2" in caplog.text


def test_batch_size_sets_the_first_batch_and_no_error_means_no_halving(caplog):
    x = torch.randn(10, 2)
    fn = _Limited(lambda r: -r, limit=10)
    with caplog.at_level("WARNING", logger="flowgrad.batching"):
        assert torch.equal(map_batches(fn, x, batch_size=4), -x)
        assert torch.equal(map_batches(fn, x, batch_size=99), -x)
    assert fn.sizes == [4, 4, 2, 10] and not caplog.text
    assert map_batches(lambda r: r + 1, torch.zeros(0, 3)).shape == (0, 3)


def test_a_single_row_that_does_not_fit_raises_the_out_of_memory_error():
    fn = _Limited(lambda r: r, limit=0)
    with pytest.raises(OutOfMemory):
        map_batches(fn, torch.zeros(4, 2))
    assert fn.sizes == [4, 2, 1]


def test_in_halves_runs_both_halves_recursively_and_joins_them_in_order():
    calls, halved = [], []

    def fn(items):
        calls.append(list(items))
        if len(items) > 2:
            raise OutOfMemory("CUDA out of memory")
        return [i * 10 for i in items]

    out = in_halves(fn, range(5), lambda a, b: a + b, on_halve=lambda n, h: halved.append((n, h)))
    assert out == [0, 10, 20, 30, 40]
    assert calls == [[0, 1, 2, 3, 4], [0, 1], [2, 3, 4], [2], [3, 4]] and halved == [(5, 2), (3, 1)]
    assert in_halves(fn, [7, 8], lambda a, b: a + b) == [70, 80]  # fits: one call, no join


def test_in_halves_raises_the_given_error_or_the_out_of_memory_for_one_item_that_does_not_fit():
    def never(items):
        raise OutOfMemory("CUDA out of memory")

    with pytest.raises(OutOfMemory):
        in_halves(never, [1, 2], lambda a, b: a + b)
    with pytest.raises(RuntimeError, match="single image") as err:
        in_halves(never, [1, 2, 3], lambda a, b: a + b, too_large=RuntimeError("out of memory with a single image"))
    assert not isinstance(err.value, OutOfMemory)


def test_applying_a_control_gives_the_same_states_when_memory_forces_smaller_batches():
    field = ConvField()
    limited = _Limited(field, limit=2)
    z0 = torch.randn(7, 3, 6, 6, dtype=torch.float64)
    control = torch.randn(8, 3, 6, 6, dtype=torch.float64) * 0.1
    control[:3] = 0
    for start in (0, 3):
        branch = uncontrolled_state(field, z0, 8, start)
        assert torch.allclose(uncontrolled_state(limited, z0, 8, start), branch, atol=1e-12)
        want = apply_controls(field, branch, control, 8, start_step=start)
        got = apply_controls(limited, branch, control, 8, start_step=start)
        assert torch.allclose(got, want, atol=1e-12)
    assert limited.sizes[:3] == [7, 3, 1] and set(limited.sizes) == {7, 3, 1}  # each call: 7, 3, then one by one


@pytest.mark.gpu
def test_a_real_cuda_out_of_memory_with_graphs_halves_and_gives_the_eager_states(caplog):
    """The memory cap lets a 64-image forward fit eagerly but not warm-up plus graph capture: the run goes on
    in smaller batches after the failed captures' memory is released, with the eager result."""
    from flowgrad.cuda_graphs import GraphedVelocity
    from flowgrad.models import load_model

    dev = torch.device("cuda", torch.cuda.current_device())  # the memory cap wants an index
    flow = load_model("demo", device=dev)
    z0 = torch.randn(256, *flow.sample_shape, device=dev, generator=torch.Generator(dev).manual_seed(0))
    control = torch.randn(4, *flow.sample_shape, device=dev, generator=torch.Generator(dev).manual_seed(1)) * 0.1
    want = torch.cat([apply_controls(flow, z, control, 4) for z in z0.split(16)])
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_reserved(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    with torch.no_grad():
        flow(z0[:32], torch.full((32,), 0.5, device=dev))
    per_image = (torch.cuda.max_memory_reserved(dev) - base) / 32
    total = torch.cuda.get_device_properties(dev).total_memory
    graphed = GraphedVelocity(flow)
    torch.cuda.empty_cache()
    try:
        torch.cuda.set_per_process_memory_fraction((torch.cuda.memory_reserved(dev) + 80 * per_image) / total, dev)
        with caplog.at_level("WARNING", logger="flowgrad.batching"):
            got = apply_controls(graphed, z0, control, 4)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, dev)
        graphed.reset()
    assert "out of memory with 256 images per batch" in caplog.text
    assert graphed.replays > 0
    assert torch.allclose(got, want, atol=1e-4)
