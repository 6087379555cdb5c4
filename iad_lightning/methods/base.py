"""The shared base of every method: one evaluation path from predictions to metrics.

A method implements ``preprocess`` (its input geometry) and ``predict_batch`` (per image an
anomaly map and an image score). The base module collects test predictions on the CPU per
category and, as soon as a category's images are all in (on every rank), gathers them from all
ranks, drops the duplicates a distributed sampler pads with, and reduces them with
``_reduce_category`` (metrics from ``iad_lightning.metrics``, the crop check, the metrics at the
calibrated thresholds); the category's maps are then freed, so test memory is bounded by the
largest category (``category_buffer``). No method computes its own metrics.

Every method also carries the decision thresholds calibrated after fitting on out-of-sample
scores of normal train images (``iad_lightning.calibration``): buffers ``image_threshold``,
``pixel_threshold`` and the widths of the normalised score (global, NaN until calibrated), and per
category in ``calibration_info``. A method whose fit is cheap sets ``supports_crossfit`` and, when
``crossfit`` is set, hands ``out_of_sample`` scores to the calibration (``iad_lightning.crossfit``).

And it carries the preprocessing it was fitted with (``fitted_preprocess``: the datamodule's,
data-level overrides such as ``data.center_crop=false`` included), recorded when fitting starts,
stored in the checkpoint (``data/geometry.py``). ``input_preprocess`` is what test, predict and
export use.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F

from iad_lightning.calibration import CALIBRATION_KEY, THRESHOLD_BUFFERS, calibrated_category, calibrated_results
from iad_lightning.checkpoint import CONFIG_KEY, close_finished_epoch
from iad_lightning.data.crop_check import crop_check, warn_if_cropped
from iad_lightning.data.geometry import (
    PREPROCESS_KEY,
    describe_preprocess,
    preprocess_from_dict,
    preprocess_to_dict,
    same_geometry,
)
from iad_lightning.data.transforms import Preprocess
from iad_lightning.errors import ConfigError
from iad_lightning.methods.category_buffer import CategoryBuffer, category_order
from iad_lightning.metrics import compute_metrics
from iad_lightning.metrics.curve import thin_curves
from iad_lightning.results import mean_over_categories


CURVE_POINTS = 4000  # vertices kept per curve for the plots (the metrics use every point)

# Lightning warnings that do not apply to these methods (there is nothing for a user to change):
# - the held-out normal images are the datamodule's validation split for threshold calibration
#   (calibration.py), not for a validation loop, which methods without validation_step skip on purpose;
warnings.filterwarnings("ignore", message=r"You passed in a `val_dataloader` but have no `validation_step`")
# - memory-bank and Gaussian methods (PatchCore, PaDiM, FeatureNorm) fit without an optimiser;
warnings.filterwarnings("ignore", message=r"`LightningModule.configure_optimizers` returned `None`")
# - frozen pretrained backbones (and EfficientAD's teacher) stay in eval mode on purpose: their
#   batch-norm statistics are part of the weights;
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
# - Lightning's own call of a torch pytree API that torch deprecated (gone with a newer Lightning).
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class AnomalyModule(L.LightningModule):
    """Base LightningModule: subclasses implement ``preprocess`` and ``predict_batch``."""

    supports_crossfit = False  # True: the fit fills ``out_of_sample`` when ``crossfit`` is set

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[str, Any] | None = None
        self._test_buffer = CategoryBuffer()
        self._test_reduced: dict[str, dict[str, Any]] = {}  # per category: what _reduce_category kept
        self.curves: dict[str, dict[str, Any]] = {}  # per category: the curve points of the metrics (plots)
        self.calibration_info: dict[str, Any] | None = None
        self.fitted_preprocess: Preprocess | None = None  # set at fit start or from the checkpoint
        self.image_scores: list[dict[str, Any]] = []  # per test image: path, category, label, score
        self.crossfit: Any = None  # crossfit.CrossFit, set by callbacks.calibration before fitting
        self.out_of_sample: Any = None  # calibration.NormalScores of the train images, from the fit
        for name in THRESHOLD_BUFFERS:  # NaN = not calibrated; set by calibration.ThresholdCalibration
            self.register_buffer(name, torch.tensor(float("nan")))
        self._register_load_state_dict_pre_hook(_fill_missing_thresholds, with_module=True)

    # -- what a method provides -------------------------------------------------------------
    @property
    def preprocess(self) -> Preprocess:
        raise NotImplementedError

    @property
    def input_preprocess(self) -> Preprocess:
        """The preprocessing this model takes: the one it was fitted with (``fitted_preprocess``),
        else (not fitted yet) the method's own ``preprocess``."""
        return self.fitted_preprocess if self.fitted_preprocess is not None else self.preprocess

    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return ``{"anomaly_map": (B,1,H,W), "pred_score": (B,)}`` for normalised images."""
        raise NotImplementedError

    def configure_data(self, datamodule: Any, world_size: int) -> None:
        """Adapt the datamodule once the trainer exists (e.g. per-device batch from an effective
        batch). Called by ``train.py`` and ``test.py`` before any loader is built; default: no-op."""

    def exclude_from_calibration(self, records: list) -> None:
        """Train images the method fits on whatever the fold (a k-shot reference bank): not scored."""
        if self.crossfit is not None:
            self.crossfit.exclude(records)

    def evaluation_targets(self, out: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The (B, H, W) maps and boolean masks the pixel metrics see. Default (the project's
        protocol): the map at the input size and ``mask > 0.5``. ``out`` is ``_predict_with_size``'s,
        with the method's own map in ``anomaly_map_native``; a method whose official protocol
        evaluates elsewhere offers it as an option by overriding this."""
        return out["anomaly_map"][:, 0], batch["mask"][:, 0] > 0.5

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

    def category_scope(self, batch: dict) -> ExitStack:
        """A context in which the submodules that condition on the class (a ``batch_categories``
        context manager, e.g. ADPretrain's per-class reference banks) see the batch's category names."""
        stack = ExitStack()
        categories = batch.get("category")
        if categories is not None:
            for module in self.modules():
                scope = getattr(module, "batch_categories", None)
                if module is not self and callable(scope):
                    stack.enter_context(scope(list(categories)))
        return stack

    def _predict_with_size(self, batch: dict) -> dict[str, torch.Tensor]:
        with self.category_scope(batch):
            out = self.predict_batch(batch["image"])
        amap = out["anomaly_map"]
        if amap.shape[-2:] != batch["image"].shape[-2:]:  # maps are evaluated at input size
            amap = F.interpolate(amap, size=batch["image"].shape[-2:], mode="bilinear", align_corners=False)
        return {"anomaly_map": amap, "pred_score": out["pred_score"], "anomaly_map_native": out["anomaly_map"]}

    def on_fit_start(self) -> None:
        """The fit's preprocessing (the datamodule's, overrides included) becomes the model's."""
        _quiet_fit_without_optimizer(self._trainer)  # None outside a fit (unit tests)
        served = getattr(getattr(self._trainer, "datamodule", None), "input_preprocess", None)
        if served is None:  # no trainer (a hook called directly) or plain loaders: the method's own
            return
        if self.fitted_preprocess is not None and not same_geometry(self.fitted_preprocess, served):
            self.print(f"warning: resuming a model fitted with {describe_preprocess(self.fitted_preprocess)} "
                       f"on {describe_preprocess(served)}; the model now records the latter")
        self.fitted_preprocess = served

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # the resolved method config (plain types) lets test.py rebuild the module safely
        checkpoint[CONFIG_KEY] = getattr(self, "method_config", None)
        checkpoint[CALIBRATION_KEY] = self.calibration_info
        checkpoint[PREPROCESS_KEY] = preprocess_to_dict(self.input_preprocess)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self._trainer is not None:  # resuming a fit (not iad_lightning.load)
            close_finished_epoch(checkpoint, self._trainer.max_steps)
        self.calibration_info = checkpoint.get(CALIBRATION_KEY)
        stored = checkpoint.get(PREPROCESS_KEY)  # None: written before models carried it (checkpoint.py)
        self.fitted_preprocess = None if stored is None else preprocess_from_dict(stored)

    def on_test_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        ends = dm.category_ends("test") if hasattr(dm, "category_ends") else {}
        self._test_buffer = CategoryBuffer(ends)  # without ends: every category at epoch end
        self._test_reduced = {}
        self.results = None
        self.image_scores = []
        self.curves = {}

    def test_step(self, batch: dict, batch_idx: int) -> dict[str, torch.Tensor]:
        out = self._predict_with_size(batch)
        maps, masks = self.evaluation_targets(out, batch)
        self._test_buffer.add(
            {
                "index": batch["index"].cpu().numpy(),
                "pred_score": out["pred_score"].detach().float().cpu().numpy(),
                "label": torch.as_tensor(batch["label"]).cpu().numpy(),
                "anomaly_map": maps.detach().float().cpu().numpy(),
                "mask": masks.cpu().numpy(),
                "category": np.asarray(batch["category"]),
                "path": np.asarray([str(p) for p in batch.get("path", batch["index"].tolist())]),
                # fraction of mask pixels inside the crop (data/crop_check.py); 1 for other loaders
                "mask_kept": np.asarray(batch.get("mask_kept", np.ones(len(batch["index"]))), dtype=np.float64),
            }
        )
        for cat in self._test_buffer.ready():  # categories complete on this rank (collective)
            self._release_category(cat)
        return out

    def _release_category(self, cat: str) -> None:
        pred = self._test_buffer.release(cat)
        if pred is not None:
            self._test_reduced[cat] = self._reduce_category(cat, pred)

    def _reduce_category(self, cat: str, pred: dict[str, np.ndarray]) -> dict[str, Any]:
        """What the test path keeps of one complete category: the one place where all of its
        predictions are in memory (extend it for more per-category results). ``pred``: ``index``
        (sorted, unique), ``pred_score``, ``label``, ``anomaly_map`` (N,H,W) float32, ``mask``
        (N,H,W) bool, ``category``, ``mask_kept``; the same on every rank. Returns ``metrics``
        (pixel metrics None for a category without masks), ``crop_check`` and ``calibrated``; the
        category's curve points go to ``self.curves``."""
        has_masks = bool(pred["mask"].any())
        maps, masks = (pred["anomaly_map"], pred["mask"]) if has_masks else (None, None)
        curves: dict[str, Any] = {}
        result = {
            "metrics": compute_metrics(pred["pred_score"], pred["label"], maps, masks, curves=curves),
            "crop_check": crop_check(pred["category"], pred["label"], pred["mask_kept"])[cat],
            "calibrated": calibrated_category(pred["pred_score"], pred["label"], maps, masks, self, cat),
        }
        # the exact curve points behind the metrics, thinned for the plots (callbacks/plots.py), so
        # that memory stays per category: a pixel ROC has up to one point per pixel
        self.curves[cat] = thin_curves(curves, CURVE_POINTS)
        result["image_scores"] = [{"path": str(p), "category": cat, "label": int(y), "score": float(s)}
                                  for p, y, s in zip(pred["path"], pred["label"], pred["pred_score"])]
        self.curves[cat]["test_scores"] = (pred["pred_score"].copy(), pred["label"].copy())  # calibration plot
        return result

    def on_test_epoch_end(self) -> None:
        for cat in self._test_buffer.rest():  # the last category, and any the datamodule did not name
            self._release_category(cat)
        order = category_order(list(self._test_reduced), getattr(self.trainer, "datamodule", None))
        reduced = {cat: self._test_reduced[cat] for cat in order}
        self._test_buffer, self._test_reduced = CategoryBuffer(), {}
        per_cat = {cat: r["metrics"] for cat, r in reduced.items()}
        self.image_scores = [row for r in reduced.values() for row in r["image_scores"]]
        self.results = {
            "categories": per_cat,
            "mean": mean_over_categories(per_cat),
            "crop_check": {cat: r["crop_check"] for cat, r in reduced.items()},
            "calibrated": calibrated_results({cat: r["calibrated"] for cat, r in reduced.items()}, self),
        }
        if self.trainer.is_global_zero:
            warn_if_cropped(self.results["crop_check"])
        for cat, values in self.results["categories"].items():
            for key, value in values.items():
                if value is not None:
                    self.log(f"test/{cat}/{key}", value, rank_zero_only=True, sync_dist=False)
        for key, value in self.results["mean"].items():
            if value is not None:
                self.log(f"test/mean/{key}", value, rank_zero_only=True, sync_dist=False)
        for key, value in self.results["calibrated"]["mean"].items():
            if value is not None:
                self.log(f"test/calibrated/{key}", value, rank_zero_only=True, sync_dist=False)


def _quiet_fit_without_optimizer(trainer: L.Trainer) -> None:
    """configure_optimizers returned None (Lightning then fits with a mock optimiser): such a fit logs
    nothing per step, so Lightning's "training batches smaller than the logging interval" advice
    does not apply to it."""
    optimizers = getattr(trainer, "optimizers", None) or []
    if optimizers and all(type(opt).__name__ == "_MockOptimizer" for opt in optimizers):
        warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than the "
                                r"logging interval")


def split_effective_batch(datamodule: Any, effective: int, world_size: int) -> None:
    """Per-device batch = ``effective`` / world size unless ``data.batch_size`` is set (methods
    whose recipe fixes the batch over all devices: UniAD, Dinomaly)."""
    if datamodule.batch_size is None:
        if effective % world_size:
            raise ConfigError(
                f"method.effective_batch_size={effective} is not divisible by the {world_size} devices; "
                "change it or set data.batch_size (per device)"
            )
        datamodule.batch_size = effective // world_size


def _fill_missing_thresholds(module, state_dict, prefix, *args) -> None:
    """Checkpoints written before calibration existed load as 'not calibrated' (NaN)."""
    for name in THRESHOLD_BUFFERS:
        state_dict.setdefault(prefix + name, torch.tensor(float("nan")))
