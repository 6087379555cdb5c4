"""``synthetic``: a procedurally generated industrial inspection set that needs no download.

It backs the offline default run and the tests. Five categories, textures and objects
(``CATEGORIES``): ``fabric`` (denim twill), ``wood`` (board with annual rings), ``gear`` (turned
steel gear on a tray), ``pcb`` (populated circuit board), ``blister`` (capsules in a blister pack).
Normal images vary: texture randomness, pose/position jitter of the object and of its parts,
lighting gain/offset/fall-off, white balance and sensor noise.

Defects (``DEFECTS``): ``scratch`` (thin tapering curve), ``hole`` (dark void with a frayed rim),
``stain`` (soft blob with a tide line), ``missing`` (a tooth or component or capsule absent),
``misplaced`` (a component or capsule shifted, turned or reversed). The mask is *exactly* the set
of pixels the defect changed: the specimen is rendered with and without the defect under the
same camera (lighting and noise), and a pixel is defective iff some 8-bit channel changed by more
than ``MASK_THRESHOLD`` levels; elsewhere the defect-free pixel is kept. So a soft stain's mask is
its visible core.

Layout (MVTec AD), under ``<root>/synthetic-v1-s<seed>-<size>-<n_train>-<n_test_good>-<n_test_defect>/``::

    <category>/train/good/000.png ...           n_train normal images
    <category>/test/good/000.png ...            n_test_good normal images
    <category>/test/<defect>/000.png ...        n_test_defect images, dealt round-robin over the defects
    <category>/ground_truth/<defect>/000_mask.png   8-bit 0/255
    <category>/.complete                        written last: the category is complete

Determinism: image ``i`` of a split is drawn from ``np.random.default_rng([seed, category_id,
split_id, i])`` only, so the bytes (same numpy version and machine) do not depend on which
categories are generated or in what order. ``render_sample`` renders one image in memory, with its
defect-free twin. Images are stored as uncompressed PNG (deflate saves little on sensor noise and
would cost ~40% of the generation time); masks are deflated.

Atomicity: a category is written into a temporary sibling folder and ``os.replace``-d into place,
so a crash never leaves a half-written category that passes for complete, and concurrent processes
(DDP ranks, multirun jobs) may race: the loser of the rename discards its copy. A category folder
without the marker (copied or truncated by hand) is set aside and regenerated.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from iad_lightning.data.formats.base import DatasetIndex, register
from iad_lightning.data.formats.mvtec import MVTecAD
from iad_lightning.data.records import Record
from iad_lightning.data.synthetic_draw import SURFACE_DEFECTS, Category, draw_photometric, expose
from iad_lightning.data.synthetic_objects import Blister, Gear, Pcb
from iad_lightning.data.synthetic_textures import Fabric, Wood
from iad_lightning.errors import DatasetError

VERSION = 1
_SPECS: dict[str, Category] = {spec.name: spec for spec in (Fabric(), Wood(), Gear(), Pcb(), Blister())}
CATEGORIES: tuple[str, ...] = tuple(_SPECS)  # fixed order; a category's id is its position
DEFECTS: dict[str, tuple[str, ...]] = {name: spec.defects for name, spec in _SPECS.items()}
SPLITS = {"train": 0, "test_good": 1, "test_defect": 2}
MASK_THRESHOLD = 6  # 8-bit levels: a smaller change is invisible under the sensor noise
MARKER = ".complete"


@dataclass(frozen=True)
class Sample:
    """One rendered image, the same specimen without its defect, and the exact defect mask."""

    image: np.ndarray  # H×W×3 uint8
    clean: np.ndarray  # H×W×3 uint8
    mask: np.ndarray  # H×W bool
    defect: str


def render_sample(category: str, split: str, index: int, *, seed: int = 0, image_size: int = 256) -> Sample:
    """Render image ``index`` of ``split`` ("train", "test_good" or "test_defect") of a category."""
    spec = _SPECS[category]
    rng = np.random.default_rng([seed, CATEGORIES.index(category), SPLITS[split], index])
    params = spec.sample(rng)
    camera = draw_photometric(rng, image_size)
    scene, surface = spec.render(params, image_size)
    clean = expose(scene, camera)
    if split != "test_defect":
        return Sample(clean, clean, np.zeros(clean.shape[:2], bool), "good")
    kind = spec.defects[index % len(spec.defects)]
    min_area = max(4, int(5e-4 * image_size**2))
    for _ in range(20):
        if kind in SURFACE_DEFECTS:
            broken = SURFACE_DEFECTS[kind](rng, scene, surface, spec.style)
        else:
            broken, _ = spec.render(params, image_size, spec.part_edit(kind, rng, params))
        defective = expose(broken, camera)
        change = np.abs(defective.astype(np.int16) - clean)
        mask = np.maximum(np.maximum(change[..., 0], change[..., 1]), change[..., 2]) > MASK_THRESHOLD
        if mask.sum() >= min_area:
            image = clean.copy()
            image[mask] = defective[mask]
            return Sample(image, clean, mask, kind)
    raise RuntimeError(f"synthetic: no visible '{kind}' defect for {category} #{index} (seed {seed})")


def _png(array: np.ndarray, level: int) -> bytes:
    """8-bit grey (H×W) or RGB (H×W×3) PNG, unfiltered, deflated at zlib ``level`` (0: stored).

    PIL's encoder spends most of its time on a per-row filter search that buys nothing here.
    """
    h, w = array.shape[:2]
    rows = np.zeros((h, 1 + array[0].size), np.uint8)  # leading 0: filter type "none"
    rows[:, 1:] = array.reshape(h, -1)

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", w, h, 8, 2 if array.ndim == 3 else 0, 0, 0, 0)
    data = zlib.compress(rows.tobytes(), level)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def _write_sample(folder: Path, category: str, split: str, i: int, seed: int, image_size: int) -> None:
    sample = render_sample(category, split, i, seed=seed, image_size=image_size)
    if split == "test_defect":
        stem = f"{i // len(DEFECTS[category]):03d}"
        (folder / "test" / sample.defect / f"{stem}.png").write_bytes(_png(sample.image, 0))
        mask = _png(sample.mask.astype(np.uint8) * 255, 1)
        (folder / "ground_truth" / sample.defect / f"{stem}_mask.png").write_bytes(mask)
    else:
        sub = "train" if split == "train" else "test"
        (folder / sub / "good" / f"{i:03d}.png").write_bytes(_png(sample.image, 0))


def _generate(folder: Path, category: str, seed: int, image_size: int, n_train: int, n_test_good: int,
              n_test_defect: int) -> None:
    """Write one category in the MVTec AD layout into ``folder``, the completion marker last.

    In-process on purpose: forked workers on two cores were slower than this on a shared, busy
    machine.
    """
    counts = {"train": n_train, "test_good": n_test_good, "test_defect": n_test_defect}
    subdirs = ["train/good"] * (n_train > 0) + ["test/good"] * (n_test_good > 0)
    kinds = DEFECTS[category][:n_test_defect]
    subdirs += [f"{top}/{kind}" for kind in kinds for top in ("test", "ground_truth")]
    for sub in subdirs:
        (folder / sub).mkdir(parents=True)
    for split, n in counts.items():
        for i in range(n):
            _write_sample(folder, category, split, i, seed, image_size)
    meta = {"version": VERSION, "category": category, "seed": seed, "image_size": image_size,
            "n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect}
    (folder / MARKER).write_text(json.dumps(meta))


def _is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Move a complete category into place atomically; losing the race to another process is fine."""
    if final.exists() and not _is_complete(final):  # not from a rename (copied or truncated by hand)
        stale = final.with_name(f".stale-{final.name}-{uuid.uuid4().hex}")
        try:
            os.replace(final, stale)
        except OSError:  # another process moved or replaced it first
            pass
        shutil.rmtree(stale, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError:
        if not _is_complete(final):  # anything but a lost race with an identical copy
            raise


def _parse_categories(categories: str | Sequence[str] | None) -> list[str]:
    if categories is None or categories == "all":
        return list(CATEGORIES)
    if isinstance(categories, str):
        wanted = [c.strip() for c in categories.split(",")]
    else:
        wanted = [str(c) for c in categories]
    unknown = [c for c in wanted if c not in CATEGORIES]
    if unknown:
        raise DatasetError(f"format 'synthetic': unknown categories {unknown} in data.options.categories; "
                           f"available: {list(CATEGORIES)}")
    return [c for c in CATEGORIES if c in wanted]


@register
class Synthetic(DatasetIndex):
    """Index of the synthetic set; ``root`` is a cache folder where it is generated on first use.

    Options: ``seed``, ``image_size`` (px), ``n_train``, ``n_test_good``, ``n_test_defect`` (per
    category) and ``categories`` ("all", a comma list or a list; default all, in ``CATEGORIES`` order).
    """

    name = "synthetic"

    def __init__(self, root: str | Path | None = None, *, seed: int = 0, image_size: int = 256,
                 n_train: int = 48, n_test_good: int = 12, n_test_defect: int = 24,
                 categories: str | Sequence[str] | None = None, **unknown: Any) -> None:
        root = Path(root if root is not None else Path.home() / ".cache" / "iad_lightning" / "synthetic")
        self.counts = {"n_train": n_train, "n_test_good": n_test_good, "n_test_defect": n_test_defect}
        values = {"image_size": image_size, **self.counts}
        for key, low in {"image_size": 32, "n_train": 1, "n_test_good": 0, "n_test_defect": 0}.items():
            value = values[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise DatasetError(f"format 'synthetic': data.options.{key}={value!r} must be an "
                                   f"integer >= {low}")
        if n_test_good + n_test_defect == 0:
            raise DatasetError("format 'synthetic': data.options.n_test_good + n_test_defect must be >= 1")
        try:
            root.expanduser().mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise DatasetError(f"format 'synthetic': cannot create the cache folder '{root}' ({err}); "
                               f"set data.root to a writable folder") from err
        super().__init__(root, **unknown)  # rejects unknown options with a DatasetError
        self.seed, self.image_size = int(seed), int(image_size)
        self.counts = {k: int(v) for k, v in self.counts.items()}
        self.folder = self.root / (f"synthetic-v{VERSION}-s{self.seed}-{self.image_size}-"
                                   f"{n_train}-{n_test_good}-{n_test_defect}")
        self._categories = _parse_categories(categories)

    def categories(self) -> list[str]:
        return list(self._categories)

    def prepare(self, categories: Sequence[str] | None = None) -> None:
        """Generate the categories that are not complete yet (safe to call from several processes)."""
        for category in self._categories if categories is None else _parse_categories(categories):
            if _is_complete(self.folder / category):
                continue
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / f".tmp-{category}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                _generate(tmp, category, self.seed, self.image_size, **self.counts)
                _publish(tmp, self.folder / category)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

    def records(self, category: str) -> list[Record]:
        if category not in CATEGORIES:
            raise DatasetError(f"format 'synthetic': unknown category '{category}'; "
                               f"available: {list(CATEGORIES)}")
        self.prepare([category])
        return MVTecAD(self.folder).records(category)
