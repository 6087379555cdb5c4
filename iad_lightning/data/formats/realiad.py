"""Real-IAD: one JSON per category (``<json_dir>/<cat>.json``) over the image tree.

Image path = ``<root>/<image_dir>/<meta.prefix>/<image_path>`` (``meta.prefix`` is honoured,
not replaced by the category name). Official label rule (``datasets/explicit_dataset.py``):
normal iff ``mask_path is None`` or ``anomaly_class == meta.normal_class``; the path is never
used (many ``NG/...`` views show no defect and are labelled ``OK`` with a null mask).
``mask_threshold`` defaults to 0 (``> 0``, as for every set); the official ADEval evaluator
uses ``> 127`` (set ``mask_threshold=127`` to reproduce it; for clean 0/255 masks they agree).
Train records keep their JSON label (the ``fuiad`` noisy-train JSONs contain anomalies).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, ClassVar

from iad_lightning.data.formats._common import (
    check_not_empty,
    check_threshold,
    order_categories,
    read_json,
)
from iad_lightning.data.formats.base import DatasetIndex, register
from iad_lightning.data.records import Record
from iad_lightning.errors import DatasetError

REALIAD_CATEGORIES = (
    "audiojack", "bottle_cap", "button_battery", "end_cap", "eraser", "fire_hood", "mint",
    "mounts", "pcb", "phone_battery", "plastic_nut", "plastic_plug", "porcelain_doll",
    "regulator", "rolled_strip_base", "sim_card_set", "switch", "tape", "terminalblock",
    "toothbrush", "toy", "toy_brick", "transistor1", "u_block", "usb", "usb_adaptor",
    "vcpill", "wooden_beads", "woodstick", "zipper",
)  # fmt: skip
SAMPLE_KEYS = ("category", "anomaly_class", "image_path", "mask_path")
META_KEYS = ("prefix", "normal_class")
# Official ADEval grouping of the 5 camera views of one physical sample.
_SAMPLE_RE = re.compile(r"([a-zA-Z][a-zA-Z0-9_]*_[0-9]{4}_[A-Z][A-Z_]*[A-Z])_C[0-9]_")


def sample_key(image_path: str) -> str | None:
    """The multi-view sample id of an image path (official ADEval regex), or None."""
    m = _SAMPLE_RE.search(Path(image_path).name)
    return m.group(1) if m else None


def camera_view(image_path: str) -> str:
    """The camera view (``C1``..``C5``), parsed from the right: names may contain ``__``."""
    return Path(image_path).stem.split("_")[-2]


@register
class RealIAD(DatasetIndex):
    """Real-IAD. Options: ``json_dir`` (e.g. ``realiad_jsons_sv``), ``image_dir``
    (``realiad_1024`` or ``realiad_raw``), both relative to the root or absolute, and
    ``mask_threshold``. Categories = the JSON files present in ``json_dir``."""

    name: ClassVar[str] = "realiad"
    official_categories: ClassVar[tuple[str, ...]] = REALIAD_CATEGORIES

    def __init__(
        self,
        root: str | Path,
        *,
        json_dir: str = "realiad_jsons",
        image_dir: str = "realiad_1024",
        mask_threshold: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(root, **options)
        self.json_dir = self.root / Path(json_dir).expanduser()
        self.image_dir = self.root / Path(image_dir).expanduser()
        self.mask_threshold = check_threshold(mask_threshold, self.name)
        for what, path in (("json_dir", self.json_dir), ("image_dir", self.image_dir)):
            if not path.is_dir():
                raise DatasetError(
                    f"Real-IAD folder '{path}' not found; set data.options.{what} (relative to "
                    f"data.root '{self.root}' or absolute)"
                )

    def categories(self) -> list[str]:
        found = [p.stem for p in self.json_dir.glob("*.json") if not p.name.startswith(".")]
        return order_categories(found, self.official_categories)

    def load_json(self, category: str) -> dict[str, Any]:
        """The category's JSON, with its ``meta`` and sample keys validated."""
        path = self.json_dir / f"{category}.json"
        data = read_json(
            path,
            "Real-IAD index",
            f"no index for category '{category}'; check data.category and data.options.json_dir",
        )
        if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
            raise DatasetError(f"Real-IAD index '{path}': missing object key 'meta'")
        for key in META_KEYS:
            if not isinstance(data["meta"].get(key), str):
                raise DatasetError(f"Real-IAD index '{path}': missing string key 'meta.{key}'")
        for split in ("train", "test"):
            if not isinstance(data.get(split), list):
                raise DatasetError(f"Real-IAD index '{path}': missing list key '{split}'")
            for i, s in enumerate(data[split]):
                where = f"Real-IAD index '{path}', {split}[{i}]"
                missing = [k for k in SAMPLE_KEYS if not (isinstance(s, dict) and k in s)]
                if missing:
                    raise DatasetError(f"{where}: missing key(s) {missing}")
                if not isinstance(s["image_path"], str) or not s["image_path"]:
                    raise DatasetError(f"{where}: 'image_path' must be a non-empty string")
                if s["mask_path"] is not None and not isinstance(s["mask_path"], str):
                    raise DatasetError(f"{where}: 'mask_path' must be a string or null")
        return data

    def records(self, category: str) -> list[Record]:
        data = self.load_json(category)
        json_path = self.json_dir / f"{category}.json"
        base = self.image_dir / data["meta"]["prefix"]
        if not base.is_dir():
            raise DatasetError(
                f"Real-IAD image folder '{base}' (image_dir + meta.prefix of '{json_path}') not "
                f"found; check data.options.image_dir"
            )
        normal_class = data["meta"]["normal_class"]
        recs = []
        for split in ("train", "test"):
            for i, s in enumerate(data[split]):
                where = f"('{json_path}', {split}[{i}])"
                image = base / s["image_path"]
                if not image.is_file():
                    raise DatasetError(f"image '{image}' {where} does not exist")
                normal = not s["mask_path"] or s["anomaly_class"] == normal_class
                masks: tuple[str, ...] = ()
                if not normal:
                    mask = base / s["mask_path"]
                    if not mask.is_file():
                        raise DatasetError(
                            f"no ground-truth mask for anomalous image '{image}': '{mask}' "
                            f"{where} does not exist"
                        )
                    masks = (str(mask),)
                defect = "good" if normal else str(s["anomaly_class"])
                label = 0 if normal else 1
                recs.append(
                    Record(str(image), label, category, split, masks, defect, self.mask_threshold)
                )
        return check_not_empty(recs, f"'{json_path}'", self.name)
