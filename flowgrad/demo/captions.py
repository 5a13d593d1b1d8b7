"""Captions for demo-world portraits, composed from their factors.

The tiny demo CLIP is trained contrastively on (render, caption) pairs, so captions must teach
every editable concept *and its negation*: each caption mentions a random subset of the salient
attributes (age, smile, glasses, beard, hair colour and length, eyes), in varied order and
phrasing, e.g. "a photo of an old person with glasses", "a close-up of a bearded person with red
hair", "a young smiling face". There is no gender factor, so nouns are neutral.

Attribute prompts in ``data/attributes.toml`` are written with the same words (see
:data:`CAPTION_VOCAB`), so the CLIP understands them.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from .render import FACTOR_NAMES, HAIR_COLORS

__all__ = [
    "AGE_OLD_MIN", "AGE_YOUNG_MAX", "CAPTION_VOCAB", "HAIR_LONG_MIN", "HAIR_SHORT_MAX",
    "MIDDLE_AGE", "NEUTRAL_MAX", "SMILE_MIN", "caption", "concepts",
]

AGE_YOUNG_MAX = 0.3
"""age below this is captioned young."""
AGE_OLD_MIN = 0.7
"""age above this is captioned old."""
MIDDLE_AGE = (0.4, 0.6)
"""age in this range is sometimes captioned middle-aged."""
SMILE_MIN = 0.6
"""smile above this is captioned smiling."""
NEUTRAL_MAX = 0.3
"""smile below this is captioned serious / not smiling."""
HAIR_LONG_MIN = 0.65
HAIR_SHORT_MAX = 0.3
_DENSE_BEARD = 0.6
_STUBBLE = 0.25
_EYES_WIDE = 0.8
_EYES_NARROW = 0.2

# concept -> (adjectives placed before the noun, phrases placed after it)
CAPTION_VOCAB: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "young": (("young", "youthful", "young-looking"), ()),
    "old": (("old", "elderly", "aged", "senior"), ()),
    "middle_aged": (("middle-aged",), ()),
    "smiling": (("smiling", "happy", "grinning", "cheerful"), ("smiling", "with a smile",
                                                              "with a big smile")),
    "neutral": (("serious", "unsmiling"), ("not smiling", "with a neutral expression",
                                           "with a serious expression")),
    "glasses": (("bespectacled",), ("with glasses", "wearing glasses", "in glasses")),
    "no_glasses": ((), ("without glasses", "with no glasses", "not wearing glasses")),
    "beard": (("bearded",), ("with a beard", "with facial hair")),
    "thick_beard": ((), ("with a thick beard", "with a full beard")),
    "stubble": (("stubbly",), ("with stubble",)),
    "clean_shaven": (("clean-shaven", "beardless"), ("without a beard", "with no beard")),
    "hair_black": (("black-haired", "dark-haired"), ("with black hair", "with dark hair")),
    "hair_brown": (("brown-haired",), ("with brown hair",)),
    "hair_blond": (("blond", "blond-haired"), ("with blond hair", "with blonde hair")),
    "hair_red": (("red-haired", "ginger"), ("with red hair", "with ginger hair")),
    "long_hair": (("long-haired",), ("with long hair",)),
    "short_hair": (("short-haired",), ("with short hair",)),
    "wide_eyes": (("wide-eyed",), ("with wide open eyes", "with big open eyes")),
    "narrow_eyes": (("squinting",), ("with half-closed eyes", "with narrowed eyes")),
}
"""Words each concept may be captioned with (the registry prompts use these words)."""

_HAIR_WORDS = {"hair_black": ("black", "dark"), "hair_brown": ("brown",),
               "hair_blond": ("blond", "blonde"), "hair_red": ("red", "ginger")}
_FRAME_WORDS = ((0.0, 0.08, "black"), (0.26, 0.4, "red"), (0.6, 0.74, "blue"), (0.92, 1.0, "gold"))
_NOUNS = ("person", "person", "person", "face", "individual")
_PREFIXES = ("a photo of", "a photo of", "a portrait of", "a close-up of", "a picture of",
             "an image of", "a cartoon of", "")
# probability that a present concept is mentioned
_P_MENTION = {"age": 0.75, "smile": 0.7, "glasses": 0.6, "no_glasses": 0.3, "beard": 0.6,
              "clean_shaven": 0.3, "hair": 0.5, "length": 0.4, "eyes": 0.25}


def concepts(row: Mapping[str, float]) -> list[str]:
    """Salient concepts of one image's factors (keys of :data:`CAPTION_VOCAB`), before sampling.

    ``middle_aged`` is listed for ages in :data:`MIDDLE_AGE`; the rest follow the thresholds above.
    """
    out = []
    age, smile = row["age"], row["smile"]
    if age < AGE_YOUNG_MAX:
        out.append("young")
    elif age > AGE_OLD_MIN:
        out.append("old")
    elif MIDDLE_AGE[0] <= age <= MIDDLE_AGE[1]:
        out.append("middle_aged")
    if smile > SMILE_MIN:
        out.append("smiling")
    elif smile < NEUTRAL_MAX:
        out.append("neutral")
    out.append("glasses" if row["glasses"] >= 0.5 else "no_glasses")
    if row["beard"] >= 0.5:
        density = row["beard_density"]
        out.append("thick_beard" if density > _DENSE_BEARD else "stubble" if density < _STUBBLE
                   else "beard")
    else:
        out.append("clean_shaven")
    out.append(max(HAIR_COLORS, key=lambda c: row[c]))
    if row["hair_length"] > HAIR_LONG_MIN:
        out.append("long_hair")
    elif row["hair_length"] < HAIR_SHORT_MAX:
        out.append("short_hair")
    if row["eye_openness"] > _EYES_WIDE:
        out.append("wide_eyes")
    elif row["eye_openness"] < _EYES_NARROW:
        out.append("narrow_eyes")
    return out


def _mention_probability(concept: str) -> float:
    if concept in ("young", "old", "middle_aged"):
        return _P_MENTION["age"] * (0.5 if concept == "middle_aged" else 1.0)
    if concept in ("smiling", "neutral"):
        return _P_MENTION["smile"]
    if concept in ("beard", "thick_beard", "stubble"):
        return _P_MENTION["beard"]
    if concept in HAIR_COLORS:
        return _P_MENTION["hair"]
    if concept in ("long_hair", "short_hair"):
        return _P_MENTION["length"]
    if concept in ("wide_eyes", "narrow_eyes"):
        return _P_MENTION["eyes"]
    return _P_MENTION[concept]


def _frame_word(frame: float) -> str | None:
    for lo, hi, word in _FRAME_WORDS:
        if lo <= frame <= hi:
            return word
    return None


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _join(phrases: Sequence[str]) -> str:
    if len(phrases) <= 2:
        return " and ".join(phrases)
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption_row(row: Mapping[str, float], rng: random.Random) -> str:
    chosen = [c for c in concepts(row) if rng.random() < _mention_probability(c)]
    rng.shuffle(chosen)
    adjectives: list[str] = []
    phrases: list[str] = []
    hair_colour = next((c for c in chosen if c in HAIR_COLORS), None)
    length = next((c for c in chosen if c in ("long_hair", "short_hair")), None)
    combine = hair_colour is not None and length is not None and rng.random() < 0.6
    if combine:
        chosen.remove(length)
    for concept in chosen:
        adj, post = CAPTION_VOCAB[concept]
        if combine and concept == hair_colour:
            # "with long red hair": one phrase for colour and length
            colour = rng.choice(_HAIR_WORDS[concept])
            phrases.append(f"with {length.split('_')[0]} {colour} hair")
            continue
        if concept == "glasses" and rng.random() < 0.3:
            word = _frame_word(row["glasses_frame"])
            if word is not None:
                phrases.append(f"with {word} glasses")
                continue
        use_adj = bool(adj) and (not post or rng.random() < 0.5)
        (adjectives if use_adj else phrases).append(rng.choice(adj if use_adj else post))
    words = " ".join([*adjectives, rng.choice(_NOUNS)])
    noun_phrase = f"{_article(words)} {words}"
    if phrases:
        noun_phrase = f"{noun_phrase} {_join(phrases)}"
    return f"{rng.choice(_PREFIXES)} {noun_phrase}".strip()


def _rows(factors: Mapping[str, object]) -> list[dict[str, float]]:
    if not isinstance(factors, Mapping):
        raise TypeError(f"factors must be a mapping name -> value(s), got {type(factors).__name__}")
    missing = [k for k in FACTOR_NAMES if k not in factors]
    if missing:
        raise ValueError(f"factors is missing {missing}; pass the dict returned by sample_factors "
                         "or render (or one row of it)")
    cols = {k: torch.as_tensor(factors[k], dtype=torch.float32).detach().cpu().reshape(-1)
            for k in FACTOR_NAMES}
    n = cols["age"].shape[0]
    if any(c.shape[0] != n for c in cols.values()):
        raise ValueError("all factors must have the same number of values")
    lists = {k: c.tolist() for k, c in cols.items()}
    return [{k: lists[k][i] for k in FACTOR_NAMES} for i in range(n)]


def caption(factors: Mapping[str, Tensor | float], seed: int) -> list[str]:
    """Captions for a batch of factors (or one row of scalars).

    Caption ``i`` depends only on ``(seed, i)`` and image ``i``'s factors.

    Args:
        factors: name -> (n,) tensor (as from :func:`~flowgrad.demo.render.render`) or
            name -> float for a single image.
        seed: any Python int.

    Returns:
        n captions (one for a single row).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return [_caption_row(row, random.Random(f"flowgrad-caption/{seed}/{i}"))
            for i, row in enumerate(_rows(factors))]
