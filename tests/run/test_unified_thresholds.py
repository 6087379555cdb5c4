"""Unified mode through the entry points: a PatchCore fit on two categories cross-fits an
out-of-sample score for every train image, calibrates one threshold per category from that
category's own images (checkpoint entry, export metadata), draws the calibration plot, and
predict.py / iad_lightning.load(...).predict use each file's category (given or read from the
folder layout), falling back to the global threshold. The final bank is bit-equal to a fit
without cross-fitting."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import iad_lightning
from iad_lightning.calibration import CALIBRATION_KEY
from iad_lightning.errors import ConfigError

from .test_entrypoints import TINY, fx, run

CATS = ("bottle", "cable")
N_TRAIN = 6


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unified")
    for c, cat in enumerate(CATS):
        d = root / cat
        for i in range(N_TRAIN):
            fx.save_image(d / "train" / "good" / f"{i:03d}.png", 100 * c + i)
        for i in range(2):
            fx.save_image(d / "test" / "good" / f"{i:03d}.png", 100 * c + 50 + i)
            fx.save_image(d / "test" / "crack" / f"{i:03d}.png", 100 * c + 60 + i, shape=i)
            fx.save_mask(d / "ground_truth" / "crack" / f"{i:03d}_mask.png", i)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> Path:
    out = tmp_path_factory.mktemp("run")
    run("train.py", "data=mvtec", f"data.root={data_root}", "data.category=[bottle,cable]", *TINY,
        "threshold.folds=3", "threshold.normal_fpr=0.2", "logger=none", f"hydra.run.dir={out}")
    return out


def test_cross_fitted_per_category_thresholds_and_the_bank_of_a_fit_on_all_images(trained, data_root, tmp_path):
    res = json.loads((trained / "results.json").read_text())["calibrated"]
    thr = res["thresholds"]
    assert thr["source"] == "cross-fitted (3 folds)" and thr["normal_images"] == 2 * N_TRAIN  # every train image
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    info = ckpt[CALIBRATION_KEY]
    for cat in CATS:
        c = info["categories"][cat]
        assert len(c["scores"]) == N_TRAIN and c["image"]["normal_values"] == N_TRAIN  # its own images only
        assert thr["categories"][cat]["image_threshold"] == c["image_threshold"] and "scores" not in thr["categories"][cat]
        assert (trained / "plots" / f"{cat}_calibration.png").is_file()
    # the final bank: a fit on every train image, bit-equal to one without cross-fitting (no held-out split)
    plain = tmp_path / "plain"
    run("train.py", "data=mvtec", f"data.root={data_root}", "data.category=[bottle,cable]", *TINY,
        "threshold.folds=0", "threshold.holdout_fraction=0", "test=false", "logger=none", f"hydra.run.dir={plain}")
    bank = torch.load(plain / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert torch.equal(bank["model.memory_bank"], ckpt["state_dict"]["model.memory_bank"])
    # threshold.leave_one_out=true: one coreset, every train image scored against it without its
    # own rows (tests/methods/test_crossfit.py checks the scores by brute force); the same bank
    loo = tmp_path / "loo"
    run("train.py", "data=mvtec", f"data.root={data_root}", "data.category=[bottle,cable]", *TINY,
        "threshold.leave_one_out=true", "test=false", "logger=none", f"hydra.run.dir={loo}")
    loo_ckpt = torch.load(loo / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert torch.equal(loo_ckpt["state_dict"]["model.memory_bank"], ckpt["state_dict"]["model.memory_bank"])
    loo_info = loo_ckpt[CALIBRATION_KEY]
    assert loo_info["source"].startswith("leave-one-image-out") and loo_info["normal_images"] == 2 * N_TRAIN
    assert all(len(loo_info["categories"][cat]["scores"]) == N_TRAIN for cat in CATS)


def test_predict_uses_each_files_category(trained, data_root, tmp_path):
    ckpt = trained / "checkpoints" / "last.ckpt"
    model = iad_lightning.load(ckpt, device="cpu")
    info = torch.load(ckpt, map_location="cpu", weights_only=True)[CALIBRATION_KEY]
    assert model.categories == list(CATS)
    files = sorted(str(p) for p in data_root.glob("*/test/*/*.png"))
    cats = [Path(f).parts[-4] for f in files]
    out = model.predict(files, category=cats)
    for f, cat, score, decision in zip(files, cats, out.scores, out.decisions):
        t = info["categories"][cat]["image_threshold"]
        assert decision == ("anomalous" if score > t else "normal"), (f, score, t)
    glob = model.predict(files)  # no category: the global threshold
    t = float(torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]["image_threshold"])
    assert glob.decisions == ["anomalous" if s > t else "normal" for s in glob.scores]
    with pytest.raises(ConfigError, match="category='screw' has no calibrated thresholds.*known: bottle, cable"):
        model.predict(files[:1], category="screw")
    # predict.py reads the category from the folder layout, and prints decisions per category
    proc = run("predict.py", f"ckpt_path={ckpt}", f"input={data_root}", "save_maps=none", "overlays=false",
               f"hydra.run.dir={tmp_path / 'pred'}")
    with open(tmp_path / "pred" / "predictions.csv", newline="") as fh:
        rows = {r["path"]: r for r in csv.DictReader(fh)}
    for f, cat, decision, score in zip(files, cats, out.decisions, out.scores):
        assert rows[f]["category"] == cat and rows[f]["decision"] == decision
        assert float(rows[f]["score"]) == pytest.approx(float(score), rel=1e-5)
    train_rows = [r for p, r in rows.items() if "/train/" in p]
    assert len(train_rows) == 2 * N_TRAIN and {r["category"] for r in train_rows} == set(CATS)
    for cat in CATS:
        assert f"  {cat}: " in proc.stdout and f"(image threshold {info['categories'][cat]['image_threshold']:.6g})" in proc.stdout
    # category= overrides the layout; the export metadata carries the same per-category thresholds
    from omegaconf import OmegaConf

    from iad_lightning.predict import predict

    summary = predict(OmegaConf.create({"ckpt_path": str(ckpt), "input": str(data_root / "bottle" / "test"),
                                        "category": "cable", "save_maps": "none", "overlays": False,
                                        "device": "cpu", "output_dir": str(tmp_path / "pred2")}))
    assert list(summary["categories"]) == ["cable"] and summary["files"] == 4
    from iad_lightning.checkpoint import load_method
    from iad_lightning.export import export_metadata

    meta = json.loads(export_metadata(load_method(ckpt))["iad_thresholds"])
    for cat in CATS:
        assert meta["categories"][cat]["image_threshold"] == pytest.approx(info["categories"][cat]["image_threshold"])
    assert np.isfinite(meta["image_threshold"])
