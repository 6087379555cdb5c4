"""MVTec AD and MPDD: ``<cat>/{train/good, test/<defect>, ground_truth/<defect>/<stem>_mask.png}``.

Also reads VisA's reorganised "1cls" copy (``test/bad``, masks ``ground_truth/bad/<stem>.png``)
since a mask named ``<stem>.<ext>`` is accepted when ``<stem>_mask`` is absent.
"""

from __future__ import annotations

from typing import ClassVar

from iad_lightning.data.formats._common import (
    check_not_empty,
    find_mask,
    images_by_stem,
    list_images,
    split_layout_categories,
    require_category_dir,
    subdirs,
)
from iad_lightning.data.formats.base import DatasetIndex, register
from iad_lightning.data.records import Record

MVTEC_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut",
    "pill", "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
MPDD_CATEGORIES = (
    "bracket_black", "bracket_brown", "bracket_white", "connector", "metal_plate", "tubes",
)  # fmt: skip


@register
class MVTecAD(DatasetIndex):
    """MVTec AD layout; subclasses change the normal folder name, mask suffixes or categories.

    Label = folder (``good`` = 0, any other ``test/`` sub-folder = 1, its name is the defect).
    Any sub-folder of the root with a ``train/`` or ``test/`` folder is a category; unofficial
    ones are listed after the official ones, sorted.
    """

    name: ClassVar[str] = "mvtec"
    official_categories: ClassVar[tuple[str, ...]] = MVTEC_CATEGORIES
    normal_dir: ClassVar[str] = "good"
    mask_suffixes: ClassVar[tuple[str, ...]] = ("_mask", "")

    def categories(self) -> list[str]:
        return split_layout_categories(self.root, self.official_categories)

    def records(self, category: str) -> list[Record]:
        cat_dir = require_category_dir(self.root, category, self.name)
        recs = [
            Record(str(p), 0, category, "train")
            for p in list_images(cat_dir / "train" / self.normal_dir)
        ]
        for defect_dir in subdirs(cat_dir / "test"):
            defect = defect_dir.name
            if defect == self.normal_dir:
                recs += [Record(str(p), 0, category, "test") for p in list_images(defect_dir)]
                continue
            gt = cat_dir / "ground_truth" / defect
            by_stem = images_by_stem(gt)
            for p in list_images(defect_dir):
                mask = find_mask(gt, p.stem, self.mask_suffixes, p, by_stem)
                recs.append(Record(str(p), 1, category, "test", (str(mask),), defect))
        return check_not_empty(recs, cat_dir, self.name)


@register
class MPDD(MVTecAD):
    """MPDD: the MVTec AD layout with its own 6 categories."""

    name: ClassVar[str] = "mpdd"
    official_categories: ClassVar[tuple[str, ...]] = MPDD_CATEGORIES
