"""VisA, read from the raw tree driven by ``split_csv/1cls.csv`` (no copy step).

CSV header ``object,split,label,image,mask``; paths are relative to the root; ``mask`` is
empty for normal rows. Raw masks hold defect-class ids (1, 2, ...), so they are binarised
``> 0`` (``mask_threshold=0``), never ``== 255``. Images are uppercase ``.JPG``.
For the reorganised "1cls" MVTec-like copy use ``data.format=mvtec`` instead.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, ClassVar

from iad_lightning.data.formats._common import (
    check_not_empty,
    order_categories,
    require_category_dir,
)
from iad_lightning.data.formats.base import DatasetIndex, register
from iad_lightning.data.records import Record
from iad_lightning.errors import DatasetError

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2",
    "pcb1", "pcb2", "pcb3", "pcb4", "pipe_fryum",
)  # fmt: skip
CSV_COLUMNS = ("object", "split", "label", "image", "mask")
_LABELS = {"normal": 0, "anomaly": 1}


@register
class VisA(DatasetIndex):
    """VisA 1-class split. ``split_csv``: the split file, relative to the root (or absolute)."""

    name: ClassVar[str] = "visa"
    official_categories: ClassVar[tuple[str, ...]] = VISA_CATEGORIES

    def __init__(
        self, root: str | Path, *, split_csv: str = "split_csv/1cls.csv", **options: Any
    ) -> None:
        super().__init__(root, **options)
        self.split_csv = self.root / Path(split_csv).expanduser()
        self._rows = self._read_csv()

    def _read_csv(self) -> list[tuple[int, dict[str, str]]]:
        """Rows as (line number, stripped row), every row checked once."""
        path = self.split_csv
        if not path.is_file():
            raise DatasetError(
                f"VisA split file '{path}' not found; set data.options.split_csv (relative to "
                f"data.root) or point data.root at the extracted VisA folder"
            )
        rows = []
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = [c for c in CSV_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetError(
                    f"VisA split file '{path}': missing column(s) {missing}; "
                    f"expected the header {','.join(CSV_COLUMNS)}"
                )
            for row in reader:
                row = {k: (v or "").strip() for k, v in row.items() if k is not None}
                problem = (
                    f"split '{row['split']}' is not train/test"
                    if row["split"] not in ("train", "test")
                    else f"label '{row['label']}' is not normal/anomaly"
                    if row["label"] not in _LABELS
                    else "empty image path"
                    if not row["image"]
                    else f"anomalous image '{row['image']}' has no mask"
                    if row["label"] == "anomaly" and not row["mask"]
                    else None
                )
                if problem:
                    where = f"VisA split file '{path}' line {reader.line_num}"
                    raise DatasetError(f"{where}: {problem}")
                rows.append((reader.line_num, row))
        return rows

    def categories(self) -> list[str]:
        found = {r["object"] for _, r in self._rows if (self.root / r["object"]).is_dir()}
        return order_categories(found, self.official_categories)

    def records(self, category: str) -> list[Record]:
        require_category_dir(self.root, category, self.name)
        recs = []
        for line, row in self._rows:
            if row["object"] != category:
                continue
            where = f"'{self.split_csv}' line {line}"
            image = self.root / row["image"]
            if not image.is_file():
                raise DatasetError(f"image '{image}' listed in {where} does not exist")
            label = _LABELS[row["label"]]
            masks: tuple[str, ...] = ()
            if label:
                mask = self.root / row["mask"]
                if not mask.is_file():
                    raise DatasetError(
                        f"no ground-truth mask for anomalous image '{image}': '{mask}' listed "
                        f"in {where} does not exist"
                    )
                masks = (str(mask),)
            defect = "bad" if label else "good"
            recs.append(Record(str(image), label, category, row["split"], masks, defect))
        return check_not_empty(recs, f"'{self.root / category}' in '{self.split_csv}'", self.name)
