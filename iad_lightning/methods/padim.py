"""PaDiM (Defard et al., ICPR 2020) as a LightningModule; maths in ``models/padim.py``.

    python train.py method=padim data=mvtec data.root=/datasets/mvtec data.category=screw
    python train.py method=padim method.projector=runs/.../projector.pt backbone=lite0 ...   (ADPretrain)

Fitting is one pass over the train good images: features are kept on the CPU, then one Gaussian
per patch position is fitted. With ``projector`` the features are ADPretrain's projected residuals
of all 4 levels at full width (no channel subset), one Gaussian set per level (spec section 7).
"""

from __future__ import annotations

import warnings
from typing import Any, Iterator

import torch

from iad_lightning.data.transforms import Preprocess
from iad_lightning.methods.base import AnomalyModule
from iad_lightning.models.backbones import FeatureExtractor
from iad_lightning.models.padim import PaDiMFeatures, PaDiMInference, PaDiMModel, random_channel_subset


class PaDiM(AnomalyModule):
    """Per-position Gaussians; paper defaults in ``conf/method/padim.yaml``."""

    supports_crossfit = True  # fold Gaussians from the stored features (calibration.py)

    def __init__(self, backbone: dict[str, Any], n_features: int = 550, resize: int = 256, crop: int = 224,
                 eps: float = 0.01, blur_sigma: float = 4.0, subset_seed: int = 1024, projector: str | None = None,
                 projector_shots: int = 8, reference_set: str | None = None, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        if projector is None:
            extractor = FeatureExtractor(**backbone)
            total = sum(extractor.channels)
            d = n_features
            if d > total:
                warnings.warn(f"PaDiM: n_features={d} > the {total} channels of backbone '{backbone['name']}' "
                              f"layers {backbone.get('layers')}; all {total} are used", stacklevel=2)
                d = total
            index = random_channel_subset(total, d, subset_seed) if d < total else None
            self.features = PaDiMFeatures(extractor, index, per_level=False)
            self.model = PaDiMModel(1, eps, blur_sigma, align_corners=False)
        else:
            from iad_lightning.methods._projector import build_extractor

            extractor, self._bank_image_size = build_extractor(backbone, projector, (0, 1, 2, 3))
            self.features = PaDiMFeatures(extractor, None, per_level=True)
            self.model = PaDiMModel(4, eps, blur_sigma, align_corners=True)  # authors: align_corners=True
        self.automatic_optimization = False
        self._train: list[list[torch.Tensor]] = []

    @property
    def preprocess(self) -> Preprocess:
        fe = self.features.extractor
        return Preprocess(resize=self.hparams.resize, crop=self.hparams.crop, mean=fe.mean, std=fe.std)

    def configure_optimizers(self) -> None:
        return None

    def on_train_start(self) -> None:
        if self.hparams.projector is not None:
            from iad_lightning.methods._projector import set_reference_bank

            bank = set_reference_bank(self.features.extractor, self.trainer.datamodule.index_records()["train"],
                                      self.hparams.projector_shots, self.hparams.seed, self._bank_image_size,
                                      self.device, self.preprocess, self.hparams.reference_set)
            self.exclude_from_calibration(bank)  # in-sample whatever the fold

    def on_train_epoch_start(self) -> None:
        self._train, self._index = [], []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        with self.category_scope(batch):  # ADPretrain: each image against its class's bank
            self._train.append([f.cpu() for f in self.features(batch["image"])])
        self._index.append(batch["index"].cpu())
        self._input_size = tuple(batch["image"].shape[-2:])

    def on_train_epoch_end(self) -> None:
        groups = [torch.cat([b[g] for b in self._train]) for g in range(self.model.groups)]
        index = torch.cat(self._index)
        self._train, self._index = [], []
        if self.crossfit is not None:  # out-of-sample scores of every train image, then the final fit
            self.out_of_sample = self.crossfit.run(index, lambda train, held: self._score_fold(groups, index, train, held))
        self.model.fit(groups)
        self.model.to(self.device)
        self.print(f"PaDiM: Gaussians from {groups[0].shape[0]} train images, dims {[g.shape[1] for g in groups]}")
        self.trainer.should_stop = True

    def _score_fold(self, groups: list[torch.Tensor], index: torch.Tensor, train: torch.Tensor,
                    held: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Cross-fitting hook: Gaussians of the ``train`` images, the maps of the ``held`` ones."""
        row = torch.full((int(index.max()) + 1,), -1, dtype=torch.long)
        row[index.flip(0)] = torch.arange(index.numel() - 1, -1, -1)  # first occurrence of each image
        fold = PaDiMModel(self.model.groups, self.hparams.eps, self.hparams.blur_sigma, self.model.align_corners)
        fold.fit(groups, rows=row[train]).to(self.device)
        for start in range(0, held.numel(), 16):
            idx = held[start:start + 16]
            amap, score = fold.predict([g[row[idx]].to(self.device) for g in groups], self._input_size)
            yield idx, amap, score

    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        amap, score = self.model.predict(self.features(images), images.shape[-2:])
        return {"anomaly_map": amap, "pred_score": score}

    def export_module(self) -> torch.nn.Module:
        return PaDiMInference(self.features, self.model)
