"""CLIP guidance on tiny random-init open_clip models: loading, the loss and its guarantees.

No network and no real weights: a tiny model config is written per test session and weights are
round-tripped through files in tmp_path.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowgrad.augment import apply_augment
from flowgrad.clip_guidance import (
    OFF_AXIS_SMOOTHING, ClipLoadError, ClipLoss, ClipModel, clip_score, load_clip, random_clip, zero_shot,
)

REPO = Path(__file__).resolve().parents[1]
TEST_CONFIG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
PROMPT, NEGATIVE = "a photo of a smiling face", "a photo of a sad face"


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("configs") / "flowgrad-test-clip.json"
    path.write_text(json.dumps(TEST_CONFIG))
    return path


@pytest.fixture(scope="module")
def clip(config_path) -> ClipModel:
    return random_clip(str(config_path), seed=0)


def images(b: int = 3, size: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- imports


def test_importing_flowgrad_does_not_import_open_clip():
    code = ("import sys, flowgrad, flowgrad.clip_guidance, flowgrad.augment; "
            "print(sorted(m for m in ('open_clip', 'huggingface_hub', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=120, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------- model holder


def test_random_clip_is_frozen_and_encodes_normalized(clip):
    assert clip.image_size == 32 and len(clip.mean) == 3 and len(clip.std) == 3
    assert not clip.model.training
    assert not any(p.requires_grad for p in clip.model.parameters())
    text = clip.encode_text([PROMPT, NEGATIVE])
    assert text.shape == (2, 16)
    torch.testing.assert_close(text.norm(dim=1), torch.ones(2))
    emb = clip.encode_image(torch.rand(3, 3, 40, 28))  # any H, W
    assert emb.shape == (3, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_encode_image_resizes_and_normalizes_like_the_model_expects(clip):
    x = images(2, 48)
    by_hand = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear",
                                              align_corners=False, antialias=False)
    mean = torch.tensor(clip.mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.std).view(1, 3, 1, 1)
    expected = clip.model.encode_image((by_hand - mean) / std, normalize=True)
    torch.testing.assert_close(clip.encode_image(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(clip.encode_image(x, max_batch=1), expected, rtol=0, atol=1e-6)


def test_random_clip_is_seeded_and_leaves_global_rng_alone(config_path):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = random_clip(str(config_path), seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after)
    b, c = random_clip(str(config_path), seed=7), random_clip(str(config_path), seed=8)
    assert a.name == "random:flowgrad-test-clip:seed=7"
    sa, sb, sc = (m.model.state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["visual.conv1.weight"], sc["visual.conv1.weight"])


def test_demo_config_is_found_by_name():
    tiny = random_clip("flowgrad-tiny-clip")
    assert tiny.image_size == 64
    n_params = sum(p.numel() for p in tiny.model.parameters())
    assert 4_000_000 < n_params < 12_000_000
    assert tiny.encode_image(torch.rand(2, 3, 64, 64)).shape == (2, 128)
    assert tiny.tokenizer(["a face"]).shape == (1, 32)


def test_bad_images_are_rejected(clip):
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        clip.encode_image(torch.rand(3, 32, 32))
    with pytest.raises(TypeError, match="float"):
        clip.encode_image(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


# --------------------------------------------------------------------------- loss


def test_loss_is_per_image_and_gradient_reaches_every_image(clip):
    loss = ClipLoss(clip, PROMPT, replicas=3)
    x = images().requires_grad_(True)
    out = loss(x)
    assert out.shape == (3,) and torch.isfinite(out).all()
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    assert (x.grad.flatten(1).abs().sum(1) > 0).all()
    assert loss.last_terms is not None and loss.last_terms.clip.shape == (3,)
    assert not loss.last_terms.loss.requires_grad


def test_one_image_loss_has_no_gradient_to_other_images(clip):
    loss = ClipLoss(clip, PROMPT, source=images(seed=1), replicas=4)
    x = images().requires_grad_(True)
    loss(x)[1].backward()
    assert torch.count_nonzero(x.grad[0]) == 0 and torch.count_nonzero(x.grad[2]) == 0
    assert torch.count_nonzero(x.grad[1]) > 0


def test_perturbing_one_image_leaves_the_other_losses_unchanged(clip):
    loss = ClipLoss(clip, PROMPT, replicas=4)
    params = loss.sample_params(3)
    x = images()
    y = x.clone()
    y[0] = 1.0 - y[0]
    before, after = loss(x, params), loss(y, params)
    torch.testing.assert_close(after[1:], before[1:], rtol=0, atol=1e-7)
    assert (after[0] - before[0]).abs() > 1e-4


def test_batch_loss_equals_each_image_alone_with_its_params(clip):
    r = 4
    loss = ClipLoss(clip, PROMPT, negative_prompt=NEGATIVE, source=images(seed=2), replicas=r)
    params = loss.sample_params(3)
    batch = loss(images(), params)
    alone_loss = ClipLoss(clip, PROMPT, negative_prompt=NEGATIVE, replicas=r)
    for b in range(3):
        alone_loss.source = images(seed=2)[b:b + 1]
        single = alone_loss(images()[b:b + 1], params.select(slice(b * r, (b + 1) * r)))
        torch.testing.assert_close(single, batch[b:b + 1], rtol=0, atol=1e-6)


def test_clip_term_matches_a_hand_computation(clip):
    r = 5
    loss = ClipLoss(clip, PROMPT, replicas=r, seed=3)
    params = loss.sample_params(3)
    x = images()
    emb = clip.encode_image(apply_augment(x.repeat_interleave(r, dim=0), params))
    text = clip.encode_text([PROMPT])[0]
    expected = -(emb @ text).view(3, r).mean(1)
    torch.testing.assert_close(loss.terms(x, params).clip, expected, rtol=0, atol=1e-6)


def test_without_augmentation_clip_term_is_negative_clip_score_and_directional(clip):
    x = images()
    plain = ClipLoss(clip, PROMPT, policy=(), replicas=2, alpha=1.0)
    torch.testing.assert_close(plain(x), -clip_score(clip, x, PROMPT), rtol=0, atol=1e-6)
    directional = ClipLoss(clip, PROMPT, negative_prompt=NEGATIVE, policy=(), replicas=1,
                           alpha=1.0)
    expected = -(clip_score(clip, x, PROMPT) - clip_score(clip, x, NEGATIVE))
    torch.testing.assert_close(directional(x), expected, rtol=0, atol=1e-6)


def test_alpha_mixes_clip_and_l1_terms(clip):
    x, source = images(), images(seed=9)
    hand_l1 = (x - source).abs().mean(dim=(1, 2, 3))
    only_l1 = ClipLoss(clip, PROMPT, source=source, alpha=0.0, replicas=2)
    assert torch.equal(only_l1(x), hand_l1)
    only_clip = ClipLoss(clip, PROMPT, source=source, alpha=1.0, replicas=2, seed=4)
    out = only_clip(x)
    assert torch.equal(out, only_clip.last_terms.clip)
    assert torch.equal(only_clip.last_terms.l1, hand_l1)
    mixed = ClipLoss(clip, PROMPT, source=source, alpha=0.7, replicas=2, seed=4)
    torch.testing.assert_close(mixed(x), 0.7 * only_clip.last_terms.clip + 0.3 * hand_l1,
                               rtol=0, atol=1e-6)
    no_source = ClipLoss(clip, PROMPT, alpha=0.5, replicas=2)
    no_source(x)
    assert not no_source.last_terms.l1.any()


KEEP = [("a photo of a person with red hair", "a photo of a person with black hair"), ("a photo of glasses", "")]


def test_preserve_term_is_zero_at_the_source_and_matches_the_formula(clip):
    x, source = images(), images(seed=9)
    loss = ClipLoss(clip, PROMPT, source=source, alpha=0.7, replicas=2, seed=3, preserve=KEEP,
                    preserve_weight=2.0)
    plain = ClipLoss(clip, PROMPT, source=source, alpha=0.7, replicas=2, seed=3)
    params = loss.sample_params(3)
    at_source = loss.terms(source, params)
    assert torch.equal(at_source.keep, torch.zeros(3))
    terms = loss.terms(x, params)
    # by hand, with the same augmentations for the image and its source
    e = clip.encode_text([KEEP[0][0], KEEP[0][1], KEEP[1][0]])
    m = torch.stack([e[0] - e[1], e[2]], dim=1)

    def s(imgs):
        emb = clip.encode_image(apply_augment(imgs.repeat_interleave(2, dim=0), params))
        return (emb @ m).view(3, 2, 2).mean(dim=1)
    expected = (s(x) - s(source)).abs().mean(dim=1)
    torch.testing.assert_close(terms.keep, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(terms.loss, plain.terms(x, params).loss + 2.0 * expected, rtol=0, atol=1e-6)
    assert plain.terms(x, params).keep is None
    xr = x.clone().requires_grad_(True)
    loss.terms(xr, params).keep.sum().backward()
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def descend(loss: ClipLoss, source: torch.Tensor, steps: int = 20, lr: float = 0.5) -> torch.Tensor:
    """``steps`` of plain gradient descent on the image itself, from ``source``."""
    x = source.clone().requires_grad_(True)
    opt = torch.optim.SGD([x], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        loss(x).sum().backward()
        opt.step()
    return x.detach()


def test_preserve_keeps_the_preserved_score_during_optimization(clip):
    """Gradient descent on the image: with the preserve term the preserved score moves less."""
    source = images(b=2, seed=5)

    def run(weight):
        loss = ClipLoss(clip, PROMPT, source=source, alpha=1.0, replicas=1, policy=(), preserve=KEEP[:1],
                        preserve_weight=weight)
        x = descend(loss, source)
        with torch.no_grad():
            t = loss.terms(x)
        return float(t.clip.mean()), float(t.keep.mean())
    (_, keep_free), (clip_kept, keep_kept) = run(0.0), run(5.0)
    assert keep_free > 0 and keep_kept < 0.5 * keep_free
    assert clip_kept < -float(clip_score(clip, source, PROMPT).mean())  # the edit still happened


def test_preserve_arguments_are_validated(clip):
    src = images()
    with pytest.raises(ValueError, match="source"):
        ClipLoss(clip, PROMPT, preserve=KEEP, preserve_weight=1.0)
    with pytest.raises(ValueError, match="pair"):
        ClipLoss(clip, PROMPT, source=src, preserve=["red hair"], preserve_weight=1.0)
    with pytest.raises(ValueError, match="sequence"):
        ClipLoss(clip, PROMPT, source=src, preserve="red hair", preserve_weight=1.0)
    with pytest.raises(ValueError, match="preserve_weight"):
        ClipLoss(clip, PROMPT, source=src, preserve=KEEP, preserve_weight=-1.0)


@pytest.mark.parametrize("negative", [None, NEGATIVE])
def test_off_axis_term_is_zero_at_the_source_and_matches_the_formula(clip, negative):
    x, source = images(), images(seed=9)
    loss = ClipLoss(clip, PROMPT, negative_prompt=negative, source=source, alpha=0.7, replicas=2, seed=3,
                    off_axis_weight=0.5)
    plain = ClipLoss(clip, PROMPT, negative_prompt=negative, source=source, alpha=0.7, replicas=2, seed=3)
    params = loss.sample_params(3)
    assert torch.equal(loss.terms(source, params).off_axis, torch.zeros(3))
    terms = loss.terms(x, params)
    # by hand: the embedding change under the same augmentations, minus its part along the text axis
    e = clip.encode_text([PROMPT] if negative is None else [PROMPT, negative])
    axis = e[0] if negative is None else e[0] - e[1]
    axis = axis / axis.norm()

    def emb(imgs):
        return clip.encode_image(apply_augment(imgs.repeat_interleave(2, dim=0), params))
    change = emb(x) - emb(source)
    off = change - (change @ axis)[:, None] * axis
    d = OFF_AXIS_SMOOTHING
    expected = ((off.square().sum(1) + d * d).sqrt() - d).view(3, 2).mean(1)
    torch.testing.assert_close(terms.off_axis, expected, rtol=0, atol=1e-6)
    assert (expected > 0).all()  # different images differ off the axis too, not only along it
    torch.testing.assert_close(terms.loss, plain.terms(x, params).loss + 0.7 * 0.5 * expected, rtol=0, atol=1e-6)
    assert plain.terms(x, params).off_axis is None
    torch.testing.assert_close(terms.clip, plain.terms(x, params).clip, rtol=0, atol=0)  # reported apart


def test_off_axis_term_leaves_changes_along_the_text_axis_free(clip):
    loss = ClipLoss(clip, PROMPT, negative_prompt=NEGATIVE, source=images(b=2), replicas=2, off_axis_weight=1.0)
    ref = torch.nn.functional.normalize(torch.randn(4, loss.text_axis.numel()), dim=1)
    along = ref + 0.3 * loss.text_axis
    torch.testing.assert_close(loss._off_axis(along, ref, 2), torch.zeros(2), rtol=0, atol=1e-6)
    side = torch.randn(loss.text_axis.numel())
    side = 0.2 * (side - (side @ loss.text_axis) * loss.text_axis) / (side - (side @ loss.text_axis)
                                                                      * loss.text_axis).norm()
    d = OFF_AXIS_SMOOTHING
    torch.testing.assert_close(loss._off_axis(ref + side + 0.3 * loss.text_axis, ref, 2),
                               torch.full((2,), (0.04 + d * d) ** 0.5 - d), rtol=0, atol=1e-6)


def test_off_axis_term_steers_the_embedding_change_towards_the_axis(clip):
    """Gradient descent on the image: with the term, less of the embedding change is off the text axis."""
    source = images(b=2, seed=5)

    def run(weight):
        loss = ClipLoss(clip, PROMPT, negative_prompt=NEGATIVE, source=source, alpha=1.0, replicas=1, policy=(),
                        off_axis_weight=weight)
        x = descend(loss, source)
        with torch.no_grad():
            change = clip.encode_image(x) - clip.encode_image(source)
            along = change @ loss.text_axis
            off = (change - along[:, None] * loss.text_axis).norm(dim=1)
        return float(along.mean()), float(off.mean())
    (along_free, off_free), (along_held, off_held) = run(0.0), run(2.0)
    assert along_held > 0 and along_free > 0  # both edits moved along the axis
    assert off_held / along_held < 0.7 * (off_free / along_free)


def test_off_axis_arguments_are_validated(clip):
    with pytest.raises(ValueError, match="source"):
        ClipLoss(clip, PROMPT, off_axis_weight=1.0)
    for bad in (-1.0, True, "1"):
        with pytest.raises(ValueError, match="off_axis_weight"):
            ClipLoss(clip, PROMPT, source=images(), off_axis_weight=bad)
    ClipLoss(clip, PROMPT, off_axis_weight=0.0)  # off: no source needed


def test_calls_are_reproducible_from_the_seed_and_draw_fresh_params(clip):
    x = images()
    a, b = ClipLoss(clip, PROMPT, replicas=2, seed=11), ClipLoss(clip, PROMPT, replicas=2, seed=11)
    a1, a2 = a(x), a(x)
    assert torch.equal(a1, b(x)) and torch.equal(a2, b(x))
    assert not torch.equal(a1, a2)
    assert not torch.equal(a1, ClipLoss(clip, PROMPT, replicas=2, seed=12)(x))


def test_fixed_augmentations_reuse_the_first_draw_per_batch_size(clip):
    x = images()
    fixed = ClipLoss(clip, PROMPT, replicas=2, seed=11, fixed_augmentations=True)
    first = fixed(x)
    assert torch.equal(fixed(x), first)  # a deterministic function of the images
    draw = ClipLoss(clip, PROMPT, replicas=2, seed=11)
    assert torch.equal(first, draw(x, draw.sample_params(3)))  # the seed's first draw
    fixed(x[:2])  # another batch size draws its own set and keeps the first
    assert torch.equal(fixed(x), first)
    moved = x.clone()
    moved[1] = moved[1].flip(-1)  # a change to image 1 changes its loss only
    after = fixed(moved)
    assert torch.equal(after[[0, 2]], first[[0, 2]]) and not torch.equal(after[1], first[1])


def test_image_seeds_make_each_image_draw_independently_of_its_batch(clip):
    """With one seed per image, an image's loss is the same whatever images share its batch and in what
    order; fixed draws and reseeding keep that."""
    x = images(4)
    seeds = [101, 202, 303, 404]
    whole = ClipLoss(clip, PROMPT, replicas=3, image_seeds=seeds)
    full = [whole(x) for _ in range(2)]  # two calls: each image's generator moves on
    assert not torch.equal(full[0], full[1])
    order = [2, 0]
    part = ClipLoss(clip, PROMPT, replicas=3, image_seeds=[seeds[i] for i in order])
    for call in full:
        torch.testing.assert_close(part(x[order]), call[order], rtol=0, atol=1e-6)
    shared = ClipLoss(clip, PROMPT, replicas=3, seed=101)(x)  # one generator for the batch draws otherwise
    assert not torch.allclose(shared, full[0], atol=1e-6)
    whole.reseed(seeds)  # a restart gives the first draws again
    torch.testing.assert_close(whole(x), full[0], rtol=0, atol=0)
    fixed = ClipLoss(clip, PROMPT, replicas=3, image_seeds=seeds, fixed_augmentations=True)
    torch.testing.assert_close(fixed(x), full[0], rtol=0, atol=0)
    torch.testing.assert_close(fixed(x), full[0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="seeds for 4 images, got a batch of 2"):
        whole(x[:2])
    for bad in (7, [1.5, 2], "12"):
        with pytest.raises(ValueError, match="image_seeds"):
            ClipLoss(clip, PROMPT, image_seeds=bad)


@pytest.mark.parametrize("size", [24, 40])  # the tower's input is 32: down- and upsampling
def test_deterministic_preprocess_resizes_as_interpolate_does(clip, size, monkeypatch):
    """Under deterministic algorithms the input resize runs as matrix products: same values and pixel
    gradients as interpolate (bilinear, no antialias), which it does not call."""
    x = images(3, size=size)
    results = []
    interpolate_calls = []
    interpolate = torch.nn.functional.interpolate

    def counted(*args, **kwargs):
        interpolate_calls.append(torch.are_deterministic_algorithms_enabled())
        return interpolate(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "interpolate", counted)
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for mode in (True, False):
            torch.use_deterministic_algorithms(mode)
            leaf = x.clone().requires_grad_(True)
            out = clip.preprocess(leaf)
            (grad,) = torch.autograd.grad(out.square().sum(), leaf)
            results.append((out.detach(), grad))
    finally:
        torch.use_deterministic_algorithms(before)
    assert interpolate_calls == [False]  # only the non-deterministic pass resized with interpolate
    assert results[0][0].shape == (3, 3, 32, 32)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-5)


def test_max_batch_chunks_give_the_same_loss(clip, monkeypatch):
    """The 3 * 4 augmented copies go through the image tower in one call, or in ceil(12 / 5) = 3 calls of at
    most 5 rows with max_batch=5; the losses agree."""
    rows: list[int] = []
    encode = clip.model.encode_image

    def counted(x, *args, **kwargs):
        rows.append(x.shape[0])
        return encode(x, *args, **kwargs)

    monkeypatch.setattr(clip.model, "encode_image", counted)
    x = images()
    whole = ClipLoss(clip, PROMPT, replicas=4, seed=1)(x)
    assert rows == [12]
    rows.clear()
    chunked = ClipLoss(clip, PROMPT, replicas=4, seed=1, max_batch=5)(x)
    assert rows == [5, 5, 2]
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)


def test_loss_arguments_are_validated(clip):
    with pytest.raises(ValueError, match="alpha"):
        ClipLoss(clip, PROMPT, alpha=1.5)
    with pytest.raises(ValueError, match="replicas"):
        ClipLoss(clip, PROMPT, replicas=0)
    with pytest.raises(ValueError, match="prompt"):
        ClipLoss(clip, "  ")
    with pytest.raises(ValueError, match="source has shape"):
        ClipLoss(clip, PROMPT, source=images(2))(images(3))
    loss = ClipLoss(clip, PROMPT, replicas=2)
    with pytest.raises(ValueError, match="sample_params"):
        loss(images(3), loss.sample_params(2))


def test_clip_score_and_zero_shot(clip):
    x = images(4)
    score = clip_score(clip, x, PROMPT)
    assert score.shape == (4,) and (score.abs() <= 1 + 1e-6).all()
    torch.testing.assert_close(score, clip.encode_image(x) @ clip.encode_text([PROMPT])[0])
    wins = zero_shot(clip, x, PROMPT, NEGATIVE)
    assert wins.dtype == torch.bool and wins.shape == (4,)
    assert torch.equal(wins, score > clip_score(clip, x, NEGATIVE))
    assert torch.equal(zero_shot(clip, x, NEGATIVE, PROMPT), ~wins)


# --------------------------------------------------------------------------- load_clip


def assert_same_model(loaded: ClipModel, original: ClipModel) -> None:
    a, b = loaded.model.state_dict(), original.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = images(2, 32)
    assert torch.equal(loaded.encode_image(x), original.encode_image(x))
    assert torch.equal(loaded.encode_text([PROMPT]), original.encode_text([PROMPT]))


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_config_json_round_trip_is_bit_exact(clip, config_path, tmp_path, suffix):
    folder = tmp_path / "a:b"  # a colon in the paths (CONFIG_JSON:FILE is split at the config's ".json:")
    folder.mkdir()
    config_path = Path(shutil.copy(config_path, folder / config_path.name))
    weights = folder / f"weights{suffix}"
    if suffix == ".pt":
        torch.save(clip.model.state_dict(), weights)
    else:
        from safetensors.torch import save_file
        save_file(clip.model.state_dict(), str(weights))
    spec = f"{config_path}:{weights}"
    loaded = load_clip(spec)
    assert loaded.name == spec and loaded.image_size == 32
    assert_same_model(loaded, clip)
    assert_same_model(load_clip(f"flowgrad-test-clip:{weights}"), clip)  # registered by now


def write_hf_folder(folder: Path, clip: ClipModel, weights_name: str,
                    preprocess: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    config = {"model_cfg": TEST_CONFIG, **({"preprocess_cfg": preprocess} if preprocess else {})}
    (folder / "open_clip_config.json").write_text(json.dumps(config))
    if weights_name.endswith(".safetensors"):
        from safetensors.torch import save_file
        save_file(clip.model.state_dict(), str(folder / weights_name))
    else:
        torch.save(clip.model.state_dict(), folder / weights_name)
    return folder


def test_hf_layout_folder_round_trip(clip, tmp_path):
    folder = write_hf_folder(tmp_path / "bin", clip, "open_clip_pytorch_model.bin")
    assert_same_model(load_clip(str(folder)), clip)
    custom = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    folder = write_hf_folder(tmp_path / "st", clip, "open_clip_model.safetensors", custom)
    loaded = load_clip(str(folder))
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)
    a, b = loaded.model.state_dict(), clip.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hf_hub_spec_resolves_from_the_local_cache_only(clip, tmp_path):
    repo = tmp_path / "hub" / "models--someorg--tiny-clip"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef0123456789abcdef01234567")
    write_hf_folder(repo / "snapshots" / "0123456789abcdef0123456789abcdef01234567", clip,
                    "open_clip_pytorch_model.bin")
    assert_same_model(load_clip("hf-hub:someorg/tiny-clip", cache_dir=tmp_path / "hub"), clip)
    start = time.perf_counter()
    with pytest.raises(ClipLoadError, match="not in the local Hugging Face cache"):
        load_clip("hf-hub:someorg/absent-clip", cache_dir=tmp_path / "hub")
    assert time.perf_counter() - start < 5.0


def test_missing_weights_fail_fast_with_a_one_line_fix(tmp_path):
    import open_clip  # noqa: F401 - time the lookup, not the first import of the package

    missing = tmp_path / "nowhere" / "vit_b_32.pt"
    start = time.perf_counter()
    with pytest.raises(ClipLoadError) as info:
        load_clip(f"ViT-B-32:{missing}")
    assert time.perf_counter() - start < 5.0
    message = str(info.value)
    assert str(missing) in message and "\n" not in message
    assert "open_clip_pytorch_model.bin" in message and "hf-hub:timm/" in message
    assert "ViT-B-32-quickgelu" in message  # the OpenAI weights need QuickGELU


def test_unknown_names_corrupt_and_mismatched_files_are_explained(clip, config_path, tmp_path):
    weights = tmp_path / "w.pt"
    torch.save(clip.model.state_dict(), weights)
    with pytest.raises(ClipLoadError, match="unknown open_clip model 'NoSuchNet-7'.*list_models"):
        load_clip(f"NoSuchNet-7:{weights}")
    with pytest.raises(ClipLoadError, match="unknown open_clip model"):
        random_clip("NoSuchNet-7")
    for name in ("junk.pt", "junk.safetensors"):
        (tmp_path / name).write_bytes(b"definitely not a checkpoint" * 10)
        with pytest.raises(ClipLoadError, match="corrupt"):
            load_clip(f"{config_path}:{tmp_path / name}")
    other = dict(TEST_CONFIG, embed_dim=8)
    other_path = tmp_path / "flowgrad-test-clip-e8.json"
    other_path.write_text(json.dumps(other))
    with pytest.raises(ClipLoadError, match="do not fit model"):
        load_clip(f"{other_path}:{weights}")
    with pytest.raises(ClipLoadError, match="is not NAME:FILE"):
        load_clip("ViT-B-32")
    with pytest.raises(ClipLoadError, match="has no open_clip_config.json"):
        load_clip(str(tmp_path))


def test_a_config_name_clash_is_refused(config_path, tmp_path):
    random_clip(str(config_path))  # registered
    clash = tmp_path / "flowgrad-test-clip.json"
    clash.write_text(json.dumps(dict(TEST_CONFIG, embed_dim=24)))
    with pytest.raises(ClipLoadError, match="rename the file"):
        random_clip(str(clash))
