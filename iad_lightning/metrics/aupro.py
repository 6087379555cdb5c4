"""AU-PRO, the official MVTec AD definition (metrics.md §5.1, §5.2).

    FPR(t) = #{OK pixels with s >= t} / #{OK pixels}           (all images, good ones included)
    PRO(t) = (1/K) sum_k |C_k ∩ {s >= t}| / |C_k|               (C_k: 8-connected GT regions)
    AU-PRO@L = (1/L) ∫_0^L PRO d(FPR)

The curve has one point per distinct score, starts at (0, 0), ends at (1, 1), and the area is
cut at L by exact linear interpolation, as in the official ``trapezoid``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy import ndimage

from ._inputs import UndefinedMetricError, as_maps, positives
from .curve import BinaryCurve, build_curve

# Official structuring element: 8-connectivity (scipy's default would be 4-connectivity).
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def region_weights(positive: np.ndarray) -> tuple[np.ndarray, int]:
    """Per positive pixel (C order of ``positive[positive]``) the weight 1/|C_k| of its region.

    positive: (N, H, W) boolean GT. Returns (weights float64, K = number of regions).
    """
    ids = []
    offset = 0
    for n in np.flatnonzero(positive.any(axis=(1, 2))):
        m = positive[n]
        labelled, k = ndimage.label(m, structure=_EIGHT_CONNECTED)
        ids.append(labelled[m].astype(np.int64) + (offset - 1))
        offset += k
    if offset == 0:
        return np.empty(0, dtype=np.float64), 0
    region = np.concatenate(ids)
    sizes = np.bincount(region, minlength=offset)
    return (1.0 / sizes)[region], offset


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area of y(x) on [0, limit]; x ascending (duplicates allowed, y in given order).

    Points with x <= limit count fully; if limit falls strictly inside a segment, the partial
    segment is added with y interpolated linearly at the limit (official generic_util.trapezoid).
    """
    ins = int(np.searchsorted(x, limit, side="right"))  # x[:ins] <= limit, x[0] = 0 < limit
    xs, ys = x[:ins], y[:ins]
    area = float(np.dot(np.diff(xs), ys[1:] + ys[:-1]) / 2.0)
    if ins < x.size and xs[-1] < limit:
        x0, x1, y0, y1 = x[ins - 1], x[ins], y[ins - 1], y[ins]
        y_lim = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        area += float(0.5 * (y_lim + y0) * (limit - x0))
    return area


def pro_curve(c: BinaryCurve, n_regions: int) -> tuple[np.ndarray, np.ndarray]:
    """The official (FPR, PRO) polyline, with the horizontal runs between positives collapsed.

    Per distinct positive score v_j two points: (fp_above_j / n_neg, PRO_{j-1}) ends the
    horizontal run of negatives above v_j, (fp_j / n_neg, PRO_j) closes the tie group at v_j.
    Collinear points on horizontal runs are dropped, which changes no area and no interpolation.
    """
    if c.weight_sum is None:
        raise ValueError("pro_curve needs a curve built with region weights.")
    m = c.count.size
    pro = np.minimum(c.weight_sum / n_regions, 1.0)  # official: clip to <= 1
    x = np.empty(2 * m + 2)
    y = np.empty(2 * m + 2)
    x[0] = y[0] = 0.0  # prepend (0, 0)
    x[-1] = y[-1] = 1.0  # append (1, 1)
    x[1:-1:2] = c.fp_above / c.n_neg
    x[2:-1:2] = c.fp / c.n_neg
    y[1] = 0.0
    y[3:-1:2] = pro[:-1]
    y[2:-1:2] = pro
    return x, y


def pro_curve_to_limit(c: BinaryCurve, n_regions: int, fpr_limit: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """The (FPR, PRO) points that ``aupro_from_curve`` integrates: FPR <= L, closed by the point
    interpolated at L exactly as the area is cut (the official ``trapezoid``)."""
    x, y = pro_curve(c, n_regions)
    ins = int(np.searchsorted(x, fpr_limit, side="right"))
    xs, ys = x[:ins], y[:ins]
    if ins < x.size and xs[-1] < fpr_limit:
        y_lim = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        xs, ys = np.append(xs, fpr_limit), np.append(ys, y_lim)
    return xs, ys


def check_fpr_limit(fpr_limit: float) -> float:
    """The integration limit L must lie in (0, 1]."""
    limit = float(fpr_limit)
    if not 0.0 < limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit!r}.")
    return limit


def aupro_from_curve(c: BinaryCurve, n_regions: int, fpr_limit: float = 0.3) -> float:
    """AU-PRO@L = area under the PRO curve up to FPR = L, divided by L."""
    limit = check_fpr_limit(fpr_limit)
    x, y = pro_curve(c, n_regions)
    return float(_area_to_limit(x, y, limit) / limit)


def pixel_curve(anomaly_maps: Any, masks: Any) -> tuple[BinaryCurve, int]:
    """Validate maps and masks, label GT regions and build the shared pixel curve."""
    maps = as_maps(anomaly_maps, "anomaly_maps")
    gt = as_maps(masks, "masks")
    if maps.shape != gt.shape:
        raise ValueError(
            f"anomaly_maps shape {tuple(maps.shape)} != masks shape {tuple(gt.shape)} "
            "(after dropping a channel dim of size 1); resize maps or masks to match."
        )
    positive = positives(gt)
    weights, n_regions = region_weights(positive)
    if n_regions == 0:
        raise UndefinedMetricError(
            "masks: no anomalous pixel (no GT region) in any image; pixel metrics and AU-PRO "
            "are undefined (the official MVTec code would silently return 0.15)."
        )
    return build_curve(maps, positive, weights, name="anomaly_maps"), n_regions


def aupro(anomaly_maps: Any, masks: Any, fpr_limit: float = 0.3) -> float:
    """Official AU-PRO@fpr_limit over all images (good ones give FPR only).

    anomaly_maps, masks: (N, H, W), (N, 1, H, W) or one (H, W) map; masks anomalous iff > 0.
    Raises ValueError when there is no GT region or no OK pixel, or fpr_limit is not in (0, 1].
    """
    limit = check_fpr_limit(fpr_limit)
    curve, n_regions = pixel_curve(anomaly_maps, masks)
    return aupro_from_curve(curve, n_regions, limit)
