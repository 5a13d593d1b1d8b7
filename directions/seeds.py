"""Seeds of a discovery job's per-image randomness: each image's latent and its CLIP augmentations.

Both depend only on the job's seed and the image's index, never on how images are batched, so a job's
result does not depend on ``batch_size``, on halving a batch after an out-of-memory, or on how batches are
shared among torchrun ranks.
"""

from __future__ import annotations

__all__ = ["augment_seed", "image_seed"]


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index``'s latent: independent of how images are batched."""
    return (seed * 1_000_003 + index * 7919 + 12345) % (2**63 - 1)


def augment_seed(seed: int, index: int, draw: int = 0) -> int:
    """Seed of image ``index``'s CLIP augmentations (``draw``: a restart, e.g. the joint method's iteration).

    Its own stream, unrelated to the latent's (:func:`image_seed`), and independent of how images are
    batched, so a job's result does not depend on ``batch_size`` (or on halving a batch after an
    out-of-memory).
    """
    mixed = (image_seed(seed, index) * 6364136223846793005 + 1442695040888963407 + draw * 2654435761)
    return mixed % (2**63 - 1)
