"""Tiny fake datasets, one generator per on-disk layout (specs/datasets.md §10).

Images are 32x32 RGB: normal = flat grey 128 plus small seeded noise, anomalous = the same
plus bright squares where the mask is positive. Masks are 'L' PNGs (JPEG for TN3K) whose
positive value is sometimes not 255 (1, 2, 3, 5) to test ``> 0`` binarisation. Anomalous image
``i`` of a folder gets ``SHAPES[i % 2]``: two separated squares, or two squares touching only
diagonally (8-connectivity in PRO), so a mask paired with the wrong image is detected.
Every generator returns the root it wrote.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

SIZE = 32
Box = tuple[int, int, int, int]  # y0, x0, y1, x1 (exclusive)
SHAPES: tuple[tuple[Box, ...], tuple[Box, ...]] = (
    ((4, 4, 10, 10), (20, 20, 26, 26)),  # two separated squares
    ((4, 20, 10, 26), (10, 26, 16, 32)),  # two squares touching only diagonally
)


def expected_mask(shape: int, size: int = SIZE) -> np.ndarray:
    """The bool mask of ``SHAPES[shape]``."""
    m = np.zeros((size, size), dtype=bool)
    for y0, x0, y1, x1 in SHAPES[shape]:
        m[y0:y1, x0:x1] = True
    return m


def _image(seed: int, shape: int | None = None) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = 128 + rng.integers(-4, 5, size=(SIZE, SIZE, 3))
    if shape is not None:
        arr[expected_mask(shape)] = 250
    return Image.fromarray(arr.astype(np.uint8))


def save_image(path: Path, seed: int, shape: int | None = None) -> Path:
    """A normal (shape None) or anomalous image; the format follows the extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _image(seed, shape).save(path)
    return path


def save_mask(path: Path, shape: int, value: int = 255) -> Path:
    """An 'L' mask with ``value`` on ``SHAPES[shape]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((expected_mask(shape) * value).astype(np.uint8)).save(path)
    return path


def make_mvtec(
    root: Path, categories: Sequence[str] = ("bottle", "cable"), defect: str = "crack"
) -> Path:
    """MVTec AD / MPDD: train/good, test/good, test/<defect>, ground_truth/<defect>/NNN_mask.png."""
    for c, cat in enumerate(categories):
        d = root / cat
        for i in range(2):
            save_image(d / "train" / "good" / f"{i:03d}.png", 100 * c + i)
            save_image(d / "test" / "good" / f"{i:03d}.png", 100 * c + 10 + i)
            save_image(d / "test" / defect / f"{i:03d}.png", 100 * c + 20 + i, shape=i)
            save_mask(d / "ground_truth" / defect / f"{i:03d}_mask.png", i, value=(255, 3)[i])
    (root / "license.txt").write_text("not a category\n")
    return root


def make_btad(root: Path, categories: Sequence[str] = ("01", "02")) -> Path:
    """BTAD: ok/ko, one .bmp and one .png per folder; masks ``ground_truth/ko/<stem>.<png|bmp>``."""
    for c, cat in enumerate(categories):
        d = root / cat
        for i, ext in enumerate((".bmp", ".png")):
            save_image(d / "train" / "ok" / f"{i:04d}{ext}", 100 * c + i)
            save_image(d / "test" / "ok" / f"{i:04d}{ext}", 100 * c + 10 + i)
            save_image(d / "test" / "ko" / f"{i:04d}{ext}", 100 * c + 20 + i, shape=i)
        save_mask(d / "ground_truth" / "ko" / "0000.png", 0, value=1)
        save_mask(d / "ground_truth" / "ko" / "0001.bmp", 1)
    return root


LOCO_DEFECTS_CONFIG = [
    {"defect_name": "missing", "pixel_value": 1, "saturation_threshold": 50,
     "relative_saturation": False},
    {"defect_name": "extra", "pixel_value": 2, "saturation_threshold": 0.5,
     "relative_saturation": True},
]


def make_mvtec_loco(root: Path, categories: Sequence[str] = ("juice_bottle", "pushpins")) -> Path:
    """MVTec LOCO: train/validation/test good, one logical and one structural anomaly, each
    with a ground-truth folder; the logical one has 2 overlapping channels (values 1 and 2)."""
    for c, cat in enumerate(categories):
        d = root / cat
        (d).mkdir(parents=True, exist_ok=True)
        (d / "defects_config.json").write_text(json.dumps(LOCO_DEFECTS_CONFIG))
        for i in range(2):
            save_image(d / "train" / "good" / f"{i:03d}.png", 100 * c + i)
            save_image(d / "validation" / "good" / f"{i:03d}.png", 100 * c + 5 + i)
            save_image(d / "test" / "good" / f"{i:03d}.png", 100 * c + 10 + i)
        save_image(d / "test" / "logical_anomalies" / "000.png", 100 * c + 20, shape=0)
        gt = d / "ground_truth" / "logical_anomalies" / "000"
        # channel 000 = first square of shape 0 (value 1), channel 001 = the second (value 2)
        save_mask(gt / "000.png", 0, value=1)
        arr = np.zeros((SIZE, SIZE), np.uint8)
        arr[20:26, 20:26] = 2
        arr[8:12, 8:12] = 2  # overlaps channel 000
        Image.fromarray(arr).save(gt / "001.png")
        save_image(d / "test" / "structural_anomalies" / "000.png", 100 * c + 21, shape=1)
        save_mask(d / "ground_truth" / "structural_anomalies" / "000" / "000.png", 1)
    return root


def make_visa(root: Path, categories: Sequence[str] = ("candle", "capsules")) -> Path:
    """VisA raw tree + split_csv/1cls.csv; masks hold class ids (1 and 5), images are .JPG.
    The CSV also lists 'pcb1', whose folder is absent (not a category on disk)."""
    rows = [("object", "split", "label", "image", "mask")]
    for c, cat in enumerate(categories):
        d = root / cat / "Data"
        for i in range(4):
            rel = f"{cat}/Data/Images/Normal/{i:04d}.JPG"
            save_image(root / rel, 100 * c + i)
            rows.append((cat, "train" if i < 2 else "test", "normal", rel, ""))
        for i in range(2):
            rel = f"{cat}/Data/Images/Anomaly/{i:03d}.JPG"
            mrel = f"{cat}/Data/Masks/Anomaly/{i:03d}.png"
            save_image(root / rel, 100 * c + 20 + i, shape=i)
            save_mask(root / mrel, i, value=(1, 5)[i])
            rows.append((cat, "test", "anomaly", rel, mrel))
        (d / "image_anno.csv").write_text("image,label,mask\n")
    rows.append(("pcb1", "train", "normal", "pcb1/Data/Images/Normal/0000.JPG", ""))
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root


def _realiad_category(root: Path, cat: str, prefix: str, seed: int) -> dict:
    """One Real-IAD category: images under ``realiad_1024/<prefix>``, returns its JSON."""
    base = root / "realiad_1024" / prefix

    def sample(rel: str, cls: str, mask: str | None) -> dict:
        return {"category": cat, "anomaly_class": cls, "image_path": rel, "mask_path": mask}

    train, test = [], []
    for v in (1, 2):
        rel = f"OK/S0001/{cat}_0001_OK_C{v}_20230101000000.jpg"
        save_image(base / rel, seed + v)
        train.append(sample(rel, "OK", None))
        rel = f"OK/S0004/{cat}_0004_OK_C{v}_20230101000003.jpg"
        save_image(base / rel, seed + 10 + v)
        test.append(sample(rel, "OK", None))
    for v in range(1, 6):  # NG sample: views C1, C2 show the defect, C3..C5 do not
        stem = f"NG/HS/S0002/{cat}_0002_NG_HS_C{v}_20230101000001"
        if v <= 2:
            save_image(base / f"{stem}.jpg", seed + 20 + v, shape=v - 1)
            save_mask(base / f"{stem}.png", v - 1, value=(1, 255)[v - 1])
            test.append(sample(f"{stem}.jpg", "HS", f"{stem}.png"))
        else:
            save_image(base / f"{stem}.jpg", seed + 20 + v)
            test.append(sample(f"{stem}.jpg", "OK", None))
    stem = f"NG/HS/S0003/{cat}__0003_NG_HS_C1_20230101000002"  # double underscore quirk
    save_image(base / f"{stem}.jpg", seed + 30, shape=0)
    save_mask(base / f"{stem}.png", 0)
    test.append(sample(f"{stem}.jpg", "HS", f"{stem}.png"))
    return {"meta": {"prefix": prefix, "normal_class": "OK"}, "train": train, "test": test}


def make_realiad(root: Path) -> Path:
    """Real-IAD: audiojack (prefix ``audiojack/``) and toy (prefix ``toy_images/``, not the
    category name, to test that ``meta.prefix`` is honoured); JSONs in ``realiad_jsons/``."""
    (root / "realiad_jsons").mkdir(parents=True, exist_ok=True)
    for c, (cat, prefix) in enumerate((("toy", "toy_images/"), ("audiojack", "audiojack/"))):
        data = _realiad_category(root, cat, prefix, 100 * c)
        (root / "realiad_jsons" / f"{cat}.json").write_text(json.dumps(data, indent=1))
    return root


def meta_entry(img: str, mask: str, cls: str, specie: str, anomaly: int) -> dict:
    """One image entry of an AnomalyCLIP meta.json."""
    return {"img_path": img, "mask_path": mask, "cls_name": cls, "specie_name": specie,
            "anomaly": anomaly}  # fmt: skip


def make_anomalyclip_medical(root: Path) -> Path:
    """AnomalyCLIP meta.json, test only: 'colon' (ClinicDB-like, paths that include a root:
    this one or another machine's) and 'brain' (image-level only, ``mask_path`` "")."""
    entries = []
    for i in range(4):
        anomalous = i >= 2
        save_image(root / "images" / f"{i}.png", i, shape=(i - 2) if anomalous else None)
        mask = ""
        if anomalous:
            save_mask(root / "masks" / f"{i}.png", i - 2, value=(255, 3)[i - 2])
            mask = (f"{root}/masks/{i}.png", f"/elsewhere/data/colon/masks/{i}.png")[i - 2]
        img = (f"{root}/images/{i}.png", f"/elsewhere/data/colon/images/{i}.png", f"images/{i}.png",
               f"{root}/images/{i}.png")[i]  # fmt: skip
        entries.append(meta_entry(img, mask, "colon", "", int(anomalous)))
    brain = []
    for i, folder in enumerate(("no", "no", "yes", "yes")):
        rel = f"brain_tumor_dataset/{folder}/{i}.png"
        save_image(root / rel, 50 + i)
        # the last one has a mask_path that is a folder: "classification only" in AnomalyCLIP
        mask = f"{root}/" if i == 3 else ""
        brain.append(meta_entry(rel, mask, "brain", folder, int(folder == "yes")))
    meta = {"train": {}, "test": {"colon": entries, "brain": brain}}
    (root / "meta.json").write_text(json.dumps(meta, indent=1))
    return root


def make_anomalyclip_dagm(root: Path, meta_file: str = "dagm_meta.json") -> Path:
    """DAGM-style meta file with ``Train``/``Test`` keys and two classes."""
    meta: dict = {"Train": {}, "Test": {}}
    for c, cls in enumerate(("Class1", "Class2")):
        train, test = [], []
        for i in range(2):
            rel = f"{cls}/Train/{i}.png"
            save_image(root / rel, 10 * c + i)
            train.append(meta_entry(rel, "", cls, "good", 0))
            rel = f"{cls}/Test/{i}.png"
            save_image(root / rel, 10 * c + 2 + i)
            test.append(meta_entry(rel, "", cls, "good", 0))
            rel, mrel = f"{cls}/Test/{i + 2}.png", f"{cls}/Test/Label/{i + 2}_label.png"
            save_image(root / rel, 10 * c + 4 + i, shape=i)
            save_mask(root / mrel, i)
            test.append(meta_entry(rel, mrel, cls, "bad", 1))
        meta["Train"][cls], meta["Test"][cls] = train, test
    (root / meta_file).write_text(json.dumps(meta))
    return root


def make_tn3k(root: Path) -> Path:
    """TN3K as AnomalyCLIP indexes it: test-image/test-mask JPEGs, all anomalous, class
    'thyroid', root-including paths. The JPEG masks contain values in 1..254 (ringing)."""
    entries = []
    for i in range(3):
        save_image(root / "test-image" / f"{i}.jpg", i, shape=i % 2)
        save_mask(root / "test-mask" / f"{i}.jpg", i % 2)  # JPEG: compression adds ringing
        img, mask = f"{root}/test-image/{i}.jpg", f"{root}/test-mask/{i}.jpg"
        entries.append(meta_entry(img, mask, "thyroid", "", 1))
    (root / "meta.json").write_text(json.dumps({"train": {}, "test": {"thyroid": entries}}))
    return root


def make_folder(root: Path, n_normal: int = 2, normal_test: bool = True) -> Path:
    """Custom folder set: good/ (mixed extensions and case), good_test/, scratch/ (2) and
    dent/ (1); masks in masks/scratch/<stem>_mask.png and flat masks/<stem>.png (dent)."""
    for i in range(n_normal):
        save_image(root / "good" / f"n{i}{('.png', '.JPG', '.jpeg', '.bmp', '.TIF')[i % 5]}", i)
    if normal_test:
        for i in range(2):
            save_image(root / "good_test" / f"t{i}.png", 10 + i)
    for i in range(2):
        save_image(root / "scratch" / f"s{i}.png", 20 + i, shape=i)
        save_mask(root / "masks" / "scratch" / f"s{i}_mask.png", i, value=(255, 7)[i])
    save_image(root / "dent" / "d0.jpg", 30, shape=1)
    save_mask(root / "masks" / "d0.png", 1)
    return root
