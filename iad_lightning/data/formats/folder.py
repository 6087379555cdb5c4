"""A custom dataset as plain folders: one category, named after the root folder.

    <root>/good/*.png              normal images (``normal_dir``)
    <root>/<defect>/*.jpg ...      anomalous images, one folder per defect (``abnormal_dirs``)
    <root>/good_test/*.png         optional normal test images (``normal_test_dir``)
    <root>/masks[/<defect>]/<stem>[_mask].<ext>   optional masks (``mask_dir``)

By default every sub-folder except the normal, normal-test and mask folders (and any folder
named mask, masks, ground_truth or gt) is a defect folder.
Without ``normal_test_dir``, a fraction ``test_fraction`` of the normal images (at least one
when there are two or more) is moved to test, chosen by a permutation seeded with ``seed``:
the same files every run. Masks are matched by the image stem, with or without ``_mask``,
first in ``mask_dir/<defect>/`` then in ``mask_dir/``; with a ``mask_dir`` every anomalous
image must have a mask, without one the set is classification-only (all-zero masks).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Sequence

import numpy as np

from iad_lightning.data.formats._common import (
    check_not_empty,
    check_threshold,
    is_image,
    list_images,
    subdirs,
)
from iad_lightning.data.formats.base import DatasetIndex, register
from iad_lightning.data.records import Record
from iad_lightning.errors import DatasetError

# Never defect folders by default, even without ``mask_dir`` (a classification-only run).
MASK_DIR_NAMES = ("mask", "masks", "ground_truth", "gt")


@register
class Folder(DatasetIndex):
    """Folder-of-images dataset; every folder option is relative to the root or absolute."""

    name: ClassVar[str] = "folder"

    def __init__(
        self,
        root: str | Path,
        *,
        normal_dir: str = "good",
        abnormal_dirs: Sequence[str] | str | None = None,
        normal_test_dir: str | None = None,
        mask_dir: str | None = None,
        test_fraction: float = 0.2,
        seed: int = 0,
        mask_threshold: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(root, **options)
        self.normal_dir = self._folder(normal_dir, "normal_dir")
        self.normal_test_dir = (
            self._folder(normal_test_dir, "normal_test_dir") if normal_test_dir else None
        )
        self.mask_dir = self._folder(mask_dir, "mask_dir") if mask_dir else None
        if abnormal_dirs is None:
            skip = {self.normal_dir, self.normal_test_dir, self.mask_dir}
            self.abnormal_dirs = [
                d for d in subdirs(self.root)
                if d.resolve() not in skip and d.name.lower() not in MASK_DIR_NAMES
            ]
        else:
            names = [abnormal_dirs] if isinstance(abnormal_dirs, str) else list(abnormal_dirs)
            self.abnormal_dirs = [self._folder(str(d), "abnormal_dirs") for d in names]
        if not isinstance(test_fraction, (int, float)) or not 0.0 <= test_fraction < 1.0:
            raise DatasetError(
                f"format 'folder': option test_fraction={test_fraction!r} must be in [0, 1)"
            )
        self.test_fraction = float(test_fraction)
        self.seed = int(seed)
        self.mask_threshold = check_threshold(mask_threshold, self.name)

    def _folder(self, path: str, option: str) -> Path:
        """``root/path`` (or an absolute path), resolved; it must be an existing folder."""
        folder = (self.root / Path(path).expanduser()).resolve()
        if not folder.is_dir():
            raise DatasetError(
                f"format 'folder': folder '{folder}' (data.options.{option}) does not exist"
            )
        return folder

    def categories(self) -> list[str]:
        return [self.root.name]

    def _normal_split(self, normals: list[Path]) -> set[int]:
        """Indices of the normal images that go to test (seeded, deterministic)."""
        n = len(normals)
        n_test = int(n * self.test_fraction + 0.5)
        if self.test_fraction > 0 and n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        elif n < 2:
            n_test = 0
        return set(np.random.default_rng(self.seed).permutation(n)[:n_test].tolist())

    def _mask_index(self) -> dict[tuple[str, str], Path]:
        """(sub-folder relative to mask_dir, stem) -> mask file, over the whole mask tree."""
        if self.mask_dir is None:
            return {}
        index: dict[tuple[str, str], Path] = {}
        for p in sorted(self.mask_dir.rglob("*")):
            if is_image(p):
                index.setdefault((p.parent.relative_to(self.mask_dir).as_posix(), p.stem), p)
        return index

    def _find_mask(self, index: dict[tuple[str, str], Path], defect: str, image: Path) -> Path:
        for sub in (defect, "."):
            for stem in (image.stem + "_mask", image.stem):
                if (sub, stem) in index:
                    return index[(sub, stem)]
        raise DatasetError(
            f"no ground-truth mask for anomalous image '{image}': expected "
            f"'{self.mask_dir}/{defect}/{image.stem}[_mask].<ext>' or "
            f"'{self.mask_dir}/{image.stem}[_mask].<ext>'; add it or unset data.options.mask_dir"
        )

    def records(self, category: str) -> list[Record]:
        if category != self.root.name:
            raise DatasetError(
                f"format 'folder' has the single category '{self.root.name}' (the root folder "
                f"name '{self.root}'), not '{category}'"
            )
        normals = list_images(self.normal_dir)
        if self.normal_test_dir is not None:
            recs = [Record(str(p), 0, category, "train") for p in normals]
            recs += [Record(str(p), 0, category, "test") for p in list_images(self.normal_test_dir)]
        else:
            to_test = self._normal_split(normals)
            recs = [
                Record(str(p), 0, category, "test" if i in to_test else "train")
                for i, p in enumerate(normals)
            ]
            recs.sort(key=lambda r: r.split != "train")  # train first, as in the other formats
        index = self._mask_index()
        for folder in self.abnormal_dirs:
            for p in list_images(folder):
                masks = (str(self._find_mask(index, folder.name, p)),) if self.mask_dir else ()
                recs.append(
                    Record(str(p), 1, category, "test", masks, folder.name, self.mask_threshold)
                )
        return check_not_empty(recs, self.root, self.name)
