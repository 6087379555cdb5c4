"""load_image / load_mask: every mode to RGB uint8, bool masks, errors that name the file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from iad_lightning.data.io import load_image, load_mask
from iad_lightning.errors import DatasetError

GREY = np.arange(12 * 16, dtype=np.uint8).reshape(12, 16)  # H=12, W=16: catches (W,H) mix-ups


def rgb(path: Path) -> np.ndarray:
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (16, 12)
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.shape == (12, 16, 3)
    return arr


@pytest.mark.parametrize("mode", ["L", "LA", "P"])
def test_grey_modes_become_rgb(tmp_path: Path, mode: str) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(GREY).convert(mode).save(path)
    arr = rgb(path)
    for c in range(3):
        np.testing.assert_array_equal(arr[..., c], GREY)


def test_binary_image(tmp_path: Path) -> None:
    path = tmp_path / "bw.png"
    Image.fromarray(GREY > 100).save(path)
    assert set(np.unique(rgb(path))) == {0, 255}


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    arr = np.zeros((12, 16, 4), np.uint8)
    arr[..., 0], arr[..., 1], arr[..., 2], arr[..., 3] = 10, 20, GREY, 0  # fully transparent
    path = tmp_path / "rgba.png"
    Image.fromarray(arr).save(path)
    out = rgb(path)
    np.testing.assert_array_equal(out, arr[..., :3])


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("i16.png", lambda a: Image.fromarray(a.astype(np.uint16))),
        ("i16b.tif", lambda a: Image.frombytes("I;16B", (16, 12), a.astype(">u2").tobytes())),
        ("i32.tif", lambda a: Image.fromarray(a.astype(np.int32))),
    ],
)
def test_16_bit_scaled_by_257(tmp_path: Path, name: str, make) -> None:
    path = tmp_path / name
    make(GREY.astype(np.uint32) * 257).save(path)
    arr = rgb(path)
    np.testing.assert_array_equal(arr[..., 0], GREY)
    np.testing.assert_array_equal(arr[..., 2], GREY)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (16, 12), (200, 30, 30)).convert("CMYK").save(path)
    arr = rgb(path).astype(int)
    assert arr[..., 0].mean() > 150 and arr[..., 1].mean() < 80


def test_missing_image(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(DatasetError, match="nope.png"):
        load_image(path)


def test_truncated_png(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(good)
    bad = tmp_path / "truncated.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DatasetError, match="truncated.png"):
        load_image(bad)


def test_random_bytes(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 300, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError, match="garbage.jpg"):
        load_image(bad)
    with pytest.raises(DatasetError, match="garbage.jpg"):
        load_mask([bad], (16, 12))


def save_mask(path: Path, values: np.ndarray) -> Path:
    Image.fromarray(values.astype(np.uint8)).save(path)
    return path


def test_mask_threshold_and_or(tmp_path: Path) -> None:
    a = np.zeros((12, 16), np.uint8)
    a[0, :4] = (1, 127, 128, 255)
    b = np.zeros((12, 16), np.uint8)
    b[5, 5] = 3
    pa, pb = save_mask(tmp_path / "a.png", a), save_mask(tmp_path / "b.png", b)
    m = load_mask([pa], (16, 12))
    assert m.dtype == bool and m.shape == (12, 16) and m.sum() == 4
    assert load_mask([pa], (16, 12), threshold=127).sum() == 2
    both = load_mask([str(pa), str(pb)], (16, 12))
    assert both.sum() == 5 and both[5, 5]


def test_empty_mask_list_uses_pil_size_order() -> None:
    m = load_mask([], (40, 30))
    assert m.dtype == bool and m.shape == (30, 40) and not m.any()


def test_16_bit_mask(tmp_path: Path) -> None:
    path = tmp_path / "m16.png"
    values = np.zeros((12, 16), np.uint16)
    values[2, 2], values[3, 3] = 257 * 200, 100  # 100/257 rounds to 0: background
    Image.fromarray(values).save(path)
    m = load_mask([path], (16, 12))
    assert m[2, 2] and not m[3, 3] and m.sum() == 1
    assert load_mask([path], (16, 12), threshold=127).sum() == 1


def test_mask_of_wrong_size(tmp_path: Path) -> None:
    path = save_mask(tmp_path / "small_mask.png", np.zeros((8, 8)))
    with pytest.raises(DatasetError) as e:
        load_mask([path], (16, 12), image_path="img/000.png")
    msg = str(e.value)
    assert "small_mask.png" in msg and "8x8" in msg and "img/000.png" in msg and "16x12" in msg


def test_missing_mask(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="gone_mask.png"):
        load_mask([tmp_path / "gone_mask.png"], (16, 12))
