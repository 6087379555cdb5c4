"""The fit-time calibration of decision thresholds as a callback (``iad_lightning.calibration``)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import lightning as L
import torch

from iad_lightning.calibration import MIN_EXCEEDANCES, calibrate_from, cross_fits, held_out_scores
from iad_lightning.crossfit import CrossFit

log = logging.getLogger(__name__)


class ThresholdCalibration(L.Callback):
    """Before fitting: gives a method that supports it its cross-fitting folds (``folds`` >= 2,
    ``iad_lightning.crossfit``). When fitting ends: calibrates the thresholds from the method's
    out-of-sample scores of every train image, or else by running it on the held-out normal images,
    then rewrites the last checkpoint(s) so that they hold them. Runs in ``on_train_end`` (after the
    method's last-epoch fitting, inside the strategy: model on its device)."""

    def __init__(self, normal_fpr: float = 0.01, pixel_normal_fpr: float | None = None, batch_size: int = 16,
                 folds: int = 5, seed: int = 0, tail: str = "auto", min_exceedances: float = MIN_EXCEEDANCES,
                 tail_fraction: float = 0.2, leave_one_out: bool = False) -> None:
        self.normal_fpr, self.pixel_normal_fpr, self.batch_size = normal_fpr, pixel_normal_fpr, batch_size
        self.folds, self.seed, self.leave_one_out = int(folds), seed, bool(leave_one_out)
        self.rule = dict(tail=tail, min_exceedances=min_exceedances, tail_fraction=tail_fraction)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage == "fit" and dm is not None and hasattr(dm, "fit_records") and cross_fits(pl_module, dm, self.folds):
            loo = self.leave_one_out and getattr(pl_module, "supports_leave_one_out", False)
            if self.leave_one_out and not loo:
                log.info("threshold.leave_one_out: %s has no leave-one-image-out scoring; it cross-fits %d folds",
                         type(pl_module).__name__, self.folds)
            pl_module.crossfit = CrossFit.for_records(dm.fit_records(), self.folds, self.seed, leave_one_out=loo)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "dataset"):
            return
        normal = getattr(pl_module, "out_of_sample", None)
        advice = "add normal train images"
        if normal is None:
            with torch.random.fork_rng(devices=[]):  # a loader draws its base seed from the global RNG:
                # leave the training streams as they were, so that the last.ckpt rewritten below
                # resumes (callbacks.checkpoint.RNGState) exactly as the uninterrupted run continues
                normal = held_out_scores(pl_module, dm, getattr(dm, "eval_batch_size", None) or self.batch_size)
            advice = "hold out more normal images (threshold.holdout_fraction or data.val_fraction)"
        pl_module.out_of_sample, pl_module.crossfit = None, None
        if normal is not None and len(normal.score) == 0 and normal.excluded:
            warnings.warn(f"threshold calibration: all {normal.excluded} train images are in-sample by construction "
                          "(the method's k-shot reference bank), so no decision thresholds are calibrated; "
                          "decisions will be 'unknown'. Add normal train images beyond the k-shot bank.", stacklevel=2)
            return
        if normal is None or len(normal.score) == 0:
            warnings.warn(
                "threshold calibration: no out-of-sample normal training images (no cross-fitting, and "
                "data.val_fraction and threshold.holdout_fraction hold none out), so no decision thresholds "
                "are calibrated; decisions will be 'unknown'. Set threshold.holdout_fraction (e.g. 0.1) or "
                "threshold.folds (e.g. 5, for a method that cross-fits) to calibrate.",
                stacklevel=2,
            )
            return
        calibrate_from(pl_module, normal, self.normal_fpr, self.pixel_normal_fpr, advice=advice, **self.rule)
        for cb in trainer.checkpoint_callbacks:
            path = getattr(cb, "last_model_path", "") or ""
            if path and Path(path).is_file():
                trainer.save_checkpoint(path)
