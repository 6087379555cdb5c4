"""FeatureNorm (ADPretrain, spec section 7): the norm of the projected residual is the anomaly score.

    python train.py method=featurenorm method.projector=runs/.../projector.pt data=mvtec data.root=...

Per patch sqrt(||e|| + 1) - 1 over the 4 levels, upsampled (bilinear, align_corners=True), averaged,
Gaussian sigma 4; image score = max. Nothing is trained: fitting only encodes the k-shot reference
bank (``shots`` seeded train good images per category). Without ``projector`` the raw backbone
levels are scored (the paper's "w/o pretrain" row, about chance level).

Deviation: the authors' ``val_norm.py`` gives every test image its own bank of the 10 nearest
normal train images (precomputed ``aligned/references`` JSON); we use the fixed k-shot bank, the
one their PatchCore / PaDiM / UniAD evaluations use.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from iad_lightning.calibration import pixel_sample
from iad_lightning.data.transforms import Preprocess
from iad_lightning.methods._projector import build_extractor, set_reference_bank
from iad_lightning.methods.base import AnomalyModule
from iad_lightning.models.adpretrain import FeatureNormInference, ResidualProjectorExtractor, feature_norm


class FeatureNorm(AnomalyModule):
    """Projected-residual norm as the score; defaults in ``conf/method/featurenorm.yaml``."""

    supports_crossfit = True  # scores the train images outside its k-shot bank (calibration.py)

    def __init__(self, backbone: dict[str, Any], projector: str | None = None, shots: int = 8, image_size: int = 224,
                 blur_sigma: float = 4.0, seed: int = 0, reference_set: str | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.feature_extractor, self.bank_size = build_extractor(backbone, projector, (0, 1, 2, 3))
        self.automatic_optimization = False

    @property
    def preprocess(self) -> Preprocess:
        s, fe = self.hparams.image_size, self.feature_extractor
        return Preprocess(resize=s, crop=s, mean=fe.mean, std=fe.std)

    def configure_optimizers(self) -> None:
        return None

    def on_train_start(self) -> None:
        bank = set_reference_bank(self.feature_extractor, self.trainer.datamodule.index_records()["train"],
                                  self.hparams.shots, self.hparams.seed, self.bank_size, self.device, self.preprocess,
                                  self.hparams.reference_set)
        self.exclude_from_calibration(bank)
        source = self.hparams.reference_set or "train good images"
        self.print(f"FeatureNorm: reference banks from {len(bank)} images ({source})")
        self._scored = []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        if self.crossfit is None:
            self.trainer.should_stop = True  # nothing to learn: the bank is the whole fit
            return
        # calibration: the final model never saw the train images outside its k-shot bank, so its
        # own scores of them are out-of-sample (split conformal; no folds needed)
        with torch.no_grad():
            out = self._predict_with_size(batch)
        self._scored.append((batch["index"].cpu(), pixel_sample(out["anomaly_map"].cpu()), out["pred_score"].cpu()))

    def on_train_epoch_end(self) -> None:
        if self.crossfit is not None:
            self.out_of_sample = self.crossfit.score_only(self._scored)
        self._scored = []
        self.trainer.should_stop = True

    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        amap, score = feature_norm(self.feature_extractor(images), images.shape[-2:], self.hparams.blur_sigma)
        return {"anomaly_map": amap, "pred_score": score}

    def export_module(self) -> torch.nn.Module:
        return FeatureNormInference(self.feature_extractor, self.hparams.blur_sigma)


@torch.no_grad()
def evaluate_featurenorm(backbone, projector, datamodule, shots: int, seed: int, device) -> dict[str, Any]:
    """Mean test metrics of FeatureNorm over the datamodule's categories, one k-shot bank each
    (used by ADPretrain's optional test-set model selection)."""
    from iad_lightning.metrics import compute_metrics
    from iad_lightning.results import mean_over_categories

    splits = datamodule.index_records()
    extractor = ResidualProjectorExtractor(backbone, projector, (0, 1, 2, 3)).to(device)
    per_cat = {}
    for cat in datamodule.categories:
        set_reference_bank(extractor, [r for r in splits["train"] if r.category == cat], shots, seed,
                           datamodule.preprocess.crop, device, datamodule.preprocess)
        scores, labels, maps, masks = [], [], [], []
        data = datamodule.dataset("test")
        for i, rec in enumerate(data.records):
            if rec.category != cat:
                continue
            item = data[i]
            amap, score = feature_norm(extractor(item["image"][None].to(device)), item["image"].shape[-2:])
            scores.append(float(score)), labels.append(rec.label)
            maps.append(amap[0, 0].cpu().numpy()), masks.append(item["mask"][0].numpy() > 0.5)
        per_cat[cat] = compute_metrics(np.array(scores), np.array(labels), np.stack(maps), np.stack(masks))
    return mean_over_categories(per_cat)
