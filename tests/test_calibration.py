"""iad_lightning.calibration: the threshold rule, the clamp of unmeasurable rates, the
normalised score and the metrics at fixed thresholds, on hand-checked vectors."""

import math

import numpy as np
import pytest
import torch

from iad_lightning.calibration import metrics_at_thresholds, normal_threshold, normalize


def test_threshold_is_exceeded_by_the_requested_share_of_normals():
    values = torch.arange(1, 251, dtype=torch.float32)  # 250 distinct normal scores
    t = normal_threshold(values, 0.01)  # k = floor(2.5) = 2 above
    assert t.value == 248.0 and t.fpr == pytest.approx(2 / 250) and t.n == 250
    assert normal_threshold(values, 0.0).value == 250.0  # rate 0: the maximum
    # the normalised score: threshold -> 0.5, the median normal value -> 0.1
    assert float(normalize(np.array([t.value]), t.value, t.scale)[0]) == pytest.approx(0.5)
    assert float(normalize(np.array([125.0]), t.value, t.scale)[0]) == pytest.approx(0.1)  # torch: the lower median
    assert float(normalize(torch.tensor([1e9]), t.value, t.scale)[0]) == pytest.approx(1.0)


@pytest.mark.parametrize("fpr, rate", [(0.01, 0.0), (0.08, 0.1)])
def test_unmeasurable_rate_warns_and_uses_the_closest_supported_one(fpr, rate):
    values = np.arange(10.0)  # 10 images: supported rates 0, 0.1, 0.2, ...
    with pytest.warns(UserWarning, match=f"cannot measure a false-alarm rate of {fpr:g}.*closest supported rate {rate:g}"):
        t = normal_threshold(values, fpr)
    assert t.fpr == rate and t.value == (9.0 if rate == 0 else 8.0)


def test_ties_never_exceed_the_requested_rate():
    t = normal_threshold(np.array([1.0, 2.0, 2.0, 2.0, 3.0] * 20), 0.3)  # 100 values, 30 allowed above
    assert t.fpr <= 0.3 and t.value == 2.0 and t.fpr == 0.2


def test_metrics_at_thresholds_by_hand():
    scores = np.array([0.1, 0.6, 0.4, 0.9, 0.7])
    labels = np.array([0, 0, 1, 1, 1])
    maps = np.zeros((5, 2, 2))
    maps[3, 0, :] = 1.0  # predicted region: 2 pixels of image 3
    masks = np.zeros((5, 2, 2), dtype=bool)
    masks[3, 0, 0] = masks[3, 1, 0] = True  # ground truth: 2 pixels, 1 shared
    m = metrics_at_thresholds(scores, labels, maps, masks, 0.5, 0.5)
    # predicted anomalous: 0.6 (normal, FP), 0.9 and 0.7 (TP); 0.4 missed (FN)
    assert m["image_precision"] == pytest.approx(2 / 3) and m["image_recall"] == pytest.approx(2 / 3)
    assert m["image_f1"] == pytest.approx(2 / 3) and m["image_fpr"] == pytest.approx(1 / 2)
    assert m["pixel_iou"] == pytest.approx(1 / 3)
    none = metrics_at_thresholds(scores, labels, maps, masks, math.nan, math.nan)
    assert all(v is None for v in none.values())  # not calibrated: nothing made up
    assert metrics_at_thresholds(scores, labels, None, None, 10.0, 0.5)["image_precision"] is None
