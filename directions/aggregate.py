"""Turning per-image optimized controls into one global direction.

Every aggregator takes the per-image controls X of shape (n, N, C, H, W) (flattened to (n, D)) and
returns an :class:`Aggregate`: a unit direction, its natural scale and per-image diagnostics.

Natural scale: strength 1.0 means "a typical per-image edit": the median over images of each
image's control component along the unit direction, ``median_i <u_i, d>``. For the mean aggregator
this is close to the norm of the mean control. The probe, which does not use the controls, has its own
unit: the distance between its two labelled groups' mean latents along its normal.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

__all__ = ["Aggregate", "Method", "METHODS", "aggregate", "split_half_cosine", "natural_scale"]

Method = Literal["mean", "pc1", "pca", "probe", "robust", "joint"]
METHODS: tuple[str, ...] = ("mean", "pc1", "pca", "probe", "robust")


@dataclass(frozen=True)
class Aggregate:
    """A global direction and how each image relates to it.

    Attributes:
        unit: (D,) float64 unit direction.
        scale: natural scale (see module docstring).
        per_image_cosine: (n,) cosine of each image's control with ``unit``.
        inlier: (n,) bool, False for images an aggregator set aside (robust) .
        info: aggregator-specific numbers (explained variance, probe accuracy, ...).
    """

    unit: np.ndarray
    scale: float
    per_image_cosine: np.ndarray
    inlier: np.ndarray
    info: dict = field(default_factory=dict)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if not np.isfinite(norm) or norm == 0.0:
        raise ValueError("the aggregated direction is zero or not finite (did any image move?)")
    return v / norm


def _cosines(x: np.ndarray, unit: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1)
    return np.divide(x @ unit, norms, out=np.zeros(len(x)), where=norms > 0)


def natural_scale(x: np.ndarray, unit: np.ndarray) -> float:
    """Median over images of the control component along ``unit``."""
    return float(np.median(x @ unit))


def _aligned(v: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Flip ``v`` so that the images' mean control projects positively on it."""
    return v if float(x.mean(0) @ v) >= 0 else -v


def _mean(x: np.ndarray, **_) -> tuple[np.ndarray, dict]:
    return _unit(x.mean(0)), {}


def _pc1(x: np.ndarray, **_) -> tuple[np.ndarray, dict]:
    """Uncentred first principal component (the top right-singular vector of X), sign-aligned."""
    from sklearn.decomposition import TruncatedSVD

    n_comp = min(2, min(x.shape) - 1) or 1
    svd = TruncatedSVD(n_components=max(1, n_comp), algorithm="arpack" if min(x.shape) > 2 else "randomized",
                       random_state=0)
    svd.fit(x)
    return _aligned(_unit(svd.components_[0]), x), {
        "singular_values": svd.singular_values_.tolist()}


def _pca(x: np.ndarray, **_) -> tuple[np.ndarray, dict]:
    """Centred PCA: the main axis of per-image *variation* (an analysis, not an edit direction)."""
    from sklearn.decomposition import PCA

    k = min(5, x.shape[0] - 1, x.shape[1])
    pca = PCA(n_components=max(1, k), svd_solver="full", random_state=0).fit(x)
    return _aligned(_unit(pca.components_[0]), x), {
        "explained_variance_ratio": pca.explained_variance_ratio_.tolist()}


def _probe(x: np.ndarray, *, latents: np.ndarray | None = None, labels: np.ndarray | None = None,
           n_steps: int = 1, **_) -> tuple[np.ndarray, dict]:
    """InterFaceGAN-style baseline: the normal of a linear classifier on the latents z0.

    ``labels`` says which images show the attribute (e.g. CLIP zero-shot before editing). The normal
    lives in z0 space, so the direction is a control on the first Euler step only.
    """
    from sklearn.linear_model import LogisticRegression

    if latents is None or labels is None:
        raise ValueError("aggregator 'probe' needs latents and labels")
    labels = np.asarray(labels).astype(int)
    if labels.min() == labels.max():
        raise ValueError("aggregator 'probe' needs images with and without the attribute (all labels equal)")

    def fit(rows: np.ndarray) -> LogisticRegression:
        return LogisticRegression(C=1.0, max_iter=2000).fit(latents[rows], labels[rows])

    def unit_normal(clf: LogisticRegression) -> np.ndarray:
        return clf.coef_[0] / np.linalg.norm(clf.coef_[0])

    clf = fit(np.arange(len(labels)))
    normal = unit_normal(clf)
    unit = np.zeros(x.shape[1])
    unit[: normal.size] = normal  # step 0 occupies the first D/N entries of the flattened control
    info = {"probe_train_accuracy": float(clf.score(latents, labels)), "positives": int(labels.sum())}
    # Strength 1 moves a latent by the distance between the two groups' mean positions along the normal
    # (InterFaceGAN's unit of edit), measured out of sample: each half's normal on the other half's latents.
    # In-sample it would be the margin of an overfitted separator (latents have more dimensions than there are
    # images), and the per-image controls' step-0 components are no measure either (~1e-2 on the demo world).
    halves = np.array_split(np.random.default_rng(0).permutation(len(labels)), 2)
    separations = []
    for fit_rows, test_rows in (halves, halves[::-1]):
        if labels[fit_rows].min() == labels[fit_rows].max() or labels[test_rows].min() == labels[test_rows].max():
            continue
        proj = latents[test_rows] @ unit_normal(fit(fit_rows))
        separations.append(float(proj[labels[test_rows] == 1].mean() - proj[labels[test_rows] == 0].mean()))
    if separations:
        info["held_out_separation"] = separations
    if separations and np.mean(separations) > 0:
        info["scale"] = float(np.mean(separations))
        info["scale_note"] = ("probe: the distance between the labelled groups' mean latents along the normal, "
                              "held out (each half's normal on the other half)")
    else:
        info["probe_note"] = ("the normal does not separate held-out latents: no transferable edit found; strength "
                              "1 falls back to the controls' median projection")
    return _unit(unit), info


def _robust(x: np.ndarray, **_) -> tuple[np.ndarray, dict]:
    """Mean of the inliers: images whose cosine to the leave-one-out mean is an outlier are dropped."""
    total = x.sum(0)
    n = len(x)
    loo_cos = np.array([
        float(_cosines(x[i:i + 1], _unit(total - x[i]))[0]) if n > 1 else 1.0 for i in range(n)])
    med = np.median(loo_cos)
    mad = np.median(np.abs(loo_cos - med)) * 1.4826 + 1e-12
    inlier = loo_cos >= med - 3.0 * mad
    return _unit(x[inlier].mean(0)), {"inlier": inlier, "loo_cosine": loo_cos.tolist()}


_AGGREGATORS: dict[str, Callable[..., tuple[np.ndarray, dict]]] = {
    "mean": _mean, "pc1": _pc1, "pca": _pca, "probe": _probe, "robust": _robust}


def aggregate(controls: np.ndarray, method: Method = "mean", **kwargs) -> Aggregate:
    """Aggregate per-image controls (n, N, C, H, W) into a unit direction + natural scale.

    Args:
        controls: per-image optimized controls of successfully optimized images.
        method: "mean" (the paper's; default), "pc1" (uncentred PC1, sign-aligned), "pca" (centred
            PC1: variation analysis), "probe" (linear-probe normal on latents, needs ``latents``
            (n, C·H·W) and ``labels`` (n,)), "robust" (mean after dropping outlier images).
    """
    if method not in _AGGREGATORS:
        raise ValueError(f"unknown aggregator {method!r}; choose one of {', '.join(METHODS)}")
    controls = np.asarray(controls, dtype=np.float64)
    if controls.ndim == 0 or len(controls) == 0:
        raise ValueError("no successfully optimized images to aggregate")
    x = controls.reshape(len(controls), -1)
    unit, info = _AGGREGATORS[method](x, n_steps=controls.shape[1] if controls.ndim > 1 else 1, **kwargs)
    inlier = info.pop("inlier", np.ones(len(x), dtype=bool))
    if "scale" in info:  # an aggregator with its own (positive) unit of edit, named in its scale_note: the probe
        return Aggregate(unit=unit, scale=info.pop("scale"), per_image_cosine=_cosines(x, unit), inlier=inlier,
                         info=info)
    scale = natural_scale(x[inlier], unit)
    if not scale > 0:
        scale = float(np.median(np.abs(x @ unit))) or 1.0
        info["scale_note"] = "median projection was not positive; used the median |projection|"
    return Aggregate(unit=unit, scale=scale, per_image_cosine=_cosines(x, unit), inlier=inlier, info=info)


def split_half_cosine(controls: np.ndarray, method: Method = "mean", seed: int = 0, **kwargs) -> float:
    """Cosine between directions aggregated from two disjoint random halves of the images."""
    n = len(controls)
    if n < 4:
        return float("nan")
    perm = np.random.default_rng(seed).permutation(n)
    halves = perm[: n // 2], perm[n // 2:]
    units = []
    for idx in halves:
        sub = {k: (v[idx] if isinstance(v, np.ndarray) and len(v) == n else v) for k, v in kwargs.items()}
        try:
            units.append(aggregate(controls[idx], method, **sub).unit)
        except ValueError:
            return float("nan")
    return float(units[0] @ units[1])
