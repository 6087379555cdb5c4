"""BTAD (BeanTech): ``<cat>/{train/ok, test/ok, test/ko}``, masks ``ground_truth/ko/<stem>.png``.

The raw archive mixes ``.bmp`` and ``.png``: images and masks are accepted with either
extension and the mask is looked up by the image's stem (no ``_mask`` suffix).
"""

from __future__ import annotations

from typing import ClassVar

from iad_lightning.data.formats.base import register
from iad_lightning.data.formats.mvtec import MVTecAD

BTAD_CATEGORIES = ("01", "02", "03")


@register
class BTAD(MVTecAD):
    """BTAD: normal folder ``ok``; every other ``test/`` folder (``ko``) is anomalous."""

    name: ClassVar[str] = "btad"
    official_categories: ClassVar[tuple[str, ...]] = BTAD_CATEGORIES
    normal_dir: ClassVar[str] = "ok"
    mask_suffixes: ClassVar[tuple[str, ...]] = ("",)
