"""The AnomalyCLIP / ADer ``meta.json`` format (medical sets, TN3K, DAGM, and re-indexed MVTec...).

Schema: ``{"train"|"test": {cls_name: [{"img_path", "mask_path", "cls_name", "specie_name",
"anomaly"}]}}``; DAGM uses ``Train``/``Test``; ADer's ``validation`` becomes split "val".
- Label = the ``anomaly`` field (0/1), never inferred from the path or the mask.
- ``mask_path`` empty, or resolving to a directory (AnomalyCLIP joins "" to the root), means
  no mask: a classification-only item with an all-zero mask. ``anomaly == 0`` never has a mask.
- Several generators write paths that already include their root (``f"{root}/images/x.png"``);
  a path is resolved against the root, dropping leading components until it exists under it.
- Test-only sets (zero-shot benchmarks) have no train records; only an empty test split raises.
- ``mask_threshold`` (default 0 = AnomalyCLIP's ``> 0``): 127 is cleaner for JPEG masks (TN3K)
  where compression ringing adds faint non-zero pixels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from iad_lightning.data.formats._common import check_not_empty, check_threshold, read_json
from iad_lightning.data.formats.base import DatasetIndex, register
from iad_lightning.data.records import Record, Split
from iad_lightning.errors import DatasetError

SPLIT_KEYS: dict[str, Split] = {
    "train": "train", "Train": "train",
    "test": "test", "Test": "test",
    "validation": "val", "Validation": "val",
}  # fmt: skip


def _check_entry(entry: Any, where: str) -> None:
    """One image entry: a non-empty ``img_path``, ``anomaly`` 0/1, ``mask_path`` a string."""
    if not isinstance(entry, dict) or not isinstance(entry.get("img_path"), str):
        raise DatasetError(f"{where}: missing string key 'img_path'")
    if not entry["img_path"]:
        raise DatasetError(f"{where}: empty 'img_path'")
    anomaly = entry.get("anomaly")
    if anomaly not in (0, 1) or isinstance(anomaly, float):
        raise DatasetError(f"{where}: key 'anomaly' must be 0 or 1, got {anomaly!r}")
    if not isinstance(entry.get("mask_path") or "", str):
        raise DatasetError(f"{where}: key 'mask_path' must be a string")


@register
class AnomalyCLIPMeta(DatasetIndex):
    """Index of a ``meta.json``. Options: ``meta_file`` (relative to the root or absolute),
    ``mask_threshold``. Categories = the class names in the file, sorted."""

    name: ClassVar[str] = "anomalyclip"

    def __init__(
        self,
        root: str | Path,
        *,
        meta_file: str = "meta.json",
        mask_threshold: int = 0,
        **options: Any,
    ) -> None:
        super().__init__(root, **options)
        self.meta_file = self.root / Path(meta_file).expanduser()
        self.mask_threshold = check_threshold(mask_threshold, self.name)
        self._meta = self._load()

    def _load(self) -> dict[Split, dict[str, list[dict[str, Any]]]]:
        """The file grouped by split ("train"/"val"/"test") then class, with keys validated."""
        path = self.meta_file
        data = read_json(
            path,
            "meta file",
            "set data.options.meta_file (relative to data.root) or generate it with "
            "AnomalyCLIP's generate_dataset_json scripts",
        )
        if not isinstance(data, dict):
            raise DatasetError(f"meta file '{path}' must be an object with 'train'/'test' keys")
        unknown = sorted(k for k in data if k not in SPLIT_KEYS)
        if unknown:
            raise DatasetError(
                f"meta file '{path}': unknown key(s) {unknown}; known: {list(SPLIT_KEYS)}"
            )
        out: dict[Split, dict[str, list[dict[str, Any]]]] = {"train": {}, "val": {}, "test": {}}
        for key, classes in data.items():
            if not isinstance(classes, dict):
                raise DatasetError(f"meta file '{path}': '{key}' must map class names to lists")
            for cls, entries in classes.items():
                if not isinstance(entries, list):
                    raise DatasetError(f"meta file '{path}': '{key}.{cls}' must be a list")
                for i, entry in enumerate(entries):
                    _check_entry(entry, f"meta file '{path}', {key}.{cls}[{i}]")
                out[SPLIT_KEYS[key]].setdefault(cls, []).extend(entries)
        return out

    def _resolve(self, raw: str) -> Path | None:
        """The existing path under the root that ``raw`` names, or None.

        Tries ``raw`` itself if absolute, then ``root/raw``, then ``root`` joined with ``raw``
        minus 1, 2, ... leading components (paths written with the generator's root).
        """
        p = Path(raw)
        parts = p.parts[1:] if p.is_absolute() else p.parts
        candidates = ([p] if p.is_absolute() else []) + [
            self.root.joinpath(*parts[k:]) for k in range(len(parts))
        ]
        return next((c for c in candidates if c.exists()), None)

    def categories(self) -> list[str]:
        return sorted({cls for split in self._meta.values() for cls in split})

    def records(self, category: str) -> list[Record]:
        if category not in self.categories():
            raise DatasetError(
                f"category '{category}' not found in meta file '{self.meta_file}'; "
                f"available: {self.categories()}"
            )
        recs = []
        for split, classes in self._meta.items():
            for i, e in enumerate(classes.get(category, [])):
                where = f"('{self.meta_file}', {split} {category}[{i}])"
                image = self._resolve(e["img_path"])
                if image is None or not image.is_file():
                    raise DatasetError(
                        f"image '{e['img_path']}' {where} not found under '{self.root}'"
                    )
                label = int(e["anomaly"])
                masks: tuple[str, ...] = ()
                raw_mask = e.get("mask_path") or ""
                if label and raw_mask:
                    mask = self._resolve(raw_mask)
                    if mask is None:
                        raise DatasetError(
                            f"no ground-truth mask for anomalous image '{image}': '{raw_mask}' "
                            f"{where} not found under '{self.root}'"
                        )
                    if mask.is_file():  # a directory = classification only
                        masks = (str(mask),)
                defect = str(e.get("specie_name") or "anomaly") if label else "good"
                recs.append(
                    Record(str(image), label, category, split, masks, defect, self.mask_threshold)
                )
        where = f"'{category}' in '{self.meta_file}'"
        return check_not_empty(recs, where, self.name, need_train=False)
