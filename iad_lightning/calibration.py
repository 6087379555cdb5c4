"""Decision thresholds calibrated on held-out NORMAL training images, never on test data.

After a method is fitted, ``callbacks.calibration.ThresholdCalibration`` (added by ``train.py`` for
every method) runs
the method on the held-out normal images of the datamodule's validation split (``data.val_fraction``
of each category's train good images; ``threshold.holdout_fraction`` when that is 0) and sets:

- ``image_threshold``: an image is *anomalous* iff its raw score is ``> image_threshold``; chosen so
  that a fraction ``threshold.normal_fpr`` (default 0.01) of the held-out normal images exceeds it
  (the ``k = floor(fpr * n)``-th largest score of the ``n`` held-out images, ``k = 0``: the maximum);
- ``pixel_threshold``: the same rule over all pixels of the held-out normal anomaly maps at
  ``threshold.pixel_normal_fpr`` (default: ``normal_fpr``); the predicted defect region of an
  image is ``anomaly_map > pixel_threshold``.

With ``n`` held-out images only the rates ``k / n`` can be measured. If the requested rate is below
``1 / n`` a warning says so and the closest supported rate (0 or ``1 / n``) is used.

The thresholds are buffers of ``AnomalyModule`` (so they are in the checkpoint's ``state_dict``
and load with ``weights_only=True``); NaN means "not calibrated" (then decisions are ``unknown``
and the metrics at the thresholds are null).

Normalised score (display only, metrics always use raw scores):
``sigmoid((s - t) / w)`` with ``t`` the threshold and ``w = (t - median of the held-out normal
values) / ln 9``: the threshold maps to 0.5 and the median normal value to 0.1. The same mapping
with the pixel threshold normalises anomaly maps.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset

from iad_lightning.distributed import gather_rows, is_distributed
from iad_lightning.errors import ConfigError

log = logging.getLogger(__name__)
CALIBRATION_KEY = "iad_calibration"  # checkpoint entry: calibration details (plain types)
THRESHOLD_BUFFERS = ("image_threshold", "image_scale", "pixel_threshold", "pixel_scale")
CALIBRATED_KEYS = ("image_precision", "image_recall", "image_f1", "image_fpr", "pixel_iou")
LN9 = math.log(9.0)


@dataclass
class Threshold:
    """One calibrated threshold and how it was obtained."""

    value: float
    scale: float  # w of the normalised score
    requested_fpr: float
    fpr: float  # rate of the held-out normal values above ``value``
    n: int  # held-out normal values (images or pixels)


def normal_threshold(values: torch.Tensor | np.ndarray, fpr: float, what: str = "image") -> Threshold:
    """The threshold that ``fpr`` of ``values`` (normal scores or pixels) exceed; see the module doc."""
    if not 0.0 <= fpr < 1.0:
        raise ConfigError(f"threshold.normal_fpr={fpr} must be in [0, 1)")
    v = torch.as_tensor(values).flatten().double()
    v = v[torch.isfinite(v)]
    n = v.numel()
    if n == 0:
        raise ConfigError(f"no finite held-out normal {what} values to calibrate a threshold on")
    k = math.floor(fpr * n + 1e-9)
    if k == 0 and fpr > 0:
        k = 1 if fpr * n >= 0.5 else 0  # the closest supported rate, 0 or 1/n
        warnings.warn(
            f"threshold calibration: {n} held-out normal {what}s cannot measure a false-alarm rate of "
            f"{fpr:g} (the smallest non-zero rate is 1/{n} = {1 / n:.3g}); using the closest supported "
            f"rate {k / n:.3g}. Hold out more normal images (threshold.holdout_fraction or data.val_fraction).",
            stacklevel=2,
        )
    value = float(torch.kthvalue(v, n - k).values)  # the (k+1)-th largest: at most k values above
    median = float(v.median())
    scale = (value - median) / LN9
    if not scale > 0:  # degenerate (all held-out values equal): any positive width keeps the order
        scale = max(abs(value), 1.0) * 1e-3
    return Threshold(value, scale, fpr, float((v > value).double().mean()), n)


def normalize(values: np.ndarray | torch.Tensor, threshold: float, scale: float) -> Any:
    """``sigmoid((values - threshold) / scale)``: the threshold maps to 0.5 (NaN if uncalibrated)."""
    if isinstance(values, torch.Tensor):
        return torch.sigmoid((values - threshold) / scale)
    z = (np.asarray(values, dtype=np.float64) - threshold) / scale
    return (0.5 * (1.0 + np.tanh(0.5 * z))).astype(np.float32)  # overflow-free sigmoid


# ------------------------------------------------------------------------------ fit time
def held_out_normal(datamodule: Any) -> Any:
    """The held-out normal images: the validation split's good (label 0) records."""
    ds = datamodule.dataset("val")
    keep = [i for i, rec in enumerate(ds.records) if int(rec.label) == 0]
    return Subset(ds, keep)


def apply_holdout(datamodule: Any, holdout_fraction: float) -> None:
    """Hold out ``holdout_fraction`` of the train good images for calibration when the method
    holds none out itself (``data.val_fraction`` 0, e.g. PatchCore, UniAD); call before indexing."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ConfigError(f"threshold.holdout_fraction={holdout_fraction} must be in [0, 1)")
    if getattr(datamodule, "val_fraction", None) == 0.0 and holdout_fraction > 0:
        datamodule.val_fraction = holdout_fraction


@torch.no_grad()
def calibrate(module: Any, datamodule: Any, normal_fpr: float = 0.01, pixel_normal_fpr: float | None = None,
              batch_size: int = 16) -> dict[str, Any] | None:
    """Run ``module`` on the held-out normal images and set its threshold buffers (every rank
    runs its strided shard; scores and map pixels are gathered, so all ranks agree)."""
    pixel_fpr = normal_fpr if pixel_normal_fpr is None else pixel_normal_fpr
    ds = held_out_normal(datamodule)
    n_total = len(ds)
    if n_total == 0:
        warnings.warn(
            "threshold calibration: no held-out normal training images (data.val_fraction and "
            "threshold.holdout_fraction give none), so no decision thresholds are calibrated; "
            "decisions will be 'unknown'. Set threshold.holdout_fraction (e.g. 0.1) to calibrate.",
            stacklevel=2,
        )
        return None
    if is_distributed():
        ds = Subset(ds, range(torch.distributed.get_rank(), n_total, torch.distributed.get_world_size()))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=getattr(datamodule, "num_workers", 0))
    was_training = module.training
    module.eval()
    scores, pixels = [torch.empty(0)], [torch.empty(0)]
    for batch in loader:
        out = module._predict_with_size({"image": batch["image"].to(module.device), "category": batch.get("category")})
        scores.append(out["pred_score"].detach().float().flatten().cpu())
        pixels.append(out["anomaly_map"].detach().float().flatten().cpu())
    module.train(was_training)
    score, pixel = torch.cat(scores), torch.cat(pixels)
    if is_distributed():
        group = module.device if module.device.type == "cuda" else torch.device("cpu")
        score, pixel = gather_rows(score, group), gather_rows(pixel, group)
    image_t = normal_threshold(score, normal_fpr, "image")
    pixel_t = normal_threshold(pixel, pixel_fpr, "pixel")
    set_thresholds(module, image_t, pixel_t)
    info = {"held_out_images": n_total, "image_normal_fpr": normal_fpr, "image_fpr_held_out": image_t.fpr,
            "held_out_pixels": pixel_t.n, "pixel_normal_fpr": pixel_fpr, "pixel_fpr_held_out": pixel_t.fpr}
    module.calibration_info = info
    if not is_distributed() or torch.distributed.get_rank() == 0:
        log.info(
            f"Calibrated on {n_total} held-out normal images: image threshold {image_t.value:.6g} "
            f"(false-alarm rate {image_t.fpr:.3g} on them, requested {normal_fpr:g}), pixel threshold "
            f"{pixel_t.value:.6g} (rate {pixel_t.fpr:.3g} over {pixel_t.n} pixels, requested {pixel_fpr:g})"
        )
    return info


def set_thresholds(module: Any, image: Threshold, pixel: Threshold) -> None:
    for name, value in (("image_threshold", image.value), ("image_scale", image.scale),
                        ("pixel_threshold", pixel.value), ("pixel_scale", pixel.scale)):
        getattr(module, name).fill_(value)


def thresholds_of(module: Any) -> dict[str, float]:
    """The four threshold buffers as floats (NaN when not calibrated)."""
    return {name: float(getattr(module, name)) for name in THRESHOLD_BUFFERS}


# ------------------------------------------------------------------------------ test time
def metrics_at_thresholds(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray | None,
                          masks: np.ndarray | None, image_threshold: float, pixel_threshold: float) -> dict:
    """Image precision, recall, F1, false-alarm rate and the pixel IoU (over all pixels of the
    given images) at fixed thresholds; a value the data cannot define is None."""
    out: dict[str, float | None] = dict.fromkeys(CALIBRATED_KEYS)
    if math.isfinite(image_threshold):
        pred = np.asarray(scores) > image_threshold
        lab = np.asarray(labels).astype(bool)
        tp, fp = int((pred & lab).sum()), int((pred & ~lab).sum())
        fn = int((~pred & lab).sum())
        out["image_precision"] = tp / (tp + fp) if tp + fp else None
        out["image_recall"] = tp / (tp + fn) if tp + fn else None
        out["image_f1"] = 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn else None
        out["image_fpr"] = fp / int((~lab).sum()) if (~lab).any() else None
    if maps is not None and masks is not None and math.isfinite(pixel_threshold):
        region = maps > pixel_threshold
        union = int((region | masks).sum())
        out["pixel_iou"] = int((region & masks).sum()) / union if union else None
    return out


def calibrated_category(scores: np.ndarray, labels: np.ndarray, maps: np.ndarray | None,
                        masks: np.ndarray | None, module: Any) -> dict:
    """``metrics_at_thresholds`` of one category at the module's calibrated thresholds."""
    thr = thresholds_of(module)
    return metrics_at_thresholds(scores, labels, maps, masks, thr["image_threshold"], thr["pixel_threshold"])


def calibrated_results(per_cat: dict[str, dict], module: Any) -> dict[str, Any]:
    """The ``calibrated`` entry of results.json: thresholds and the metrics at them
    (``calibrated_category`` per category) with the unweighted mean over categories."""
    mean = {}
    for key in CALIBRATED_KEYS:
        values = [m[key] for m in per_cat.values() if m[key] is not None]
        mean[key] = float(sum(values)) / len(values) if values else None
    finite = {k: (v if math.isfinite(v) else None) for k, v in thresholds_of(module).items()}
    return {"thresholds": {**finite, **(getattr(module, "calibration_info", None) or {})},
            "categories": per_cat, "mean": mean}
