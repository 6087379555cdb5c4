"""One preprocessing per fitted model: test.py, predict.py (checkpoint, ONNX, TorchScript) and
iad_lightning.load score every file alike on a folder set whose defects lie outside the centre crop.

The set is narrow tiles (40 x 96, like Kolektor's commutators) with defects at the top border. PatchCore
(Lite0) proposes resize 64 / crop 48, which keeps only the middle third of a tile's height; ``data=folder``
fits and tests without the crop (``data.center_crop: false``, a 64 x 64 square), and that is what the
model must carry into every other use. Before models carried it, predict.py and the ONNX export applied
the crop: other scores, and every normal image was flagged.
"""

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import iad_lightning
from iad_lightning.data.geometry import PREPROCESS_KEY, preprocess_from_dict
from iad_lightning.data.transforms import Preprocess, without_crop

from .test_entrypoints import REPO, TINY

W, H = 40, 96
GEOMETRY = ["method.resize=64", "method.crop=48"]
OVERRIDES = [o for o in TINY if not o.startswith(("method.crop=", "method.resize=", "callbacks."))] + GEOMETRY
FOLDER = ["data=folder", "+data.options.normal_test_dir=good_test", "+data.options.mask_dir=masks",
          "data.num_workers=0", "callbacks.visualizer=null", "callbacks.plots=null", "logger=none",
          "+trainer.enable_progress_bar=false"]


def _entry(task: str, overrides: list[str], out: Path) -> dict:
    """What train.py / test.py run, in-process: the Hydra-composed config into ``run.train`` /
    ``run.test``; the composed config is saved as Hydra saves it (``<run>/.hydra/config.yaml``)."""
    from hydra import compose, initialize_config_dir

    from iad_lightning import run

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(task, overrides=[*overrides, f"paths.output_dir={out}"])
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")
    return getattr(run, task)(cfg)


def _tile(seed: int, defect: bool) -> tuple[Image.Image, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 6 * np.pi, H)[:, None]
    arr = 120 + 30 * np.sin(y + rng.uniform(0, 0.3)) + rng.normal(0, 4, (H, W))  # striped, like a commutator
    mask = np.zeros((H, W), bool)
    if defect:  # at the top border: rows 2-11, far outside the crop (rows ~34-62 of 96)
        x0 = int(rng.integers(4, W - 14))
        mask[2:12, x0:x0 + 10] = True
        arr[mask] = 250
    rgb = np.repeat(np.clip(arr, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return Image.fromarray(rgb), mask


@pytest.fixture(scope="module")
def widget(tmp_path_factory) -> Path:
    """<root>/good (8 train), good_test (4 normal test), crack (3, masks in masks/crack)."""
    root = tmp_path_factory.mktemp("widget") / "widget"
    for folder, n, seed, defect in (("good", 8, 0, False), ("good_test", 4, 100, False), ("crack", 3, 200, True)):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            image, mask = _tile(seed + i, defect)
            image.save(root / folder / f"{i:03d}.png")
            if defect:
                (root / "masks" / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, widget) -> Path:
    out = tmp_path_factory.mktemp("run")
    _entry("train", [*FOLDER, f"data.root={widget}", *OVERRIDES, "threshold.holdout_fraction=0.25", "test=false"], out)
    return out / "checkpoints" / "last.ckpt"


def _csv(path: Path) -> dict[str, dict]:
    with open(path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def _predict(model: Path, widget: Path, out: Path) -> dict[str, dict]:
    from iad_lightning.predict import predict  # what predict.py runs

    predict(OmegaConf.create({"ckpt_path": str(model), "input": str(widget), "device": "cpu", "batch_size": 4,
                              "save_maps": "none", "overlays": False, "resume": False, "output_dir": str(out)}))
    return _csv(out / "predictions.csv")


@pytest.mark.filterwarnings("ignore:.*torch.jit.load.*:FutureWarning")
def test_test_predict_and_exports_give_every_file_the_same_score(fitted, widget, tmp_path):
    pytest.importorskip("onnxruntime")
    from iad_lightning.export import main as export_main

    stored = preprocess_from_dict(torch.load(fitted, map_location="cpu", weights_only=True)[PREPROCESS_KEY])
    method = Preprocess(resize=64, crop=48, mean=stored.mean, std=stored.std, resize_backend=stored.resize_backend)
    assert stored == without_crop(method) and stored.crop is None  # the fit's geometry, not the method's
    test_out = tmp_path / "test"
    _entry("test", [f"ckpt_path={fitted}", *FOLDER, f"data.root={widget}", "data.batch_size=4",
                    "trainer.accelerator=cpu"], test_out)
    results = json.loads((test_out / "results.json").read_text())
    assert preprocess_from_dict(results["preprocess"]) == stored
    tested = _csv(test_out / "scores.csv")
    normals = [p for p, r in tested.items() if r["label"] == "0"]
    assert len(tested) == 7 and len(normals) == 4
    assert results["crop_check"]["widget"]["wholly_outside"] == 0  # no crop: every defect is seen
    threshold = results["calibrated"]["thresholds"]["image_threshold"]
    rate = results["calibrated"]["categories"]["widget"]["image_fpr"]
    assert rate == np.mean([float(tested[p]["score"]) > threshold for p in normals])

    onnx_path, ts_path = tmp_path / "model.onnx", tmp_path / "model.pt"
    for fmt, path in (("onnx", onnx_path), ("torchscript", ts_path)):
        assert export_main([f"ckpt_path={fitted}", f"format={fmt}", f"output={path}", "dynamic_batch=true"]) == 0
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(meta[PREPROCESS_KEY])["crop"] is None and preprocess_from_dict(json.loads(meta[PREPROCESS_KEY])) == stored
    for model in (fitted, onnx_path, ts_path):
        rows = _predict(model, widget, tmp_path / model.suffix.strip("."))
        assert iad_lightning.load(model, device="cpu").preprocess == stored
        for path, ref in tested.items():  # every test file: the same score and decision as test.py
            got = rows[path]
            assert float(got["score"]) == pytest.approx(float(ref["score"]), rel=1e-5), (model.name, path)
            assert got["decision"] == ("anomalous" if float(ref["score"]) > threshold else "normal")
        assert np.mean([rows[p]["decision"] == "anomalous" for p in normals]) == rate  # the same false-alarm rate
        train = [r for p, r in rows.items() if "/good/" in p]
        assert len(train) == 8 and all(float(r["score"]) <= threshold for r in train)  # train normals: normal


def test_an_old_checkpoint_keeps_working(fitted, widget, tmp_path):
    """Written before models stored their preprocessing (no iad_preprocess entry): the method's
    geometry, without its crop when the run's saved Hydra config says data.center_crop: false."""
    ckpt = torch.load(fitted, map_location="cpu", weights_only=True)
    del ckpt[PREPROCESS_KEY]
    old = fitted.with_name("old.ckpt")  # beside last.ckpt: the run's .hydra/config.yaml is found
    torch.save(ckpt, old)
    files = sorted((widget / "crack").glob("*.png")) + sorted((widget / "good_test").glob("*.png"))
    with warnings.catch_warnings():  # a new checkpoint loads silently
        warnings.simplefilter("error")
        new = iad_lightning.load(fitted, device="cpu")
    scores = new.predict(files).scores
    with pytest.warns(UserWarning, match=r"stores no preprocessing.*resize 64x64, no crop.*data.center_crop=false"):
        beside = iad_lightning.load(old, device="cpu")
    assert beside.preprocess == new.preprocess
    np.testing.assert_array_equal(beside.predict(files).scores, scores)
    bare = tmp_path / "old.ckpt"  # alone: today's behaviour, the method's own crop, and a warning
    shutil.copy(old, bare)
    with pytest.warns(UserWarning, match=r"stores no preprocessing.*centre crop 48.*\.hydra/config\.yaml"):
        alone = iad_lightning.load(bare, device="cpu")
    assert alone.preprocess.crop == 48 and alone.preprocess.resize == 64
    assert not np.allclose(alone.predict(files).scores, scores, rtol=1e-3)  # why the geometry must travel
