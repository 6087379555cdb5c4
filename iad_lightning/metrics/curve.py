"""The one sort shared by AUROC, AP, F1-max and AU-PRO.

Every exact metric here is a function of the curve "positive iff score >= t" at every distinct
score t (official MVTec / scikit-learn tie semantics: a tie group enters the positive set at
once). Between two consecutive distinct scores of *positive* samples only negatives are added,
which moves the ROC/PRO curve horizontally and leaves recall unchanged. So the whole curve is
determined by, for each distinct positive score v_j (descending):

    c_j  = #{pos : s == v_j}      tp_j = #{pos : s >= v_j}
    fp_j = #{neg : s >= v_j}      fp_above_j = #{neg : s > v_j}

The negatives are sorted once, by value only (np.sort in place, no int64 index array over
all pixels); fp_j and fp_above_j come from np.searchsorted. Only the positives, typically a few
percent of the pixels, are argsorted, so that per-pixel weights (1/|C_k| for AU-PRO) follow them.
Counts are integers; only the AU-PRO weight sums are float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._inputs import UndefinedMetricError, check_scores


@dataclass(frozen=True)
class BinaryCurve:
    """The exact curve compressed to the distinct positive scores, in descending order."""

    n_pos: int
    n_neg: int
    count: np.ndarray  # c_j (int64)
    tp: np.ndarray  # tp_j (int64)
    fp: np.ndarray  # fp_j (int64)
    fp_above: np.ndarray  # fp_above_j (int64)
    weight_sum: np.ndarray | None  # sum of the weights of positives with s >= v_j (float64)


def build_curve(
    scores: np.ndarray,
    positive: np.ndarray,
    weights: np.ndarray | None = None,
    name: str = "scores",
) -> BinaryCurve:
    """Sort once and build the compressed curve.

    scores: any shape, raw unbounded values (never squashed or clipped).
    positive: boolean, same shape as scores.
    weights: optional float64 weight per positive sample, in C order of ``scores[positive]``.
    Raises UndefinedMetricError when only one class is present, ValueError on empty/NaN input.
    """
    if scores.shape != positive.shape:
        raise ValueError(
            f"{name}: scores shape {tuple(scores.shape)} != labels shape {tuple(positive.shape)}."
        )
    check_scores(scores, name)
    scores = scores.reshape(-1)
    positive = positive.reshape(-1)
    if scores.dtype == np.bool_:
        scores = scores.view(np.uint8)

    pos = scores[positive]
    n_pos = int(pos.size)
    n_neg = int(scores.size) - n_pos
    if n_pos == 0 or n_neg == 0:
        which = "negative (good)" if n_pos == 0 else "positive (anomalous)"
        raise UndefinedMetricError(
            f"{name}: all {scores.size} samples are {which}; the metric needs both classes."
        )

    neg = scores[~positive]
    neg.sort()  # ascending, in place: the one big sort

    order = np.argsort(pos)[::-1]  # descending
    pos = pos[order]
    is_new = np.empty(n_pos, dtype=bool)
    is_new[0] = True
    np.not_equal(pos[1:], pos[:-1], out=is_new[1:])
    starts = np.flatnonzero(is_new)
    values = pos[starts]
    ends = np.append(starts[1:], n_pos)  # exclusive end of each tie group
    count = np.diff(ends, prepend=0).astype(np.int64)
    tp = ends.astype(np.int64)

    # searchsorted is faster with ascending needles (cache-friendly), so search reversed.
    asc = values[::-1]
    fp = n_neg - np.searchsorted(neg, asc, side="left")[::-1].astype(np.int64)
    fp_above = n_neg - np.searchsorted(neg, asc, side="right")[::-1].astype(np.int64)

    weight_sum = None
    if weights is not None:
        if weights.shape != (n_pos,):
            raise ValueError(f"{name}: expected {n_pos} positive weights, got {weights.shape}.")
        weight_sum = np.cumsum(weights[order], dtype=np.float64)[ends - 1]
    return BinaryCurve(n_pos, n_neg, count, tp, fp, fp_above, weight_sum)


def thin_curve(x: np.ndarray, y: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """At most ~max_points vertices of a curve with increasing x, evenly spread in x, first and
    last kept: for drawing only (metrics always use every point)."""
    if x.size <= max_points:
        return x, y
    keep = np.searchsorted(x, np.linspace(x[0], x[-1], max_points), side="left").clip(0, x.size - 1)
    keep = np.unique(np.concatenate([[0], keep, [x.size - 1]]))
    return x[keep], y[keep]


def thin_curves(curves: dict, max_points: int) -> dict:
    """``thin_curve`` on every (x, y) pair of a ``compute_metrics(curves=...)`` dict."""
    return {k: thin_curve(*v, max_points) if isinstance(v, tuple) and len(v) == 2 else v for k, v in curves.items()}
