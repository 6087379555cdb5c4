"""What ``predict.py`` does: a trained model on a folder of new images, robust to messy input.

    python predict.py ckpt_path=outputs/train/runs/<date>/checkpoints/last.ckpt input=/line/images
    python predict.py ckpt_path=model.onnx input='/line/**/*.png' device=cpu save_maps=both

Writes into ``output_dir`` (the Hydra run folder):
- ``predictions.csv``: one row per input file, appended and flushed batch by batch (columns
  ``CSV_COLUMNS``); a file that cannot be read (corrupt, truncated, empty, not an image) gets its
  error in ``error`` and the others are processed;
- ``maps/<relative path>.png``: the normalised anomaly map as 8-bit grey (the pixel threshold is
  128; uncalibrated: min-max per image), ``.npy`` raw float maps with ``save_maps=npy|both``;
- ``overlays/<relative path>.png``: the input as the method saw it, the jet-coloured normalised
  map blended over it, the predicted defect region (map > pixel threshold) outlined in red;
- a summary at the end: counts per decision (per category when the model has several), errors,
  throughput.

Thresholds: a model fitted on several categories (unified mode) carries one threshold pair per
category. ``category=<name>`` applies that category's to every file; by default (``category=null``)
each file's category is read from the folder layout: the nearest folder of its path named like a
calibrated category (``.../screw/test/crack/001.png`` -> ``screw``); a file with none gets the global
thresholds (calibrated on all categories' normal images pooled; column ``category`` empty).
``resume=true`` (with ``hydra.run.dir`` = the interrupted run's folder) skips files already in its
``predictions.csv``. Relative paths are taken from the input folder (a glob: its fixed prefix).
"""

from __future__ import annotations

import csv
import glob
import logging
import os
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage
from torch.utils.data import DataLoader, Dataset

from iad_lightning.colors import jet
from iad_lightning.data.geometry import describe_preprocess
from iad_lightning.data.io import load_image_8bit
from iad_lightning.errors import ConfigError, DatasetError
from iad_lightning.inference import Predictor, load

log = logging.getLogger(__name__)

CSV_NAME = "predictions.csv"
CSV_COLUMNS = ("path", "score", "normalized_score", "decision", "defect_fraction", "width", "height",
               "map", "overlay", "error", "category")
SAVE_MAPS = ("png", "npy", "both", "none")


def list_inputs(spec: str) -> tuple[list[Path], Path]:
    """The files of an image path, a folder (recursive; hidden files skipped) or a glob, sorted,
    and the base folder their relative output names start from."""
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        fixed = [part for part in path.parts[: next(i for i, p in enumerate(path.parts) if glob.has_magic(p))]]
        base = Path(*fixed) if fixed else Path(".")
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        base = path
    elif path.is_file():
        files, base = [path], path.parent
    else:
        raise ConfigError(f"input='{spec}' is neither an image file, a folder nor a glob that matches files")
    if not files:
        raise ConfigError(f"input='{spec}' holds no files")
    return [f.resolve() for f in files], base.resolve()


class _Files(Dataset):
    """Loads and preprocesses one file; an unreadable file yields its error instead."""

    def __init__(self, files: list[Path], predictor: Predictor) -> None:
        self.files, self.predictor = files, predictor

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> dict[str, Any]:
        try:
            image = load_image_8bit(self.files[i])  # RGB in the preprocessing (before or after its resize)
            tensor = self.predictor.to_tensor(image)
        except DatasetError as err:
            return {"i": i, "tensor": None, "size": ("", ""), "error": str(err)}
        return {"i": i, "tensor": tensor, "size": image.size, "error": ""}


def _done_paths(csv_path: Path) -> set[str]:
    """Paths already in a predictions.csv; a half-written last line (a kill mid-write) is cut."""
    if not csv_path.is_file():
        return set()
    text = csv_path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        csv_path.write_text(text)
    rows = list(csv.DictReader(text.splitlines()))
    return {r["path"] for r in rows if r.get("path")}


def _outline(region: np.ndarray) -> np.ndarray:
    return region & ~ndimage.binary_erosion(region, iterations=1, border_value=0)


def overlay_image(view: np.ndarray, norm_map: np.ndarray, region: np.ndarray) -> np.ndarray:
    """uint8 RGB: the jet-coloured normalised map over the view, the defect region outlined red."""
    out = 0.55 * view.astype(np.float32) / 255.0 + 0.45 * jet(norm_map)
    out[_outline(region)] = (1.0, 0.0, 0.0)
    return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)


def _display_map(predictor: Predictor, amap: np.ndarray, category: str | None = None) -> np.ndarray:
    if predictor.calibrated:
        return predictor.normalize_maps(amap, category)
    lo, hi = float(amap.min()), float(amap.max())
    return ((amap - lo) / max(hi - lo, 1e-12)).astype(np.float32)


def predict(cfg: Any) -> dict[str, Any]:
    """Run ``cfg.ckpt_path`` on ``cfg.input``; returns the summary (counts, throughput)."""
    if cfg.get("ckpt_path") in (None, "", "???"):
        raise ConfigError("pass ckpt_path=<run>/checkpoints/last.ckpt (or an exported .onnx) and input=<image, folder or glob>")
    if cfg.get("input") in (None, "", "???"):
        raise ConfigError("pass input=<an image, a folder or a glob> (and ckpt_path=...)")
    save_maps = str(cfg.get("save_maps", "png")).lower()
    if save_maps not in SAVE_MAPS:
        raise ConfigError(f"save_maps={save_maps}: expected one of {', '.join(SAVE_MAPS)}")
    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files, base = list_inputs(str(cfg.input))
    csv_path = out_dir / CSV_NAME
    if cfg.get("resume", False):
        done = _done_paths(csv_path)
        if not csv_path.is_file():
            log.warning(f"resume=true but {csv_path} does not exist: pass hydra.run.dir=<the interrupted run's folder>")
        files = [f for f in files if str(f) not in done]
        print(f"resume: {len(done)} files already in {csv_path}, {len(files)} to go")
    elif csv_path.is_file():
        csv_path.unlink()  # a fresh run in an existing folder starts a fresh table

    predictor = load(cfg.ckpt_path, str(cfg.get("device", "auto")))
    print(f"{predictor.name}: preprocessing stored with the model: {describe_preprocess(predictor.preprocess)}")
    category = cfg.get("category")
    if category is not None:
        predictor.thresholds_for(str(category))  # an unknown name fails here, naming the known ones
    if not predictor.calibrated:
        log.warning("the model carries no calibrated thresholds: decisions are 'unknown' (retrain with "
                    "threshold.holdout_fraction > 0)")
    loader = DataLoader(_Files(files, predictor), batch_size=int(cfg.get("batch_size", 16)),
                        num_workers=int(cfg.get("num_workers", 0)), collate_fn=list)
    counts: Counter = Counter()
    per_category: dict[str, Counter] = defaultdict(Counter)
    start = time.perf_counter()
    new_file = not csv_path.is_file()
    with open(csv_path, "a", newline="") as fh:
        writer = csv.writer(fh)
        if new_file:
            writer.writerow(CSV_COLUMNS)
            fh.flush()
        try:
            from tqdm import tqdm

            batches = tqdm(loader, desc="predict", unit="batch")
        except ImportError:  # pragma: no cover
            batches = loader
        for items in batches:
            good = [it for it in items if it["tensor"] is not None]
            maps, scores = predictor.predict_tensors([it["tensor"] for it in good]) if good else ([], [])
            results = {it["i"]: (m, s) for it, m, s in zip(good, maps, scores)}
            for it in items:
                path = files[it["i"]]
                if it["error"]:
                    counts["error"] += 1
                    writer.writerow([str(path), "", "", "error", "", "", "", "", "", it["error"], ""])
                    continue
                amap, score = results[it["i"]]
                cat = str(category) if category is not None else category_of(path, predictor.categories)
                row = _write_outputs(predictor, path, base, out_dir, it, amap, float(score), save_maps,
                                     bool(cfg.get("overlays", True)), cat)
                counts[row[3]] += 1
                per_category[cat or ""][row[3]] += 1
                writer.writerow(row)
            fh.flush()
            os.fsync(fh.fileno())  # rows survive a kill
    elapsed = time.perf_counter() - start
    n = sum(counts.values())
    summary = {"files": n, "counts": dict(counts), "seconds": elapsed,
               "images_per_second": (n - counts["error"]) / elapsed if elapsed > 0 else None, "csv": str(csv_path),
               "categories": {c: dict(v) for c, v in per_category.items()}}
    print(f"\n{n} files ({_parts(counts, ('error',)) or 'nothing new'}) in {elapsed:.1f} s "
          f"({summary['images_per_second'] or 0:.1f} images/s) with {predictor.name}; table: {csv_path}")
    if len(predictor.categories) > 1 and per_category:  # unified model: decisions per category
        for cat, c in sorted(per_category.items()):
            t = predictor.thresholds_for(cat or None)["image_threshold"]
            print(f"  {cat or '(global threshold)'}: {_parts(c)} (image threshold {t:.6g})")
    return summary


def _parts(counts: Counter, extra: tuple[str, ...] = ()) -> str:
    return ", ".join(f"{k} {counts[k]}" for k in ("anomalous", "normal", "unknown", *extra) if counts[k])


def category_of(path: Path, categories: list[str]) -> str | None:
    """The nearest folder of ``path`` named like one of ``categories`` (None: no such folder)."""
    known = set(categories)
    return next((part for part in reversed(Path(path).parts[:-1]) if part in known), None)


def _write_outputs(predictor: Predictor, path: Path, base: Path, out_dir: Path, item: dict, amap: np.ndarray,
                   score: float, save_maps: str, overlays: bool, category: str | None = None) -> list:
    try:
        rel = path.relative_to(base)
    except ValueError:
        rel = Path(path.name)
    region = predictor.regions(amap, category)
    norm_score = float(predictor.normalize_scores(np.asarray([score]), category)[0])
    decision = predictor.decide(np.asarray([score]), category)[0]
    map_file = overlay_file = ""
    if save_maps in ("png", "both"):
        target = out_dir / "maps" / f"{rel}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((np.clip(_display_map(predictor, amap, category), 0, 1) * 255 + 0.5).astype(np.uint8)).save(target)
        map_file = str(target.relative_to(out_dir))
    if save_maps in ("npy", "both"):
        target = out_dir / "maps" / f"{rel}.npy"
        target.parent.mkdir(parents=True, exist_ok=True)
        np.save(target, amap.astype(np.float32))
        map_file = map_file or str(target.relative_to(out_dir))
    if overlays:
        target = out_dir / "overlays" / f"{rel}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        view = predictor.view(item["tensor"])
        Image.fromarray(overlay_image(view, _display_map(predictor, amap, category), region)).save(target)
        overlay_file = str(target.relative_to(out_dir))
    width, height = item["size"]
    return [str(path), f"{score:.6g}", "" if norm_score != norm_score else f"{norm_score:.6f}", decision,
            f"{float(region.mean()):.6f}", width, height, map_file, overlay_file, "", category or ""]
