"""compute_metrics: the per-category metric dict that every method reports (metrics.md §0)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from ._inputs import UndefinedMetricError, as_maps, positives, to_numpy
from .aupro import aupro_from_curve, check_fpr_limit, pixel_curve, pro_curve_to_limit
from .classification import (
    auroc_from_curve,
    average_precision_from_curve,
    f1_max_from_curve,
    roc_curve,
)
from .curve import build_curve

IMAGE_KEYS = ("image_auroc", "image_ap", "image_f1max")
PIXEL_KEYS = ("pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro")
METRIC_KEYS: tuple[str, ...] = IMAGE_KEYS + PIXEL_KEYS


class UndefinedMetricWarning(UserWarning):
    """Some metrics are undefined for this data and were reported as None."""


def _image_vector(x: Any, name: str) -> np.ndarray:
    arr = to_numpy(x, name)
    if arr.ndim == 2 and arr.shape[1] == 1:
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,) or (N, 1), got {tuple(arr.shape)}.")
    return arr


def compute_metrics(
    image_scores: Any,
    image_labels: Any,
    anomaly_maps: Any | None = None,
    masks: Any | None = None,
    fpr_limit: float = 0.3,
    curves: dict[str, Any] | None = None,
) -> dict[str, float | None]:
    """Exact image- and pixel-level metrics of one category, keyed by METRIC_KEYS.

    image_scores, image_labels: (N,); labels anomalous iff > 0.
    anomaly_maps, masks: (N, H, W) or (N, 1, H, W), or both None (pixel keys are then None).
    The pixel scores are sorted once for pixel AUROC, AP, F1-max and AU-PRO@fpr_limit.
    A metric undefined for the data (one class only, no GT region) is None, with one
    UndefinedMetricWarning saying which and why; invalid input raises ValueError.
    curves: a dict to fill with the points of the curves the numbers come from (for plots):
    ``image_roc`` and ``pixel_roc`` as (FPR, TPR), ``pixel_pro`` as (FPR, PRO) up to ``fpr_limit``,
    and ``fpr_limit``; a curve that is undefined is left out.
    """
    limit = check_fpr_limit(fpr_limit)
    scores = _image_vector(image_scores, "image_scores")
    labels = _image_vector(image_labels, "image_labels")
    if scores.shape != labels.shape:
        raise ValueError(
            f"image_scores has {scores.shape[0]} entries but image_labels has {labels.shape[0]}."
        )
    if (anomaly_maps is None) != (masks is None):
        raise ValueError("anomaly_maps and masks must be given together (or both None).")

    out: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)
    reasons: list[str] = []

    try:
        c = build_curve(scores, positives(labels), name="image_scores")
        out["image_auroc"] = auroc_from_curve(c)
        out["image_ap"] = average_precision_from_curve(c)
        out["image_f1max"] = f1_max_from_curve(c)
        if curves is not None:
            curves["image_roc"] = roc_curve(c)
    except UndefinedMetricError as e:
        reasons.append(f"{', '.join(IMAGE_KEYS)} are None: {e}")

    if anomaly_maps is not None:
        maps = as_maps(anomaly_maps, "anomaly_maps")
        gt = as_maps(masks, "masks")
        for name, arr in (("anomaly_maps", maps), ("masks", gt)):
            if arr.shape[0] != scores.shape[0]:
                raise ValueError(
                    f"{name} has {arr.shape[0]} maps but image_scores has {scores.shape[0]} "
                    "entries; give one map per image."
                )
        try:
            c, n_regions = pixel_curve(maps, gt)
            out["pixel_auroc"] = auroc_from_curve(c)
            out["pixel_ap"] = average_precision_from_curve(c)
            out["pixel_f1max"] = f1_max_from_curve(c)
            out["pixel_aupro"] = aupro_from_curve(c, n_regions, limit)
            if curves is not None:
                curves["pixel_roc"] = roc_curve(c)
                curves["pixel_pro"] = pro_curve_to_limit(c, n_regions, limit)
                curves["fpr_limit"] = limit
        except UndefinedMetricError as e:
            reasons.append(f"{', '.join(PIXEL_KEYS)} are None: {e}")

    if reasons:
        warnings.warn("; ".join(reasons), UndefinedMetricWarning, stacklevel=2)
    return out
