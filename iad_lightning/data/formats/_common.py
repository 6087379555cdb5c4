"""Small helpers shared by the format indexes: deterministic listing and checks."""

from __future__ import annotations

import json

from pathlib import Path
from typing import Any, Iterable, Sequence

from iad_lightning.data.records import Record
from iad_lightning.errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def is_image(path: Path) -> bool:
    """A visible file with an image extension, in any case (.PNG, .JPG...)."""
    return (
        path.suffix.lower() in IMAGE_EXTENSIONS
        and not path.name.startswith(".")
        and path.is_file()
    )


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name; [] if the folder does not exist."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if is_image(p)), key=lambda p: p.name)


def subdirs(folder: Path) -> list[Path]:
    """Visible sub-folders of ``folder``, sorted by name; [] if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def order_categories(found: Iterable[str], official: Sequence[str] = ()) -> list[str]:
    """Official categories that are present, in the official order, then the others sorted."""
    found = set(found)
    return [c for c in official if c in found] + sorted(found - set(official))


def split_layout_categories(root: Path, official: Sequence[str] = ()) -> list[str]:
    """Sub-folders of ``root`` that hold a ``train/`` or ``test/`` folder (MVTec-like layouts)."""
    found = [d.name for d in subdirs(root) if (d / "train").is_dir() or (d / "test").is_dir()]
    return order_categories(found, official)


def images_by_stem(folder: Path) -> dict[str, Path]:
    """Map stem -> image file in ``folder`` (first by sorted name if a stem has several files)."""
    out: dict[str, Path] = {}
    for p in list_images(folder):
        out.setdefault(p.stem, p)
    return out


def find_mask(
    folder: Path,
    stem: str,
    suffixes: Sequence[str],
    image: Path,
    by_stem: dict[str, Path] | None = None,
) -> Path:
    """The mask of ``image`` in ``folder``: ``<stem><suffix>.<any image ext>``, first suffix wins.

    Pairing is by stem, never by sorted index; a missing mask raises ``DatasetError``.
    ``by_stem`` is ``images_by_stem(folder)``, passed in to list each folder only once.
    """
    by_stem = images_by_stem(folder) if by_stem is None else by_stem
    for suffix in suffixes:
        if stem + suffix in by_stem:
            return by_stem[stem + suffix]
    expected = " or ".join(f"'{folder / (stem + s)}.png'" for s in suffixes)
    raise DatasetError(
        f"no ground-truth mask for anomalous image '{image}': expected {expected} "
        f"(any image extension); add the mask or remove the image"
    )


def require_category_dir(root: Path, category: str, fmt: str) -> Path:
    """``root/category`` or a DatasetError naming the missing folder."""
    path = root / category
    if not path.is_dir():
        raise DatasetError(
            f"category folder '{path}' (format '{fmt}') not found; check data.root and "
            f"data.category"
        )
    return path


def check_not_empty(
    records: list[Record], where: Path | str, fmt: str, need_train: bool = True
) -> list[Record]:
    """Raise if a category has no train (good) images or no test images ("empty category").

    ``where``: the category folder (quoted in the message) or a ready-made description.
    """
    where = f"'{where}'" if isinstance(where, Path) else where
    if need_train and not any(r.split == "train" for r in records):
        raise DatasetError(
            f"empty category: no training images found for {where} (format '{fmt}'); "
            f"check the folder layout against specs/datasets.md"
        )
    if not any(r.split == "test" for r in records):
        raise DatasetError(
            f"empty category: no test images found for {where} (format '{fmt}'); "
            f"check the folder layout against specs/datasets.md"
        )
    return records


def check_threshold(value: int, fmt: str) -> int:
    """Validate a ``mask_threshold`` option (0..254, a pixel is anomalous iff > threshold)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 254:
        raise DatasetError(
            f"format '{fmt}': option mask_threshold={value!r} must be an int in 0..254 "
            f"(a mask pixel is anomalous iff its 8-bit value is > mask_threshold)"
        )
    return value


def read_json(path: Path, what: str, missing_hint: str) -> Any:
    """Parse a JSON index file; a missing or unreadable file raises DatasetError naming it."""
    if not path.is_file():
        raise DatasetError(f"{what} '{path}' not found; {missing_hint}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read {what} '{path}': {e}") from e
