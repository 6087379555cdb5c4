"""iad_lightning.calibration: the conformal rank, the GPD tail on known distributions, the
Clopper-Pearson interval, when the small-sample warning fires, the normalised score and the metrics
at fixed thresholds."""

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import stats

from iad_lightning.calibration import (
    NormalScores,
    calibrate_from,
    clopper_pearson,
    metrics_at_thresholds,
    normal_threshold,
    normalize,
    thresholds_for,
)


def test_conformal_rank_when_the_data_resolve_the_rate():
    values = torch.arange(1, 1001, dtype=torch.float32)  # 1000 distinct normal scores, 10 expected above
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # enough images: no warning
        t = normal_threshold(values, 0.01)
    # the ceil((n + 1)(1 - a)) = 991-th smallest: 9 of 1000 above
    assert t.rule == "conformal" and t.value == 991.0 and t.fpr == pytest.approx(9 / 1000) and t.n == 1000
    assert t.determined_by == 1 and t.fpr_interval == pytest.approx(clopper_pearson(9, 1000))
    assert normal_threshold(values, 0.0).value == 1000.0  # rate 0: the maximum
    # the normalised score: threshold -> 0.5, the median normal value -> 0.1
    assert float(normalize(np.array([t.value]), t.value, t.scale)[0]) == pytest.approx(0.5)
    assert float(normalize(np.array([500.5]), t.value, t.scale)[0]) == pytest.approx(0.1)
    assert float(normalize(torch.tensor([1e9]), t.value, t.scale)[0]) == pytest.approx(1.0)


def test_ties_never_exceed_the_requested_rate():
    t = normal_threshold(np.array([1.0, 2.0, 2.0, 2.0, 3.0] * 20), 0.3)  # 100 values, 30 allowed above
    assert t.fpr <= 0.3 and t.value == 2.0 and t.fpr == 0.2


def test_clopper_pearson_matches_the_exact_binomial_interval():
    for x, n in ((0, 20), (5, 100), (3, 320), (20, 20)):
        ci = stats.binomtest(x, n).proportion_ci(confidence_level=0.95, method="exact")
        assert clopper_pearson(x, n) == pytest.approx((ci.low, ci.high), abs=1e-9)
    assert clopper_pearson(0, 20)[1] == pytest.approx(1 - 0.025 ** (1 / 20))  # closed form for x = 0


@pytest.mark.parametrize("shape", [0.0, 0.2, -0.2])
def test_gpd_tail_recovers_the_rate_a_max_cannot(shape):
    """100 normal scores, requested rate 0.002 (would need 500 for a rank): the maximum gives
    ~1/101 on new normals; the GPD tail ~0.002. Scores: a GPD with known shape (exponential for 0)."""
    fpr, n, reps = 0.002, 100, 150
    dist = stats.genpareto(shape, loc=1.0, scale=1.0)
    rng = np.random.default_rng(0)
    tail_rates, max_rates = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(reps):
            sample = dist.rvs(n, random_state=rng)
            t = normal_threshold(sample, fpr)
            assert t.rule == "gpd" and t.determined_by == 20  # the top max(10, 0.2 n)
            tail_rates.append(dist.sf(t.value))
            max_rates.append(dist.sf(sample.max()))
    assert np.mean(max_rates) == pytest.approx(1 / (n + 1), rel=0.3)  # 5x the request
    assert 0.5 * fpr < np.median(tail_rates) < 2.5 * fpr  # median-unbiased up to the 20-point fit's bias
    assert abs(np.log(np.median(tail_rates) / fpr)) < abs(np.log(np.mean(max_rates) / fpr)) / 2


def test_degenerate_tail_falls_back_and_warns_with_the_numbers():
    with pytest.warns(UserWarning) as record:
        t = normal_threshold(np.full(30, 5.0), 0.01, where="category 'x'")
    assert t.rule == "max" and t.value == 5.0 and "distinct" in t.note
    msg = str(record[0].message)
    assert "category 'x'" in msg and "30 normal images cannot resolve a false-alarm rate of 0.01" in msg
    assert "needs >= 100" in msg and "70 more" in msg and "threshold.normal_fpr >= 0.032" in msg


def test_warning_fires_only_when_the_images_cannot_resolve_the_rate():
    rng = np.random.default_rng(1)
    scores = rng.exponential(size=320)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        t = normal_threshold(scores, 0.01)  # a conformal rank exists: used, no warning
        gpd = normal_threshold(scores, 0.01, tail="gpd")  # 3.2 expected above < 5: the tail model
    assert t.rule == "conformal" and t.value == np.sort(scores)[317]  # ceil(321 * 0.99) = 318th smallest
    assert gpd.rule == "gpd" and gpd.determined_by == 64
    with pytest.warns(UserWarning, match="60 normal images cannot resolve.*generalised Pareto fit to the largest 12"):
        normal_threshold(rng.exponential(size=60), 0.01)


def test_per_category_thresholds_each_from_their_own_images():
    class Module(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name in ("image_threshold", "image_scale", "pixel_threshold", "pixel_scale"):
                self.register_buffer(name, torch.tensor(float("nan")))

    rng = np.random.default_rng(0)
    low, high = rng.normal(10, 1, 200), rng.normal(100, 5, 200)  # two categories, different scales
    scores = np.concatenate([low, high])
    pixels = np.concatenate([rng.normal(1, 0.1, (200, 16)), rng.normal(50, 1, (200, 16))])
    normal = NormalScores(np.arange(400), ["a"] * 200 + ["b"] * 200, scores, pixels, "test")
    m = Module()
    info = calibrate_from(m, normal, 0.05)
    a, b = thresholds_for(m, "a"), thresholds_for(m, "b")
    assert a["image_threshold"] == normal_threshold(low, 0.05).value
    assert b["image_threshold"] == normal_threshold(high, 0.05).value
    assert thresholds_for(m, None)["image_threshold"] == pytest.approx(normal_threshold(scores, 0.05).value)
    assert thresholds_for(m, "unknown") == thresholds_for(m, None)  # the documented global fallback
    assert info["categories"]["a"]["scores"] == pytest.approx(low.tolist())


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
