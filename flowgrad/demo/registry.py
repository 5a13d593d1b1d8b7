"""The attribute registry: named edit targets (prompts, and the demo-world factor that measures them).

The registry is a TOML file (``data/attributes.toml``) with one table per attribute::

    [old]
    prompt = "a photo of an old person"
    negative_prompt = "a photo of a young person"
    factor = "age"        # optional: a name in flowgrad.demo.render.FACTOR_NAMES
    direction = 1         # +1: the factor should rise under the edit, -1: fall
    preserve = ["smiling", "glasses"]   # optional: attributes the edit should leave alone
    discovery = { n_images = 64, off_axis_weight = 0.5 }   # optional: this attribute's discovery recipe

A ``discovery`` table holds settings that ``discover-directions --attr NAME`` uses instead of its
built-in defaults (options given on the command line still win); its keys are :data:`RECIPE_KEYS`.

The data directory is the repository's ``data/`` unless the environment variable
``FLOWGRAD_DATA`` names another directory.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ..paths import data_dir
from .render import FACTOR_NAMES

__all__ = ["AGGREGATORS", "Attribute", "DATA_ENV", "RECIPE_KEYS", "data_dir", "get_attribute", "load_registry",
           "preserve_pairs", "registry_path"]

DATA_ENV = "FLOWGRAD_DATA"
"""Environment variable that overrides the data directory (read by :func:`flowgrad.paths.data_dir`)."""

_FILE = "attributes.toml"
_KEYS = {"prompt", "negative_prompt", "factor", "direction", "preserve", "discovery"}

RECIPE_KEYS: Mapping[str, type] = MappingProxyType({
    "n_images": int, "steps": int, "iterations": int, "lr": float, "t_window": tuple, "preserve_weight": float,
    "off_axis_weight": float, "aggregator": str})
"""Settings an attribute's ``discovery`` table may set, with their types (numbers > 0, weights >= 0;
``t_window`` a pair [t_start, t_end] with 0 <= t_start < t_end <= 1, as a stored direction's window;
``aggregator`` one of :data:`AGGREGATORS`)."""

AGGREGATORS: tuple[str, ...] = ("mean", "pc1", "pca", "probe", "robust", "joint")
"""Names ``discover-directions --aggregator`` takes (``directions.aggregate.METHODS`` plus ``joint``)."""


@dataclass(frozen=True)
class Attribute:
    """One edit target.

    Attributes:
        name: registry key, e.g. ``"old"``.
        prompt: text the edit moves towards.
        negative_prompt: text the edit moves away from ("" for none).
        factor: demo-world factor measuring the attribute, or None.
        direction: +1 if ``factor`` should rise under the edit, -1 if it should fall.
        preserve: names of registry attributes the edit should leave alone (their prompts join the
            guidance loss as a preservation term, see :func:`preserve_pairs`).
        discovery: the attribute's discovery recipe: settings (keys of :data:`RECIPE_KEYS`) that replace
            the built-in defaults of ``discover-directions --attr NAME``.
    """

    name: str
    prompt: str
    negative_prompt: str
    factor: str | None
    direction: int
    preserve: tuple[str, ...] = ()
    discovery: Mapping[str, int | float | str | tuple[float, float]] = field(
        default_factory=lambda: MappingProxyType({}), hash=False)


def _recipe(name: str, entry: object, where: Path) -> Mapping[str, int | float | str | tuple[float, float]]:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: attribute {name!r}: 'discovery' must be a table of settings, got {entry!r}")
    unknown = sorted(set(entry) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"{where}: attribute {name!r}: unknown discovery setting(s) {unknown}; "
                         f"allowed: {sorted(RECIPE_KEYS)}")
    recipe: dict[str, int | float | str | tuple[float, float]] = {}
    for key, value in entry.items():
        kind = RECIPE_KEYS[key]
        if kind is tuple:
            recipe[key] = _window(name, key, value, where)
            continue
        if kind is str:
            if value not in AGGREGATORS:
                raise ValueError(f"{where}: attribute {name!r}: discovery setting {key!r} must be one of "
                                 f"{', '.join(AGGREGATORS)}, got {value!r}")
            recipe[key] = value
            continue
        ok_type = isinstance(value, int) if kind is int else isinstance(value, (int, float))
        weight = key.endswith("_weight")
        if isinstance(value, bool) or not ok_type or not (value >= 0 if weight else value > 0):
            need = "a number >= 0" if weight else ("an integer > 0" if kind is int else "a number > 0")
            raise ValueError(f"{where}: attribute {name!r}: discovery setting {key!r} must be {need}, got {value!r}")
        recipe[key] = kind(value)
    return MappingProxyType(recipe)


def _window(name: str, key: str, value: object, where: Path) -> tuple[float, float]:
    pair = value if isinstance(value, list) and len(value) == 2 else None
    if pair is None or any(isinstance(x, bool) or not isinstance(x, (int, float)) for x in pair) \
            or not 0 <= pair[0] < pair[1] <= 1:
        raise ValueError(f"{where}: attribute {name!r}: discovery setting {key!r} must be a pair [t_start, t_end] "
                         f"with 0 <= t_start < t_end <= 1, got {value!r}")
    return float(pair[0]), float(pair[1])


def registry_path() -> Path:
    """Path of the default registry file, ``data_dir() / "attributes.toml"``."""
    return data_dir() / _FILE


def _attribute(name: str, entry: object, where: Path) -> Attribute:
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: attribute {name!r} must be a table ([{name}] with prompt = ...), "
                         f"got {type(entry).__name__}")
    unknown = sorted(set(entry) - _KEYS)
    if unknown:
        raise ValueError(f"{where}: attribute {name!r} has unknown key(s) {unknown}; "
                         f"allowed keys: {sorted(_KEYS)}")
    prompt = entry.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: attribute {name!r} needs a non-empty string 'prompt', got {prompt!r}")
    negative = entry.get("negative_prompt", "")
    if not isinstance(negative, str):
        raise ValueError(f"{where}: attribute {name!r}: 'negative_prompt' must be a string, "
                         f"got {negative!r}")
    factor = entry.get("factor")
    if factor is not None and factor not in FACTOR_NAMES:
        raise ValueError(f"{where}: attribute {name!r} names unknown factor {factor!r}; "
                         f"known factors: {', '.join(FACTOR_NAMES)} (or leave 'factor' out)")
    if factor is not None and "direction" not in entry:
        raise ValueError(f"{where}: attribute {name!r} has a factor but no 'direction' (1 or -1)")
    direction = entry.get("direction", 1)
    if isinstance(direction, bool) or direction not in (1, -1):
        raise ValueError(f"{where}: attribute {name!r}: 'direction' must be 1 or -1, got {direction!r}")
    preserve = entry.get("preserve", [])
    if not isinstance(preserve, list) or not all(isinstance(p, str) for p in preserve):
        raise ValueError(f"{where}: attribute {name!r}: 'preserve' must be a list of attribute names, "
                         f"got {preserve!r}")
    if name in preserve:
        raise ValueError(f"{where}: attribute {name!r} cannot preserve itself")
    return Attribute(name=name, prompt=prompt, negative_prompt=negative, factor=factor,
                     direction=int(direction), preserve=tuple(preserve),
                     discovery=_recipe(name, entry.get("discovery", {}), where))


def load_registry(path: str | os.PathLike[str] | None = None) -> dict[str, Attribute]:
    """Read an attribute registry.

    Args:
        path: a registry TOML file; defaults to :func:`registry_path`.

    Returns:
        name -> :class:`Attribute`, in file order.

    Raises:
        FileNotFoundError: if the file does not exist.
        ValueError: if the file is not valid TOML or an entry is malformed.
    """
    where = Path(path) if path is not None else registry_path()
    if not where.is_file():
        raise FileNotFoundError(f"attribute registry {str(where)!r} not found; pass an existing "
                                f"TOML file or set {DATA_ENV} to a directory holding {_FILE}")
    try:
        with where.open("rb") as fh:
            table = tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"{where}: not valid TOML ({err})") from err
    if not table:
        raise ValueError(f"{where}: the registry defines no attributes")
    registry = {name: _attribute(name, entry, where) for name, entry in table.items()}
    for attr in registry.values():
        unknown = [p for p in attr.preserve if p not in registry]
        if unknown:
            raise ValueError(f"{where}: attribute {attr.name!r} preserves unknown attribute(s) {unknown}; "
                             f"known attributes: {', '.join(registry)}")
    return registry


def preserve_pairs(names: Sequence[str], registry: Mapping[str, Attribute]) -> tuple[tuple[str, str], ...]:
    """(prompt, negative_prompt) pairs of the named attributes, for the guidance loss's preservation term.

    An attribute whose pair is another listed pair reversed (``dark_hair`` after ``blond``) adds nothing
    new and is skipped, so each distinction is weighed once.

    Raises:
        ValueError: for a name not in ``registry``.
    """
    pairs: list[tuple[str, str]] = []
    for name in names:
        if name not in registry:
            raise ValueError(f"unknown attribute {name!r} to preserve; known attributes: {', '.join(registry)}")
        a = registry[name]
        pair = (a.prompt, a.negative_prompt)
        if pair not in pairs and (a.negative_prompt, a.prompt) not in pairs:
            pairs.append(pair)
    return tuple(pairs)


def get_attribute(name: str, path: str | os.PathLike[str] | None = None) -> Attribute:
    """The attribute called ``name`` in the registry at ``path`` (default registry if None).

    Raises:
        ValueError: for an unknown name, listing the known ones.
    """
    registry = load_registry(path)
    if name not in registry:
        raise ValueError(f"unknown attribute {name!r}; known attributes: {', '.join(registry)}")
    return registry[name]
