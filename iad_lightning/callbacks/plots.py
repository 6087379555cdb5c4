"""Curve plots of a test run: per category the ROC curves (image and pixel level) and the PRO
curve up to the AU-PRO limit, a bar chart of every metric per category, and per category the
calibration plot (``<category>_calibration.png``: the out-of-sample normal train scores the image
threshold was calibrated on, the test normal and defective scores, the threshold with the requested
and realised false-alarm rates and the recall). PNG files in ``<run>/plots/`` and, as images, to
every logger that takes them (TensorBoard, W&B, MLflow).

The points are the exact curves the metrics are computed from (``compute_metrics(curves=...)``,
kept by the method in ``pl_module.curves``), so a plotted area is the reported number. Long
curves are thinned for drawing only (at most ``max_points`` vertices per curve, by FPR).
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np

from iad_lightning.callbacks.visualize import log_image
from iad_lightning.metrics.curve import thin_curve
from iad_lightning.results import SHORT_NAMES


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _to_rgb(fig: Any) -> np.ndarray:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    buf.seek(0)
    from PIL import Image

    return np.asarray(Image.open(buf).convert("RGB"))


def roc_figure(category: str, curves: dict[str, Any], metrics: dict[str, Any], max_points: int = 2000):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=100)
    for key, label, metric, style in (("image_roc", "image", "image_auroc", "-"),
                                      ("pixel_roc", "pixel", "pixel_auroc", "--")):
        if key in curves:
            x, y = thin_curve(*curves[key], max_points)
            ax.plot(x, y, style, lw=2, label=f"{label} (AUROC {100 * metrics[metric]:.2f})", drawstyle="default")
    ax.plot([0, 1], [0, 1], ":", color="grey", lw=1, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.01), xlabel="false positive rate", ylabel="true positive rate",
           title=f"{category}: ROC")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def pro_figure(category: str, curves: dict[str, Any], metrics: dict[str, Any], max_points: int = 2000):
    plt = _pyplot()
    limit = curves.get("fpr_limit", 0.3)
    fig, ax = plt.subplots(figsize=(5.2, 5.0), dpi=100)
    x, y = thin_curve(*curves["pixel_pro"], max_points)
    ax.plot(x, y, lw=2, label=f"PRO (AU-PRO@{limit:g} {100 * metrics['pixel_aupro']:.2f})")
    ax.fill_between(x, y, alpha=0.15)
    ax.set(xlim=(0, limit), ylim=(0, 1.01), xlabel="false positive rate (pixels of good regions)",
           ylabel="per-region overlap", title=f"{category}: PRO up to FPR {limit:g}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def metrics_bar_figure(results: dict[str, Any]):
    plt = _pyplot()
    cats = list(results["categories"])
    rows = [*cats, "mean"] if len(cats) > 1 else cats
    values = {**results["categories"], "mean": results["mean"]}
    keys = [k for k in SHORT_NAMES if any(values[r].get(k) is not None for r in rows)]
    width = 0.8 / max(1, len(keys))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) * max(1, len(keys)) * 0.35 + 2), 4.6), dpi=100)
    pos = np.arange(len(rows))
    for j, key in enumerate(keys):
        heights = [100 * v if (v := values[r].get(key)) is not None else np.nan for r in rows]
        ax.bar(pos + (j - (len(keys) - 1) / 2) * width, heights, width, label=SHORT_NAMES[key])
    ax.set_xticks(pos, rows, rotation=30 if len(rows) > 6 else 0, ha="right" if len(rows) > 6 else "center")
    ax.set(ylim=(0, 100), ylabel="metric (%)", title="metrics per category")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=min(len(keys), 4), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12 if len(rows) <= 6 else -0.25))
    fig.tight_layout()
    return fig


def calibration_figure(category: str, cal: dict[str, Any], test_scores: tuple[np.ndarray, np.ndarray] | None,
                       source: str = "out-of-sample"):
    """Scores as dots, one row per group, with the category's image threshold (``cal``: an entry
    of ``calibration_info["categories"]``) and the rates it gives on each group."""
    plt = _pyplot()
    t, info = float(cal["image_threshold"]), cal["image"]
    rows = [(f"train normal\n({source}, n={len(cal['scores'])})", np.asarray(cal["scores"], dtype=float), "tab:blue")]
    if test_scores is not None:
        scores, labels = np.asarray(test_scores[0], dtype=float), np.asarray(test_scores[1]).astype(bool)
        rows += [(f"test normal\n(n={int((~labels).sum())})", scores[~labels], "tab:green"),
                 (f"test defective\n(n={int(labels.sum())})", scores[labels], "tab:red")]
    fig, ax = plt.subplots(figsize=(9.0, 1.6 + 1.0 * len(rows)), dpi=100)
    rng = np.random.default_rng(0)
    for y, (label, values, color) in enumerate(rows):
        if len(values):
            ax.scatter(values, y + rng.uniform(-0.28, 0.28, len(values)), s=14, alpha=0.6, color=color, lw=0)
            above = int((values > t).sum())
            word = "recall" if "defective" in label else "false alarms"
            ax.text(1.01, y, f"{word}\n{above}/{len(values)} = {100 * above / len(values):.1f} %",
                    transform=ax.get_yaxis_transform(), va="center", fontsize=9)
    lo, hi = info["fpr_interval"]
    how = {"gpd": f"GPD tail fit to the top {info['determined_by']}", "max": "the largest score",
           "conformal": "conformal rank"}.get(info["rule"], info["rule"])
    ax.axvline(t, color="black", ls="--", lw=1.5)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=9)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("image score (anomalous iff > threshold)")
    ax.set_title(f"{category}: image threshold {t:.4g} ({how}); requested false-alarm rate "
                 f"{100 * info['requested_fpr']:.3g} %, on train {100 * info['fpr_calibration']:.3g} % "
                 f"[95 %: {100 * lo:.2g}-{100 * hi:.2g} %]", fontsize=9.5)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


class CurvePlots(L.Callback):
    """After testing: ``plots/<category>_roc.png``, ``plots/<category>_pro.png`` (when the data has
    masks), ``plots/<category>_calibration.png`` (a calibrated model) and ``plots/metrics.png``;
    each also goes to the image loggers."""

    def __init__(self, dirname: str = "plots", log_to_loggers: bool = True, max_points: int = 2000) -> None:
        self.dirname, self.log_to_loggers, self.max_points = dirname, log_to_loggers, max_points

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        results, curves = getattr(pl_module, "results", None), getattr(pl_module, "curves", None) or {}
        if not trainer.is_global_zero or not results or not results.get("categories"):
            return
        plt = _pyplot()
        root = Path(trainer.default_root_dir) / self.dirname
        root.mkdir(parents=True, exist_ok=True)
        figures = []
        for cat, cat_curves in curves.items():
            metrics = results["categories"].get(cat, {})
            if "image_roc" in cat_curves or "pixel_roc" in cat_curves:
                figures.append((f"{cat}_roc", roc_figure(cat, cat_curves, metrics, self.max_points)))
            if "pixel_pro" in cat_curves:
                figures.append((f"{cat}_pro", pro_figure(cat, cat_curves, metrics, self.max_points)))
            cal = ((getattr(pl_module, "calibration_info", None) or {}).get("categories") or {}).get(cat)
            if cal and cal.get("scores"):
                source = (pl_module.calibration_info.get("source") or "out-of-sample").split(" (")[0]
                figures.append((f"{cat}_calibration", calibration_figure(cat, cal, cat_curves.get("test_scores"), source)))
        figures.append(("metrics", metrics_bar_figure(results)))
        for name, fig in figures:
            fig.savefig(root / f"{name}.png")
            if self.log_to_loggers and trainer.loggers:
                image = _to_rgb(fig)
                for logger in trainer.loggers:
                    log_image(logger, f"plots/{name}", image, trainer.global_step)
            plt.close(fig)
