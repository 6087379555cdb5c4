"""One LightningDataModule for every dataset format, per-category or unified."""

from __future__ import annotations

import logging
import os
import warnings
from collections import defaultdict
from typing import Any, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader

from iad_lightning.data.dataset import AnomalyDataset
from iad_lightning.data.formats.base import get_index
from iad_lightning.data.records import Record
from iad_lightning.data.sampler import EpochSeededSampler
from iad_lightning.data.transforms import Preprocess, without_crop
from iad_lightning.errors import ConfigError, DatasetError

log = logging.getLogger(__name__)


# data.fit_split -> the index splits the train loader serves
FIT_SPLITS = {"train": ("train",), "test": ("test",), "all": ("train", "test")}


def split_validation(records: Sequence[Record], fraction: float, seed: int) -> tuple[list, list]:
    """Hold out ``fraction`` of each category's train good images as validation.

    The choice is a seeded permutation per category, so it is the same on every rank and run.
    Validation is never taken from test images.
    """
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"data.val_fraction={fraction} must be in [0, 1)")
    by_cat: dict[str, list[Record]] = defaultdict(list)
    for rec in records:
        by_cat[rec.category].append(rec)
    train, val = [], []
    for i, (cat, recs) in enumerate(sorted(by_cat.items())):
        n_val = int(round(fraction * len(recs)))
        if fraction > 0 and len(recs) - n_val < 1:
            raise DatasetError(f"category '{cat}': too few train images ({len(recs)}) to hold out validation")
        order = np.random.default_rng([seed, i]).permutation(len(recs))
        held = set(order[:n_val].tolist())
        for j, rec in enumerate(recs):
            (val if j in held else train).append(rec)
    return train, val


_LOWERED: set[tuple[int, int]] = set()


def usable_workers(num_workers: int) -> int:
    """``data.num_workers`` capped at the CPUs this process may use: more loader processes than
    cores only compete with each other (torch warns about it on every loader)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    if int(num_workers) > cpus:
        if (int(num_workers), cpus) not in _LOWERED:  # once per process, not per datamodule
            _LOWERED.add((int(num_workers), cpus))
            log.info("data.num_workers=%d lowered to %d, the CPUs this process may use", int(num_workers), cpus)
        return cpus
    return int(num_workers)


class AnomalyDataModule(L.LightningDataModule):
    """Serves train / validation / test loaders for one or several categories of a format.

    format: a registered index name (``mvtec``, ``visa``, ``realiad``, ``btad``, ``mpdd``,
        ``mvtec_loco``, ``anomalyclip``, ``folder``, ``synthetic``).
    category: a name, a list, a comma-separated string, or ``"all"``. Several categories mean
        unified mode: one model over all of them, metrics still per category.
    options: format-specific keyword options (e.g. ``json_dir`` for Real-IAD).
    val_fraction: share of train good images held out as validation (native validation splits,
        e.g. MVTec LOCO's, are used as they are and added to it).
    batch_size: per-device train batch; null lets the method choose (``configure_data``).
    shuffle: the train order of epoch e is a permutation seeded by (run seed, e)
        (``data/sampler.py``), so that ``train.py ckpt_path=...`` resumes with the same order, also
        mid-epoch (the position is saved in the checkpoint through ``state_dict``).
    fit_split: what the train loader serves. ``train`` (default, every one-class method): the
        train good images. ``test``: the labelled test split, images and masks of all selected
        categories mixed: the *auxiliary-data protocol* of AnomalyCLIP (prompts trained on
        MVTec AD's test split, evaluated zero-shot on another dataset) and ADPretrain (projectors
        pretrained on labelled anomalies). ``all``: train and test together (Real-IAD
        pretraining). With ``test`` or ``all`` this datamodule's test split is no held-out data:
        its test loader warns that metrics on it are not zero-shot / not held out.
    center_crop: ``True`` (default) applies the method's centre crop as it is (the official
        protocols); ``False`` drops it for every split (``transforms.without_crop``: the image
        resized to a square of the method's resize size), e.g. for users' own images whose
        defects touch the border (``data=folder``'s default). Test runs count the defects a crop
        cuts (``results.json`` ``crop_check``).
    pin_memory: ``auto`` (default) pins the loaders' batches when the trainer runs on CUDA
        (``trainer=gpu``), so that the copies to the device are asynchronous; ``true`` / ``false``.
    The method sets ``preprocess`` before the loaders are built. A fitted model under test sets
    ``fitted_preprocess`` too (``data.geometry.serve_fitted_geometry``): every split is then served
    exactly the geometry the model was fitted with, and ``center_crop`` no longer applies.
    """

    def __init__(
        self,
        format: str,
        root: str,
        category: str | Sequence[str] = "all",
        options: dict[str, Any] | None = None,
        batch_size: int | None = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.0,
        shuffle: bool = True,
        seed: int = 0,
        pin_memory: bool | str = "auto",
        fit_split: str = "train",
        center_crop: bool = True,
    ) -> None:
        super().__init__()
        self.format, self.root, self.category = format, str(root), category
        self.options = dict(options or {})
        self.batch_size, self._eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.val_fraction, self.shuffle = usable_workers(num_workers), val_fraction, shuffle
        if pin_memory not in (True, False, "auto"):
            raise ConfigError(f"data.pin_memory={pin_memory!r} must be auto, true or false")
        self.seed, self.pin_memory = seed, pin_memory
        if fit_split not in FIT_SPLITS:
            raise ConfigError(f"data.fit_split='{fit_split}' is unknown; use one of {list(FIT_SPLITS)}")
        self.fit_split = fit_split
        self.center_crop = bool(center_crop)
        self.preprocess: Preprocess | None = None
        self.fitted_preprocess: Preprocess | None = None
        self._splits: dict[str, list[Record]] | None = None
        self.categories: list[str] = []
        self._train_sampler: EpochSeededSampler | None = None
        self._resume_position: tuple[int, int] | None = None  # (epoch, samples) from a checkpoint

    @property
    def eval_batch_size(self) -> int | None:
        """Batch size of validation and test loaders (the train batch size unless set)."""
        return self._eval_batch_size or self.batch_size

    @eval_batch_size.setter
    def eval_batch_size(self, value: int | None) -> None:
        self._eval_batch_size = value

    def index_records(self) -> dict[str, list[Record]]:
        """Index the dataset once: {"train": [...], "val": [...], "test": [...]}."""
        if self._splits is None:
            index = get_index(self.format, self.root, **self.options)
            self.categories = index.resolve_categories(self.category)
            records = [r for c in self.categories for r in index.records(c)]
            train, val = split_validation(
                [r for r in records if r.split == "train"], self.val_fraction, self.seed
            )
            self._splits = {
                "train": train,
                "val": val + [r for r in records if r.split == "val"],
                "test": [r for r in records if r.split == "test"],
            }
        return self._splits

    def prepare_data(self) -> None:
        # Runs on one process first: lets generated formats (synthetic) build their cache.
        self.index_records()

    def setup(self, stage: str | None = None) -> None:
        self.index_records()

    @property
    def fits_on_test(self) -> bool:
        """True when the train loader serves test images (``fit_split`` test or all)."""
        return "test" in FIT_SPLITS[self.fit_split]

    def fit_records(self) -> list[Record]:
        """The records the train loader serves, per ``fit_split``."""
        splits = self.index_records()
        return [r for name in FIT_SPLITS[self.fit_split] for r in splits[name]]

    @property
    def input_preprocess(self) -> Preprocess | None:
        """The preprocessing every split is served with: a fitted model's own
        (``fitted_preprocess``), else the method's ``preprocess`` with this config's ``center_crop``
        (what a fit is served, and what the model then stores); None while neither is set."""
        if self.fitted_preprocess is not None:
            return self.fitted_preprocess
        if self.preprocess is None:
            return None
        return self.preprocess if self.center_crop else without_crop(self.preprocess)

    def dataset(self, split: str) -> AnomalyDataset:
        """The dataset of an index split (``train``, ``val``, ``test``) or of ``fit`` (``fit_split``)."""
        preprocess = self.input_preprocess
        if preprocess is None:
            raise ConfigError("datamodule.preprocess is unset: the method must set it before loading")
        records = self.fit_records() if split == "fit" else self.index_records()[split]
        return AnomalyDataset(records, preprocess)

    def category_ends(self, split: str = "test") -> dict[str, int]:
        """Per category, one past the index of its last image in ``dataset(split)``: the
        evaluation path releases a category's predictions once a rank has passed its end
        (records are category-grouped, loaders in dataset order)."""
        records = self.fit_records() if split == "fit" else self.index_records()[split]
        return {rec.category: i + 1 for i, rec in enumerate(records)}  # the last occurrence wins

    def loader_pin_memory(self) -> bool:
        """``pin_memory`` of the loaders: ``auto`` pins on a CUDA trainer (page-locked batches, whose
        copies to the GPU Lightning issues with ``non_blocking=True``), never on CPU."""
        if self.pin_memory != "auto":
            return bool(self.pin_memory)
        from lightning.pytorch.accelerators import CUDAAccelerator

        trainer = getattr(self, "trainer", None)
        return trainer is not None and isinstance(trainer.accelerator, CUDAAccelerator)

    def _loader(self, split: str, batch_size: int | None, shuffle: bool) -> DataLoader:
        if batch_size is None:
            raise ConfigError("data.batch_size is null and the method did not set it; set data.batch_size=N")
        return DataLoader(
            self.dataset(split),
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.loader_pin_memory(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        if not self.fit_records():
            what = "train good images" if self.fit_split == "train" else f"images in data.fit_split={self.fit_split}"
            raise DatasetError(
                f"no training images for category {self.categories} under '{self.root}' "
                f"(format '{self.format}'); this method needs {what}"
            )
        if not self.shuffle:
            return self._loader("fit", self.batch_size, False)
        if self.batch_size is None:
            raise ConfigError("data.batch_size is null and the method did not set it; set data.batch_size=N")
        dataset = self.dataset("fit")
        # the order of epoch e is a function of (run seed, e): reproducible across a resume
        self._train_sampler = EpochSeededSampler(dataset, seed=int(os.environ.get("PL_GLOBAL_SEED", self.seed)))
        if self._resume_position is not None:
            self._train_sampler.skip_once(*self._resume_position)
            self._resume_position = None
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=self._train_sampler,
            num_workers=self.num_workers,
            pin_memory=self.loader_pin_memory(),
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self._train_sampler.seed),  # worker seeds off the global RNG
        )

    # -- resume: where in the epoch's order an interrupted run stopped -------------------------
    def state_dict(self) -> dict[str, Any]:
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.training:
            return {}
        progress = trainer.fit_loop.epoch_loop.batch_progress
        # batches of this epoch; none to skip once the epoch has run them all (a run that max_steps
        # stops on an epoch's last batch resumes at the next epoch's first: checkpoint.close_finished_epoch)
        done = 0 if progress.is_last_batch else progress.current.processed
        return {"train_epoch": int(trainer.current_epoch), "train_samples_seen": int(done * (self.batch_size or 0))}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_epoch" in state_dict:
            self._resume_position = (state_dict["train_epoch"], state_dict["train_samples_seen"])

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        if self.fits_on_test:
            warnings.warn(
                f"data.fit_split={self.fit_split}: the test split of '{self.root}' was used for fitting, "
                "so metrics on it are NOT held-out (not zero-shot); evaluate on another dataset",
                stacklevel=2,
            )
        return self._loader("test", self.eval_batch_size, False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
