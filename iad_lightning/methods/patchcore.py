"""PatchCore (Roth et al., CVPR 2022) as a LightningModule: fit-time memory bank logic only.

The network maths (embedding, scoring, maps) live in ``models/patchcore.py``; the coreset in
``models/coreset.py``. Fitting is one pass over the train split with bounded memory: every
batch's patch embeddings are projected at once with the coreset's random projection (the same
seeded matrix as ``approximate_greedy_coreset``, so the same selection) and only these
``projection_dim``-d rows stay in memory; the full-dimension rows go to a temporary file on disk
(float32, exact). At the end the projections are gathered from all ranks and put in dataset
order, the greedy coreset runs on them, and only the selected full rows are read back (and
gathered from the rank that holds them). What grows with N is the N x 128 projection, not the
N x D bank (4,000 images at 224, 3.1 M patches: 1.6 GB against 12.8 GB at 1024 dims); at the
peak it exists about three times (the per-batch list, the coreset's layout and the deferred
loop's row-major copy; ``bench/patchcore_scale.py``). The bank equals a single-process,
full-bank run's.
"""

from __future__ import annotations

import tempfile
from typing import Any

import numpy as np
import torch

from iad_lightning.data.transforms import Preprocess
from iad_lightning.distributed import gather_objects, gather_rows, is_distributed
from iad_lightning.errors import ConfigError
from iad_lightning.methods.base import AnomalyModule
from iad_lightning.models.backbones import FeatureExtractor
from iad_lightning.models.coreset import (
    _ROW_ALIGN,
    _round_up,
    approximate_greedy_coreset,
    coreset_projection,
    greedy_coreset_from_projection,
)
from iad_lightning.models.nn_search import NearestNeighbourSearch
from iad_lightning.models.patchcore import PatchCoreInference, PatchCoreModel, resolve_embed_dimensions


class PatchCore(AnomalyModule):
    """Memory-bank anomaly detection; paper defaults in ``conf/method/patchcore.yaml``."""

    def __init__(
        self,
        backbone: dict[str, Any],
        resize: int = 256,
        crop: int | None = 224,
        coreset_ratio: float = 0.1,
        projection_dim: int = 128,
        num_starts: int = 10,
        pretrain_embed_dimension: int | list[int] | str = "auto",
        target_embed_dimension: int | str = "auto",
        patch_size: int = 3,
        num_neighbors: int = 1,
        paper_reweighting: bool = False,
        reweight_neighbors: int = 9,
        blur_sigma: float = 4.0,
        search: dict[str, Any] | None = None,
        coreset_device: str = "auto",
        seed: int = 0,
        resize_backend: str = "pil",
        projector: str | None = None,
        projector_shots: int = 8,
        projector_levels: list[int] = (1, 2, 3),
    ) -> None:
        super().__init__()
        if not 0.0 < coreset_ratio <= 1.0:
            raise ConfigError(f"method.coreset_ratio={coreset_ratio} must be in (0, 1]")
        self.save_hyperparameters()
        self.feature_extractor = self._feature_source(backbone, projector, projector_levels)
        try:  # "auto": the paper's 1024/1024 unless a layer would be stretched (see the function)
            pretrain_dims, target_dim = resolve_embed_dimensions(
                pretrain_embed_dimension, target_embed_dimension, self.feature_extractor.channels, patch_size)
        except ValueError as err:
            raise ConfigError(f"method.{err}") from None
        self.model = PatchCoreModel(
            pretrain_embed_dimension=pretrain_dims,
            target_embed_dimension=target_dim,
            patch_size=patch_size,
            num_neighbors=num_neighbors,
            paper_reweighting=paper_reweighting,
            reweight_neighbors=reweight_neighbors,
            blur_sigma=blur_sigma,
            nn_search=NearestNeighbourSearch(**(search or {})),
        )
        self.automatic_optimization = False
        self._fit: _StreamingBank | None = None

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
        resize = self.hparams.resize
        if self.hparams.crop is None:  # method.crop: null: the whole image, resized to a square (r, r)
            resize = (resize, resize) if isinstance(resize, int) else tuple(resize)
        return Preprocess(resize=resize, crop=self.hparams.crop, mean=fe.mean, std=fe.std,
                          resize_backend=self.hparams.resize_backend)

    def configure_optimizers(self) -> None:
        return None  # nothing is trained

    def on_train_epoch_start(self) -> None:
        self._fit = None

    def training_step(self, batch: dict, batch_idx: int) -> None:
        embedding, _ = self.model.embed(self.feature_extractor(batch["image"]))
        if self._fit is None:
            self._fit = _StreamingBank(embedding.shape[-1], self.hparams.projection_dim, self.hparams.seed,
                                       self._coreset_device())
        self._fit.add(embedding, batch["index"])

    def _coreset_device(self) -> torch.device:
        return self.device if self.hparams.coreset_device == "auto" else torch.device(self.hparams.coreset_device)

    def on_train_epoch_end(self) -> None:
        group_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        fit, self._fit = self._fit, None
        bank, n = fit.select(self.hparams.coreset_ratio, self.hparams.num_starts, group_device)
        self.model.fit(bank.to(self.device))
        self.print(f"PatchCore: {n} train patches -> memory bank {bank.shape[0]}")
        self.trainer.should_stop = True  # one pass over the data is the whole fit

    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.feature_extractor(images)
        anomaly_map, score = self.model.predict(feats, images.shape[-2:])
        return {"anomaly_map": anomaly_map, "pred_score": score}

    def export_module(self) -> torch.nn.Module:
        """Backbone, embedding, the bank as a constant and the exact k-NN as matmul + topk."""
        if self.model.memory_bank.shape[0] == 0:
            raise ConfigError("PatchCore has an empty memory bank: export a checkpoint of a finished fit")
        return PatchCoreInference(self.feature_extractor, self.model)


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


class _StreamingBank:
    """Fit-time store of the training patches with bounded memory (see the module docstring).

    Per batch: the ``projection_dim``-d projection psi(x) = W x with W =
    ``coreset_projection(D, projection_dim, seed)`` (the matrix ``approximate_greedy_coreset``
    draws), computed on the coreset device, kept on the CPU; the full float32 rows appended to an
    anonymous temporary file. ``select`` returns the coreset's full rows in selection order, equal
    to ``bank[approximate_greedy_coreset(bank, ...)]`` of the dataset-ordered full bank (a test).
    """

    def __init__(self, dim: int, projection_dim: int | None, seed: int, device: torch.device) -> None:
        self.dim, self.device = dim, device
        self.generator, self.weight = coreset_projection(dim, projection_dim, seed, device)
        self.projected: list[torch.Tensor] = []  # (B, P, d') per batch, CPU float32
        self.indices: list[torch.Tensor] = []
        self.spill = tempfile.TemporaryFile(prefix="patchcore_bank_")  # full rows, float32, in arrival order
        self.rows = 0
        self.patches = 0

    def add(self, embedding: torch.Tensor, index: torch.Tensor) -> None:
        b, p, d = embedding.shape
        self.patches = p
        flat = embedding.reshape(b * p, d)
        proj = flat.to(self.device, torch.float32)
        if self.weight is not None:
            proj = proj @ self.weight.t()  # psi(x), row by row the same bits as the full-bank projection
        self.projected.append(proj.to("cpu", torch.float32).view(b, p, -1))
        self.spill.write(np.ascontiguousarray(flat.detach().to("cpu", torch.float32).numpy()).tobytes())
        self.rows += b * p
        self.indices.append(index.cpu())

    def select(self, ratio: float, num_starts: int, group_device: torch.device) -> tuple[torch.Tensor, int]:
        """(coreset rows (M, D) float32 CPU in selection order, number of train patches N)."""
        p, device = self.patches, self.device
        local_idx = torch.cat(self.indices)
        idx = gather_rows(local_idx[:, None], group_device)[:, 0]  # images in gathered (rank) order
        if is_distributed():
            local = torch.cat(self.projected)
            self.projected.clear()
            chunks = [gather_rows(local, group_device)]
            del local
        else:
            chunks = self.projected  # consumed below, so the peak stays near one copy
        unique, first = _first_occurrence(idx)  # dataset order; first gathered position of each image
        slot = torch.full((int(idx.max()) + 1,), -1, dtype=torch.long)
        slot[unique] = torch.arange(unique.numel())
        n = unique.numel() * p
        dproj = chunks[0].shape[-1]
        # the coreset's layout: (d', N_pad) with zero padding columns, |psi(x)|^2 row by row as in _project
        projected_t = torch.zeros(dproj, _round_up(n, _ROW_ALIGN), dtype=torch.float32, device=device)
        sq_norms = torch.zeros(projected_t.shape[1], dtype=torch.float32, device=device)
        start = 0
        while chunks:
            chunk = chunks.pop(0)
            pos = torch.arange(start, start + chunk.shape[0])
            take = first[slot[idx[pos]]] == pos  # drop the duplicates a distributed sampler pads with
            cols = (slot[idx[pos[take]]][:, None] * p + torch.arange(p)).reshape(-1).to(device)
            rows = chunk[take].reshape(-1, dproj).to(device)
            projected_t[:, cols] = rows.t()
            sq_norms[cols] = (rows * rows).sum(1)
            start += chunk.shape[0]
            del chunk, rows
        keep = greedy_coreset_from_projection(projected_t, sq_norms, n, ratio, self.generator, num_starts).cpu()
        del projected_t, sq_norms
        # dataset row -> (gathered image position, patch); full rows come from the rank that wrote them
        image_pos, patch = first[keep // p], keep % p
        sizes = [int(v) for v in gather_objects(local_idx.numel())]
        rank = torch.distributed.get_rank() if is_distributed() else 0
        offset = sum(sizes[:rank])
        mine = (image_pos >= offset) & (image_pos < offset + sizes[rank])
        self.spill.flush()
        rows = torch.empty(0, self.dim, dtype=torch.float32)
        if self.rows:
            table = np.memmap(self.spill, dtype=np.float32, mode="r", shape=(self.rows, self.dim))
            local_rows = ((image_pos[mine] - offset) * p + patch[mine]).numpy()
            rows = torch.from_numpy(np.array(table[local_rows]))  # reads only the selected rows
            del table
        self.spill.close()
        if not is_distributed():
            return rows, n
        positions = gather_rows(torch.nonzero(mine)[:, 0][:, None], group_device)[:, 0]
        rows = gather_rows(rows, group_device)
        bank = torch.empty(keep.numel(), self.dim, dtype=torch.float32)
        bank[positions] = rows
        return bank, n
