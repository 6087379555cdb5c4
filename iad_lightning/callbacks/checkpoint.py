"""Checkpoints for long runs: ``last.ckpt`` every N optimiser steps, and the RNG states a resumed
run needs to continue exactly where an interrupted one stopped.

``ModelCheckpoint`` is Lightning's, plus ``every_n_train_steps`` as an *additional* trigger that
refreshes ``last.ckpt`` (Lightning's own makes it the only trigger and, with ``save_top_k: 0``,
writes nothing but a last checkpoint that is then not refreshed at the end of training). The final
state is always written when training ends. Files are written atomically (Lightning writes through
an fsspec transaction), so a kill during a save leaves the previous ``last.ckpt`` intact.

``RNGState`` (added to every run by ``run.py``) stores the torch (CPU and CUDA), numpy and Python
RNG states with each checkpoint and restores them just before the first training batch of the
resumed run, after whatever the fit start draws (loaders, statistics passes): augmentation,
dropout and UniAD's feature jitter then continue the interrupted run's random streams.
"""

from __future__ import annotations

import random
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint as _LightningModelCheckpoint


class ModelCheckpoint(_LightningModelCheckpoint):
    """Lightning's ``ModelCheckpoint``; ``every_n_train_steps`` additionally refreshes ``last.ckpt``."""

    def __init__(self, *args: Any, every_n_train_steps: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if every_n_train_steps is not None and every_n_train_steps < 0:
            raise ValueError(f"callbacks.model_checkpoint.every_n_train_steps={every_n_train_steps} must be >= 0")
        self.every_n_steps = int(every_n_train_steps or 0)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self.every_n_steps and step > 0 and step % self.every_n_steps == 0 \
                and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))  # the final state
        else:
            super().on_train_end(trainer, pl_module)


class RNGState(L.Callback):
    """Saves the global RNG states with every checkpoint; restores them when a run resumes."""

    def __init__(self) -> None:
        self._pending: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        np_state = np.random.get_state()
        state = {
            "torch": torch.get_rng_state(),
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = state_dict or None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        np_state = state["numpy"]
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["gauss"]))
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
