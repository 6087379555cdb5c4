"""A torch Dataset over ``Record`` lists yielding the fixed-key dicts of the data contract."""

from __future__ import annotations

from typing import Sequence

from torch.utils.data import Dataset

from iad_lightning.data.io import load_image, load_mask
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
        image = load_image(rec.image)
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
