"""The fit-time calibration of decision thresholds as a callback (``iad_lightning.calibration``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L

from iad_lightning.calibration import calibrate


class ThresholdCalibration(L.Callback):
    """Calibrates the thresholds when fitting ends, then rewrites the last checkpoint(s) so that
    they hold them. Runs in ``on_train_end`` (after the method's last-epoch fitting, e.g.
    PatchCore's bank and EfficientAD's quantiles, inside the strategy: model on its device)."""

    def __init__(self, normal_fpr: float = 0.01, pixel_normal_fpr: float | None = None, batch_size: int = 16) -> None:
        self.normal_fpr, self.pixel_normal_fpr, self.batch_size = normal_fpr, pixel_normal_fpr, batch_size

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "dataset"):
            return
        info = calibrate(pl_module, dm, self.normal_fpr, self.pixel_normal_fpr,
                         getattr(dm, "eval_batch_size", None) or self.batch_size)
        if info is None:
            return
        for cb in trainer.checkpoint_callbacks:
            path = getattr(cb, "last_model_path", "") or ""
            if path and Path(path).is_file():
                trainer.save_checkpoint(path)
