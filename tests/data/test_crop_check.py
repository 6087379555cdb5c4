"""Crop safety: the fraction of mask pixels a centre crop keeps, the per-category counts, the
warning, and the no-crop geometry (method.crop=null, data.center_crop=false)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from iad_lightning.data.crop_check import crop_check, warn_if_cropped
from iad_lightning.data.datamodule import AnomalyDataModule
from iad_lightning.data.transforms import PairTransform, Preprocess, without_crop

from . import fixtures as fx

PATCHCORE = Preprocess(resize=256, crop=224)  # 256 -> 224: a 16 px border is cut on each side


def _mask(boxes, size=(256, 256)) -> np.ndarray:
    m = np.zeros(size, dtype=bool)
    for y0, x0, y1, x1 in boxes:
        m[y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize("boxes, kept", [
    ([(100, 100, 120, 120)], 1.0),  # centre defect
    ([(100, 0, 110, 16)], 0.0),  # wholly in the cut left border
    ([(100, 8, 110, 24)], 0.5),  # half of its 16 columns inside
    ([], 1.0),  # no mask pixels: nothing to lose
])
def test_pair_transform_reports_the_kept_fraction(boxes, kept):
    image = Image.new("RGB", (256, 256), (128, 128, 128))
    mask = _mask(boxes)
    img, msk, frac = PairTransform(PATCHCORE).apply(image, mask)
    assert img.shape == (3, 224, 224) and msk.shape == (1, 224, 224)
    assert frac == kept
    assert int(msk.sum()) == int(kept * mask.sum())
    img2, msk2 = PairTransform(PATCHCORE)(image, mask)  # __call__ unchanged
    assert torch.equal(img, img2) and torch.equal(msk, msk2)
    # no crop: a square resize of the whole image, every mask pixel kept and aligned with the image
    square = without_crop(PATCHCORE)
    assert (square.resize, square.crop) == ((256, 256), None)
    img3, msk3, frac3 = PairTransform(square).apply(image, mask)
    assert img3.shape == (3, 256, 256) and frac3 == 1.0 and int(msk3.sum()) == int(mask.sum())


def test_no_crop_keeps_map_and_mask_geometry_on_a_wide_image():
    # a 128 x 320 image (Kolektor-like) with a defect at its right border: squashed, not cut
    mask = _mask([(60, 300, 70, 320)], size=(128, 320))
    image = Image.fromarray(np.where(mask[..., None], 250, 128).astype(np.uint8).repeat(3, 2))
    img, msk, frac = PairTransform(without_crop(PATCHCORE)).apply(image, mask)
    assert img.shape[-2:] == msk.shape[-2:] == (256, 256) and frac == 1.0
    bright = img[0] > img[0].mean()  # the defect's pixels in the image are the mask's pixels
    assert (bright == (msk[0] > 0.5)).float().mean() > 0.99 and msk[0, :, -1].any()
    _, msk_c, frac_c = PairTransform(PATCHCORE).apply(image, mask)  # cropped: the defect is gone
    assert frac_c == 0.0 and not msk_c.any()


def test_crop_check_counts_per_category_and_warns():
    category = np.array(["a", "a", "a", "a", "b", "b"])
    label = np.array([0, 1, 1, 1, 1, 1])
    kept = np.array([1.0, 1.0, 0.25, 0.0, 1.0, 1.0])
    check = crop_check(category, label, kept)
    assert check == {
        "a": {"defective": 3, "partly_outside": 1, "wholly_outside": 1, "mostly_outside": 2,
              "mask_pixels_kept": pytest.approx(1.25 / 3)},
        "b": {"defective": 2, "partly_outside": 0, "wholly_outside": 0, "mostly_outside": 0, "mask_pixels_kept": 1.0},
    }
    with pytest.warns(UserWarning, match=r"a: 1 partly, 1 wholly outside of 3 defective.*method.crop=null"):
        warn_if_cropped(check)
    assert warn_if_cropped({"b": check["b"]}) is None


def test_crop_check_warns_only_when_a_defect_is_mostly_cut(caplog):
    """A defect trimmed at its edge (>= half of its pixels kept) is an INFO line, not a warning;
    one image keeping less than half of its defect is a warning."""
    import logging
    import warnings

    trimmed = crop_check(np.array(["a", "a"]), np.array([1, 1]), np.array([1.0, 0.9]))
    assert trimmed["a"]["partly_outside"] == 1 and trimmed["a"]["mostly_outside"] == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="iad_lightning.data.crop_check"):
            assert "a: 1 partly" in warn_if_cropped(trimmed)
    assert "crop check" in caplog.text
    mostly = crop_check(np.array(["a", "a"]), np.array([1, 1]), np.array([1.0, 0.4]))
    assert mostly["a"]["mostly_outside"] == 1 and mostly["a"]["wholly_outside"] == 0
    with pytest.warns(UserWarning, match="a: 1 partly, 0 wholly"):
        warn_if_cropped(mostly)


def test_datamodule_center_crop_false_serves_whole_images(tmp_path):
    root = fx.make_folder(tmp_path / "parts")
    items = {}
    for center_crop in (True, False):
        dm = AnomalyDataModule(format="folder", root=str(root), batch_size=2, center_crop=center_crop,
                               options={"normal_test_dir": "good_test", "mask_dir": "masks"})
        dm.preprocess = Preprocess(resize=32, crop=24)
        test = dm.dataset("test")
        items[center_crop] = [test[i] for i in range(len(test))]
        assert dm.dataset("fit")[0]["image"].shape[-2:] == ((24, 24) if center_crop else (32, 32))
    cut = [it["mask_kept"] for it in items[True] if it["label"] == 1]
    assert min(cut) < 1.0  # fixture defects reach the image border (x 26..32)
    assert all(it["mask_kept"] == 1.0 and it["mask"].shape[-2:] == (32, 32) for it in items[False])
