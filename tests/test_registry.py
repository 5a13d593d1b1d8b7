"""The attribute registry (data/attributes.toml) and its reader."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from flowgrad.demo.captions import caption
from flowgrad.demo.registry import (
    DATA_ENV, Attribute, data_dir, get_attribute, load_registry, preserve_pairs, registry_path,
)
from flowgrad.demo.render import FACTOR_NAMES, sample_factors

REQUIRED = ("old", "young", "smiling", "glasses", "beard", "blond", "dark_hair")


def test_default_registry_loads_with_required_attributes() -> None:
    registry = load_registry()
    assert set(REQUIRED) <= set(registry)
    for name, attr in registry.items():
        assert isinstance(attr, Attribute) and attr.name == name
        assert attr.prompt and attr.negative_prompt and attr.prompt != attr.negative_prompt
        assert attr.factor in FACTOR_NAMES, name
        assert attr.direction in (1, -1)
    assert (registry["old"].factor, registry["old"].direction) == ("age", 1)
    assert (registry["young"].factor, registry["young"].direction) == ("age", -1)
    assert registry["old"].prompt == registry["young"].negative_prompt
    assert registry["dark_hair"].factor == "hair_black"
    with pytest.raises(dataclasses.FrozenInstanceError):
        registry["old"].direction = -1  # type: ignore[misc]


def test_default_path_is_the_repository_data_dir(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DATA_ENV, raising=False)
    repo = Path(__file__).resolve().parents[1]
    assert data_dir() == repo / "data"
    assert registry_path() == repo / "data" / "attributes.toml"


def test_env_var_points_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "attributes.toml").write_text(
        '[sleepy]\nprompt = "a photo of a person with half-closed eyes"\n'
        'negative_prompt = "a photo of a person with wide open eyes"\n'
        'factor = "eye_openness"\ndirection = -1\n\n'
        '[vague]\nprompt = "a nice picture"\n')
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    registry = load_registry()
    assert list(registry) == ["sleepy", "vague"]
    assert registry["sleepy"] == Attribute("sleepy", "a photo of a person with half-closed eyes",
                                           "a photo of a person with wide open eyes", "eye_openness", -1)
    assert registry["vague"] == Attribute("vague", "a nice picture", "", None, 1)
    assert get_attribute("sleepy").factor == "eye_openness"


def test_unknown_attribute_is_a_one_line_value_error() -> None:
    with pytest.raises(ValueError) as info:
        get_attribute("bald")
    message = str(info.value)
    assert not isinstance(info.value, KeyError)
    assert "\n" not in message and "'bald'" in message
    assert all(name in message for name in REQUIRED)


@pytest.mark.parametrize("text, match", [
    ('[x]\nprompt = "p"\nfactor = "gender"\ndirection = 1\n', "unknown factor 'gender'"),
    ('[x]\nprompt = "p"\nfactor = "age"\ndirection = 2\n', "must be 1 or -1"),
    ('[x]\nprompt = "p"\nfactor = "age"\n', "no 'direction'"),
    ('[x]\nnegative_prompt = "n"\n', "non-empty string 'prompt'"),
    ('[x]\nprompt = "p"\ncolour = "red"\n', r"unknown key\(s\) \['colour'\]"),
    ('x = 1\n', "must be a table"),
    ('[x\nprompt = "p"\n', "not valid TOML"),
    ('', "defines no attributes"),
])
def test_malformed_registries(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_registry(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=DATA_ENV):
        load_registry(tmp_path / "nope.toml")


def test_prompts_use_caption_words() -> None:
    """Each prompt's attribute phrase (what remains after 'a photo of a person') occurs in captions."""
    texts = caption(sample_factors(3000, seed=0), seed=0)
    for attr in load_registry().values():
        for prompt in (attr.prompt, attr.negative_prompt):
            assert prompt.startswith("a photo of "), prompt
            key = re.sub(r"^a photo of an? ", "", prompt).replace("person", "").strip()
            pattern = rf"(?<![\w-]){re.escape(key)}(?![\w-])"
            assert any(re.search(pattern, t) for t in texts), f"{attr.name}: {key!r} never captioned"


def test_preserve_lists_name_known_attributes_and_pairs_are_deduplicated():
    registry = load_registry()
    for attr in registry.values():
        assert attr.name not in attr.preserve
        assert all(p in registry for p in attr.preserve)
    pairs = preserve_pairs(["blond", "dark_hair", "red_hair"], registry)
    assert pairs == (("a photo of a person with blond hair", "a photo of a person with dark hair"),
                     ("a photo of a person with red hair", "a photo of a person with black hair"))
    with pytest.raises(ValueError, match="unknown attribute 'x'"):
        preserve_pairs(["x"], registry)


def test_bad_preserve_entries_are_refused(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[a]\nprompt = "p"\npreserve = ["b"]\n')
    with pytest.raises(ValueError, match="unknown attribute"):
        load_registry(path)
    path.write_text('[a]\nprompt = "p"\npreserve = ["a"]\n')
    with pytest.raises(ValueError, match="itself"):
        load_registry(path)
    path.write_text('[a]\nprompt = "p"\npreserve = "b"\n')
    with pytest.raises(ValueError, match="list of attribute names"):
        load_registry(path)


def test_discovery_recipes_are_read_and_checked(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text('[a]\nprompt = "p"\ndiscovery = { n_images = 64, off_axis_weight = 0.5, lr = 12, iterations = 10,'
                    ' t_window = [0.8, 1], steps = 30, aggregator = "joint" }\n[b]\nprompt = "q"\n')
    reg = load_registry(path)
    assert dict(reg["a"].discovery) == {"n_images": 64, "off_axis_weight": 0.5, "lr": 12.0, "iterations": 10,
                                        "t_window": (0.8, 1.0), "steps": 30, "aggregator": "joint"}
    assert isinstance(reg["a"].discovery["lr"], float) and dict(reg["b"].discovery) == {}
    with pytest.raises(TypeError):
        reg["a"].discovery["lr"] = 1.0  # read-only
    for text, match in [('discovery = { n_steps = 4 }', r"unknown discovery setting\(s\) \['n_steps'\]"),
                        ('discovery = { steps = 0 }', "'steps' must be an integer > 0"),
                        ('discovery = { steps = 20.0 }', "'steps' must be an integer > 0"),
                        ('discovery = { aggregator = "median" }', "'aggregator' must be one of mean, pc1, pca"),
                        ('discovery = { aggregator = 1 }', "'aggregator' must be one of"),
                        ('discovery = { n_images = 2.5 }', "'n_images' must be an integer > 0"),
                        ('discovery = { n_images = 0 }', "'n_images' must be an integer > 0"),
                        ('discovery = { off_axis_weight = -1 }', "'off_axis_weight' must be a number >= 0"),
                        ('discovery = { lr = true }', "'lr' must be a number > 0"),
                        ('discovery = { iterations = 0 }', "'iterations' must be an integer > 0"),
                        ('discovery = { t_window = [0.8] }', r"'t_window' must be a pair \[t_start, t_end\]"),
                        ('discovery = { t_window = [0.8, 0.5] }', "0 <= t_start < t_end <= 1, got"),
                        ('discovery = { t_window = [0.5, 0.5] }', "0 <= t_start < t_end <= 1, got"),
                        ('discovery = { t_window = [0.5, 1.5] }', "0 <= t_start < t_end <= 1, got"),
                        ('discovery = { t_window = ["a", 1] }', "'t_window' must be a pair"),
                        ('discovery = { t_window = 0.5 }', "'t_window' must be a pair"),
                        ('discovery = 3', "'discovery' must be a table")]:
        path.write_text(f'[a]\nprompt = "p"\n{text}\n')
        with pytest.raises(ValueError, match=match):
            load_registry(path)


def test_aggregator_names_agree_across_the_layers():
    """The registry's, the CLI's (kept literal for a fast --help) and the library's aggregator names are one list."""
    from cli.discover import AGGREGATOR_NAMES
    from directions.aggregate import METHODS
    from flowgrad.demo.registry import AGGREGATORS

    assert AGGREGATORS == AGGREGATOR_NAMES == (*METHODS, "joint")
