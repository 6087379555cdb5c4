"""The data contract shared by every dataset format.

A format is only an *index*: it turns a dataset root and a category into a list of
``Record``. Everything else (loading, binarising masks, transforms, splits) is shared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class Record:
    """One image of a dataset.

    image: absolute path of the image file.
    label: 0 good, 1 anomalous (from the folder / JSON label, never inferred from the mask).
    category: the category (class) name.
    split: "train" (good images for fitting), "val" (a native validation split, e.g. MVTec LOCO)
        or "test".
    masks: absolute paths of the ground-truth mask files; several files are OR-ed (MVTec LOCO
        channels). Empty tuple means an all-zero mask (good images, classification-only sets).
    defect: the defect type (folder name, anomaly class) or "good".
    mask_threshold: a mask pixel is anomalous iff its 8-bit grey value is > this (0 for most
        sets; 127 for the Real-IAD official rule or JPEG masks).
    """

    image: str
    label: int
    category: str
    split: Split
    masks: tuple[str, ...] = field(default=())
    defect: str = "good"
    mask_threshold: int = 0
