"""Straightness-based non-uniform discretization of the backward pass (FlowGrad, Sec. 4.2).

From the forward pass's velocities, step k's straightness is

    d_k = max(||v_{k-1} - v_k||^2, ||v_{k+1} - v_k||^2) / ||v_k||^2

(one-sided at the first and last step: the original code wrapped step 0 around to the last
velocity). Walking along the trajectory, d_k is accumulated and a segment is closed after the step
where the sum exceeds the threshold, or at the end. The backward pass then treats each segment as
ONE Euler step of the segment's full length (one VJP), and every control inside the segment receives
that segment's gradient.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .trajectory import Trajectory

__all__ = ["Segmentation", "start_mask", "straightness", "straightness_segments", "segment_steps"]


@dataclass(frozen=True)
class Segmentation:
    """A partition of steps 0 .. N-1 into consecutive segments.

    Attributes:
        starts: first step of each segment, increasing, starting at 0.
        lengths: number of steps in each segment (sum = N).
    """

    starts: tuple[int, ...]
    lengths: tuple[int, ...]

    def __post_init__(self) -> None:
        starts = tuple(int(s) for s in self.starts)
        lengths = tuple(int(n) for n in self.lengths)
        object.__setattr__(self, "starts", starts)
        object.__setattr__(self, "lengths", lengths)
        if not starts or len(starts) != len(lengths):
            raise ValueError(f"Segmentation needs equally many starts and lengths (≥ 1), got "
                             f"{len(starts)} and {len(lengths)}")
        if starts[0] != 0 or any(n < 1 for n in lengths):
            raise ValueError("Segmentation must start at step 0 and have positive lengths")
        if any(s + n != s_next for s, n, s_next in zip(starts, lengths, starts[1:])):
            raise ValueError("Segmentation segments must be contiguous (start_{i+1} = start_i + length_i)")

    @classmethod
    def uniform(cls, n_steps: int) -> Segmentation:
        """Every step its own segment: exact backprop."""
        return cls(tuple(range(n_steps)), (1,) * n_steps)

    @classmethod
    def from_starts(cls, starts: Sequence[int], n_steps: int) -> Segmentation:
        """Build from segment start indices (0 must be included) and the number of steps."""
        starts = sorted(set(int(s) for s in starts))
        if not starts or starts[0] != 0 or starts[-1] >= n_steps:
            raise ValueError(f"segment starts must include 0 and lie below n_steps={n_steps}, got {starts}")
        ends = starts[1:] + [n_steps]
        return cls(tuple(starts), tuple(e - s for s, e in zip(starts, ends)))

    @classmethod
    def evenly(cls, n_segments: int, n_steps: int) -> Segmentation:
        """``n_segments`` segments of (nearly) equal length; useful for fixed-cost benchmarks."""
        if not 1 <= n_segments <= n_steps:
            raise ValueError(f"n_segments must be in [1, n_steps={n_steps}], got {n_segments}")
        return cls.from_starts([round(i * n_steps / n_segments) for i in range(n_segments)], n_steps)

    @property
    def n_steps(self) -> int:
        return self.starts[-1] + self.lengths[-1]

    def __len__(self) -> int:
        return len(self.starts)


def start_mask(segments: Sequence[Segmentation]) -> Tensor:
    """(N, B) bool CPU mask: entry (k, b) is True where image b's segment starts at step k."""
    mask = torch.zeros((segments[0].n_steps, len(segments)), dtype=torch.bool)
    for i, seg in enumerate(segments):
        mask[list(seg.starts), i] = True
    return mask


def straightness(traj: Trajectory) -> Tensor:
    """(N, B) float64 per-image straightness d_k of a trajectory (see module docstring).

    A zero velocity gives d_k = inf unless its neighbours are equal to it (then 0); NaN becomes inf, so a
    broken image is never merged into a long segment.
    """
    sq = traj.velocity_sq_norms                     # (N, B)
    diff = traj.velocity_diff_sq_norms              # (N-1, B)
    n = sq.shape[0]
    zero = torch.zeros_like(sq[:1])
    before = torch.cat([zero, diff], 0)             # ||v_{k-1} - v_k||^2, 0 at k = 0
    after = torch.cat([diff, zero], 0)              # ||v_{k+1} - v_k||^2, 0 at k = N-1
    num = torch.maximum(before, after)[:n]
    d = torch.where(num == 0, torch.zeros_like(num), num / sq)
    return torch.nan_to_num(d, nan=math.inf, posinf=math.inf)


def segment_steps(d: Sequence[float], threshold: float) -> Segmentation:
    """Segment one sequence of straightness values (the accumulation rule of the paper's code)."""
    starts, lengths = [], []
    acc, length, start = 0.0, 0, 0
    for k, dk in enumerate(d):
        acc += float(dk)
        length += 1
        if acc > threshold or k == len(d) - 1:
            starts.append(start)
            lengths.append(length)
            acc, length, start = 0.0, 0, k + 1
    return Segmentation(tuple(starts), tuple(lengths))


def straightness_segments(traj: Trajectory, threshold: float, *, per_image: bool = False,
                          among: Tensor | None = None) -> Segmentation | tuple[Segmentation, ...]:
    """Segment a trajectory where it bends.

    Args:
        traj: a forward trajectory (its per-image velocity norms are used).
        threshold: accumulated straightness that closes a segment (paper: 5e-3). 0 gives exact
            (uniform) segments wherever the path bends at all; ``inf`` gives one segment.
        per_image: return one segmentation per image instead of one shared by the batch.
        among: (B,) bool, the images the shared segmentation is computed from (default: all; e.g. leave
            out an image whose trajectory is no longer finite). Not with ``per_image``.

    Returns:
        A :class:`Segmentation` shared by the batch, computed from the per-step *maximum* straightness
        over the images. Since the sum of maxima bounds each image's own sum, every shared segment
        satisfies every image's threshold, and each image gets at least as many segments as alone
        (the boundaries may fall elsewhere than in its own segmentation). With ``per_image=True``, a
        tuple of B segmentations, each exactly what a batch of one would get.
    """
    if not isinstance(threshold, (int, float)) or math.isnan(threshold) or threshold < 0:
        raise ValueError(f"threshold must be a non-negative number, got {threshold!r}")
    d = straightness(traj).cpu()
    if per_image:
        if among is not None:
            raise ValueError("among= selects the images of a shared segmentation; not with per_image=True")
        return tuple(segment_steps(d[:, b].tolist(), threshold) for b in range(d.shape[1]))
    if among is not None:
        among = torch.as_tensor(among, dtype=torch.bool).cpu()
        if tuple(among.shape) != (d.shape[1],) or not among.any():
            raise ValueError(f"among must be a (B,) = ({d.shape[1]},) bool mask selecting at least one image")
        d = d[:, among]
    return segment_steps(d.max(dim=1).values.tolist(), threshold)
