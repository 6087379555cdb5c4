"""Exact AUROC, average precision and F1-max (metrics.md §1-§4), from the shared curve."""

from __future__ import annotations

from typing import Any

import numpy as np

from ._inputs import positives, to_numpy
from .curve import BinaryCurve, build_curve


def auroc_from_curve(c: BinaryCurve) -> float:
    """AUROC = P(s+ > s-) + 1/2 P(s+ = s-) (Mann-Whitney; = trapezoidal ROC with tie merging).

    For the c_j positives at v_j: #neg below = n_neg - fp_j, #neg tied = fp_j - fp_above_j, so
    2 * n_pos * n_neg * AUROC = sum_j c_j * ((n_neg - fp_j) + (n_neg - fp_above_j)).
    """
    below_plus_le = (c.n_neg - c.fp) + (c.n_neg - c.fp_above)
    denom = 2 * c.n_pos * c.n_neg
    if denom < 2**62:  # exact in int64, then one correctly rounded division
        return int(np.dot(c.count, below_plus_le)) / denom
    return float(np.dot(c.count.astype(np.float64), below_plus_le)) / denom


def roc_curve(c: BinaryCurve) -> tuple[np.ndarray, np.ndarray]:
    """The exact ROC polyline (FPR, TPR) from (0, 0) to (1, 1) whose trapezoid area is
    ``auroc_from_curve``: per distinct positive score v_j the end of the horizontal run of
    negatives above v_j, (fp_above_j, tp_{j-1}), then the tie group's diagonal to (fp_j, tp_j)."""
    m = c.count.size
    fpr, tpr = np.empty(2 * m + 2), np.empty(2 * m + 2)
    fpr[0] = tpr[0] = 0.0
    fpr[-1] = tpr[-1] = 1.0
    fpr[1:-1:2], fpr[2:-1:2] = c.fp_above / c.n_neg, c.fp / c.n_neg
    tp = c.tp / c.n_pos
    tpr[1], tpr[3:-1:2], tpr[2:-1:2] = 0.0, tp[:-1], tp
    return fpr, tpr


def average_precision_from_curve(c: BinaryCurve) -> float:
    """Step-wise AP = sum_k (R_k - R_{k-1}) P_k over descending distinct thresholds.

    Recall moves only at positive scores, by c_j / n_pos, where P_j = tp_j / (tp_j + fp_j).
    Equals sklearn.metrics.average_precision_score (not the trapezoidal AUPR).
    """
    precision = c.tp / (c.tp + c.fp)
    return float(np.dot(c.count, precision) / c.n_pos)


def f1_max_from_curve(c: BinaryCurve) -> float:
    """F1-max = max_t 2PR/(P+R) = max_t 2tp/(tp + fp + n_pos).

    Within a run of thresholds with the same tp, fp is smallest at the highest one, which is a
    distinct positive score, so the maximum over those scores is the maximum over all t.
    """
    return float(np.max(2.0 * c.tp / (c.tp + c.fp + c.n_pos)))


def _curve(scores: Any, labels: Any) -> BinaryCurve:
    s = to_numpy(scores, "scores")
    y = to_numpy(labels, "labels")
    return build_curve(s, positives(y))


def auroc(scores: Any, labels: Any) -> float:
    """Exact area under the ROC curve; labels anomalous iff > 0. ValueError if undefined."""
    return auroc_from_curve(_curve(scores, labels))


def average_precision(scores: Any, labels: Any) -> float:
    """Exact step-wise average precision (= sklearn). Raises ValueError if undefined."""
    return average_precision_from_curve(_curve(scores, labels))


def f1_max(scores: Any, labels: Any) -> float:
    """Exact maximum F1 over all distinct thresholds (positive iff score >= t)."""
    return f1_max_from_curve(_curve(scores, labels))
