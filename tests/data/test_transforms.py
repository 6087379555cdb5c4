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


# -- AnomalyCLIP's official preprocessing (utils.get_transform, dataset.py): generic Preprocess fields
def _official_clip_image(path, size):
    """Official: Image.open, Resize((S, S), bicubic), CenterCrop(S), convert("RGB"), ToTensor, Normalize."""
    tf = T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                    lambda im: im.convert("RGB"), T.ToTensor(), T.Normalize(MEAN, STD)])
    return tf(Image.open(path))


def _official_clip_mask(mask_path, size):
    """Official: (L > 0) as a 0/255 image, Resize((S, S)) (Pillow bilinear), CenterCrop, ToTensor, > 0.5."""
    m = np.array(Image.open(mask_path).convert("L")) > 0
    t = T.Compose([T.Resize((size, size)), T.CenterCrop(size), T.ToTensor()])(Image.fromarray(m.astype(np.uint8) * 255))
    return (t > 0.5).float()


def _odd_images(tmp_path):
    rng = np.random.default_rng(3)
    out = []
    rgb = Image.fromarray(rng.integers(0, 256, (61, 97, 3), dtype=np.uint8))
    out.append(("rgb", rgb))
    grey = Image.fromarray(rng.integers(0, 256, (83, 45), dtype=np.uint8))
    out.append(("grey", grey))
    pal = Image.fromarray(rng.integers(0, 256, (57, 71, 3), dtype=np.uint8)).quantize(16)
    out.append(("palette", pal))
    pal_t = pal.copy()
    pal_t.info["transparency"] = 3
    out.append(("palette_transparent", pal_t))
    rgba = Image.fromarray(rng.integers(0, 256, (40, 53, 4), dtype=np.uint8), mode="RGBA")
    out.append(("rgba", rgba))
    files = []
    for name, im in out:
        path = tmp_path / f"{name}.png"
        im.save(path)
        mask = np.zeros((im.size[1], im.size[0]), np.uint8)
        mask[5:17, 7:30] = 255
        mask[30:31, 3:40] = 255  # one-pixel line: bilinear + > 0.5 decides it
        mask_path = tmp_path / f"{name}_mask.png"
        Image.fromarray(mask).save(mask_path)
        files.append((path, mask_path))
    return files


CLIP_PRE = dict(crop=None, mean=MEAN, std=STD, resize_backend="pil", interpolation="bicubic", rgb_after_resize=True,
                mask_interpolation="bilinear")


@pytest.mark.parametrize("size", [518, 40])
def test_anomalyclip_official_preprocessing_matches_torchvision_pillow_exactly(tmp_path, size):
    from iad_lightning.data.dataset import AnomalyDataset
    from iad_lightning.data.records import Record

    files = _odd_images(tmp_path)
    recs = [Record(image=str(p), label=1, category="c", split="test", masks=(str(m),)) for p, m in files]
    data = AnomalyDataset(recs, Preprocess(resize=(size, size), **CLIP_PRE))
    for i, (path, mask_path) in enumerate(files):
        item = data[i]
        assert torch.equal(item["image"], _official_clip_image(path, size)), path.name
        assert torch.equal(item["mask"], _official_clip_mask(mask_path, size)), path.name


def test_rgb_after_resize_matters_for_palette_and_rgba_only(tmp_path):
    from iad_lightning.data.io import load_image, load_image_8bit

    before = PairTransform(Preprocess(resize=(33, 33), crop=None, mean=MEAN, std=STD, resize_backend="pil",
                                      interpolation="bicubic"))
    after = PairTransform(Preprocess(resize=(33, 33), **{**CLIP_PRE, "mask_interpolation": "nearest"}))
    for path, _ in _odd_images(tmp_path):
        raw = load_image_8bit(path)
        mask = np.zeros((raw.size[1], raw.size[0]), bool)
        same = torch.equal(before(load_image(path), mask)[0], after(raw, mask)[0])
        assert same == (path.stem in ("rgb", "grey")), path.name  # P: indices resized nearest; RGBA premultiplied


def test_bicubic_tensor_backend_and_bad_fields():
    img, mask = _image_and_mask()
    x, m = PairTransform(Preprocess(resize=(48, 48), crop=None, mean=MEAN, std=STD, interpolation="bicubic",
                                    mask_interpolation="bilinear"))(img, mask)
    t = T.functional.resize(T.functional.to_tensor(img), [48, 48], interpolation=T.InterpolationMode.BICUBIC,
                            antialias=True)
    assert torch.allclose(x, T.functional.normalize(t, MEAN, STD))
    mt = T.functional.resize(torch.from_numpy(mask.astype(np.float32) * 255)[None], [48, 48], antialias=True) > 127.5
    assert torch.equal(m, mt.float())
    with pytest.raises(ConfigError, match="interpolation='nearest'"):
        Preprocess(interpolation="nearest")
    with pytest.raises(ConfigError, match="rgb_after_resize"):
        Preprocess(rgb_after_resize=True, resize_backend="tensor")
    with pytest.raises(ConfigError, match="mask_interpolation"):
        Preprocess(mask_interpolation="bicubic")
