"""The progress bar: ``Epoch 3/20`` (or ``Epoch 3, step 1200/70000`` for step-limited methods)
and no ``v_num`` (the run's folder and logger names are in the run summary instead)."""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import convert_inf


def epoch_label(trainer: L.Trainer) -> str:
    """``Epoch e/E`` (1-based) when the fit is bounded by epochs, else ``Epoch e``."""
    epoch, max_epochs = trainer.current_epoch + 1, trainer.max_epochs
    max_steps = trainer.max_steps if trainer.max_steps is not None else -1
    if max_steps > 0 or max_epochs is None or max_epochs < 0:
        return f"Epoch {epoch}"
    return f"Epoch {epoch}/{max_epochs}"


class ProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar with the epoch out of the total and without ``v_num``."""

    def on_train_epoch_start(self, trainer: L.Trainer, *args: Any) -> None:
        if self._leave:  # as Lightning's, with the label set before the bar is first drawn
            self.train_progress_bar = self.init_train_tqdm()
        self.train_progress_bar.reset(convert_inf(self.total_train_batches))
        self.train_progress_bar.initial = 0
        self.train_progress_bar.set_description(epoch_label(trainer))

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if trainer.max_steps is not None and trainer.max_steps > 0:
            metrics["step"] = f"{trainer.global_step}/{trainer.max_steps}"
        return metrics


def with_progress_bar(callbacks: list[Any], enable_progress_bar: bool | None) -> list[Any]:
    """``callbacks`` plus ``ProgressBar`` unless the bar is off (``trainer.enable_progress_bar=false``)
    or a progress bar is configured already (``callbacks.*``)."""
    from lightning.pytorch.callbacks import ProgressBar as _Base

    if enable_progress_bar is False or any(isinstance(c, _Base) for c in callbacks):
        return callbacks
    return [*callbacks, ProgressBar()]
