"""Exact, sort-based anomaly detection metrics (see shared specs/metrics.md).

Positive iff score >= t, one curve point per distinct score, float64 with integer counts,
raw unbounded scores (never squashed). AU-PRO follows the official MVTec AD definition.
"""

from ._inputs import UndefinedMetricError
from .aupro import aupro
from .classification import auroc, average_precision, f1_max
from .compute import METRIC_KEYS, UndefinedMetricWarning, compute_metrics

__all__ = [
    "METRIC_KEYS",
    "UndefinedMetricError",
    "UndefinedMetricWarning",
    "aupro",
    "auroc",
    "average_precision",
    "compute_metrics",
    "f1_max",
]
