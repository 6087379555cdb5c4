"""results.json / results.md of a run, written atomically once metrics exist."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from iad_lightning.metrics import METRIC_KEYS

SHORT_NAMES = {
    "image_auroc": "I-AUROC",
    "image_ap": "I-AP",
    "image_f1max": "I-F1max",
    "pixel_auroc": "P-AUROC",
    "pixel_ap": "P-AP",
    "pixel_f1max": "P-F1max",
    "pixel_aupro": "AUPRO",
    "image_precision": "I-Prec",
    "image_recall": "I-Rec",
    "image_f1": "I-F1",
    "image_fpr": "I-FPR",
    "pixel_iou": "P-IoU",
}


def mean_over_categories(per_category: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Unweighted mean of each metric over the categories that define it (None if none does)."""
    mean: dict[str, float | None] = {}
    for key in METRIC_KEYS:
        values = [m[key] for m in per_category.values() if m.get(key) is not None]
        mean[key] = float(sum(values)) / len(values) if values else None
    return mean


def atomic_write(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a crash never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _fmt(value: float | None) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def markdown_table(results: dict[str, Any], keys: tuple[str, ...] = METRIC_KEYS) -> str:
    """One row per category plus the mean row; values in percent, '-' where undefined."""
    keys = tuple(k for k in keys if any(m.get(k) is not None for m in results["categories"].values())) or keys
    lines = ["| category | " + " | ".join(SHORT_NAMES[k] for k in keys) + " |"]
    lines.append("|---|" + "---:|" * len(keys))
    rows = list(results["categories"].items())
    if len(rows) > 1 or not rows:
        rows.append(("**mean**", results["mean"]))
    for name, metrics in rows:
        lines.append(f"| {name} | " + " | ".join(_fmt(metrics.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def calibrated_table(results: dict[str, Any]) -> str:
    """The metrics at the calibrated thresholds (``results["calibrated"]``) as a markdown table."""
    from iad_lightning.calibration import CALIBRATED_KEYS

    return markdown_table(results["calibrated"], CALIBRATED_KEYS)


def write_results(results: dict[str, Any], out_dir: str | Path) -> None:
    """Write results.json and results.md into ``out_dir``: ``categories`` / ``mean`` (the
    threshold-free metrics, exact shape) and, when present, ``trained_on`` (what a method fitted on
    other data was trained on, e.g. zero-shot AnomalyCLIP), ``crop_check`` (defects cut by the
    centre crop), ``preprocess`` (the geometry the test images were served with, data/geometry.py)
    and ``calibrated`` (thresholds and the metrics at them, ``iad_lightning.calibration``)."""
    out = Path(out_dir)
    clean = {
        "categories": {c: {k: m.get(k) for k in METRIC_KEYS} for c, m in results["categories"].items()},
        "mean": {k: results["mean"].get(k) for k in METRIC_KEYS},
    }
    if results.get("trained_on") is not None:  # what the method was fitted on, when not this data
        clean["trained_on"] = results["trained_on"]
    if results.get("crop_check") is not None:  # defects cut by the centre crop (data/crop_check.py)
        clean["crop_check"] = results["crop_check"]
    if results.get("preprocess") is not None:  # the model's preprocessing the test was served with
        clean["preprocess"] = results["preprocess"]
    md = markdown_table(clean)
    if results.get("calibrated"):
        clean["calibrated"] = results["calibrated"]
        md += "\nAt the calibrated thresholds (out-of-sample normal train images):\n\n" + calibrated_table(results)
    atomic_write(out / "results.json", json.dumps(clean, indent=2) + "\n")
    atomic_write(out / "results.md", md)


IMAGE_SCORES_NAME = "scores.csv"


def write_image_scores(rows: list[dict[str, Any]], out_dir: str | Path) -> None:
    """``scores.csv``: one row per test image (path, category, label, score), in test order; the
    scores ``predict.py`` gives the same files (one preprocessing, read from the model)."""
    if not rows:
        return
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(("path", "category", "label", "score"))
    writer.writerows((r["path"], r["category"], r["label"], f"{r['score']:.9g}") for r in rows)
    atomic_write(Path(out_dir) / IMAGE_SCORES_NAME, buf.getvalue())
