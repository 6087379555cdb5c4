"""A torch Dataset over ``Record`` lists yielding the fixed-key dicts of the data contract."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch.utils.data import Dataset

from iad_lightning.data.io import load_image_8bit, load_mask
from iad_lightning.data.records import Record
from iad_lightning.data.transforms import PairTransform, Preprocess


class AnomalyDataset(Dataset):
    """Yields ``{"image", "mask", "label", "category", "path", "index"}`` per record.

    ``index`` is the position in this dataset: the evaluation path uses it to drop the
    duplicates a distributed sampler pads with and to restore a rank-independent order.
    ``mask_kept`` is the fraction of the mask's pixels that the method's centre crop keeps
    (1.0 without a crop or without mask pixels), counted by ``iad_lightning.data.crop_check``.
    """

    def __init__(self, records: Sequence[Record], preprocess: Preprocess) -> None:
        self.records = list(records)
        self.transform = PairTransform(preprocess)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        rec = self.records[index]
        with single_thread():
            image = load_image_8bit(rec.image)  # RGB in the transform (before or after the resize)
            mask = load_mask(rec.masks, image.size, rec.mask_threshold, image_path=rec.image)
            image_t, mask_t, kept = self.transform.apply(image, mask)
        return {
            "image": image_t,
            "mask": mask_t,
            "label": rec.label,
            "category": rec.category,
            "path": rec.image,
            "index": index,
            "mask_kept": kept,
        }


@contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread for the small per-item tensor ops. Loader workers already run with one;
    in the main process (``num_workers=0``) an OpenMP team on a machine busier than its cores
    makes each of them wait for a descheduled thread: measured 24 ms instead of 0.2 ms per item's
    few ops at load 3 on 2 cores (the whole Kolektor test set: 2.8 s instead of 0.55 s)."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
