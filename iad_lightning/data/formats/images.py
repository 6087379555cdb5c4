"""A plain folder of (natural) images, searched recursively: train images only, no labels.

    <root>/**/*.jpg|png|...        e.g. ImageNet's train folder or Imagenette

It serves what is not an anomaly dataset: the images EfficientAD's teacher is distilled on
(``method=efficientad_teacher data=images data.root=/datasets/imagenet/train``) and its ImageNet
penalty images. There is one category, named ``images``; there is no test split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from iad_lightning.data.formats._common import is_image
from iad_lightning.data.formats.base import DatasetIndex, register
from iad_lightning.data.records import Record
from iad_lightning.errors import DatasetError

CATEGORY = "images"


def find_images(root: str | Path, limit: int | None = None) -> list[Path]:
    """Every image file under ``root`` (recursively), sorted by path; at most ``limit``.

    Raises DatasetError naming the folder when it is missing or holds no image.
    """
    folder = Path(root).expanduser().resolve()
    if not folder.is_dir():
        raise DatasetError(f"image folder '{folder}' does not exist or is not a folder")
    found = sorted((p for p in folder.rglob("*") if is_image(p) and not _hidden(p, folder)), key=str)
    if not found:
        raise DatasetError(f"image folder '{folder}' holds no images (.png, .jpg, .jpeg, .bmp, .tif)")
    return found[:limit] if limit else found


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


@register
class Images(DatasetIndex):
    """All images under the root as one unlabeled train category ``images``."""

    name: ClassVar[str] = "images"

    def __init__(self, root: str | Path, *, limit: int | None = None, **options: Any) -> None:
        super().__init__(root, **options)
        self.limit = limit

    def categories(self) -> list[str]:
        return [CATEGORY]

    def records(self, category: str) -> list[Record]:
        if category != CATEGORY:
            raise DatasetError(f"format 'images' has one category '{CATEGORY}', not '{category}'")
        return [Record(image=str(p), label=0, category=CATEGORY, split="train") for p in find_images(self.root, self.limit)]
