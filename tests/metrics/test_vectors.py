"""The verified test vectors of specs/metrics.md §8 (TV1-TV5 and the edge vectors).

Tolerances as the spec says: abs=1e-6 for AU-PRO (the official code uses float32 FPR),
abs=1e-9 for everything else.
"""

import numpy as np
import pytest

from iad_lightning.metrics import (
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    f1_max,
)
from iad_lightning.metrics.aupro import region_weights

EXACT = 1e-9
PRO_TOL = 1e-6


def approx(value: float, tol: float = EXACT):
    return pytest.approx(value, abs=tol)


# ---------------------------------------------------------------------------- TV1, TV1b
TV1_LABELS = [0, 0, 0, 0, 1, 1, 1]
TV1_SCORES = [0.1, 0.4, 0.35, 0.8, 0.35, 0.85, 0.9]


def test_tv1_image_level_ties():
    assert auroc(TV1_SCORES, TV1_LABELS) == approx(19 / 24)
    assert average_precision(TV1_SCORES, TV1_LABELS) == approx(5 / 6)
    assert f1_max(TV1_SCORES, TV1_LABELS) == approx(4 / 5)


def test_tv1b_ambiguous_argmax():
    scores = list(TV1_SCORES)
    scores[5] = 0.8
    assert auroc(scores, TV1_LABELS) == approx(3 / 4)
    assert average_precision(scores, TV1_LABELS) == approx(13 / 18)
    assert f1_max(scores, TV1_LABELS) == approx(2 / 3)


# ---------------------------------------------------------------------------- TV2
TV2_MASK = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
TV2_MAP = np.array([[0.9, 0.4, 0.8, 0.7, 0.6], [0.5, 0.3, 0.2, 0.1, 0.0]])


def test_tv2_one_region_no_ties():
    maps, masks = TV2_MAP[None], TV2_MASK[None]
    assert aupro(maps, masks) == approx(1 / 2, PRO_TOL)
    assert aupro(maps, masks, fpr_limit=1.0) == approx(3 / 4, PRO_TOL)
    assert auroc(maps, masks) == approx(3 / 4)
    assert average_precision(maps, masks) == approx(2 / 3)
    assert f1_max(maps, masks) == approx(2 / 3)


# ---------------------------------------------------------------------------- TV3
TV3_MASK = np.array([[1, 1, 0, 0], [0, 0, 0, 0]])
TV3_MAP = np.array([[0.5, 0.5, 0.5, 0.5], [0.2, 0.2, 0.1, 0.1]])


def test_tv3_ties_between_region_and_normal_pixels():
    maps, masks = TV3_MAP[None], TV3_MASK[None]
    assert aupro(maps, masks) == approx(9 / 20, PRO_TOL)
    assert aupro(maps, masks, fpr_limit=1.0) == approx(5 / 6, PRO_TOL)
    assert auroc(maps, masks) == approx(5 / 6)
    assert average_precision(maps, masks) == approx(1 / 2)
    assert f1_max(maps, masks) == approx(2 / 3)


# ---------------------------------------------------------------------------- TV4
TV4_MASKS = np.array(
    [
        [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 1]],
        np.zeros((4, 4)),
    ]
)
TV4_MAPS = np.array(
    [
        [
            [0.95, 0.20, 0.30, 0.10],
            [0.40, 0.60, 0.05, 0.15],
            [0.25, 0.35, 0.45, 0.50],
            [0.55, 0.12, 0.70, 0.65],
        ],
        [
            [0.02, 0.08, 0.18, 0.22],
            [0.28, 0.32, 0.38, 0.42],
            [0.48, 0.52, 0.58, 0.62],
            [0.68, 0.72, 0.78, 0.03],
        ],
    ]
)


def test_tv4_eight_connectivity():
    value = aupro(TV4_MAPS, TV4_MASKS)
    assert value == approx(41 / 56, PRO_TOL)
    assert abs(value - 187 / 252) > 1e-3  # the 4-connectivity value is wrong
    _, n_regions = region_weights(TV4_MASKS > 0)
    assert n_regions == 2  # the diagonal pair is one region


def test_tv4_pixel_and_image_level():
    assert aupro(TV4_MAPS, TV4_MASKS, fpr_limit=1.0) == approx(103 / 112, PRO_TOL)
    assert auroc(TV4_MAPS, TV4_MASKS) == approx(103 / 112)
    assert average_precision(TV4_MAPS, TV4_MASKS) == approx(5 / 8)
    assert f1_max(TV4_MAPS, TV4_MASKS) == approx(2 / 3)
    m = compute_metrics(TV4_MAPS.max(axis=(1, 2)), [1, 0], TV4_MAPS, TV4_MASKS)
    assert m["image_auroc"] == m["image_ap"] == m["image_f1max"] == 1.0
    assert m["pixel_aupro"] == approx(41 / 56, PRO_TOL)
    assert m["pixel_auroc"] == approx(103 / 112)


def test_tv4_good_images_change_fpr():
    assert aupro(TV4_MAPS[:1], TV4_MASKS[:1]) == approx(1.0, PRO_TOL)


# ---------------------------------------------------------------------------- TV5
def tv5() -> tuple[np.ndarray, np.ndarray]:
    i, j = np.meshgrid(np.arange(8), np.arange(8), indexing="ij")
    masks = np.zeros((3, 8, 8))
    masks[0, 1:3, 1:4] = 1
    masks[0, 5:8, 6:8] = 1
    masks[1, 4:6, 2:6] = 1
    base = np.stack([((7 * i + 13 * j + 29 * k) % 64) / 64 for k in range(3)])
    return base + 0.5 * masks, masks


def test_tv5_regions_of_different_size():
    maps, masks = tv5()
    assert auroc(maps, masks) == approx(6317 / 6880)
    assert average_precision(maps, masks) == approx(5034307537 / 6529343040)
    assert average_precision(maps, masks) == approx(0.7710281886184984)
    assert f1_max(maps, masks) == approx(26 / 33)
    assert aupro(maps, masks) == approx(7175 / 9288, PRO_TOL)
    assert aupro(maps, masks, fpr_limit=1.0) == approx(1423 / 1548, PRO_TOL)
    m = compute_metrics(maps.max(axis=(1, 2)), [1, 1, 0], maps, masks)
    assert m["image_auroc"] == m["image_ap"] == m["image_f1max"] == 1.0
    assert m["pixel_aupro"] == approx(7175 / 9288, PRO_TOL)
    assert m["pixel_ap"] == approx(5034307537 / 6529343040)


# ---------------------------------------------------------------------------- edge vectors
def test_constant_map_gives_0_15():
    maps, masks = tv5()
    assert aupro(np.full_like(maps, 0.3), masks) == approx(0.15, PRO_TOL)
    assert aupro(np.zeros_like(TV4_MAPS), TV4_MASKS) == approx(0.15, PRO_TOL)


def test_perfect_and_inverted_maps():
    _, masks = tv5()
    assert aupro(masks.astype(float), masks) == approx(1.0, PRO_TOL)
    assert aupro(-masks.astype(float), masks) == approx(0.0, PRO_TOL)


def test_no_gt_region_raises():
    with pytest.raises(ValueError, match="no GT region"):
        aupro(TV4_MAPS, np.zeros_like(TV4_MASKS))


def test_no_ok_pixel_raises():
    with pytest.raises(ValueError, match="positive"):
        aupro(TV4_MAPS, np.ones_like(TV4_MASKS))


@pytest.mark.parametrize("limit", [0.0, -0.1, 1.5, float("nan")])
def test_fpr_limit_must_be_in_unit_interval(limit):
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(TV4_MAPS, TV4_MASKS, fpr_limit=limit)
