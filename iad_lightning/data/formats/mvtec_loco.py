"""MVTec LOCO AD: train/good, validation/good (split "val"), test/{good, logical_anomalies,
structural_anomalies}; each anomalous image has a folder ``ground_truth/<type>/<stem>/`` with
one PNG per defect channel. ALL channels go into ``Record.masks`` (OR-ed on load, as the
official evaluation and anomalib do), not only the first one as ADer does.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from iad_lightning.data.formats._common import (
    check_not_empty,
    list_images,
    split_layout_categories,
    require_category_dir,
    subdirs,
)
from iad_lightning.data.formats.base import DatasetIndex, register
from iad_lightning.data.records import Record
from iad_lightning.errors import DatasetError

MVTEC_LOCO_CATEGORIES = (
    "breakfast_box", "juice_bottle", "pushpins", "screw_bag", "splicing_connectors",
)  # fmt: skip
DEFECT_CONFIG_KEYS = ("defect_name", "pixel_value", "saturation_threshold", "relative_saturation")


@register
class MVTecLOCO(DatasetIndex):
    """MVTec LOCO AD; label from the folder (``good`` = 0), defect = the test sub-folder."""

    name: ClassVar[str] = "mvtec_loco"
    official_categories: ClassVar[tuple[str, ...]] = MVTEC_LOCO_CATEGORIES

    def categories(self) -> list[str]:
        return split_layout_categories(self.root, self.official_categories)

    def records(self, category: str) -> list[Record]:
        cat_dir = require_category_dir(self.root, category, self.name)
        recs = [
            Record(str(p), 0, category, split)
            for split, folder in (("train", "train"), ("val", "validation"))
            for p in list_images(cat_dir / folder / "good")
        ]
        for defect_dir in subdirs(cat_dir / "test"):
            defect = defect_dir.name
            for p in list_images(defect_dir):
                if defect == "good":
                    recs.append(Record(str(p), 0, category, "test"))
                    continue
                channels = list_images(cat_dir / "ground_truth" / defect / p.stem)
                if not channels:
                    raise DatasetError(
                        f"no ground-truth mask for anomalous image '{p}': expected PNG channel "
                        f"files in the folder '{cat_dir / 'ground_truth' / defect / p.stem}'"
                    )
                masks = tuple(str(c) for c in channels)
                recs.append(Record(str(p), 1, category, "test", masks, defect))
        return check_not_empty(recs, cat_dir, self.name)

    def defects_config(self, category: str) -> list[dict[str, Any]]:
        """``<cat>/defects_config.json`` (pixel values and sPRO saturation), keys validated."""
        path = require_category_dir(self.root, category, self.name) / "defects_config.json"
        try:
            entries = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DatasetError(f"cannot read defects config '{path}': {e}") from e
        if not isinstance(entries, list):
            raise DatasetError(f"defects config '{path}' must be a JSON list of objects")
        for i, entry in enumerate(entries):
            keys = entry if isinstance(entry, dict) else {}
            missing = [k for k in DEFECT_CONFIG_KEYS if k not in keys]
            if missing:
                raise DatasetError(f"defects config '{path}', entry {i}: missing key(s) {missing}")
        return entries
