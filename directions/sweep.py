"""Strength sweeps: the same images edited at several strengths, with metrics per strength."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .apply import EditSpec, apply_controls, compose_controls, first_active_step, uncontrolled_state
from .store import Direction

__all__ = ["SweepResult", "parse_strengths", "sweep", "sweep_start"]


def parse_strengths(spec: str) -> list[float]:
    """``"-2:2:9"`` (start:stop:count, inclusive) or ``"0,0.5,1"`` -> list of strengths."""
    try:
        if ":" in spec:
            start, stop, count = spec.split(":")
            n = int(count)
            if n < 1:
                raise ValueError
            if not (math.isfinite(float(start)) and math.isfinite(float(stop))):
                raise ValueError
            return [float(x) for x in np.linspace(float(start), float(stop), n)]
        values = [float(x) for x in spec.split(",") if x.strip()]
        if not values or not all(math.isfinite(v) for v in values):
            raise ValueError
        return values
    except ValueError:
        raise ValueError(f"--strengths must look like -2:2:9 (start:stop:count) or 0,0.5,1; got {spec!r}") from None


@dataclass(frozen=True)
class SweepResult:
    """Images and metrics of a strength sweep.

    Attributes:
        strengths: (S,) strengths.
        images: (S, B, 3, H, W) edited images in [0, 1] (strength 0 = unedited).
        metrics: per-image metrics, name -> (S, B) array: "clip" (prompt score), "l1" (mean |x - x(0)|),
            and one entry per judged factor when a judge is given.
    """

    strengths: list[float]
    images: Tensor
    metrics: dict[str, np.ndarray]

    def mean_metrics(self) -> dict[str, list[float]]:
        return {k: v.mean(axis=1).tolist() for k, v in self.metrics.items()}


@torch.no_grad()
def sweep(velocity, z0: Tensor, direction: Direction, strengths: Sequence[float], n_steps: int, *,
          clip=None, prompt: str | None = None,
          judge: Callable[[Tensor], dict[str, Tensor]] | None = None,
          project_out: Sequence[Direction] = (), start_step: int | None = None) -> SweepResult:
    """Apply ``direction`` at every strength to the latents ``z0`` (B, C, H, W).

    Every strength follows the unedited trajectory up to the direction's first active step, so that
    stretch is integrated once. With ``start_step`` given, ``z0`` already is the state at that step (e.g.
    real images inverted down to it; see :func:`sweep_start`).
    """
    from flowgrad.clip_guidance import clip_score

    controls = {s: compose_controls([EditSpec(direction, float(s))], n_steps, project_out).to(z0.device)
                for s in strengths if s != 0}
    if start_step is None:
        start = sweep_start(direction, n_steps, project_out)
        branch = uncontrolled_state(velocity, z0, n_steps, start, direction.eps)
    else:
        start, branch = start_step, z0
    unedited = velocity.to_image(apply_controls(velocity, branch, None, n_steps, direction.eps,
                                                start_step=start)).clamp(0, 1)
    images = []
    for s in strengths:
        if s == 0:
            images.append(unedited)
            continue
        images.append(velocity.to_image(apply_controls(velocity, branch, controls[s], n_steps, direction.eps,
                                                       start_step=start)).clamp(0, 1))
    stack = torch.stack(images)
    metrics: dict[str, np.ndarray] = {
        "l1": (stack - unedited).abs().flatten(2).mean(2).cpu().numpy()}
    if clip is not None:
        metrics["clip"] = np.stack([clip_score(clip, x, prompt or direction.prompt).cpu().numpy() for x in stack])
    if judge is not None:
        judged = [judge(x) for x in stack]
        for name in judged[0]:
            metrics[name] = np.stack([j[name].cpu().numpy() for j in judged])
    return SweepResult(strengths=[float(s) for s in strengths], images=stack.cpu(), metrics=metrics)


def sweep_start(direction: Direction, n_steps: int, project_out: Sequence[Direction] = ()) -> int:
    """The step where a sweep of ``direction`` branches off the unedited trajectory (its first active step)."""
    control = compose_controls([EditSpec(direction, 1.0)], n_steps, project_out)
    return min(first_active_step(control), n_steps - 1)
