"""UniAD (You et al., NeurIPS 2022) as a LightningModule: one model for all categories.

The maths live in ``models/uniad.py``; here: the frozen backbone, the train feature cache, the
loss, AdamW + the official step schedule (``official_step_factor``), and the effective batch split over devices. Spec: ``specs/uniad.md``.

Feature cache (``cache_features``, default on). The backbone is frozen and UniAD trains without
augmentation, so an image's aligned features (C x 14 x 14, 213 KB in fp32 for C = 272) are the
same every epoch. They are stored on first use keyed by the train dataset's ``batch["index"]``
and later epochs skip the backbone. Under DDP every rank keeps its own cache; the distributed
sampler deals other images to a rank each epoch, so a rank ends up holding up to the whole train
set. ``cache_device``: ``auto`` (the model's device) or ``cpu``. The loader still decodes images
each epoch (the datamodule owns it); only the backbone pass is saved.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from iad_lightning.data.transforms import Preprocess
from iad_lightning.errors import ConfigError
from iad_lightning.methods.base import AnomalyModule, split_effective_batch
from iad_lightning.models.backbones import FeatureExtractor
from iad_lightning.models.uniad import (
    UniADInference,
    UniADModel,
    align_features,
    anomaly_map,
    image_score,
    load_official_checkpoint,
)


class UniAD(AnomalyModule):
    """Unified feature reconstruction; paper defaults in ``conf/method/uniad.yaml``."""

    def __init__(
        self,
        backbone: dict[str, Any],
        image_size: int = 224,
        hidden_dim: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 4,
        num_decoder_layers: int = 4,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        neighbor_size: list[int] | None = (7, 7),
        neighbor_mask: list[bool] = (True, True, True),
        jitter_scale: float = 20.0,
        jitter_prob: float = 1.0,
        lr: float = 1e-4,
        weight_decay: float = 1e-4,
        betas: list[float] = (0.9, 0.999),
        lr_step_epochs: int = 800,
        lr_gamma: float = 0.1,
        effective_batch_size: int = 64,
        score_kernel: int = 16,
        cache_features: bool = True,
        cache_device: str = "auto",
        official_checkpoint: str | None = None,
        resize_backend: str = "pil",
        projector: str | None = None,
        projector_shots: int = 8,
        reference_set: str | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if projector is None:
            self.feature_extractor = FeatureExtractor(**backbone)
        else:  # ADPretrain (spec section 7): the 4 projected residual levels, concatenated (4C channels)
            from iad_lightning.methods._projector import build_extractor

            self.feature_extractor, self._bank_image_size = build_extractor(backbone, projector, (0, 1, 2, 3))
        stride = max(self.feature_extractor.reductions)
        if image_size % stride:
            raise ConfigError(f"method.image_size={image_size} must be a multiple of the backbone's stride {stride}")
        self.feature_size = (image_size // stride, image_size // stride)  # 14 x 14 at 224
        if cache_device not in ("auto", "cpu"):
            raise ConfigError(f"method.cache_device='{cache_device}' must be 'auto' or 'cpu'")
        try:
            self.model = UniADModel(
                in_channels=sum(self.feature_extractor.channels),  # 272 for B4 [0,1,2,3]; 192 for Lite0
                feature_size=self.feature_size,
                hidden_dim=hidden_dim,
                nhead=nhead,
                num_encoder_layers=num_encoder_layers,
                num_decoder_layers=num_decoder_layers,
                dim_feedforward=dim_feedforward,
                dropout=dropout,
                activation=activation,
                neighbor_size=neighbor_size,
                neighbor_mask_in=neighbor_mask,
                jitter_scale=jitter_scale,
                jitter_prob=jitter_prob,
            )
        except ValueError as err:
            raise ConfigError(f"method (uniad): {err}") from err
        self._cache: dict[int, torch.Tensor] = {}  # train index -> aligned features; never saved
        self.cache_hits = self.cache_misses = 0

    @property
    def preprocess(self) -> Preprocess:
        fe = self.feature_extractor
        size = self.hparams.image_size
        return Preprocess(resize=(size, size), crop=None, mean=fe.mean, std=fe.std,  # no aspect kept, no crop
                          resize_backend=self.hparams.resize_backend)

    def configure_data(self, datamodule: Any, world_size: int) -> None:
        """Per-device batch = effective batch / world size unless ``data.batch_size`` is set."""
        split_effective_batch(datamodule, self.hparams.effective_batch_size, world_size)

    # -- fit -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.hparams.official_checkpoint:
            # in setup, not __init__: test.py rebuilding from our own checkpoint never needs the file
            ignored = load_official_checkpoint(self.model, self.hparams.official_checkpoint)
            self.print(f"UniAD: transformer weights from {self.hparams.official_checkpoint} "
                       f"({len(ignored)} official backbone tensors ignored: the backbone is timm's)")

    def on_fit_start(self) -> None:
        super().on_fit_start()  # records the fit's preprocessing
        if self.hparams.projector is not None:  # the k-shot reference bank, before any feature is cached
            from iad_lightning.methods._projector import set_reference_bank

            set_reference_bank(self.feature_extractor, self.trainer.datamodule.index_records()["train"],
                               self.hparams.projector_shots, 0, self._bank_image_size, self.device, self.preprocess,
                               self.hparams.reference_set)
        self._cache.clear()
        self.cache_hits = self.cache_misses = 0

    def aligned_features(self, images: torch.Tensor) -> torch.Tensor:
        """feature_align (B, C, 14, 14): the backbone maps resized and concatenated (MFCN)."""
        return align_features(self.feature_extractor(images), self.feature_size)

    def _train_features(self, batch: dict) -> torch.Tensor:
        if not self.hparams.cache_features:
            with self.category_scope(batch):  # ADPretrain: each image against its class's bank
                return self.aligned_features(batch["image"])
        keys = [int(i) for i in batch["index"]]
        missing = [j for j, k in enumerate(keys) if k not in self._cache]
        if missing:
            cats = batch.get("category")
            with self.category_scope({"category": None if cats is None else [cats[j] for j in missing]}):
                fresh = self.aligned_features(batch["image"][missing])
            store = torch.device("cpu") if self.hparams.cache_device == "cpu" else fresh.device
            for j, feat in zip(missing, fresh.to(store)):
                self._cache[keys[j]] = feat.clone()  # fp32: the features a fresh pass would give
        self.cache_hits += len(keys) - len(missing)
        self.cache_misses += len(missing)
        return torch.stack([self._cache[k] for k in keys]).to(self.device, non_blocking=True)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        feature_align = self._train_features(batch)
        feature_rec = self.model(feature_align)  # jitter inside, training mode only; target clean
        loss = F.mse_loss(feature_rec, feature_align)
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True,
                 batch_size=feature_align.shape[0])
        return loss

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        opt = torch.optim.AdamW(self.model.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        factor = partial(official_step_factor, step_size=hp.lr_step_epochs, gamma=hp.lr_gamma)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "frequency": 1}}

    # -- predict ---------------------------------------------------------------------------------
    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feature_align = self.aligned_features(images)
        feature_rec = self.model(feature_align)
        amap = anomaly_map(feature_rec, feature_align, images.shape[-2:])
        # score: max of the 16x16 stride-1 mean-pooled map; no 1-AUC flip anywhere (spec §8)
        return {"anomaly_map": amap, "pred_score": image_score(amap, self.hparams.score_kernel)}

    def export_module(self) -> torch.nn.Module:
        return UniADInference(self.feature_extractor, self.model, self.hparams.score_kernel)


def official_step_factor(epoch: int, step_size: int, gamma: float) -> float:
    """LR factor of (0-based) epoch ``epoch`` as in tools/train_val.py, which calls
    ``lr_scheduler.step(epoch)`` after training epoch ``epoch``: StepLR's closed form with
    last_epoch = epoch - 1 is in force during epoch ``epoch``. So epoch 800 still trains at the base
    LR and 801 is the first at x0.1, one epoch later than a StepLR stepped plainly after each epoch."""
    return gamma ** (max(epoch - 1, 0) // step_size)
