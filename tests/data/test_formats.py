"""Each format index on its tiny fixture: categories, counts, labels, defects, mask pairing."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iad_lightning.data.formats.base import FORMATS, get_index
from iad_lightning.data.formats.realiad import camera_view, sample_key
from iad_lightning.data.io import load_image, load_mask
from iad_lightning.data.records import Record

from . import fixtures as fx


def counts(recs: list[Record]) -> Counter:
    """(split, label) -> number of records."""
    return Counter((r.split, r.label) for r in recs)


def load_all(recs: list[Record], category: str) -> dict[str, np.ndarray]:
    """Check what every format must satisfy and return image path -> loaded bool mask."""
    out = {}
    for r in recs:
        assert os.path.isabs(r.image) and Path(r.image).is_file(), r.image
        assert r.category == category and r.label in (0, 1)
        img = load_image(r.image)
        mask = load_mask(r.masks, img.size, r.mask_threshold, image_path=r.image)
        assert mask.dtype == bool and mask.shape == (img.height, img.width)
        if r.label == 0:
            assert r.masks == () and r.defect == "good" and not mask.any()
        else:
            assert r.defect != "good"
        for m in r.masks:
            assert os.path.isabs(m) and Path(m).is_file()
        out[r.image] = mask
    return out


def test_registry_has_every_format() -> None:
    expected = {"mvtec", "mpdd", "btad", "visa", "realiad", "mvtec_loco", "anomalyclip", "folder"}
    import iad_lightning.data.formats  # noqa: F401  (registers every format)

    assert expected <= set(FORMATS)


def test_mvtec(mvtec_root: Path) -> None:
    index = get_index("mvtec", mvtec_root)
    assert index.categories() == ["bottle", "cable"]  # license.txt at the root is ignored
    assert index.resolve_categories("all") == ["bottle", "cable"]
    for cat in ("bottle", "cable"):
        recs = index.records(cat)
        assert counts(recs) == {("train", 0): 2, ("test", 0): 2, ("test", 1): 2}
        masks = load_all(recs, cat)
        for r in recs:
            if r.label:
                stem = Path(r.image).stem
                assert r.defect == "crack"
                gt = mvtec_root / cat / "ground_truth" / "crack"
                assert r.masks == (str(gt / f"{stem}_mask.png"),)
                np.testing.assert_array_equal(masks[r.image], fx.expected_mask(int(stem)))


def test_official_order_then_unofficial_sorted(tmp_path: Path) -> None:
    fx.make_mvtec(tmp_path, ("zeta", "cable", "alpha", "bottle"))
    assert get_index("mvtec", tmp_path).categories() == ["bottle", "cable", "alpha", "zeta"]


def test_mpdd(mpdd_root: Path) -> None:
    index = get_index("mpdd", mpdd_root)
    assert index.categories() == ["connector", "tubes"]
    recs = index.records("tubes")
    assert counts(recs) == {("train", 0): 2, ("test", 0): 2, ("test", 1): 2}
    assert {r.defect for r in recs if r.label} == {"bad"}
    load_all(recs, "tubes")


def test_btad_bmp_and_png(btad_root: Path) -> None:
    index = get_index("btad", btad_root)
    assert index.categories() == ["01", "02"]
    recs = index.records("02")
    assert counts(recs) == {("train", 0): 2, ("test", 0): 2, ("test", 1): 2}
    assert {Path(r.image).suffix for r in recs} == {".bmp", ".png"}
    masks = load_all(recs, "02")
    anomalous = {Path(r.image).name: r for r in recs if r.label}
    assert Path(anomalous["0000.bmp"].masks[0]).name == "0000.png"  # same stem, other extension
    assert Path(anomalous["0001.png"].masks[0]).name == "0001.bmp"
    assert {r.defect for r in anomalous.values()} == {"ko"}
    for name, r in anomalous.items():  # mask value 1 counts as anomalous
        np.testing.assert_array_equal(masks[r.image], fx.expected_mask(int(Path(name).stem)))


def test_mvtec_loco_all_channels_and_val_split(loco_root: Path) -> None:
    index = get_index("mvtec_loco", loco_root)
    assert index.categories() == ["juice_bottle", "pushpins"]
    recs = index.records("pushpins")
    assert counts(recs) == {("train", 0): 2, ("val", 0): 2, ("test", 0): 2, ("test", 1): 2}
    masks = load_all(recs, "pushpins")
    by_defect = {r.defect: r for r in recs if r.label}
    assert set(by_defect) == {"logical_anomalies", "structural_anomalies"}
    logical = by_defect["logical_anomalies"]
    assert [Path(m).name for m in logical.masks] == ["000.png", "001.png"]
    expected = fx.expected_mask(0)
    expected[8:12, 8:12] = True  # only in channel 001
    np.testing.assert_array_equal(masks[logical.image], expected)
    first_only = load_mask(logical.masks[:1], (fx.SIZE, fx.SIZE))
    assert not first_only[11, 11] and masks[logical.image][11, 11]
    assert len(by_defect["structural_anomalies"].masks) == 1
    config = index.defects_config("pushpins")
    assert [c["pixel_value"] for c in config] == [1, 2]


def test_visa_csv_against_raw_tree(visa_root: Path) -> None:
    index = get_index("visa", visa_root)
    assert index.categories() == ["candle", "capsules"]  # pcb1 is in the CSV but not on disk
    recs = index.records("capsules")
    assert counts(recs) == {("train", 0): 2, ("test", 0): 2, ("test", 1): 2}
    assert all(r.image.endswith(".JPG") for r in recs)
    assert [Path(r.image).name for r in recs if r.split == "train"] == ["0000.JPG", "0001.JPG"]
    masks = load_all(recs, "capsules")
    for r in recs:
        if r.label:  # class-id valued masks (1 and 5) are binarised > 0
            stem = Path(r.image).stem
            assert Path(r.masks[0]).stem == stem and r.defect == "bad"
            np.testing.assert_array_equal(masks[r.image], fx.expected_mask(int(stem)))


def test_realiad_label_rule_prefix_and_views(realiad_root: Path) -> None:
    index = get_index("realiad", realiad_root)
    assert index.categories() == ["audiojack", "toy"]  # official order
    recs = index.records("audiojack")
    assert counts(recs) == {("train", 0): 2, ("test", 0): 5, ("test", 1): 3}
    masks = load_all(recs, "audiojack")
    ng_but_ok = [r for r in recs if "/NG/" in r.image and r.label == 0]
    assert sorted(camera_view(r.image) for r in ng_but_ok) == ["C3", "C4", "C5"]
    anomalous = [r for r in recs if r.label]
    assert {r.defect for r in anomalous} == {"HS"}
    for r in anomalous:
        assert r.masks == (r.image[: -len(".jpg")] + ".png",)
        shape = 0 if camera_view(r.image) == "C1" else 1
        np.testing.assert_array_equal(masks[r.image], fx.expected_mask(shape))
    double = [r for r in recs if "audiojack__0003" in r.image]
    assert len(double) == 1 and double[0].label == 1 and camera_view(double[0].image) == "C1"
    assert sample_key(double[0].image) == "audiojack__0003_NG_HS"
    assert sample_key(anomalous[0].image) == "audiojack_0002_NG_HS"
    toy = index.records("toy")  # meta.prefix "toy_images/" is honoured
    assert all("/realiad_1024/toy_images/" in r.image for r in toy)
    assert counts(toy) == counts(recs)


def test_realiad_threshold_option(realiad_root: Path) -> None:
    index = get_index("realiad", realiad_root, mask_threshold=127)
    c1 = next(r for r in index.records("audiojack") if r.label and "_0002_NG_HS_C1_" in r.image)
    assert c1.mask_threshold == 127  # the C1 mask has value 1: nothing is > 127
    assert not load_mask(c1.masks, (fx.SIZE, fx.SIZE), c1.mask_threshold).any()


def test_realiad_other_json_dir(realiad_root: Path, tmp_path: Path) -> None:
    sv = tmp_path / "jsons_sv"
    sv.mkdir()
    (sv / "toy.json").write_text((realiad_root / "realiad_jsons" / "toy.json").read_text())
    index = get_index("realiad", realiad_root, json_dir=str(sv))
    assert index.categories() == ["toy"]


def test_anomalyclip_medical(medical_root: Path) -> None:
    index = get_index("anomalyclip", medical_root)
    assert index.categories() == ["brain", "colon"]
    colon = index.records("colon")  # test only: no train split, allowed for this format
    assert counts(colon) == {("test", 0): 2, ("test", 1): 2}
    masks = load_all(colon, "colon")
    for r in colon:  # root-including paths (this root or another machine's) are normalised
        assert Path(r.image).is_relative_to(medical_root)
        if r.label:
            stem = Path(r.image).stem
            assert r.masks == (str(medical_root / "masks" / f"{stem}.png"),)
            assert r.defect == "anomaly"
            np.testing.assert_array_equal(masks[r.image], fx.expected_mask(int(stem) - 2))
    brain = index.records("brain")  # image-level only, including a mask_path that is a folder
    assert [r.label for r in brain] == [0, 0, 1, 1]
    assert all(r.masks == () for r in brain) and [r.defect for r in brain][2:] == ["yes", "yes"]
    assert not any(m.any() for m in load_all(brain, "brain").values())


def test_anomalyclip_dagm_keys_and_meta_file(dagm_root: Path) -> None:
    index = get_index("anomalyclip", dagm_root, meta_file="dagm_meta.json")
    assert index.categories() == ["Class1", "Class2"]
    recs = index.records("Class2")
    assert counts(recs) == {("train", 0): 2, ("test", 0): 2, ("test", 1): 2}
    masks = load_all(recs, "Class2")
    for r in recs:
        if r.label:
            assert Path(r.masks[0]).name == f"{Path(r.image).stem}_label.png"
            shape = int(Path(r.image).stem) - 2
            np.testing.assert_array_equal(masks[r.image], fx.expected_mask(shape))


def test_tn3k_jpeg_mask_threshold(tn3k_root: Path) -> None:
    raw = np.asarray(Image.open(tn3k_root / "test-mask" / "0.jpg").convert("L"))
    assert ((raw > 0) & (raw < 255)).any()  # JPEG ringing really is there
    loose = get_index("anomalyclip", tn3k_root).records("thyroid")
    strict = get_index("anomalyclip", tn3k_root, mask_threshold=127).records("thyroid")
    assert counts(loose) == {("test", 1): 3} and [r.mask_threshold for r in strict] == [127] * 3
    for a, b in zip(loose, strict):
        shape = int(Path(a.image).stem) % 2
        m0 = load_mask(a.masks, (fx.SIZE, fx.SIZE), a.mask_threshold)
        m127 = load_mask(b.masks, (fx.SIZE, fx.SIZE), b.mask_threshold)
        assert m0.sum() > m127.sum()
        assert (m127 != fx.expected_mask(shape)).sum() <= 4


def test_folder_with_normal_test_dir(folder_root: Path) -> None:
    index = get_index("folder", folder_root, normal_test_dir="good_test", mask_dir="masks")
    assert index.categories() == [folder_root.name]
    recs = index.records(folder_root.name)
    assert counts(recs) == {("train", 0): 2, ("test", 0): 2, ("test", 1): 3}
    assert [r.defect for r in recs if r.label] == ["dent", "scratch", "scratch"]
    masks = load_all(recs, folder_root.name)
    names = {Path(r.image).name: r for r in recs}
    assert names["s0.png"].masks == (str(folder_root / "masks" / "scratch" / "s0_mask.png"),)
    assert names["d0.jpg"].masks == (str(folder_root / "masks" / "d0.png"),)
    for name, shape in (("s0.png", 0), ("s1.png", 1), ("d0.jpg", 1)):
        np.testing.assert_array_equal(masks[names[name].image], fx.expected_mask(shape))


def test_folder_seeded_split_and_options(tmp_path: Path) -> None:
    root = fx.make_folder(tmp_path / "widgets", n_normal=5, normal_test=False)
    recs = get_index("folder", root).records("widgets")  # no mask_dir: classification only
    assert counts(recs) == {("train", 0): 4, ("test", 0): 1, ("test", 1): 3}
    suffixes = {Path(r.image).suffix for r in recs if r.defect == "good"}
    assert suffixes == {".png", ".JPG", ".jpeg", ".bmp", ".TIF"}
    assert all(r.masks == () for r in recs)
    again = get_index("folder", root).records("widgets")
    assert again == recs  # deterministic
    index = get_index("folder", root, abnormal_dirs=["scratch"], test_fraction=0.5, seed=3)
    half = index.records("widgets")
    assert counts(half) == {("train", 0): 2, ("test", 0): 3, ("test", 1): 2}  # round(2.5) = 3


SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED_DATA / "mvtec_screw").is_dir(), reason="no shared real data")
def test_mvtec_on_shared_real_data() -> None:
    """The two real MVTec-layout sets (grayscale PNGs): counts from their README."""
    index = get_index("mvtec", SHARED_DATA)
    assert index.categories() == ["kolektorsdd_commutator", "mvtec_screw"]
    screw = index.records("mvtec_screw")
    assert counts(screw) == {("train", 0): 320, ("test", 0): 41, ("test", 1): 119}
    assert len({r.defect for r in screw if r.label}) == 5
    assert all(Path(r.masks[0]).name == Path(r.image).stem + "_mask.png" for r in screw if r.label)
    ksdd = index.records("kolektorsdd_commutator")
    assert counts(ksdd) == {("train", 0): 230, ("test", 0): 103, ("test", 1): 50}
    load_all([r for r in ksdd if r.split == "test"][::25], "kolektorsdd_commutator")


def test_images_format_lists_a_folder_recursively(tmp_path):
    from PIL import Image

    from iad_lightning.data.formats.base import get_index
    from iad_lightning.data.formats.images import find_images
    from iad_lightning.errors import DatasetError

    for rel in ("n01/a.JPEG", "n01/b.png", "n02/sub/c.jpg", ".hidden/d.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / rel, format="PNG")
    (tmp_path / "n01" / "notes.txt").write_text("x")
    index = get_index("images", tmp_path)
    recs = index.records("images")
    assert [r.image.split("/")[-1] for r in recs] == ["a.JPEG", "b.png", "c.jpg"]
    assert {r.split for r in recs} == {"train"} and index.categories() == ["images"]
    assert len(get_index("images", tmp_path, limit=2).records("images")) == 2
    with pytest.raises(DatasetError, match="holds no images"):
        find_images(_empty(tmp_path))
    with pytest.raises(DatasetError, match="does not exist"):
        find_images(tmp_path / "missing")


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
