"""The embedded demo world: procedural portraits with known factors and the models trained on them.

* :func:`render` — (images (n, 3, 64, 64) in [0, 1], factors name -> (n,) in [0, 1]), deterministic per seed.
* :func:`judge` — the factor judge: images -> predicted factors (evaluation only, never guidance).
* ``flowgrad.load_model("demo")`` — the demo rectified flow; ``load_guidance_clip("demo")`` — the tiny CLIP.
"""

from .captions import caption
from .registry import Attribute, get_attribute, load_registry
from .render import FACTOR_NAMES, FACTORS, render, render_factors, sample_factors
from .world import DemoWeightsError, judge, load_demo_flow, load_judge

__all__ = ["Attribute", "DemoWeightsError", "FACTORS", "FACTOR_NAMES", "caption", "get_attribute", "judge",
           "load_demo_flow", "load_judge", "load_registry", "render", "render_factors", "sample_factors"]
