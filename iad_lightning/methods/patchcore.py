"""PatchCore (Roth et al., CVPR 2022) as a LightningModule: fit-time memory bank logic only.

The network maths (embedding, scoring, maps) live in ``models/patchcore.py``; the coreset in
``models/coreset.py``. Fitting is one pass over the train split: every rank embeds its shard,
features stay on the CPU, the bank is gathered from all ranks and put in dataset order, then
the approximate greedy coreset runs on the fastest available device. Because the order and the
seed are fixed, the bank equals a single-process run's.
"""

from __future__ import annotations

from typing import Any

import torch

from iad_lightning.data.transforms import Preprocess
from iad_lightning.distributed import gather_rows
from iad_lightning.errors import ConfigError
from iad_lightning.methods.base import AnomalyModule
from iad_lightning.models.backbones import FeatureExtractor
from iad_lightning.models.coreset import approximate_greedy_coreset
from iad_lightning.models.nn_search import NearestNeighbourSearch
from iad_lightning.models.patchcore import PatchCoreModel


class PatchCore(AnomalyModule):
    """Memory-bank anomaly detection; paper defaults in ``conf/method/patchcore.yaml``."""

    def __init__(
        self,
        backbone: dict[str, Any],
        resize: int = 256,
        crop: int = 224,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_starts: int = 10,
        pretrain_embed_dimension: int = 1024,
        target_embed_dimension: int = 1024,
        patch_size: int = 3,
        num_neighbors: int = 1,
        paper_reweighting: bool = False,
        reweight_neighbors: int = 9,
        blur_sigma: float = 4.0,
        search: dict[str, Any] | None = None,
        coreset_device: str = "auto",
        seed: int = 0,
        projector: str | None = None,
        projector_shots: int = 8,
        projector_levels: list[int] = (1, 2, 3),
    ) -> None:
        super().__init__()
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"method.coreset_ratio={coreset_ratio} must be in (0, 1]")
        self.save_hyperparameters()
        self.feature_extractor = self._feature_source(backbone, projector, projector_levels)
        self.model = PatchCoreModel(
            pretrain_embed_dimension=pretrain_embed_dimension,
            target_embed_dimension=target_embed_dimension,
            patch_size=patch_size,
            num_neighbors=num_neighbors,
            paper_reweighting=paper_reweighting,
            reweight_neighbors=reweight_neighbors,
            blur_sigma=blur_sigma,
            nn_search=NearestNeighbourSearch(**(search or {})),
        )
        self.automatic_optimization = False
        self._features: list[torch.Tensor] = []
        self._indices: list[torch.Tensor] = []

    def _feature_source(self, backbone: dict[str, Any], projector: str | None, levels: list[int]) -> torch.nn.Module:
        """The backbone maps PatchCore embeds; with ``projector`` (ADPretrain, spec section 7) the
        projected residuals of the last 3 levels against a k-shot train good bank instead."""
        if projector is None:
            return FeatureExtractor(**backbone)
        from iad_lightning.methods._projector import build_extractor

        extractor, self._bank_image_size = build_extractor(backbone, projector, levels)
        return extractor

    def on_train_start(self) -> None:
        if self.hparams.projector is not None:  # the reference bank of the residuals
            from iad_lightning.methods._projector import set_kshot_bank

            set_kshot_bank(self.feature_extractor, self.trainer.datamodule.index_records()["train"],
                           self.hparams.projector_shots, self.hparams.seed, self._bank_image_size, self.device)

    @property
    def preprocess(self) -> Preprocess:
        fe = self.feature_extractor
        return Preprocess(resize=self.hparams.resize, crop=self.hparams.crop, mean=fe.mean, std=fe.std)

    def configure_optimizers(self) -> None:
        return None  # nothing is trained

    def on_train_epoch_start(self) -> None:
        self._features, self._indices = [], []

    def training_step(self, batch: dict, batch_idx: int) -> None:
        embedding, _ = self.model.embed(self.feature_extractor(batch["image"]))
        self._features.append(embedding.to("cpu", torch.float32))  # (B, H*W, D) kept off the GPU
        self._indices.append(batch["index"].cpu())

    def on_train_epoch_end(self) -> None:
        group_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        bank = _bank_in_dataset_order(self._features, self._indices, group_device)
        self._features, self._indices = [], []
        device = self.device if self.hparams.coreset_device == "auto" else torch.device(self.hparams.coreset_device)
        keep = approximate_greedy_coreset(
            bank,
            self.hparams.coreset_ratio,
            projection_dim=self.hparams.projection_dim,
            num_starts=self.hparams.num_starts,
            seed=self.hparams.seed,
            device=device,
        )
        self.model.fit(bank[keep.cpu()].to(self.device))
        self.print(f"PatchCore: {bank.shape[0]} train patches -> memory bank {keep.numel()}")
        self.trainer.should_stop = True  # one pass over the data is the whole fit

    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.feature_extractor(images)
        anomaly_map, score = self.model.predict(feats, images.shape[-2:])
        return {"anomaly_map": anomaly_map, "pred_score": score}


def _bank_in_dataset_order(
    features: list[torch.Tensor], indices: list[torch.Tensor], group_device: torch.device
) -> torch.Tensor:
    """All ranks' patch features as one (N_images * H * W, D) CPU tensor in dataset order.

    Duplicates that a distributed sampler pads with are dropped. The per-batch tensors are
    consumed while they are copied, so the peak stays near one copy of the bank.
    """
    idx = gather_rows(torch.cat(indices)[:, None], group_device)[:, 0]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        local = torch.cat(features)
        features.clear()
        features.append(gather_rows(local, group_device))
        del local
    unique, first = _first_occurrence(idx)
    slot = torch.full((int(idx.max()) + 1,), -1, dtype=torch.long)
    slot[unique] = torch.arange(unique.numel())
    shape = features[0].shape[1:]
    bank = torch.empty((unique.numel(), *shape), dtype=torch.float32)
    start = 0
    while features:
        chunk = features.pop(0)
        rows = torch.arange(start, start + chunk.shape[0])
        take = first[slot[idx[rows]]] == rows  # first occurrence of each image only
        bank[slot[idx[rows[take]]]] = chunk[take]
        start += chunk.shape[0]
        del chunk
    return bank.reshape(-1, shape[-1])


def _first_occurrence(indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted unique values and the position of each one's first occurrence."""
    unique, inverse = torch.unique(indices, sorted=True, return_inverse=True)
    positions = torch.arange(indices.numel())
    first = torch.full((unique.numel(),), indices.numel(), dtype=torch.long)
    first.scatter_reduce_(0, inverse, positions, reduce="amin")
    return unique, first
