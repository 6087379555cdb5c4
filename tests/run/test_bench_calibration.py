"""bench/calibration.py and bench/calibration_shift.py: their pure pieces (no data, no model)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _load(name: str):
    sys.path.insert(0, str(BENCH))  # calibration_shift imports bench/calibration.py by name
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_realised_rate_with_its_clopper_pearson_interval():
    bench = _load("calibration")
    assert bench.with_interval(4 / 103, [0] * 103 + [1] * 50) == "3.9 [1.1-9.6]"  # 4 of 103 test normals
    assert bench.with_interval(0.0, [0] * 41 + [1] * 119) == "0.0 [0.0-8.6]"


def test_groups_from_file_names():
    shift = _load("calibration_shift")
    names = ["kos01_Part0.png", "kos01_Part3.png", "kos12_Part1.png", "other.png"]
    assert shift.group_of(names, r"^(kos\d+)_") == ["kos01", "kos01", "kos12", "other.png"]
    assert shift.group_of(names, None) == names  # no pattern: every image its own group


@pytest.mark.parametrize("fpr", [0.05, 0.1])
def test_group_resampling_is_calibrated_on_exchangeable_groups(fpr):
    """Scores with a shared effect per group (exchangeable groups): the project's rule, calibrated on
    some groups, realises the request on average on whole held-out groups; the spread is wide."""
    shift = _load("calibration_shift")
    rng = np.random.default_rng(0)
    groups = [f"g{g:02d}" for g in range(40) for _ in range(7)]
    scores = rng.normal(size=280) + np.repeat(rng.normal(scale=0.5, size=40), 7)
    out = shift.group_resampling(scores, groups, test_groups=15, fprs=[fpr], splits=1500)[fpr]
    assert out["pseudo_test_groups"] == 15
    assert out["mean"] == pytest.approx(fpr, abs=0.012)
    assert out["p05"] < fpr < out["p95"] and out["p95"] - out["p05"] > fpr / 2
