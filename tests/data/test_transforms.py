"""Preprocess resize backends: `pil` is the official PIL pipeline bit for bit, `tensor` resizes the
float tensor; masks are the same nearest-neighbour geometry under both."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from iad_lightning.data.transforms import PairTransform, Preprocess
from iad_lightning.errors import ConfigError

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# (resize, crop): PatchCore's shorter side + centre crop (down), EfficientAD/UniAD's exact size (down, up)
GEOMETRIES = [(64, 56), ((48, 48), None), ((160, 160), None)]


def _image_and_mask():
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8))
    mask = np.zeros((90, 120), bool)
    mask[20:50, 30:70] = True
    mask[60:63, 90:91] = True  # a thin defect
    return img, mask


def _pair(resize, crop, backend, mean=MEAN, std=STD):
    return PairTransform(Preprocess(resize=resize, crop=crop, mean=mean, std=std, resize_backend=backend))


@pytest.mark.parametrize("resize, crop", GEOMETRIES)
def test_pil_backend_equals_the_official_pil_pipeline_exactly(resize, crop):
    # official PatchCore / EfficientAD / UniAD: transforms.Resize on the PIL image, (CenterCrop),
    # ToTensor, Normalize
    img, mask = _image_and_mask()
    size = resize if isinstance(resize, int) else list(resize)
    official = T.Compose([T.Resize(size), *([T.CenterCrop(crop)] if crop else []), T.ToTensor(), T.Normalize(MEAN, STD)])
    x, _ = _pair(resize, crop, "pil")(img, mask)
    assert torch.equal(x, official(img))


@pytest.mark.parametrize("resize, crop", GEOMETRIES)
def test_backends_differ_by_under_one_grey_level_and_share_the_mask(resize, crop):
    img, mask = _image_and_mask()
    xp, mp = _pair(resize, crop, "pil", (0.0,) * 3, (1.0,) * 3)(img, mask)
    xt, mt = _pair(resize, crop, "tensor", (0.0,) * 3, (1.0,) * 3)(img, mask)
    diff = (xp - xt).abs().max().item()
    assert 0 < diff <= 1 / 255 + 1e-6  # Pillow rounds to 8 bits; the float path does not
    assert torch.equal(xp * 255, (xp * 255).round())  # the pil path is on the 8-bit grid
    assert torch.equal(mp, mt) and set(mp.unique().tolist()) == {0.0, 1.0}  # same nearest geometry
    # the mask stays on its region of the image: paint the mask into the image and resize both
    painted = Image.fromarray(np.where(mask[..., None], 255, 0).astype(np.uint8).repeat(3, 2))
    xi, mi = _pair(resize, crop, "pil", (0.0,) * 3, (1.0,) * 3)(painted, mask)
    inside = (xi[0] > 0.5).float()
    assert (inside != mi[0]).float().mean() < 0.02  # only boundary pixels may disagree


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ConfigError, match="resize_backend='cv2'"):
        Preprocess(resize_backend="cv2")
