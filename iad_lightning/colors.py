"""Colour maps for anomaly-map images (numpy only, no Lightning: predict.py imports it)."""

from __future__ import annotations

import numpy as np

# jet colour map anchors (value, r, g, b)
_JET = np.array([[0.0, 0, 0, 0.5], [0.11, 0, 0, 1], [0.34, 0, 1, 1], [0.65, 1, 1, 0], [0.89, 1, 0, 0], [1.0, 0.5, 0, 0]])


def jet(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] to RGB floats in [0, 1] (H, W, 3)."""
    v = np.clip(values, 0.0, 1.0)
    return np.stack([np.interp(v, _JET[:, 0], _JET[:, c]) for c in (1, 2, 3)], axis=-1)
