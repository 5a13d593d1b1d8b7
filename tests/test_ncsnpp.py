"""NCSN++ (Rectified Flow) re-implementation: conformance with upstream, checkpoint loading, adapter.

Reference data in tests/data/ncsnpp/ were produced by the unmodified upstream code on CPU in
float32 (see shared/reference/ncsnpp/README.md): a small checkpoint in the exact on-disk format,
its outputs with EMA and raw weights, an 8-step Euler trajectory, and key/shape manifests of the
small model and of the paper's CelebA-HQ 256 model.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from flowgrad.models.ncsnpp import NCSNpp, NCSNppConfig
from flowgrad.models.ncsnpp_layers import GroupNorm, Resample, downsample_fir, fir_kernel_2d, upsample_fir
from flowgrad.models.rectified_flow import (
    DEFAULT_PRESET, PRESETS, CheckpointError, CheckpointNotFoundError, RectifiedFlowVelocity, build_random,
    load_config, load_rectified_flow, ncsnpp_from_state_dict,
)
from flowgrad.velocity import VelocityField

DATA = Path(__file__).resolve().parent / "data" / "ncsnpp"
CKPT = DATA / "small_rf_checkpoint.pth"
SMALL_CONFIG = DATA / "small_config.json"
REL_TOL = 1e-5      # per-sample relative L2 (README: noise floor ~1e-6 with upstream's Fourier order)
EULER_TOL = 1e-5    # max abs per Euler state (README: observed <= 5e-7)


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample ||a_i - b_i|| / ||b_i||."""
    return (a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)


def assert_one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, repr(msg)
    return msg


@pytest.fixture(scope="module")
def ref() -> dict:
    return torch.load(DATA / "small_reference.pt")


@pytest.fixture(scope="module")
def small_config() -> NCSNppConfig:
    return load_config(SMALL_CONFIG)


@pytest.fixture(scope="module")
def ckpt() -> dict:
    return torch.load(CKPT, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def ema_field() -> RectifiedFlowVelocity:
    return load_rectified_flow(CKPT, SMALL_CONFIG)


@pytest.fixture(scope="module")
def raw_field() -> RectifiedFlowVelocity:
    return load_rectified_flow(CKPT, SMALL_CONFIG, use_ema=False)


def capture_time_cond(field: RectifiedFlowVelocity, calls: list) -> torch.utils.hooks.RemovableHandle:
    return field.net.register_forward_pre_hook(lambda module, args: calls.append(args[1].clone()))


# --------------------------------------------------------------------------- conformance


@pytest.mark.parametrize("which", ["ema", "raw"])
def test_outputs_match_upstream_per_sample(which, ref, ema_field, raw_field):
    field = ema_field if which == "ema" else raw_field
    calls: list = []
    handle = capture_time_cond(field, calls)
    try:
        with torch.no_grad():
            out = field(ref["x"], ref["t"])
    finally:
        handle.remove()
    assert out.shape == ref["x"].shape and out.dtype == torch.float32
    # The adapter multiplies t by 999 in float32, exactly as upstream's samplers.
    assert torch.equal(calls[0], ref["time_cond"])
    err = rel_l2(out, ref[f"out_{which}"])
    assert err.max().item() <= REL_TOL, err


def test_euler_trajectory_matches_upstream(ref, ema_field):
    n = ref["euler_N"]
    z = ref["euler_z0"].clone()
    calls: list = []
    handle = capture_time_cond(ema_field, calls)
    try:
        with torch.no_grad():
            for i in range(n):
                t = torch.full((z.shape[0],), float(ref["euler_t"][i]))
                z = z + ema_field(z, t) * (1.0 / n)
                assert (z - ref["euler_traj"][i + 1]).abs().max().item() <= EULER_TOL, i
    finally:
        handle.remove()
    for i, tc in enumerate(calls):
        assert torch.equal(tc, ref["euler_time_cond"][i].expand(z.shape[0]))
    assert (z - ref["euler_final"]).abs().max().item() <= EULER_TOL


def test_ema_weights_are_applied(ref, ckpt, ema_field, raw_field):
    assert rel_l2(ref["out_raw"].flatten()[None], ref["out_ema"].flatten()[None]).item() > 1.0
    with torch.no_grad():
        raw, ema = raw_field(ref["x"], ref["t"]), ema_field(ref["x"], ref["t"])
    assert rel_l2(raw.flatten()[None], ema.flatten()[None]).item() > 1.0
    sd, shadow = ema_field.net.state_dict(), ckpt["ema"]["shadow_params"]
    # W and sigmas always come from 'model'; shadow_params[0] belongs to all_modules.1.weight.
    assert torch.equal(sd["all_modules.0.W"], ckpt["model"]["module.all_modules.0.W"])
    assert torch.equal(sd["sigmas"], ckpt["model"]["module.sigmas"]) and sd["sigmas"].dtype == torch.float64
    assert torch.equal(sd["all_modules.1.weight"], shadow[0])
    assert torch.equal(sd["all_modules.1.bias"], shadow[1])
    assert torch.equal(raw_field.net.state_dict()["all_modules.1.weight"],
                       ckpt["model"]["module.all_modules.1.weight"])


def test_small_model_matches_manifest(small_config):
    manifest = json.loads((DATA / "small_manifest.json").read_text())
    check_against_manifest(NCSNpp(small_config), manifest)
    assert manifest["num_parameters_total"] == 320_793


def check_against_manifest(net: NCSNpp, manifest: dict) -> None:
    prefix = manifest["key_prefix"]
    sd = net.state_dict()
    assert [prefix + k for k in sd] == [e["key"] for e in manifest["state_dict"]]
    for entry, tensor in zip(manifest["state_dict"], sd.values()):
        assert list(tensor.shape) == entry["shape"], entry["key"]
        assert str(tensor.dtype).removeprefix("torch.") == entry["dtype"], entry["key"]
    params = list(net.named_parameters())
    assert [(prefix + n, list(p.shape), p.requires_grad) for n, p in params] == [
        (e["name"], e["shape"], e["requires_grad"]) for e in manifest["named_parameters"]]
    trainable = [prefix + n for n, p in params if p.requires_grad]
    assert trainable == [e["name"] for e in manifest["ema_shadow_params_order"]]
    assert sum(p.numel() for _, p in params) == manifest["num_parameters_total"]
    assert sum(p.numel() for _, p in params if p.requires_grad) == manifest["num_parameters_requires_grad"]
    assert len(params) == manifest["num_parameter_tensors"]
    assert len(sd) == manifest["num_state_dict_entries"]
    assert [prefix + n for n, _ in net.named_buffers()] == [b["name"] for b in manifest["named_buffers"]]
    check_module_layout(net, manifest["all_modules"])


UPSTREAM_CLASS = {"ResnetBlockBigGAN": "ResnetBlockBigGANpp", "AttnBlock": "AttnBlockpp"}


def check_module_layout(net: NCSNpp, layout: list[dict]) -> None:
    assert len(net.all_modules) == len(layout)
    for module, entry in zip(net.all_modules, layout):
        name = type(module).__name__
        assert UPSTREAM_CLASS.get(name, name) == entry["class"], entry
        if entry["class"] == "ResnetBlockBigGANpp":
            assert (module.in_ch, module.out_ch, module.up, module.down) == (
                entry["in_ch"], entry["out_ch"], entry["up"], entry["down"]), entry
        elif entry["class"] == "GroupNorm":
            assert (module.num_groups, module.num_channels, module.eps) == (
                entry["num_groups"], entry["num_channels"], entry["eps"]), entry


def test_celebahq_preset_matches_manifest_and_loads_strictly():
    manifest = json.loads((DATA / "celebahq256_manifest.json").read_text())
    preset = PRESETS[DEFAULT_PRESET]
    assert preset == NCSNppConfig.from_dict(manifest["config_full"])
    assert preset == NCSNppConfig.from_dict(manifest["config_architecture"])
    assert load_config(DEFAULT_PRESET) is preset
    with torch.device("meta"):
        net = NCSNpp(preset)
    check_against_manifest(net, manifest)
    assert manifest["num_parameters_total"] == 65_574_549
    # A state dict built from the manifest (module.-prefixed, as on disk) loads strictly.
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    state = {e["key"]: torch.zeros(e["shape"], dtype=dtypes[e["dtype"]]) for e in manifest["state_dict"]}
    loaded = ncsnpp_from_state_dict(state, preset)
    assert not any(t.is_meta for t in loaded.state_dict().values())
    assert loaded.sigmas.dtype == torch.float64 and loaded.all_modules[3].weight.shape == (128, 3, 3, 3)
    assert loaded.state_dict()["all_modules.76.weight"].data_ptr() == \
        state["module.all_modules.76.weight"].data_ptr()  # assigned, not copied
    del state["module.all_modules.40.Conv_1.bias"]
    with pytest.raises(CheckpointError, match="all_modules.40.Conv_1.bias"):
        ncsnpp_from_state_dict(state, preset)


# --------------------------------------------------------------------------- loader errors


def test_missing_file_says_where_the_checkpoint_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        load_rectified_flow(tmp_path / "nope.pth")
    assert isinstance(info.value, CheckpointNotFoundError) and isinstance(info.value, CheckpointError)
    msg = assert_one_line(info.value)
    assert "github.com/gnobitab/RectifiedFlow" in msg and "CelebA-HQ 256" in msg and "nope.pth" in msg


def _png_bytes() -> bytes:
    import io

    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["text", "random", "empty", "png", "json", "directory"])
def test_non_checkpoint_files_are_refused(tmp_path, kind):
    path = tmp_path / f"file.{kind}"
    if kind == "text":
        path.write_text("this is not a checkpoint\n" * 20)
    elif kind == "random":
        path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3),
                                       dtype=torch.uint8).numpy().tobytes())
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "png":
        path.write_bytes(_png_bytes())
    elif kind == "json":
        path.write_text(json.dumps({"model": {"a": 1}}))
    else:
        path.mkdir()
    with pytest.raises(CheckpointError) as info:
        load_rectified_flow(path, SMALL_CONFIG)
    assert str(path) in assert_one_line(info.value)


@pytest.mark.parametrize("kind", ["list", "tensor", "dict_without_model", "model_not_state_dict"])
def test_foreign_pickles_are_refused(tmp_path, kind, ckpt):
    obj = {"list": [1, 2, 3], "tensor": torch.zeros(3),
           "dict_without_model": {"weights": ckpt["model"], "epoch": 3},
           "model_not_state_dict": {"model": {"a": 1}, "ema": ckpt["ema"]}}[kind]
    path = tmp_path / "foreign.pth"
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as info:
        load_rectified_flow(path, SMALL_CONFIG)
    assert "Rectified Flow checkpoint" in assert_one_line(info.value)


def test_renamed_key_is_refused_naming_the_key(tmp_path, ckpt):
    state = dict(ckpt["model"])
    state["module.all_modules.4.Conv_9.weight"] = state.pop("module.all_modules.4.Conv_0.weight")
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_rectified_flow(path, SMALL_CONFIG)
    msg = assert_one_line(info.value)
    assert "all_modules.4.Conv_0.weight" in msg and "all_modules.4.Conv_9.weight" in msg
    assert "config probably does not match" in msg


def test_mismatching_config_is_refused():
    wrong = dataclasses.replace(load_config(SMALL_CONFIG), nf=32)
    with pytest.raises(CheckpointError) as info:
        load_rectified_flow(CKPT, wrong)
    msg = assert_one_line(info.value)
    assert "shape" in msg and "config probably does not match" in msg
    with pytest.raises(CheckpointError, match="config probably does not match"):
        load_rectified_flow(CKPT)   # default: the CelebA-HQ 256 preset


def test_other_architecture_is_refused(tmp_path):
    other = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 3, 3))
    path = tmp_path / "other.pth"
    torch.save({"model": other.state_dict(), "ema": {"shadow_params": list(other.parameters())}, "step": 1},
               path)
    with pytest.raises(CheckpointError, match="lacks .* key"):
        load_rectified_flow(path, SMALL_CONFIG)


def test_wrong_ema_list_is_refused(tmp_path, ckpt):
    bad = dict(ckpt, ema=dict(ckpt["ema"], shadow_params=ckpt["ema"]["shadow_params"][1:]))
    path = tmp_path / "short_ema.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="EMA list has 223 tensors"):
        load_rectified_flow(path, SMALL_CONFIG)


def test_missing_ema_and_plain_state_dict(tmp_path, ckpt, ref):
    no_ema = {k: v for k, v in ckpt.items() if k != "ema"}
    path = tmp_path / "no_ema.pth"
    torch.save(no_ema, path)
    with pytest.raises(CheckpointError, match="use_ema=False") as info:
        load_rectified_flow(path, SMALL_CONFIG)
    assert_one_line(info.value)
    plain = tmp_path / "plain.pth"
    torch.save({k[len("module."):]: v for k, v in ckpt["model"].items()}, plain)  # no prefix this time
    for field in (load_rectified_flow(path, SMALL_CONFIG, use_ema=False), load_rectified_flow(plain, SMALL_CONFIG)):
        with torch.no_grad():
            assert rel_l2(field(ref["x"], ref["t"]), ref["out_raw"]).max().item() <= REL_TOL


def test_unsafe_pickle_needs_explicit_opt_in(tmp_path, ckpt, ref):
    path = tmp_path / "with_args.pth"
    torch.save(dict(ckpt, args=argparse.Namespace(lr=1e-4)), path)
    with pytest.raises(CheckpointError) as info:
        load_rectified_flow(path, SMALL_CONFIG)
    msg = assert_one_line(info.value)
    assert "allow_unsafe_pickle=True" in msg and "argparse.Namespace" in msg and "arbitrary code" in msg
    field = load_rectified_flow(path, SMALL_CONFIG, allow_unsafe_pickle=True)
    with torch.no_grad():
        assert rel_l2(field(ref["x"], ref["t"]), ref["out_ema"]).max().item() <= REL_TOL


# --------------------------------------------------------------------------- configs


def test_config_round_trip_and_json(tmp_path, small_config):
    assert NCSNppConfig.from_dict(small_config.to_dict()) == small_config
    assert NCSNppConfig.from_dict(dataclasses.asdict(small_config)) == small_config
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(small_config.to_dict()))
    assert load_config(path) == small_config == load_config(str(path))
    assert small_config.ch_mult == (1, 2, 2) and small_config.attn_resolutions == (16,)
    assert small_config.all_resolutions == (32, 16, 8)


@pytest.mark.parametrize("section, key, value, match", [
    ("model", "progressive", "residual", "progressive='residual' is not supported"),
    ("model", "progressive_input", "residual", "not implemented here"),
    ("model", "resblock_type", "ddpm", "resblock_type='ddpm' is not supported"),
    ("model", "embedding_type", "learned", "embedding_type"),
    ("model", "name", "ddpm", "model.name='ddpm'"),
    ("model", "normalization", "InstanceNorm", "normalization"),
    ("model", "nf", 0, "nf must be a positive integer"),
    ("model", "ch_mult", "122", "ch_mult"),
    ("model", "fir_kernel", [1], "fir_kernel"),
    ("model", "skip_rescale", "yes", "skip_rescale must be a bool"),
    ("data", "image_size", 30, "divisible"),
])
def test_config_rejects_unsupported_values(section, key, value, match):
    d = json.loads(SMALL_CONFIG.read_text())
    d[section][key] = value
    with pytest.raises(ValueError, match=match) as info:
        NCSNppConfig.from_dict(d)
    assert_one_line(info.value)


def test_load_config_errors(tmp_path):
    with pytest.raises(ValueError, match="not a preset") as info:
        load_config("rectified-flow-imagenet-512")
    assert DEFAULT_PRESET in assert_one_line(info.value)
    bad = tmp_path / "bad.json"
    bad.write_text('{"model": {"nf": 16,}}')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        load_config(bad)
    assert_one_line(info.value)
    with pytest.raises(ValueError, match="unknown NCSNppConfig key"):
        NCSNppConfig.from_dict({"nf": 16, "channels": 3})
    with pytest.raises(TypeError):
        load_config(3)


# --------------------------------------------------------------------------- variants and adapter


TINY = NCSNppConfig(image_size=16, nf=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))


@pytest.mark.parametrize("changes", [
    {},
    {"embedding_type": "positional"},
    {"embedding_type": "positional", "scale_by_sigma": False, "fir": False, "progressive": "none",
     "progressive_input": "none"},
    {"centered": False},
    {"progressive_combine": "cat", "skip_rescale": False, "conditional": False},
    {"nonlinearity": "lrelu", "fir_kernel": (1, 1)},
])
def test_variants_run(changes):
    config = dataclasses.replace(TINY, **changes)
    field = build_random(config, seed=1)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = field(x, torch.tensor([0.3, 0.9]))
        other_t = field(x, torch.tensor([0.6, 0.9]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert out.abs().mean() > 0
    if config.conditional:
        assert not torch.allclose(out[0], other_t[0])   # the time embedding reaches the output
    torch.testing.assert_close(out[1], other_t[1])


def test_small_group_counts(small_config):
    groups = sorted({m.num_groups for m in NCSNpp(small_config).modules() if isinstance(m, torch.nn.GroupNorm)})
    assert groups == [4, 8, 12, 16]


def test_uncentered_network_maps_input_to_minus_one_one():
    centered = build_random(TINY, seed=2)
    uncentered = build_random(dataclasses.replace(TINY, centered=False), seed=2)
    x01 = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.2, 0.7])
    with torch.no_grad():
        torch.testing.assert_close(uncentered(x01, t), centered(2 * x01 - 1, t), rtol=1e-5, atol=1e-6)
    assert torch.equal(uncentered.to_image(x01), x01) and torch.equal(uncentered.from_image(x01), x01)
    torch.testing.assert_close(centered.to_image(centered.from_image(x01)), x01)


def test_adapter_contract(ema_field, ref):
    assert isinstance(ema_field, VelocityField)
    assert ema_field.sample_shape == (3, 32, 32) and ema_field.name.startswith("ncsnpp:")
    assert not any(p.requires_grad for p in ema_field.parameters()) and not ema_field.net.training
    with torch.no_grad():
        scalar = ema_field(ref["x"][:2], torch.tensor(0.6))
        vector = ema_field(ref["x"][:2], torch.tensor([0.6, 0.6]))
    assert torch.equal(scalar, vector)
    with pytest.raises(ValueError, match=r"t must have shape \(B,\)"):
        ema_field(ref["x"], torch.ones(3))
    with pytest.raises(ValueError, match="input x must have shape"):
        ema_field(torch.zeros(1, 3, 16, 16), torch.ones(1))
    assert len(ema_field.fingerprint()) == 64


def test_gradient_flows_to_the_input(ema_field, ref):
    x = ref["x"][:2].clone().requires_grad_(True)
    out = ema_field(x, ref["t"][1:3])
    (grad,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), x)
    assert grad.shape == x.shape and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_gradcheck_float64_tiny_network():
    net = build_random(TINY, seed=3).net.double()
    x = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    x.requires_grad_(True)
    time_cond = torch.tensor([400.0], dtype=torch.float64)
    # Directional check (full gradcheck over 768 inputs would be slow): d/de f(x + e v) vs v . grad.
    v = torch.randn_like(x)
    w = torch.randn(1, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (grad,) = torch.autograd.grad((net(x, time_cond) * w).sum(), x)
    eps = 1e-6
    with torch.no_grad():
        fd = ((net(x + eps * v, time_cond) - net(x - eps * v, time_cond)) * w).sum() / (2 * eps)
    torch.testing.assert_close((grad * v).sum(), fd, rtol=1e-6, atol=1e-9)


def test_channels_last_and_cpu_autocast(ref):
    base = load_rectified_flow(CKPT, SMALL_CONFIG)
    cl = load_rectified_flow(CKPT, SMALL_CONFIG, channels_last=True)
    bf16 = load_rectified_flow(CKPT, SMALL_CONFIG, autocast_dtype=torch.bfloat16)
    with torch.no_grad():
        expected = base(ref["x"], ref["t"])
        assert rel_l2(cl(ref["x"], ref["t"]), expected).max().item() <= 1e-5
        low = bf16(ref["x"], ref["t"])
    assert low.dtype == torch.float32 and torch.isfinite(low).all()
    assert rel_l2(low, expected).max().item() < 0.1
    with pytest.raises(ValueError, match="autocast_dtype"):
        RectifiedFlowVelocity(base.net, autocast_dtype=torch.int8)


def test_build_random_is_reproducible_and_follows_the_recipe():
    a, b, c = build_random(TINY, seed=7), build_random(TINY, seed=7), build_random(TINY, seed=8)
    sa, sb, sc = a.net.state_dict(), b.net.state_dict(), c.net.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["all_modules.4.Conv_0.weight"], sc["all_modules.4.Conv_0.weight"])
    big = build_random(dataclasses.replace(TINY, nf=32), seed=0).net.state_dict()
    w = big["all_modules.4.Conv_0.weight"]   # 32 -> 32, 3x3: fan_in 288
    assert abs(w.std().item() * 288 ** 0.5 - 1.0) < 0.05
    assert abs(big["all_modules.4.GroupNorm_0.weight"].mean().item() - 1.0) < 0.2
    assert big["sigmas"].dtype == torch.float64 and big["sigmas"][0].item() == pytest.approx(378.0)


# --------------------------------------------------------------------------- FIR resampling


def upfirdn_reference(x: torch.Tensor, taps: list[float], up: int, down: int, pad: tuple[int, int],
                      gain: float) -> torch.Tensor:
    """Upstream's native upfirdn2d semantics: zero insertion, zero pad, true convolution, subsample."""
    k = torch.tensor(taps, dtype=torch.float32)   # upstream builds the kernel in float32 (numpy)
    k2 = torch.outer(k, k)
    k2 = (k2 / k2.sum()).double() * gain
    b, c, h, w = x.shape
    z = torch.zeros(b, c, h * up, w * up, dtype=x.dtype)
    z[:, :, ::up, ::up] = x
    z = F.pad(z, (pad[0], pad[1], pad[0], pad[1]))
    weight = k2.flip(0, 1).to(x.dtype).expand(c, 1, *k2.shape)
    out = F.conv2d(z, weight, groups=c)   # conv2d correlates; flipping makes it a convolution
    return out[:, :, ::down, ::down]


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 1], [1, 2, 4], [1, 2, 3, 5, 1]])
def test_fir_matches_upfirdn_reference(taps):
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    kernel = fir_kernel_2d(taps).double()
    p = len(taps) - 2
    up_ref = upfirdn_reference(x, taps, up=2, down=1, pad=((p + 1) // 2 + 1, p // 2), gain=4.0)
    down_ref = upfirdn_reference(x, taps, up=1, down=2, pad=((p + 1) // 2, p // 2), gain=1.0)
    up, down = upsample_fir(x, kernel), downsample_fir(x, kernel)
    assert up.shape == (2, 3, 16, 12) and down.shape == (2, 3, 4, 3)
    torch.testing.assert_close(up, up_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(down, down_ref, rtol=1e-12, atol=1e-12)


def test_fir_constant_image_stays_constant_inside():
    kernel = fir_kernel_2d([1, 3, 3, 1])
    x = torch.full((1, 2, 8, 8), 3.0)
    up, down = upsample_fir(x, kernel), downsample_fir(x, kernel)
    torch.testing.assert_close(up[:, :, 2:-2, 2:-2], torch.full_like(up[:, :, 2:-2, 2:-2], 3.0))
    torch.testing.assert_close(down[:, :, 1:-1, 1:-1], torch.full_like(down[:, :, 1:-1, 1:-1], 3.0))
    assert up[0, 0, 0, 0].item() < 3.0       # zeros outside the image, as upstream


def test_fir_up_is_the_adjoint_of_down():
    kernel = fir_kernel_2d([1, 3, 3, 1])
    g = torch.Generator().manual_seed(9)
    x, y = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64), torch.randn(1, 2, 16, 16, generator=g,
                                                                                  dtype=torch.float64)
    k = kernel.double()
    # <up(x), y> = 4 <x, down(y)> for a symmetric kernel (up uses gain 4).
    torch.testing.assert_close((upsample_fir(x, k) * y).sum(), 4 * (x * downsample_fir(y, k)).sum())


@pytest.mark.parametrize("taps", [[1, 3, 3, 1], [1, 1], [1, 2, 4], [1, 2, 3, 5, 1]])
def test_separable_fir_matches_upfirdn_reference(taps):
    """The shifted-slice FIR (what compiled models run) computes upstream's sums, odd kernels included."""
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    p = len(taps) - 2
    up_ref = upfirdn_reference(x, taps, up=2, down=1, pad=((p + 1) // 2 + 1, p // 2), gain=4.0)
    down_ref = upfirdn_reference(x, taps, up=1, down=2, pad=((p + 1) // 2, p // 2), gain=1.0)
    up, down = Resample("up", True, taps), Resample("down", True, taps)
    up.impl = down.impl = "separable"
    # The conv path's kernel is rounded to float32 (as upstream's); the separable taps are exact.
    torch.testing.assert_close(up(x), up_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(down(x), down_ref, rtol=1e-6, atol=1e-6)


def _traced(module, x: torch.Tensor, **autocast) -> tuple[torch.Tensor, list]:
    """module(x) through torch.compile with a backend that records the traced FX graphs (optionally under CPU
    autocast): the output and every traced node."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    try:
        with torch.autocast("cpu", **autocast) if autocast else contextlib.nullcontext():
            out = torch.compile(module, backend=record)(x)
    finally:
        torch._dynamo.reset()
    return out, [n for g in graphs for n in g.graph.nodes]


def test_auto_fir_is_conv_eagerly_and_separable_when_compiled():
    m = Resample("down", True, [1, 3, 3, 1])
    x = torch.randn(1, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    calls = []
    real_conv = F.conv2d
    with mock.patch.object(F, "conv2d", side_effect=lambda *a, **k: calls.append(1) or real_conv(*a, **k)):
        eager = m(x)
    assert m.impl == "auto" and calls, "eagerly, auto runs the depthwise convolution"
    with pytest.raises(ValueError, match="separable"):
        m.impl = "seperable"
    compiled, nodes = _traced(m, x)
    ops = [str(n.target) for n in nodes if n.op == "call_function"]
    assert ops and not any("conv" in op for op in ops), ops
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)


def test_separable_fir_network_equals_conv_network_with_gradients(ref):
    field = load_rectified_flow(CKPT, SMALL_CONFIG)
    net = field.net.double()
    x = ref["x"][:2].double().requires_grad_(True)
    time_cond = 999.0 * ref["t"][:2].double()
    w = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    results = []
    resamplers = [m for m in net.modules() if isinstance(m, Resample) and m.fir]
    assert resamplers
    for impl in ("conv", "separable"):
        for m in resamplers:
            m.impl = impl
        out = net(x, time_cond)
        results.append((out, *torch.autograd.grad((out * w).sum(), x)))
    for m in resamplers:
        m.impl = "auto"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


def test_presets_are_valid_configs():
    assert set(PRESETS) == {DEFAULT_PRESET}
    assert all(isinstance(c, NCSNppConfig) for c in PRESETS.values())


def test_compiled_velocity_matches_eager_forward_and_vjp():
    """compile_backend routes the network call through torch.compile (aot_eager: dynamo + AOTAutograd, no codegen,
    so it runs on any CPU); values and input gradients equal the eager model's, and the fingerprint is unchanged."""
    eager = load_rectified_flow(CKPT, SMALL_CONFIG)
    compiled = load_rectified_flow(CKPT, SMALL_CONFIG, compile_backend="aot_eager")
    assert compiled.compile_backend == "aot_eager" and eager.compile_backend is None
    assert compiled.fingerprint() == eager.fingerprint()
    x = torch.randn((2, *eager.sample_shape), generator=torch.Generator().manual_seed(3))
    t = torch.tensor([0.25, 0.8])
    lam = torch.randn_like(x)
    outs = []
    for v in (eager, compiled):
        leaf = x.clone().requires_grad_(True)
        out = v(leaf, t)
        (grad,) = torch.autograd.grad(out, leaf, grad_outputs=lam)
        outs.append((out.detach(), grad))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="compile_backend"):
        load_rectified_flow(CKPT, SMALL_CONFIG, compile_backend="")


def _group_norm_calls(m: GroupNorm, x: torch.Tensor, **autocast) -> tuple[torch.Tensor, list[tuple]]:
    """m(x) under CPU autocast (when given), recording each F.group_norm call's dtypes and autocast state."""
    calls = []
    real = F.group_norm

    def spy(inp, groups, weight=None, bias=None, eps=1e-5):
        calls.append((inp.dtype, weight.dtype, torch.is_autocast_enabled("cpu")))
        return real(inp, groups, weight, bias, eps)

    with mock.patch.object(F, "group_norm", side_effect=spy), torch.autocast("cpu", **autocast):
        return m(x), calls


def test_group_norm_keeps_bf16_under_autocast_eagerly():
    """keep_half: a bf16 input under autocast is normalised with autocast off and bf16 affine parameters
    (CUDA autocast would otherwise run it in float32), its value that of float32 GroupNorm rounded to bf16;
    float32 inputs, keep_half=False and code traced by torch.compile take nn.GroupNorm's own path."""
    gen = torch.Generator().manual_seed(3)
    m = GroupNorm(4, 16, eps=1e-6)
    with torch.no_grad():
        m.weight.copy_(1 + 0.3 * torch.randn(16, generator=gen))
        m.bias.copy_(0.3 * torch.randn(16, generator=gen))
    assert isinstance(m, torch.nn.GroupNorm) and set(m.state_dict()) == {"weight", "bias"}
    x = (2 + 3 * torch.randn(2, 16, 8, 8, generator=gen)).bfloat16()
    out, calls = _group_norm_calls(m, x, dtype=torch.bfloat16)
    assert calls == [(torch.bfloat16, torch.bfloat16, False)] and out.dtype == torch.bfloat16
    expected = F.group_norm(x.float(), 4, m.weight, m.bias, 1e-6)
    torch.testing.assert_close(out.float(), expected, rtol=2e-2, atol=2e-2)
    m.keep_half = False
    _, calls = _group_norm_calls(m, x, dtype=torch.bfloat16)
    assert calls == [(torch.bfloat16, torch.float32, True)]
    m.keep_half = True
    _, calls = _group_norm_calls(m, x.float(), dtype=torch.bfloat16)
    assert calls == [(torch.float32, torch.float32, True)]
    _, calls = _group_norm_calls(m, x, enabled=False)
    assert calls == [(torch.bfloat16, torch.float32, False)]
    _, nodes = _traced(m, x, dtype=torch.bfloat16)
    assert any("group_norm" in str(n.target) for n in nodes)
    assert not any(n.op == "call_method" and n.target == "to" for n in nodes), "compiled: nn.GroupNorm's path"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA autocast runs group_norm in float32; needs a GPU")
def test_group_norm_bf16_under_cuda_autocast_keeps_gradients():
    net = load_rectified_flow(CKPT, SMALL_CONFIG).net.cuda()
    x = torch.randn(2, 16, 8, 8, device="cuda").bfloat16()
    gn = GroupNorm(4, 16).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert gn(x).dtype == torch.bfloat16
        gn.keep_half = False
        assert gn(x).dtype == torch.float32
    fp32 = RectifiedFlowVelocity(net)
    bf16 = RectifiedFlowVelocity(net, autocast_dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn((2, *fp32.sample_shape), generator=gen).cuda()
    t = torch.full((2,), 0.4, device="cuda")
    grads = []
    for v in (fp32, bf16):
        leaf = z.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(v(leaf, t).square().sum(), leaf)[0].flatten(1))
    assert F.cosine_similarity(*grads, dim=1).min().item() >= 0.999
