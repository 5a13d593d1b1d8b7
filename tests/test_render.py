"""The demo world: procedural portraits from known factors, and their captions."""

from __future__ import annotations

import re
import time

import pytest
import torch

from flowgrad.demo.captions import (
    AGE_OLD_MIN, AGE_YOUNG_MAX, CAPTION_VOCAB, NEUTRAL_MAX, SMILE_MIN, caption, concepts,
)
from flowgrad.demo.render import (
    FACTOR_NAMES, FACTORS, HAIR_COLORS, factor_spec, render, render_factors, sample_factors,
)

BINARY = [f.name for f in FACTORS if f.kind == "binary"]


# ---------------------------------------------------------------------------------------------
# factors

def test_factor_list_covers_the_required_factors() -> None:
    required = {"age", "smile", "glasses", "glasses_frame", "beard", "beard_density", *HAIR_COLORS,
                "hair_length", "skin_tone", "face_width", "eye_openness", "background_hue",
                "offset_x", "offset_y", "tilt"}
    assert required <= set(FACTOR_NAMES)
    assert len(set(FACTOR_NAMES)) == len(FACTOR_NAMES)
    assert all(f.kind in ("continuous", "binary") and f.description for f in FACTORS)
    assert factor_spec("glasses").kind == "binary"
    with pytest.raises(ValueError, match="known factors"):
        factor_spec("gender")


def test_sampled_factors_types_ranges_binaries_and_one_hot_hair() -> None:
    f = sample_factors(400, seed=3)
    assert list(f) == list(FACTOR_NAMES)
    for name, col in f.items():
        assert col.shape == (400,) and col.dtype == torch.float32, name
        assert float(col.min()) >= 0.0 and float(col.max()) <= 1.0, name
    for name in BINARY:
        assert set(f[name].unique().tolist()) == {0.0, 1.0}, name
    hair = torch.stack([f[c] for c in HAIR_COLORS])
    assert torch.equal(hair.sum(0), torch.ones(400))
    assert (hair.sum(1) > 50).all()  # each colour is common
    assert torch.equal(f["glasses_frame"][f["glasses"] == 0], torch.zeros(int((f["glasses"] == 0).sum())))
    assert torch.equal(f["beard_density"][f["beard"] == 0], torch.zeros(int((f["beard"] == 0).sum())))
    assert 0.3 < float(f["glasses"].mean()) < 0.5 and 0.25 < float(f["beard"].mean()) < 0.45
    # continuous factors spread over [0, 1] and are not copies of each other
    assert 0.4 < float(f["age"].mean()) < 0.6 and float(f["age"].std()) > 0.25
    assert abs(float(torch.corrcoef(torch.stack([f["age"], f["smile"]]))[0, 1])) < 0.15


def test_given_factors_are_honoured_and_others_unchanged() -> None:
    free = sample_factors(6, seed=11)
    smile = torch.linspace(0.0, 1.0, 6)
    given = sample_factors(6, seed=11, factors={"age": 0.9, "smile": smile, "hair_red": 1})
    assert torch.equal(given["age"], torch.full((6,), 0.9))
    assert torch.equal(given["smile"], smile)
    assert torch.equal(given["hair_red"], torch.ones(6))
    for c in ("hair_black", "hair_brown", "hair_blond"):
        assert torch.equal(given[c], torch.zeros(6))
    for name in FACTOR_NAMES:
        if name not in ("age", "smile", *HAIR_COLORS):
            assert torch.equal(given[name], free[name]), name


def test_gated_factors() -> None:
    f = sample_factors(20, seed=2, factors={"glasses": 0, "beard": 1})
    assert torch.equal(f["glasses_frame"], torch.zeros(20))
    assert (f["beard_density"] > 0).all()
    f = sample_factors(20, seed=2, factors={"glasses_frame": 0.5, "beard_density": 0.25})
    assert torch.equal(f["glasses"], torch.ones(20)) and torch.equal(f["beard"], torch.ones(20))
    with pytest.raises(ValueError, match="glasses_frame must be 0 where glasses is 0"):
        sample_factors(3, seed=0, factors={"glasses": 0, "glasses_frame": 0.5})


def test_hair_colour_subsets() -> None:
    f = sample_factors(300, seed=4, factors={"hair_red": 0})
    assert torch.equal(f["hair_red"], torch.zeros(300))
    hair = torch.stack([f[c] for c in HAIR_COLORS])
    assert torch.equal(hair.sum(0), torch.ones(300))
    assert (hair[:3].sum(1) > 60).all()
    with pytest.raises(ValueError, match="exactly one"):
        sample_factors(2, seed=0, factors={c: 0 for c in HAIR_COLORS})
    with pytest.raises(ValueError, match="at most one"):
        sample_factors(2, seed=0, factors={"hair_red": 1, "hair_blond": 1})


@pytest.mark.parametrize("factors, error, match", [
    ({"gender": 1.0}, ValueError, "unknown factor"),
    ({"age": 1.5}, ValueError, r"must lie in \[0, 1\]"),
    ({"age": float("nan")}, ValueError, r"must lie in \[0, 1\]"),
    ({"glasses": 0.5}, ValueError, "exactly 0 or 1"),
    ({"age": torch.zeros(3)}, ValueError, r"shape \(4,\)"),
    ({"age": "old"}, TypeError, "must be a number"),
])
def test_invalid_factor_overrides(factors: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        render(4, seed=0, factors=factors)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="n must be >= 0"):
        render(-1, seed=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        render(2, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="supersample must be >= 1"):
        render(2, seed=0, supersample=0)
    f = sample_factors(2, seed=0)
    del f["tilt"]
    with pytest.raises(ValueError, match=r"missing \['tilt'\]"):
        render_factors(f, seed=0)
    f = sample_factors(2, seed=0)
    f["hair_red"] = torch.ones(2)
    with pytest.raises(ValueError, match="exactly one"):
        render_factors(f, seed=0)


# ---------------------------------------------------------------------------------------------
# images

def test_images_shape_dtype_range() -> None:
    images, factors = render(12, seed=0)
    assert images.shape == (12, 3, 64, 64) and images.dtype == torch.float32
    assert bool(torch.isfinite(images).all())
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert float(images.std()) > 0.1  # not blank
    assert list(factors) == list(FACTOR_NAMES)
    small = render_factors(factors, seed=0, size=32, supersample=1)
    assert small.shape == (12, 3, 32, 32)
    empty, f0 = render(0, seed=0)
    assert empty.shape == (0, 3, 64, 64) and f0["age"].shape == (0,)


def test_determinism_and_seed_dependence() -> None:
    a, fa = render(6, seed=7)
    b, fb = render(6, seed=7)
    c, fc = render(6, seed=8)
    assert torch.equal(a, b)
    assert all(torch.equal(fa[k], fb[k]) for k in FACTOR_NAMES)
    assert not torch.equal(fa["age"], fc["age"])
    assert (a - c).abs().mean(dim=(1, 2, 3)).min() > 0.01  # every image differs


def test_image_depends_only_on_seed_and_index() -> None:
    small, f_small = render(5, seed=21)
    large, f_large = render(37, seed=21)  # other internal chunking
    assert torch.equal(small, large[:5])
    assert all(torch.equal(f_small[k], f_large[k][:5]) for k in FACTOR_NAMES)


def test_same_person_with_one_factor_changed() -> None:
    young, fy = render(4, seed=5, factors={"age": 0.1})
    old, fo = render(4, seed=5, factors={"age": 0.9})
    for name in FACTOR_NAMES:
        if name != "age":
            assert torch.equal(fy[name], fo[name]), name
    diff = (young - old).abs().amax(dim=1)  # (4, 64, 64)
    assert (diff > 0.1).sum(dim=(1, 2)).min() > 200  # old is very visible
    corners = torch.cat([diff[:, :6, :6], diff[:, :6, -6:]], dim=1)
    assert float(corners.max()) == 0.0  # the background does not change


def _variants(name: str, n: int) -> tuple[dict, dict]:
    """Two overrides that differ in factor ``name`` only (gates held at 1)."""
    if name in HAIR_COLORS:
        other = "hair_black" if name != "hair_black" else "hair_brown"
        return {other: torch.ones(n)}, {name: torch.ones(n)}
    gate = {"glasses_frame": "glasses", "beard_density": "beard"}.get(name)
    extra = {gate: torch.ones(n)} if gate else {}
    if factor_spec(name).kind == "binary":
        return {name: torch.zeros(n)}, {name: torch.ones(n)}
    lo, hi = (0.0, 0.5) if name.endswith("hue") else (0.2, 0.8)
    return {**extra, name: torch.full((n,), lo)}, {**extra, name: torch.full((n,), hi)}


@pytest.mark.parametrize("name", FACTOR_NAMES)
def test_every_factor_visibly_changes_every_image(name: str) -> None:
    n = 8
    lo, hi = _variants(name, n)
    a, fa = render(n, seed=5, factors=lo)
    b, fb = render(n, seed=5, factors=hi)
    assert not torch.equal(fa[name], fb[name])
    changed = ((a - b).abs().amax(dim=1) > 0.1).sum(dim=(1, 2))  # pixels changed by > 0.1
    assert int(changed.min()) >= 20, f"{name}: only {changed.tolist()} pixels changed"


def test_render_speed_smoke() -> None:
    start = time.perf_counter()
    render(128, seed=0)
    assert time.perf_counter() - start < 15.0  # ~0.3 s on one core; only catches pathologies


# ---------------------------------------------------------------------------------------------
# captions

def _words(concept: str) -> list[str]:
    adjectives, phrases = CAPTION_VOCAB[concept]
    return [*adjectives, *phrases]


def _mentions(text: str, concept: str) -> bool:
    # whole words only, and "not smiling" does not mention "smiling"
    return any(re.search(rf"(?<![\w-])(?<!not ){re.escape(w)}(?![\w-])", text) for w in _words(concept))


def test_captions_agree_with_factors() -> None:
    f = sample_factors(600, seed=9)
    texts = caption(f, seed=1)
    assert len(texts) == 600 and len(set(texts)) > 300
    rows = [{k: float(f[k][i]) for k in FACTOR_NAMES} for i in range(600)]
    for text, row in zip(texts, rows):
        if row["age"] > AGE_OLD_MIN:
            assert not _mentions(text, "young") and not _mentions(text, "middle_aged"), text
        if row["age"] < AGE_YOUNG_MAX:
            assert not _mentions(text, "old") and not _mentions(text, "middle_aged"), text
        if row["smile"] > SMILE_MIN:
            assert not _mentions(text, "neutral"), text
        if row["smile"] < NEUTRAL_MAX:
            assert not _mentions(text, "smiling"), text
        if row["glasses"] == 0:
            assert not re.search(r"(?<!not )wearing glasses|\bwith glasses|\bin glasses|bespectacled", text)
        else:
            assert not _mentions(text, "no_glasses"), text
        if row["beard"] == 0:
            assert not re.search(r"\bbearded|with a beard|stubble|full beard|thick beard", text), text
        else:
            assert not _mentions(text, "clean_shaven"), text
        for colour in HAIR_COLORS:
            if row[colour] == 0:
                assert not _mentions(text, colour), text


def test_old_render_gets_an_age_word_never_young() -> None:
    _, f = render(40, seed=3, factors={"age": 0.95})
    texts = caption(f, seed=0)
    old_words = sum(_mentions(t, "old") for t in texts)
    assert old_words >= 20
    assert not any(_mentions(t, "young") for t in texts)


def test_captions_reach_every_concept_and_are_deterministic() -> None:
    f = sample_factors(1500, seed=12)
    texts = caption(f, seed=4)
    for concept in CAPTION_VOCAB:
        assert any(_mentions(t, concept) for t in texts), concept
    assert caption(f, seed=4) == texts
    assert caption(f, seed=5) != texts
    row = {k: float(v[0]) for k, v in f.items()}
    assert caption(row, seed=4) == texts[:1]
    assert all("man" not in t.split() and "woman" not in t.split() for t in texts)


def test_concepts_and_caption_validation() -> None:
    row = {k: 0.0 for k in FACTOR_NAMES}
    row.update(age=0.9, smile=0.9, glasses=1.0, hair_red=1.0, hair_length=0.9)
    assert concepts(row) == ["old", "smiling", "glasses", "clean_shaven", "hair_red", "long_hair",
                             "narrow_eyes"]
    with pytest.raises(ValueError, match="missing"):
        caption({"age": 0.5}, seed=0)
    with pytest.raises(TypeError, match="seed must be an int"):
        caption(row, seed="a")  # type: ignore[arg-type]
