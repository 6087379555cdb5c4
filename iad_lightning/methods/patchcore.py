"""PatchCore (Roth et al., CVPR 2022) as a LightningModule: fit-time memory bank logic only.

The network maths (embedding, scoring, maps) live in ``models/patchcore.py``; the coreset in
``models/coreset.py``. Fitting is one pass over the train split with bounded memory: every
batch's patch embeddings are projected at once with the coreset's random projection (the same
seeded matrix as ``approximate_greedy_coreset``, so the same selection) and only these
``projection_dim``-d rows stay in memory; the full-dimension rows go to a temporary file on disk
(float32, exact). At the end the ranks' projection buffers are summed into the full one (each
image's columns are nonzero on one rank only), the greedy coreset runs on it, and only the
selected full rows are read back (and gathered from the rank that holds them). What grows with N
is the N x 128 projection, not the N x D bank (4,000 images at 224, 3.1 M patches: 1.6 GB against
12.8 GB at 1024 dims), and it exists once: each batch is written straight into one buffer in the
coreset's (d', N) layout (sized from the train set), which the coreset then reads in place
(``bench/patchcore_scale.py``: 2.8 GB peak RSS at 4,000 images). The bank equals a
single-process, full-bank run's.
"""

from __future__ import annotations

import tempfile
from typing import Any, Iterator

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
    coreset_projection,
    greedy_coreset_from_projection,
)
from iad_lightning.models.nn_search import NearestNeighbourSearch
from iad_lightning.models.patchcore import PatchCoreInference, PatchCoreModel, resolve_embed_dimensions


class PatchCore(AnomalyModule):
    """Memory-bank anomaly detection; paper defaults in ``conf/method/patchcore.yaml``."""

    supports_crossfit = True  # fold coresets from the stored projections (calibration.py)

    @property
    def supports_leave_one_out(self) -> bool:  # the final bank without the image's rows (crossfit.py)
        return not self.hparams.paper_reweighting

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
        reference_set: str | None = None,
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
            from iad_lightning.methods._projector import set_reference_bank

            bank = set_reference_bank(self.feature_extractor, self.trainer.datamodule.index_records()["train"],
                                      self.hparams.projector_shots, self.hparams.seed, self._bank_image_size,
                                      self.device, self.preprocess, self.hparams.reference_set)
            self.exclude_from_calibration(bank)  # in-sample whatever the fold

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
        with self.category_scope(batch):  # ADPretrain: each image against its class's bank
            embedding, grid = self.model.embed(self.feature_extractor(batch["image"]))
        if self._fit is None:
            self._fit = _StreamingBank(embedding.shape[-1], self.hparams.projection_dim, self.hparams.seed,
                                       self._coreset_device(), num_images=self._train_set_size())
            self._fit.grid, self._fit.input_size = grid, tuple(batch["image"].shape[-2:])
        self._fit.add(embedding, batch["index"])

    def _train_set_size(self) -> int | None:
        """Images of the train loader's dataset (batch["index"] runs over it): sizes the fit's
        projection buffer once; None (the buffer grows) when the loader does not say."""
        try:
            return len(self.trainer.train_dataloader.dataset)
        except (AttributeError, TypeError, RuntimeError):
            return None

    def _coreset_device(self) -> torch.device:
        return self.device if self.hparams.coreset_device == "auto" else torch.device(self.hparams.coreset_device)

    def on_train_epoch_end(self) -> None:
        group_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        fit, self._fit, plan = self._fit, None, self.crossfit
        if plan is not None and not plan.leave_one_out:  # fold scores first; the final bank does not depend on them
            self.out_of_sample = plan.run(
                fit.prepare(group_device), lambda train, held: self._score_fold(fit, train, held, group_device),
                group_device)
        bank, n = fit.select(self.hparams.coreset_ratio, self.hparams.num_starts, group_device)
        self.model.fit(bank.to(self.device))
        if plan is not None and plan.leave_one_out:
            self.out_of_sample = plan.run_leave_one_out(fit.prepare(group_device),
                                                        lambda held: self._score_leaving_out(fit, held), group_device)
        fit.close()
        self.print(f"PatchCore: {n} train patches -> memory bank {bank.shape[0]}")
        self.trainer.should_stop = True  # one pass over the data is the whole fit

    def _score_fold(self, fit: "_StreamingBank", train: torch.Tensor, held: torch.Tensor,
                    group_device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Cross-fitting hook: the coreset of the ``train`` images' patches, then the maps and
        scores of the ``held`` images from their stored embeddings (no backbone pass)."""
        bank = fit.select_subset(train, self.hparams.coreset_ratio, self.hparams.num_starts, group_device)
        self.model.fit(bank.to(self.device))
        for index, embedding in fit.rows_of(held, batch=16):
            amap, score = self.model.score_embedding(embedding.to(self.device), fit.grid, fit.input_size)
            yield index, amap, score

    def _score_leaving_out(self, fit: "_StreamingBank", held: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        """Leave-one-image-out hook: each ``held`` image against the final bank without its own rows."""
        for index, embedding in fit.rows_of(held, batch=16):
            amap, score = self.model.score_embedding(embedding.to(self.device), fit.grid, fit.input_size,
                                                     leave_out=(index, fit.bank_images))
            yield index, amap, score

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


def _read_rows(file: Any, rows: np.ndarray, dim: int) -> torch.Tensor:
    """Rows ``rows`` of a float32 (R, dim) file, read one by one in file order: no memory map, whose
    faults can map far more of the (page-cached) file than the rows read (measured: +650 MB RSS
    for 784 rows of a 3.2 GB spill)."""
    out = np.empty((len(rows), dim), dtype=np.float32)
    row_bytes = dim * out.itemsize
    file.flush()
    for i in np.argsort(rows, kind="stable").tolist():
        file.seek(int(rows[i]) * row_bytes)
        if file.readinto(memoryview(out[i]).cast("B")) != row_bytes:
            raise OSError(f"PatchCore fit: short read of row {int(rows[i])} from the temporary bank file")
    return torch.from_numpy(out)


class _StreamingBank:
    """Fit-time store of the training patches with bounded memory (see the module docstring).

    Per batch: the ``projection_dim``-d projection psi(x) = W x with W =
    ``coreset_projection(D, projection_dim, seed)`` (the matrix ``approximate_greedy_coreset``
    draws), computed on the coreset device and written straight into ONE CPU buffer in the
    coreset's final layout, (d', N_pad) with column ``index * P + patch`` (dataset order), with its
    squared norms; the full float32 rows appended to an anonymous temporary file. ``num_images``
    (the train set's size) sizes the buffer up front; without it, or when an index exceeds it, the
    buffer grows by >= 25 % (a transient copy). Only the first occurrence of an image is kept (a
    distributed sampler pads with repeats; across ranks the lowest rank's, as a rank-order gather
    would). ``select`` returns the coreset's full rows in selection order, equal to
    ``bank[approximate_greedy_coreset(bank, ...)]`` of the dataset-ordered full bank (a test).
    """

    def __init__(self, dim: int, projection_dim: int | None, seed: int, device: torch.device,
                 num_images: int | None = None) -> None:
        self.dim, self.device = dim, device
        self.generator, self.weight = coreset_projection(dim, projection_dim, seed, device)
        self.dproj = dim if self.weight is None else self.weight.shape[0]
        self.capacity = int(num_images) if num_images else 0  # images the buffer holds
        self.projected_t: torch.Tensor | None = None  # (d', round_up(capacity * P, 64)) CPU float32
        self.sq_norms: torch.Tensor | None = None
        self.spill_image = torch.full((self.capacity,), -1, dtype=torch.long)  # image -> its slot in the file
        self.spill = tempfile.TemporaryFile(prefix="patchcore_bank_")  # full rows, float32, first arrivals
        self.spilled = 0  # images in the file
        self.patches: int | None = None
        self.grid: tuple[int, int] | None = None  # patch grid and input size: the maps of cross-fitting
        self.input_size: tuple[int, int] | None = None
        self.bank_images: torch.Tensor | None = None  # after select(): the image of each coreset row
        self._present: torch.Tensor | None = None  # after prepare(): present images, their owner rank
        self._owner: torch.Tensor | None = None
        self._rank = 0

    def _grow(self, images: int) -> None:
        """Make room for ``images`` images (zero columns); the layout stays (d', N_pad) contiguous."""
        cols = _round_up(images * self.patches, _ROW_ALIGN)
        if self.projected_t is None or self.projected_t.shape[1] < cols:
            projected_t = torch.zeros(self.dproj, cols, dtype=torch.float32)
            sq_norms = torch.zeros(cols, dtype=torch.float32)
            if self.projected_t is not None:  # only without (or past) the num_images hint
                old = self.projected_t.shape[1]
                projected_t[:, :old] = self.projected_t
                sq_norms[:old] = self.sq_norms
            self.projected_t, self.sq_norms = projected_t, sq_norms
        if images > self.spill_image.numel():
            spill_image = torch.full((images,), -1, dtype=torch.long)
            spill_image[: self.spill_image.numel()] = self.spill_image
            self.spill_image = spill_image
        self.capacity = max(self.capacity, images)

    def add(self, embedding: torch.Tensor, index: torch.Tensor) -> None:
        b, p, d = embedding.shape
        if self.patches is None:
            self.patches = p
        elif p != self.patches:
            raise ValueError(f"PatchCore fit: batch has {p} patches per image, earlier batches {self.patches}; "
                             "all train images must have the same size.")
        index = index.detach().to("cpu", torch.long).view(-1)
        need = int(index.max()) + 1
        if self.projected_t is None or need > self.capacity:
            self._grow(max(need, self.capacity if self.projected_t is None else self.capacity * 5 // 4))
        # first occurrence of each image (in this batch, and not seen in an earlier one)
        unique, first = _first_occurrence(index)
        take = first[self.spill_image[unique] < 0].sort().values  # batch positions, in arrival order
        if take.numel() == 0:
            return
        flat = embedding.reshape(b * p, d)
        proj = flat.to(self.device, torch.float32)
        if self.weight is not None:
            proj = proj @ self.weight.t()  # psi(x) of the whole batch, row by row the bits of _project
        rows = proj.view(b, p, -1)[take.to(proj.device)].reshape(-1, self.dproj)  # contiguous, as in _project
        sq = (rows * rows).sum(1)  # |psi(x)|^2 row by row as in _project, on the coreset device
        images = index[take]
        cols = (images[:, None] * p + torch.arange(p)).reshape(-1)
        self.projected_t[:, cols] = rows.to("cpu", torch.float32).t()
        self.sq_norms[cols] = sq.to("cpu", torch.float32)
        self.spill_image[images] = torch.arange(self.spilled, self.spilled + images.numel())
        self.spilled += images.numel()
        full = embedding.detach().to("cpu", torch.float32)
        full = full[take] if take.numel() < b else full  # no copy without duplicates
        self.spill.write(np.ascontiguousarray(full.numpy()).data)  # a buffer view, no bytes copy

    def _combine_ranks(self, group_device: torch.device) -> torch.Tensor:
        """Every rank's buffer made the full one (all_reduce SUM in chunks: each column is nonzero on
        its owner only, x + 0 is exact); returns the owner rank per image (world size: unseen)."""
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        capacity = max(int(c) for c in gather_objects(self.capacity))
        if self.projected_t is None:
            raise ValueError("PatchCore fit: a rank received no training batch.")
        self._grow(capacity)
        owner = torch.where(self.spill_image >= 0, rank, world).to(group_device)
        dist.all_reduce(owner, op=dist.ReduceOp.MIN)
        owner = owner.cpu()
        lost = torch.nonzero((self.spill_image >= 0) & (owner != rank)).view(-1)  # a lower rank has them
        if lost.numel():
            cols = (lost[:, None] * self.patches + torch.arange(self.patches)).reshape(-1)
            self.projected_t[:, cols] = 0.0
            self.sq_norms[cols] = 0.0
        for flat in (self.projected_t.view(-1), self.sq_norms):
            step = 64 * 2**20 // flat.element_size()
            for start in range(0, flat.numel(), step):
                part = flat[start : start + step].to(group_device)
                dist.all_reduce(part, op=dist.ReduceOp.SUM)
                flat[start : start + step] = part.cpu()
        return owner

    def _compact(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The (d', N_pad) layout of the ``images`` present (sorted), contiguous, in place: only
        when the buffer has unseen images (e.g. a limited epoch) or spare capacity."""
        p, dproj = self.patches, self.dproj
        n = images.numel() * p
        n_pad = _round_up(n, _ROW_ALIGN)
        if images.numel() == self.capacity and self.projected_t.shape[1] == n_pad:
            return self.projected_t, self.sq_norms
        cols = (images[:, None] * p + torch.arange(p)).reshape(-1)
        total = self.projected_t.shape[1]
        flat = self.projected_t.view(-1)
        for r in range(dproj):  # row r moves to offset r * n_pad <= r * total: never over a later row
            row = flat[r * total : (r + 1) * total].index_select(0, cols)
            flat[r * n_pad : r * n_pad + n] = row
            flat[r * n_pad + n : (r + 1) * n_pad] = 0.0
        sq = self.sq_norms.index_select(0, cols)
        self.sq_norms[:n] = sq
        self.sq_norms[n:] = 0.0
        return flat[: dproj * n_pad].view(dproj, n_pad), self.sq_norms[:n_pad]

    def prepare(self, group_device: torch.device) -> torch.Tensor:
        """Combine the ranks' buffers once (distributed) and return the present images (dataset order)."""
        if self._present is None:
            if self.patches is None and not is_distributed():
                raise ValueError("PatchCore fit: no training batch was seen.")
            if is_distributed():
                self._owner = self._combine_ranks(group_device)
                self._rank = torch.distributed.get_rank()
                present = self._owner < torch.distributed.get_world_size()
            else:
                present = self.spill_image >= 0
                self._owner = torch.where(present, 0, 1)
            self._present = torch.nonzero(present).view(-1)
        return self._present

    def select(self, ratio: float, num_starts: int, group_device: torch.device) -> tuple[torch.Tensor, int]:
        """(coreset rows (M, D) float32 CPU in selection order, number of train patches N)."""
        images = self.prepare(group_device)
        p = self.patches
        n = images.numel() * p
        projected_t, sq_norms = self._compact(images)
        self.projected_t = self.sq_norms = None
        projected_t, sq_norms = projected_t.to(self.device), sq_norms.to(self.device)  # no copy on CPU
        keep = greedy_coreset_from_projection(projected_t, sq_norms, n, ratio, self.generator, num_starts).cpu()
        del projected_t, sq_norms
        self.bank_images = images[keep // p]  # the train image of each bank row (leave-one-image-out)
        bank = self._full_rows(self.bank_images, keep % p, group_device)
        return bank, n

    def close(self) -> None:
        """Free the full rows' temporary file (after ``select`` and any scoring of train images)."""
        self.spill.close()

    def select_subset(self, images: torch.Tensor, ratio: float, num_starts: int,
                      group_device: torch.device) -> torch.Tensor:
        """The coreset rows of ``images`` alone (sorted dataset indices, e.g. the other folds): what a
        fit on those images only selects (same projection, same generator state, same column
        order). The buffer, the generator and the spill are left as they are for ``select``."""
        self.prepare(group_device)
        p = self.patches
        n = images.numel() * p
        cols = (images[:, None] * p + torch.arange(p)).reshape(-1)
        projected_t = torch.zeros(self.dproj, _round_up(n, _ROW_ALIGN), dtype=torch.float32)
        projected_t[:, :n] = self.projected_t.index_select(1, cols)
        sq_norms = torch.zeros(projected_t.shape[1], dtype=torch.float32)
        sq_norms[:n] = self.sq_norms[cols]
        generator = torch.Generator(device=self.generator.device)
        generator.set_state(self.generator.get_state())
        keep = greedy_coreset_from_projection(projected_t.to(self.device), sq_norms.to(self.device), n, ratio,
                                              generator, num_starts).cpu()
        del projected_t, sq_norms
        return self._full_rows(images[keep // p], keep % p, group_device)

    def rows_of(self, images: torch.Tensor, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(indices, full embeddings (b, P, D)) of the ``images`` this rank holds, ``batch`` at a time."""
        mine = images[self._owner[images] == self._rank]
        p = self.patches
        for start in range(0, mine.numel(), batch):
            idx = mine[start:start + batch]
            rows = (self.spill_image[idx][:, None] * p + torch.arange(p)).reshape(-1)
            yield idx, _read_rows(self.spill, rows.numpy(), self.dim).view(idx.numel(), p, self.dim)

    def _full_rows(self, image: torch.Tensor, patch: torch.Tensor, group_device: torch.device) -> torch.Tensor:
        """Full rows of (image, patch) pairs in their order; each from the rank that owns the image."""
        mine = self._owner[image] == self._rank
        rows = _read_rows(self.spill, (self.spill_image[image[mine]] * self.patches + patch[mine]).numpy(), self.dim)
        if not is_distributed():
            return rows
        positions = gather_rows(torch.nonzero(mine)[:, 0][:, None], group_device)[:, 0]
        rows = gather_rows(rows, group_device)
        bank = torch.empty(image.numel(), self.dim, dtype=torch.float32)
        bank[positions] = rows
        return bank
