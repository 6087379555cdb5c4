"""Exact metrics vs scikit-learn and a plain official-style AU-PRO; properties; compute_metrics."""

import bisect
import warnings

import numpy as np
import pytest
import torch
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from iad_lightning.metrics import (
    METRIC_KEYS,
    UndefinedMetricWarning,
    aupro,
    auroc,
    average_precision,
    compute_metrics,
    f1_max,
)

SEEDS = [0, 1, 2, 3]


def sklearn_f1_max(scores, labels) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    p, r = p[:-1], r[:-1]  # drop the final (p=1, r=0) point
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(np.nanmax(2 * p * r / (p + r)))


def official_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """Plain transcription of the official compute_pro + trapezoid (float64 FPR)."""
    fp_change = np.zeros(maps.shape)
    pro_change = np.zeros(maps.shape)
    n_regions = 0
    for n, gt in enumerate(masks > 0):
        labelled, k = ndimage.label(gt, structure=np.ones((3, 3)))
        n_regions += k
        fp_change[n][labelled == 0] = 1
        for r in range(1, k + 1):
            pro_change[n][labelled == r] = 1.0 / np.sum(labelled == r)
    order = np.argsort(maps.ravel())[::-1]
    s = maps.ravel()[order]
    fpr = np.cumsum(fp_change.ravel()[order]) / fp_change.sum()
    pro = np.cumsum(pro_change.ravel()[order]) / n_regions
    keep = np.append(np.diff(s) != 0, True)
    x = np.concatenate([[0.0], np.minimum(fpr[keep], 1), [1.0]])
    y = np.concatenate([[0.0], np.minimum(pro[keep], 1), [1.0]])
    ins = bisect.bisect(list(x), limit)
    area = sum(0.5 * (y[k] + y[k - 1]) * (x[k] - x[k - 1]) for k in range(1, ins))
    if x[ins - 1] < limit:
        y_lim = y[ins - 1] + (y[ins] - y[ins - 1]) * (limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        area += 0.5 * (y_lim + y[ins - 1]) * (limit - x[ins - 1])
    return area / limit


def random_binary(seed: int, n: int = 2000, ties: bool = False):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.3
    scores = rng.normal(size=n) + 1.2 * labels
    if ties:
        scores = np.round(scores, 1)
    return scores, labels.astype(int)


def random_category(seed: int, n: int = 6, size: int = 24, ties: bool = False):
    """Smooth maps, blob defects of varying size in some images, the rest good."""
    rng = np.random.default_rng(seed)
    maps = ndimage.gaussian_filter(rng.normal(size=(n, size, size)), sigma=(0, 2, 2))
    masks = np.zeros((n, size, size), dtype=np.uint8)
    yy, xx = np.mgrid[:size, :size]
    for i in range(n // 2):
        for _ in range(rng.integers(1, 4)):
            cy, cx, r = rng.integers(3, size - 3), rng.integers(3, size - 3), rng.integers(1, 6)
            masks[i][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
    maps = maps + 0.6 * ndimage.gaussian_filter(masks.astype(float), sigma=(0, 1, 1))
    if ties:
        maps = np.round(maps, 2)
    return maps, masks


# ---------------------------------------------------------------------------- vs references
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_sklearn(seed, ties):
    scores, labels = random_binary(seed, ties=ties)
    assert auroc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(scores, labels) == pytest.approx(
        average_precision_score(labels, scores), abs=1e-12
    )
    assert f1_max(scores, labels) == pytest.approx(sklearn_f1_max(scores, labels), abs=1e-12)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", SEEDS)
def test_pixel_metrics_match_references(seed, ties):
    maps, masks = random_category(seed, ties=ties)
    m = compute_metrics(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
    y, s = masks.ravel(), maps.ravel()
    assert m["pixel_auroc"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert m["pixel_ap"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert m["pixel_f1max"] == pytest.approx(sklearn_f1_max(s, y), abs=1e-12)
    for limit in (0.05, 0.3, 1.0):
        assert aupro(maps, masks, limit) == pytest.approx(
            official_aupro(maps, masks, limit), abs=1e-9
        )
    assert m["pixel_aupro"] == pytest.approx(official_aupro(maps, masks, 0.3), abs=1e-9)


def test_aupro_at_one_equals_auroc_for_a_single_region():
    maps, masks = random_category(5, n=3)
    masks[:] = 0
    masks[0, 5:12, 4:9] = 1
    assert aupro(maps, masks, 1.0) == pytest.approx(auroc(maps, masks), abs=1e-9)


def test_random_scores_give_about_0_15():
    rng = np.random.default_rng(0)
    _, masks = random_category(0, n=8, size=64)
    assert aupro(rng.random(masks.shape), masks) == pytest.approx(0.15, abs=0.02)


# ---------------------------------------------------------------------------- properties
@pytest.mark.parametrize("transform", [np.exp, lambda x: x * 1000 - 5, lambda x: x**3])
@pytest.mark.parametrize("ties", [False, True])
def test_invariant_to_strictly_monotone_transform(transform, ties):
    maps, masks = random_category(7, ties=ties)
    scores = maps.max(axis=(1, 2))
    labels = masks.any(axis=(1, 2))
    a = compute_metrics(scores, labels, maps, masks)
    b = compute_metrics(transform(scores), labels, transform(maps), masks)
    for key in METRIC_KEYS:
        assert b[key] == pytest.approx(a[key], abs=1e-12), key


def test_raw_unbounded_scores_are_not_squashed():
    # float32 sigmoid would saturate these to 1.0 and create ties (torchmetrics #2819).
    scores = np.array([20.0, 30.0, 40.0, 50.0])
    assert auroc(scores, [0, 1, 0, 1]) == 0.75


def test_numpy_and_torch_inputs_agree():
    maps, masks = random_category(3)
    maps = maps.astype(np.float32)
    scores, labels = maps.max(axis=(1, 2)), masks.any(axis=(1, 2))
    a = compute_metrics(scores, labels, maps, masks)
    b = compute_metrics(
        torch.from_numpy(scores),
        torch.from_numpy(labels),
        torch.from_numpy(maps).unsqueeze(1).requires_grad_(),
        torch.from_numpy(masks).bool().unsqueeze(1),
    )
    assert a == b
    assert auroc(torch.tensor([0.1, 0.2]), torch.tensor([0, 1])) == 1.0


def test_mask_encodings_agree():
    maps, masks = random_category(4)
    ref = compute_metrics(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
    for enc in (masks.astype(bool), masks * 255, masks.astype(np.float32), masks[:, None]):
        got = compute_metrics(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, enc)
        assert got == ref


# ---------------------------------------------------------------------------- compute_metrics
def test_keys_and_python_floats():
    maps, masks = random_category(1)
    m = compute_metrics(maps.max(axis=(1, 2)), masks.any(axis=(1, 2)), maps, masks)
    assert tuple(m) == METRIC_KEYS == (
        "image_auroc", "image_ap", "image_f1max",
        "pixel_auroc", "pixel_ap", "pixel_f1max", "pixel_aupro",
    )  # fmt: skip
    assert all(type(v) is float for v in m.values())


def test_no_masks_gives_none_pixel_metrics_without_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = compute_metrics([0.1, 0.9, 0.4], [0, 1, 0])
    assert m["image_auroc"] == 1.0
    assert all(m[k] is None for k in METRIC_KEYS if k.startswith("pixel_"))


def test_only_anomalous_images_gives_none_with_one_warning():
    maps, masks = random_category(2)
    with pytest.warns(UndefinedMetricWarning, match="image_auroc") as record:
        m = compute_metrics(maps.max(axis=(1, 2)), np.ones(len(maps)), maps, masks)
    assert len(record) == 1
    assert m["image_auroc"] is m["image_ap"] is m["image_f1max"] is None
    assert isinstance(m["pixel_aupro"], float)


def test_masks_without_anomalous_pixel_give_none():
    maps, masks = random_category(2)
    with pytest.warns(UndefinedMetricWarning, match="pixel_aupro") as record:
        m = compute_metrics(maps.max(axis=(1, 2)), [0, 1, 0, 1, 0, 1], maps, np.zeros_like(masks))
    assert len(record) == 1
    assert all(m[k] is None for k in METRIC_KEYS if k.startswith("pixel_"))
    assert isinstance(m["image_auroc"], float)


@pytest.mark.parametrize(
    "args, match",
    [
        (([0.1, 0.2], [0, 1, 1]), "image_labels"),
        (([0.1, 0.2], [0, 1], np.zeros((3, 4, 4)), np.zeros((3, 4, 4))), "3 maps"),
        (([0.1, 0.2], [0, 1], np.zeros((2, 4, 4)), np.zeros((2, 4, 5))), "masks shape"),
        (([0.1, 0.2], [0, 1], np.zeros((2, 4, 4)), None), "together"),
        (([0.1, 0.2], [0, 1], np.zeros((2, 2, 4, 4)), np.zeros((2, 2, 4, 4))), "N, 1, H, W"),
        (([0.1, float("nan")], [0, 1]), "NaN"),
        (([], []), "empty"),
    ],
)
def test_invalid_input_raises(args, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(*args)


def test_one_class_raises_in_functional_api():
    with pytest.raises(ValueError, match="both classes"):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="both classes"):
        average_precision([0.1, 0.2], [0, 0])
    with pytest.raises(ValueError, match="NaN"):
        f1_max([0.1, np.nan], [0, 1])


def test_curve_points_are_the_curves_the_numbers_come_from():
    """compute_metrics(curves=...) hands out the exact ROC / PRO polylines: their trapezoid areas
    are the reported AUROCs and AU-PRO, with ties in the scores."""
    from sklearn.metrics import roc_auc_score

    from iad_lightning.metrics import compute_metrics

    rng = np.random.default_rng(4)
    labels = np.array([1, 1, 0, 0, 1, 0, 0, 1])
    scores = np.round(rng.normal(size=8) + labels, 1)
    maps = np.round(rng.random((8, 24, 24)), 2)
    masks = np.zeros((8, 24, 24), dtype=bool)
    masks[0, 2:9, 3:8] = masks[1, 10:20, 10:14] = masks[4, 0:3, 0:24] = True
    maps[masks] += 0.25
    curves: dict = {}
    m = compute_metrics(scores, labels, maps, masks, curves=curves)
    for key, metric in (("image_roc", "image_auroc"), ("pixel_roc", "pixel_auroc")):
        fpr, tpr = curves[key]
        assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1) and np.all(np.diff(fpr) >= 0)
        assert np.trapezoid(tpr, fpr) == pytest.approx(m[metric], abs=1e-12)
    assert m["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, pro = curves["pixel_pro"]
    assert fpr[-1] == pytest.approx(0.3) and curves["fpr_limit"] == 0.3
    assert np.trapezoid(pro, fpr) / 0.3 == pytest.approx(m["pixel_aupro"], abs=1e-12)
    none: dict = {}
    compute_metrics(scores, labels, curves=none)
    assert set(none) == {"image_roc"}  # no masks: no pixel curves
