"""Turn user inputs (numpy arrays, torch tensors on any device, lists) into numpy arrays.

No float64 copies are made here: scores keep their dtype (torch bfloat16, which numpy lacks,
becomes float32), masks are only compared with 0 later.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class UndefinedMetricError(ValueError):
    """A metric is undefined for this data (one class only, no GT region, no OK pixel)."""


def to_numpy(x: Any, name: str) -> np.ndarray:
    """A numpy view or copy of ``x``; torch tensors are detached and moved to the CPU."""
    if hasattr(x, "detach") and hasattr(x, "cpu"):  # torch.Tensor, without importing torch
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":
            x = x.float()
        x = x.numpy()
    arr = np.asarray(x)
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
    ):
        raise ValueError(f"{name}: expected a numeric array or tensor, got dtype {arr.dtype}.")
    if np.iscomplexobj(arr):
        raise ValueError(f"{name}: complex values are not scores (dtype {arr.dtype}).")
    return arr


def check_scores(scores: np.ndarray, name: str) -> None:
    """Raise on empty input or NaN scores (NaN has no place in a ranking)."""
    if scores.size == 0:
        raise ValueError(f"{name}: empty input, nothing to evaluate.")
    # np.min propagates NaN, so this is one pass without a temporary boolean array.
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores.min()):
        raise ValueError(
            f"{name}: contains NaN scores; fix the model output (no metric is defined on NaN)."
        )


def as_maps(x: Any, name: str) -> np.ndarray:
    """Anomaly maps or masks as an (N, H, W) array; accepts (H, W), (N, H, W), (N, 1, H, W)."""
    arr = to_numpy(x, name)
    if arr.ndim == 2:
        return arr[None]
    if arr.ndim == 3:
        return arr
    if arr.ndim == 4 and arr.shape[1] == 1:
        return arr[:, 0]
    raise ValueError(
        f"{name}: expected shape (N, H, W) or (N, 1, H, W), got {tuple(arr.shape)}."
    )


def positives(labels: np.ndarray) -> np.ndarray:
    """Binarise labels or masks: anomalous iff > 0 (0/1, 0/255, bool and float masks alike)."""
    if labels.dtype == np.bool_:
        return labels
    return labels > 0
