"""Base class and registry of dataset indexes (one small file per on-disk format)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Sequence

from iad_lightning.data.records import Record
from iad_lightning.errors import DatasetError

FORMATS: dict[str, type["DatasetIndex"]] = {}


def register(cls: type["DatasetIndex"]) -> type["DatasetIndex"]:
    """Class decorator: make a format selectable by its ``name`` (``data.format``)."""
    FORMATS[cls.name] = cls
    return cls


class DatasetIndex(ABC):
    """Lists the records of one dataset format under ``root``.

    Subclasses implement ``categories`` (what is on disk, in a stable order) and ``records``
    (train and test records of one category; a native validation split uses split="val").
    """

    name: ClassVar[str]

    def __init__(self, root: str | Path, **options: Any) -> None:
        if options:
            raise DatasetError(
                f"format '{self.name}': unknown option(s) {sorted(options)}; "
                f"check the keys under data.options"
            )
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root '{self.root}' (format '{self.name}') does not exist or is not a "
                f"folder; set data.root=PATH to the folder that holds the categories"
            )

    @abstractmethod
    def categories(self) -> list[str]:
        """Categories present under the root, in a stable (sorted or official) order."""

    @abstractmethod
    def records(self, category: str) -> list[Record]:
        """All records of one category; raises DatasetError if it is missing or empty."""

    def resolve_categories(self, category: str | Sequence[str]) -> list[str]:
        """Turn ``"all"``, a name, a comma list or a list of names into checked category names."""
        available = self.categories()
        if not available:
            raise DatasetError(f"no categories found under '{self.root}' (format '{self.name}')")
        if isinstance(category, str):
            wanted = available if category == "all" else [c.strip() for c in category.split(",")]
        else:
            wanted = [str(c) for c in category]
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise DatasetError(
                f"unknown category {unknown} for format '{self.name}' under '{self.root}'; "
                f"available: {available}"
            )
        return wanted


def get_index(format: str, root: str | Path, **options: Any) -> DatasetIndex:
    """Build the index of a registered format by name."""
    import iad_lightning.data.formats  # noqa: F401  (registers every format)

    if format not in FORMATS:
        raise DatasetError(f"unknown dataset format '{format}'; known: {sorted(FORMATS)}")
    return FORMATS[format](root, **options)
