"""Dinomaly's LightningModule: the recipe per dataset and setting (spec §10), the effective batch
split, the preprocessing geometry, and the official evaluation protocol option (spec §9)."""

import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from iad_lightning.data.transforms import PairTransform
from iad_lightning.errors import ConfigError
from iad_lightning.methods.dinomaly import Dinomaly, recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models"))
from test_dinomaly_model import tiny_model  # noqa: E402


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.mark.parametrize("fmt,category,expected", [
    ("mvtec", "all", ("unified", 10000, 0.2, 1e-10)),
    ("visa", ["candle", "pcb1"], ("unified", 10000, 0.2, 1e-10)),
    ("realiad", "all", ("unified", 50000, 0.4, 1e-10)),
    ("mvtec", "screw", ("per-class", 5000, 0.2, 1e-8)),
    ("mpdd", ["bracket_black"], ("per-class", 5000, 0.2, 1e-8)),
    ("realiad", "audiojack", ("per-class", 5000, 0.2, 1e-10)),
])
def test_recipe_per_dataset_and_setting(fmt, category, expected):
    r = recipe(fmt, category)
    assert (r["setting"], r["iterations"], r["bottleneck_dropout"], r["eps"]) == expected


def test_configure_data_splits_the_batch_and_applies_the_recipe(model):
    method = Dinomaly(model, image_size=56)
    dm = SimpleNamespace(batch_size=None, format="realiad", category="all")
    method.configure_data(dm, world_size=2)
    assert dm.batch_size == 8 and method.model.bottleneck[0].drop.p == 0.4 and method.recipe["eps"] == 1e-10
    with pytest.raises(ConfigError, match="not divisible"):
        method.configure_data(SimpleNamespace(batch_size=None, format="mvtec", category="all"), world_size=3)
    explicit = Dinomaly(model, image_size=56, eps=1e-9, bottleneck_dropout=0.1)
    explicit.configure_data(SimpleNamespace(batch_size=4, format="realiad", category="all"), world_size=1)
    assert explicit.recipe["eps"] == 1e-9 and model.bottleneck[0].drop.p == 0.1
    pre = Dinomaly(model, image_size=56).preprocess
    assert (pre.resize, pre.crop, pre.resize_backend, pre.output_size) == ((56, 56), 42, "pil", (42, 42))


def test_official_masks_are_pillow_bilinear_then_nearest_and_nonzero(model):
    method = Dinomaly(model, image_size=56, eval_protocol="official")
    mask = np.zeros((100, 100), dtype=bool)
    mask[30:47, 52:70] = True
    img = Image.fromarray(np.full((100, 100, 3), 128, dtype=np.uint8))
    _, grey = PairTransform(method.preprocess)(img, mask)
    # the official get_data_transforms on the mask image: Resize((56, 56)), CenterCrop(42), ToTensor
    official = T.Compose([T.Resize((56, 56)), T.CenterCrop(42), T.ToTensor()])(Image.fromarray(mask.astype(np.uint8) * 255))
    torch.testing.assert_close(grey, official)
    assert ((grey > 0) & (grey < 1)).any()  # grey edges
    maps = torch.rand(1, 1, 32, 32)
    out = {"anomaly_map": torch.rand(1, 1, 42, 42), "anomaly_map_native": maps}
    got_maps, got_masks = method.evaluation_targets(out, {"mask": grey[None]})
    torch.testing.assert_close(got_maps, maps[:, 0])
    want = torch.nn.functional.interpolate(grey[None], size=32, mode="nearest")[:, 0] > 0
    assert torch.equal(got_masks, want) and got_masks.sum() > (torch.nn.functional.interpolate(grey[None], size=32, mode="nearest") > 0.5).sum()
    ours = Dinomaly(model, image_size=56)
    _, binary = PairTransform(ours.preprocess)(img, mask)
    assert set(binary.unique().tolist()) <= {0.0, 1.0}
    m, k = ours.evaluation_targets(out, {"mask": binary[None]})
    assert m.shape == (1, 42, 42) and torch.equal(k, binary[None][:, 0] > 0.5)
    with pytest.raises(ConfigError, match="eval_protocol"):
        Dinomaly(model, eval_protocol="paper")
