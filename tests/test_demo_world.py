"""The committed demo world (issue "demo world"): weights, manifest, loaders, judge, tiny CLIP, smoke sample.

Every model is loaded from ``data/demo`` exactly as the CLI loads it; the checks use held-out seeds
(>= 10**9, never used in training) and a handful of images, so they run in seconds on the CPU.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from flowgrad.augment import gaussian_blur
from flowgrad.demo import evaluate as ev
from flowgrad.demo import render, world
from flowgrad.demo.registry import load_registry

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
pytestmark = pytest.mark.skipif(not (DEMO / "manifest.json").is_file(), reason="demo weights are not in data/demo")


@pytest.fixture(scope="module")
def held_out():
    """32 held-out renders and their true factors."""
    return render(32, seed=ev.EVAL_SEED + 11)


def test_manifest_lists_every_weight_file_with_its_checksum_size_and_command():
    files = json.loads((DEMO / "manifest.json").read_text())["files"]
    assert set(files) == set(world.WEIGHT_FILES.values())
    total = 0
    for name, entry in files.items():
        path = DEMO / name
        assert world.sha256_file(path) == entry["sha256"], name
        assert path.stat().st_size == entry["bytes"]
        assert entry["dtype"] == "float16" and entry["command"].startswith(("flowgrad demo train", "torchrun"))
        assert entry["steps"] > 0 and entry["card"] and entry["wall_time_s"] > 0
        total += entry["bytes"]
    assert total <= 40e6  # the budget for committed weights


def test_each_model_loads_with_the_parameter_count_of_its_manifest_entry():
    from flowgrad.clip_guidance import load_clip

    files = json.loads((DEMO / "manifest.json").read_text())["files"]
    flow, judge_net = world.load_demo_flow(), world.load_judge()
    clip = load_clip(world.demo_clip_spec())
    counts = {"flow.pt": flow, "judge.pt": judge_net, "tiny_clip.pt": clip.model}
    for name, module in counts.items():
        assert sum(p.numel() for p in module.parameters()) == files[name]["parameters"], name
    assert files["flow.pt"]["parameters"] <= 8_000_000
    assert not any(p.requires_grad for p in judge_net.parameters())


def test_the_cpu_flow_keeps_channels_last_weights_with_the_contiguous_outputs_and_fingerprint():
    flow = world.load_demo_flow()
    convs = [m.weight for m in flow.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in convs)
    plain = world.load_demo_flow().to(memory_format=torch.contiguous_format)
    assert all(m.weight.is_contiguous() for m in plain.modules() if isinstance(m, torch.nn.Conv2d))
    assert flow.fingerprint() == plain.fingerprint()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        assert torch.allclose(flow(x, t), plain(x, t), rtol=1e-5, atol=1e-5)
    leaf, lam = x.clone().requires_grad_(True), torch.randn_like(x)
    (g1,) = torch.autograd.grad(flow(leaf, t), leaf, lam)
    (g2,) = torch.autograd.grad(plain(leaf, t), leaf, lam)
    # other convolution algorithms, other summation orders: float32 rounding, far below 1e-3
    assert float((g1 - g2).norm() / g2.norm()) < 1e-5


def test_two_image_smoke_sample_is_a_nonblank_image_the_judge_reads():
    from flowgrad.demo.evaluate import sample_images

    flow = world.load_demo_flow()
    x = sample_images(flow, 2, n_steps=8, seed=ev.EVAL_SEED + 5)
    assert x.shape == (2, 3, 64, 64) and torch.isfinite(x).all()
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05  # not a blank image
    judged = world.judge(x)
    assert set(judged) == set(world.load_judge().config.factors)
    assert all(v.shape == (2,) and bool(((v >= 0) & (v <= 1)).all()) for v in judged.values())
    # the image space round trip of the flow object (what the loaders of real checkpoints also provide)
    assert torch.allclose(flow.to_image(flow.from_image(x)), x, atol=1e-6)


def test_judge_reads_held_out_renders(held_out):
    images, factors = held_out
    judged = world.judge(images)
    for name in ("glasses", "beard", "hair_black", "hair_brown", "hair_blond", "hair_red"):
        assert torch.equal(judged[name], factors[name]), name
    for name in ("age", "smile", "eye_openness", "glasses_frame", "hair_length", "face_width"):
        err = (judged[name] - factors[name]).abs().mean()
        assert err < 0.06, (name, float(err))


def test_judge_is_not_fooled_by_a_slight_blur(held_out):
    """Blurring (sigma 0.6 px) leaves every true factor unchanged, so the judge's readings must barely move.

    The first judge (trained without blur) read blur as narrower eyes (-0.15) and as glasses frames
    (+0.21); the committed one is trained with blur augmentation.
    """
    images, _ = held_out
    clean, blurred = world.judge(images), world.judge(gaussian_blur(images, ev.BLUR_CHECK_SIGMA))
    for name in clean:
        shift = float((blurred[name] - clean[name]).abs().mean())
        assert shift < 0.04, (name, shift)


@pytest.mark.parametrize("attr", ev.ZERO_SHOT_ATTRIBUTES)
def test_tiny_clip_zero_shot_on_held_out_renders(attr):
    """Prompt vs negative prompt on clear cases of 24 held-out renders (the model card measures 2,000)."""
    from flowgrad.clip_guidance import load_clip

    clip = load_clip(world.demo_clip_spec())
    images, factors = render(24, seed=ev.EVAL_SEED + 12)
    acc = ev.zero_shot_accuracy(clip, images, factors, [load_registry()[attr]])[attr]
    assert acc["n"] >= 8 and acc["accuracy"] >= 0.85, acc


@pytest.mark.parametrize("kind", ["flow", "judge"])
def test_missing_or_corrupted_weights_name_the_file_the_expected_checksum_and_the_fix(tmp_path, kind):
    folder = tmp_path / "demo"
    shutil.copytree(DEMO, folder)
    path = folder / world.WEIGHT_FILES[kind]
    expected = json.loads((folder / "manifest.json").read_text())["files"][path.name]["sha256"]
    load = world.load_demo_flow if kind == "flow" else world.load_judge

    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(world.DemoWeightsError) as info:
        load(directory=folder)
    message = str(info.value)
    assert "\n" not in message and str(path) in message and expected[:12] in message
    assert "corrupted" in message and "flowgrad demo train" in message

    path.unlink()
    with pytest.raises(world.DemoWeightsError, match=f"not found: {path}.*flowgrad demo train"):
        load(directory=folder)
