"""The shared base of every method: one evaluation path from predictions to metrics.

A method implements ``preprocess`` (its input geometry) and ``predict_batch`` (per image an
anomaly map and an image score). The base module collects test predictions on the CPU, gathers
them from all ranks, drops the duplicates a distributed sampler pads with, and computes metrics
per category with ``iad_lightning.metrics``. No method computes its own metrics.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from iad_lightning.checkpoint import CONFIG_KEY
from iad_lightning.data.transforms import Preprocess
from iad_lightning.distributed import gather_objects
from iad_lightning.errors import ConfigError
from iad_lightning.metrics import compute_metrics
from iad_lightning.results import mean_over_categories


class AnomalyModule(L.LightningModule):
    """Base LightningModule: subclasses implement ``preprocess`` and ``predict_batch``."""

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[str, Any] | None = None
        self.curves: dict[str, dict[str, Any]] = {}  # per category: the curve points of the metrics (plots)
        self._test_outputs: list[dict[str, np.ndarray]] = []

    # -- what a method provides -------------------------------------------------------------
    @property
    def preprocess(self) -> Preprocess:
        raise NotImplementedError

    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"anomaly_map": (B,1,H,W), "pred_score": (B,)}`` for normalised images."""
        raise NotImplementedError

    def configure_data(self, datamodule: Any, world_size: int) -> None:
        """Adapt the datamodule once the trainer exists (e.g. per-device batch from an effective
        batch). Called by ``train.py`` and ``test.py`` before any loader is built; default: no-op."""

    def export_module(self) -> torch.nn.Module:
        """The pure-torch inference graph ``images -> (anomaly_map, pred_score)`` with every
        normalisation baked in, for ``python -m iad_lightning.export``. Methods that can be
        exported override this."""
        raise ConfigError(f"method {type(self).__name__} cannot be exported (no export_module)")

    # -- shared evaluation path ---------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.predict_batch(images)

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        return self._predict_with_size(batch)

    def _predict_with_size(self, batch: dict) -> dict[str, torch.Tensor]:
        out = self.predict_batch(batch["image"])
        amap = out["anomaly_map"]
        if amap.shape[-2:] != batch["image"].shape[-2:]:  # maps are evaluated at input size
            amap = F.interpolate(amap, size=batch["image"].shape[-2:], mode="bilinear", align_corners=False)
        return {"anomaly_map": amap, "pred_score": out["pred_score"]}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the resolved method config (plain types) lets test.py rebuild the module safely
        checkpoint[CONFIG_KEY] = getattr(self, "method_config", None)

    def on_test_epoch_start(self) -> None:
        self._test_outputs = []
        self.results = None
        self.curves = {}

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self._predict_with_size(batch)
        self._test_outputs.append(
            {
                "index": batch["index"].cpu().numpy(),
                "pred_score": out["pred_score"].detach().float().cpu().numpy(),
                "label": torch.as_tensor(batch["label"]).cpu().numpy(),
                "anomaly_map": out["anomaly_map"].detach().float().cpu().numpy()[:, 0],
                "mask": batch["mask"].cpu().numpy()[:, 0] > 0.5,
                "category": np.asarray(batch["category"]),
            }
        )
        return out

    def on_test_epoch_end(self) -> None:
        merged = gather_predictions(self._test_outputs)
        self._test_outputs = []
        self.results = metrics_per_category(merged, self.trainer.datamodule, curves=self.curves)
        for cat, values in self.results["categories"].items():
            for key, value in values.items():
                if value is not None:
                    self.log(f"test/{cat}/{key}", value, rank_zero_only=True, sync_dist=False)
        for key, value in self.results["mean"].items():
            if value is not None:
                self.log(f"test/mean/{key}", value, rank_zero_only=True, sync_dist=False)


def gather_predictions(outputs: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate this rank's batches, gather all ranks, de-duplicate and sort by index."""
    local = {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]} if outputs else {}
    parts = [p for p in gather_objects(local) if p]
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    _, first = np.unique(merged["index"], return_index=True)  # sorted unique indices
    return {k: v[first] for k, v in merged.items()}


def metrics_per_category(pred: dict[str, np.ndarray], datamodule: Any = None,
                         curves: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """``{"categories": {cat: metrics}, "mean": metrics}``; pixel metrics None without masks.

    ``curves``: a dict that receives, per category, the ROC / PRO points the metrics come from
    (``compute_metrics(curves=...)``), for the plots of ``callbacks/plots.py``."""
    cats = [c for c in getattr(datamodule, "categories", []) if c in set(pred["category"])]
    cats += sorted(set(pred["category"]) - set(cats))
    has_masks = bool(pred["mask"].any())
    per_cat = {}
    for cat in cats:
        sel = pred["category"] == cat
        per_cat[cat] = compute_metrics(
            pred["pred_score"][sel],
            pred["label"][sel],
            pred["anomaly_map"][sel] if has_masks else None,
            pred["mask"][sel] if has_masks else None,
            curves=curves.setdefault(cat, {}) if curves is not None else None,
        )
    return {"categories": per_cat, "mean": mean_over_categories(per_cat)}
