"""Bad inputs: every one is a DatasetError whose message names the path, key or value."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from iad_lightning.data.formats.base import get_index
from iad_lightning.errors import DatasetError

from . import fixtures as fx


def test_wrong_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does_not_exist"):
        get_index("mvtec", tmp_path / "does_not_exist")


def test_unknown_format_and_option(mvtec_root: Path) -> None:
    with pytest.raises(DatasetError, match="mvtek"):
        get_index("mvtek", mvtec_root)
    with pytest.raises(DatasetError, match="colour"):
        get_index("mvtec", mvtec_root, colour="red")
    with pytest.raises(DatasetError, match="jsn_dir"):
        get_index("realiad", mvtec_root, jsn_dir="x")


def test_unknown_category(mvtec_root: Path) -> None:
    index = get_index("mvtec", mvtec_root)
    with pytest.raises(DatasetError, match="screwdriver"):
        index.resolve_categories("bottle,screwdriver")
    with pytest.raises(DatasetError, match="metal_nut"):
        index.records("metal_nut")  # the message names the missing folder
    assert index.resolve_categories(["cable"]) == ["cable"]


def test_empty_category(tmp_path: Path) -> None:
    fx.make_mvtec(tmp_path, ("bottle",))
    (tmp_path / "cable" / "train" / "good").mkdir(parents=True)
    fx.save_image(tmp_path / "cable" / "test" / "good" / "000.png", 0)
    with pytest.raises(DatasetError, match=r"empty category.*cable"):
        get_index("mvtec", tmp_path).records("cable")
    shutil.rmtree(tmp_path / "bottle" / "test")
    with pytest.raises(DatasetError, match=r"no test images.*bottle"):
        get_index("mvtec", tmp_path).records("bottle")


def test_mvtec_missing_mask(tmp_path: Path) -> None:
    fx.make_mvtec(tmp_path, ("bottle",))
    (tmp_path / "bottle" / "ground_truth" / "crack" / "001_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"crack/001\.png.*001_mask"):
        get_index("mvtec", tmp_path).records("bottle")


def test_btad_missing_mask(tmp_path: Path) -> None:
    fx.make_btad(tmp_path, ("01",))
    (tmp_path / "01" / "ground_truth" / "ko" / "0001.bmp").unlink()
    with pytest.raises(DatasetError, match="0001"):
        get_index("btad", tmp_path).records("01")


def test_loco_missing_mask_folder(tmp_path: Path) -> None:
    fx.make_mvtec_loco(tmp_path, ("pushpins",))
    shutil.rmtree(tmp_path / "pushpins" / "ground_truth" / "structural_anomalies" / "000")
    with pytest.raises(DatasetError, match="structural_anomalies/000"):
        get_index("mvtec_loco", tmp_path).records("pushpins")


def test_visa_errors(tmp_path: Path) -> None:
    fx.make_visa(tmp_path, ("candle",))
    (tmp_path / "candle" / "Data" / "Masks" / "Anomaly" / "001.png").unlink()
    with pytest.raises(DatasetError, match="Masks/Anomaly/001.png"):
        get_index("visa", tmp_path).records("candle")
    with pytest.raises(DatasetError, match="other.csv"):
        get_index("visa", tmp_path, split_csv="split_csv/other.csv")
    (tmp_path / "split_csv" / "bad.csv").write_text("object,split,image\ncandle,train,x.JPG\n")
    with pytest.raises(DatasetError, match=r"bad\.csv.*missing column.*label"):
        get_index("visa", tmp_path, split_csv="split_csv/bad.csv")
    bad_split = "object,split,label,image,mask\ncandle,dev,normal,x.JPG,\n"
    (tmp_path / "split_csv" / "bad.csv").write_text(bad_split)
    with pytest.raises(DatasetError, match=r"bad\.csv' line 2.*dev"):
        get_index("visa", tmp_path, split_csv="split_csv/bad.csv")


def _edit_realiad(root: Path, cat: str, edit) -> None:
    path = root / "realiad_jsons" / f"{cat}.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_realiad_errors(tmp_path: Path) -> None:
    fx.make_realiad(tmp_path)
    with pytest.raises(DatasetError, match=r"realiad_512.*image_dir"):
        get_index("realiad", tmp_path, image_dir="realiad_512")
    with pytest.raises(DatasetError, match="mask_threshold"):
        get_index("realiad", tmp_path, mask_threshold=255)
    index = get_index("realiad", tmp_path)
    _edit_realiad(tmp_path, "toy", lambda d: d["test"][0].pop("mask_path"))
    with pytest.raises(DatasetError, match=r"toy\.json.*test\[0\].*mask_path"):
        index.records("toy")
    _edit_realiad(tmp_path, "toy", lambda d: d["meta"].pop("normal_class"))
    with pytest.raises(DatasetError, match=r"toy\.json.*meta\.normal_class"):
        index.records("toy")
    (tmp_path / "realiad_jsons" / "toy.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"toy\.json"):
        index.records("toy")
    mask = next((tmp_path / "realiad_1024" / "audiojack").rglob("*_C2_*.png"))
    mask.unlink()
    with pytest.raises(DatasetError, match=mask.name):
        index.records("audiojack")


def test_anomalyclip_errors(tmp_path: Path) -> None:
    fx.make_anomalyclip_medical(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    with pytest.raises(DatasetError, match="nope.json"):
        get_index("anomalyclip", tmp_path, meta_file="nope.json")
    with pytest.raises(DatasetError, match="liver"):
        get_index("anomalyclip", tmp_path).records("liver")

    def write(name: str, data: dict) -> str:
        (tmp_path / name).write_text(json.dumps(data))
        return name

    bad = json.loads(json.dumps(meta))
    del bad["test"]["colon"][1]["anomaly"]
    with pytest.raises(DatasetError, match=r"m1\.json.*colon\[1\].*anomaly"):
        get_index("anomalyclip", tmp_path, meta_file=write("m1.json", bad))
    only_train = {"train": {"colon": meta["test"]["colon"][:2]}, "test": {}}
    index = get_index("anomalyclip", tmp_path, meta_file=write("m2.json", only_train))
    with pytest.raises(DatasetError, match=r"no test images.*colon.*m2\.json"):
        index.records("colon")
    (tmp_path / "masks" / "2.png").unlink()
    with pytest.raises(DatasetError, match=r"masks/2\.png"):
        get_index("anomalyclip", tmp_path).records("colon")


def test_folder_errors(tmp_path: Path) -> None:
    root = fx.make_folder(tmp_path / "parts")
    with pytest.raises(DatasetError, match="normal_dir"):
        get_index("folder", root, normal_dir="ok")
    with pytest.raises(DatasetError, match="abnormal_dirs"):
        get_index("folder", root, abnormal_dirs=["crack"])
    with pytest.raises(DatasetError, match="test_fraction"):
        get_index("folder", root, test_fraction=1.5)
    with pytest.raises(DatasetError, match="widgets"):
        get_index("folder", root).records("widgets")
    (root / "masks" / "scratch" / "s1_mask.png").unlink()
    with pytest.raises(DatasetError, match=r"scratch/s1\.png"):
        get_index("folder", root, mask_dir="masks", normal_test_dir="good_test").records("parts")
    shutil.rmtree(root / "good")
    (root / "good").mkdir()
    with pytest.raises(DatasetError, match=r"empty category.*parts"):
        get_index("folder", root).records("parts")
