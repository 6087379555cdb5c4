"""Calibrated thresholds (train.py / test.py), predict.py on messy folders, resume, and ONNX predict.

One tiny PatchCore run (module fixture) serves every test: one MVTec-layout category, 10 train
good images of which threshold.holdout_fraction=0.2 (2 images) are held out for calibration
(threshold.folds=0: the held-out path, not cross-fitting), so the requested image false-alarm rate
0.01 cannot be resolved and, too few for a tail fit, the threshold is the largest held-out score.
"""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

import iad_lightning
from iad_lightning.calibration import CALIBRATED_KEYS, Threshold, normal_threshold, set_thresholds
from iad_lightning.data.datamodule import AnomalyDataModule
from iad_lightning.data.geometry import preprocess_from_dict
from iad_lightning.metrics import METRIC_KEYS

from .test_entrypoints import REPO, TINY, fx, run

N_TRAIN = 10


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mvtec")
    d = root / "bottle"
    for i in range(N_TRAIN):
        fx.save_image(d / "train" / "good" / f"{i:03d}.png", i)
    for i in range(2):
        fx.save_image(d / "test" / "good" / f"{i:03d}.png", 50 + i)
        fx.save_image(d / "test" / "crack" / f"{i:03d}.png", 60 + i, shape=i)
        fx.save_mask(d / "ground_truth" / "crack" / f"{i:03d}_mask.png", i)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("run")
    proc = run("train.py", "data=mvtec", f"data.root={data_root}", *TINY, "threshold.holdout_fraction=0.2", "threshold.folds=0",
               "logger=none", f"hydra.run.dir={out}")
    return out, proc


def test_train_calibrates_on_held_out_normals_with_a_clamped_rate(trained, data_root, tmp_path):
    out, proc = trained
    assert "2 normal images cannot resolve a false-alarm rate of 0.01 (that needs >= 100)" in proc.stderr
    assert "the largest of the 2 scores" in proc.stderr and "hold out more normal images" in proc.stderr
    res = json.loads((out / "results.json").read_text())
    assert set(res["categories"]["bottle"]) == set(METRIC_KEYS) and set(res["mean"]) == set(METRIC_KEYS)
    cal = res["calibrated"]
    assert set(cal["categories"]["bottle"]) == set(CALIBRATED_KEYS) and set(cal["mean"]) == set(CALIBRATED_KEYS)
    assert all(v is not None and 0.0 <= v <= 1.0 for v in cal["categories"]["bottle"].values()), cal
    thr = cal["thresholds"]
    assert thr["normal_images"] == 2 and thr["image_normal_fpr"] == 0.01 and thr["source"].startswith("held-out")
    image, pixel = thr["global"]["image"], thr["global"]["pixel"]
    assert image["fpr_calibration"] == 0.0 and image["rule"] == "max" and image["determined_by"] == 1
    assert image["fpr_interval"] == [0.0, pytest.approx(1 - 0.025 ** 0.5)]  # Clopper-Pearson, 0 of 2
    assert pixel["normal_values"] == 2 * 64 * 64 and 0.0 < pixel["fpr_calibration"] <= 0.01
    # the thresholds are buffers of the checkpoint (weights_only) and equal the held-out maxima
    sd = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert float(sd["image_threshold"]) == pytest.approx(thr["image_threshold"])
    dm = AnomalyDataModule(format="mvtec", root=str(data_root), category="bottle", val_fraction=0.2)
    held_out = [r.image for r in dm.index_records()["val"]]
    assert len(held_out) == 2 and not set(held_out) & {r.image for r in dm.index_records()["train"]}
    model = iad_lightning.load(out / "checkpoints" / "last.ckpt", device="cpu")
    pred = model.predict(held_out)
    assert float(pred.scores.max()) == pytest.approx(thr["image_threshold"], rel=1e-5)
    assert pred.decisions == ["normal", "normal"]  # rate 0 on the held-out images
    assert float(np.quantile(pred.maps, 0.99)) == pytest.approx(thr["pixel_threshold"], rel=0.05)
    # test.py reports the same calibrated metrics from the checkpoint alone
    test_out = tmp_path / "test"
    run("test.py", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "data=mvtec", f"data.root={data_root}",
        "data.batch_size=4", "trainer.accelerator=cpu", "logger=none", "callbacks=none", f"hydra.run.dir={test_out}")
    assert json.loads((test_out / "results.json").read_text()) == res
    assert "I-FPR" in (test_out / "results.md").read_text()


def _messy_folder(root: Path, data_root: Path) -> dict[str, str]:
    """Good and defective images, their 16-bit / grayscale twins, and unreadable files."""
    src = data_root / "bottle" / "test"
    normal = np.asarray(Image.open(src / "good" / "000.png"))
    files = {}
    for name, path in (("good.png", src / "good" / "000.png"), ("crack.png", src / "crack" / "000.png")):
        (root / name).write_bytes(path.read_bytes())
        files[name] = "ok"
    grey = normal[..., 0]
    Image.fromarray(grey).save(root / "grey.png")  # 'L'
    Image.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(root / "grey_rgb.png")
    (root / "deep").mkdir()
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "deep" / "grey16.png")  # 'I;16'
    assert Image.open(root / "deep" / "grey16.png").mode in ("I;16", "I")
    files.update({"grey.png": "ok", "grey_rgb.png": "ok", "deep/grey16.png": "ok"})
    (root / "truncated.png").write_bytes((src / "good" / "001.png").read_bytes()[:80])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.txt").write_text("not an image\n")
    files.update({"truncated.png": "error", "empty.png": "error", "notes.txt": "error"})
    return files


def _rows(csv_path: Path) -> dict[str, dict]:
    with open(csv_path, newline="") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def test_predict_folder_with_messy_files(trained, data_root, tmp_path):
    folder = tmp_path / "line"
    folder.mkdir()
    files = _messy_folder(folder, data_root)
    out = tmp_path / "pred"
    proc = run("predict.py", f"ckpt_path={trained[0] / 'checkpoints' / 'last.ckpt'}", f"input={folder}",
               "device=cpu", "batch_size=3", "save_maps=both", f"hydra.run.dir={out}")
    rows = _rows(out / "predictions.csv")
    assert len(rows) == len(files)  # every file has a row, readable or not
    by_name = {str(Path(p).relative_to(folder.resolve())): r for p, r in rows.items()}
    for name, kind in files.items():
        row = by_name[name]
        if kind == "error":
            assert row["decision"] == "error" and "corrupt, truncated or not an image" in row["error"], row
            assert name in row["error"] and row["score"] == ""
        else:
            assert row["error"] == "" and row["decision"] in ("normal", "anomalous"), row
            assert 0.0 <= float(row["normalized_score"]) <= 1.0
            assert (out / row["map"]).is_file() and (out / f"maps/{name}.npy").is_file()
            assert (out / row["overlay"]).is_file()
    assert by_name["crack.png"]["decision"] == "anomalous"
    assert (float(by_name["crack.png"]["normalized_score"]) > 0.5) and float(by_name["crack.png"]["defect_fraction"]) > 0
    # grayscale and 16-bit inputs are converted as in training: the same score as their RGB twin
    ref = float(by_name["grey_rgb.png"]["score"])
    assert float(by_name["grey.png"]["score"]) == pytest.approx(ref, rel=1e-5)
    assert float(by_name["deep/grey16.png"]["score"]) == pytest.approx(ref, rel=1e-5)
    npy = np.load(out / "maps" / "crack.png.npy")
    assert npy.dtype == np.float32 and npy.shape == (64, 64)  # the method input resolution
    assert "error 3" in proc.stdout and "anomalous" in proc.stdout and "images/s" in proc.stdout


def test_predict_resume_skips_done_files(trained, data_root, tmp_path, capsys):
    from iad_lightning.predict import predict

    folder = tmp_path / "line"
    for i in range(4):
        fx.save_image(folder / f"{i}.png", 70 + i)
    cfg = OmegaConf.create({"ckpt_path": str(trained[0] / "checkpoints" / "last.ckpt"), "input": str(folder),
                            "device": "cpu", "batch_size": 2, "save_maps": "none", "overlays": False,
                            "resume": False, "output_dir": str(tmp_path / "out")})
    predict(cfg)  # the function predict.py runs
    csv_path = tmp_path / "out" / "predictions.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    assert len(lines) == 5
    csv_path.write_text("".join(lines[:3]) + lines[3][:12])  # killed mid-row: 2 rows and a half
    cfg.resume = True
    summary = predict(cfg)
    assert summary["files"] == 2 and "resume: 2 files already" in capsys.readouterr().out
    again = csv_path.read_text().splitlines(keepends=True)
    assert again[:3] == lines[:3] and sorted(again[3:]) == sorted(lines[3:])  # kept rows intact, no duplicates


def test_predict_without_ckpt_path_says_what_to_pass(tmp_path):
    proc = run("predict.py", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "ckpt_path=" in proc.stderr and "input=" in proc.stderr


def test_predict_with_an_exported_onnx_file(tmp_path):
    """EfficientAD (exportable on this branch) with thresholds: the ONNX file alone predicts as the checkpoint."""
    pytest.importorskip("onnxruntime")
    import onnx

    from iad_lightning.export import main as export_main
    from iad_lightning.inference import Predictor
    from iad_lightning.methods.efficientad import EfficientAD

    torch.manual_seed(0)
    cfg = {"_target_": "iad_lightning.methods.efficientad.EfficientAD", "_convert_": "all", "model_size": "small",
           "out_channels": 384, "image_size": 64}
    method = EfficientAD(**{k: v for k, v in cfg.items() if not k.startswith("_")})
    method.method_config = cfg
    folder = tmp_path / "line"
    for i in range(3):
        fx.save_image(folder / f"{i}.png", 80 + i, shape=None if i < 2 else 0)
    with torch.no_grad():
        images = torch.stack([Predictor(None, method.preprocess, {}, "x").to_tensor(Image.open(p).convert("RGB"))
                              for p in sorted(folder.iterdir())])
        amap, score = method.model(images)
    middle = float(score.median())  # one image above the threshold, two not
    set_thresholds(method, Threshold(middle, 1e-3, 0.0, 0.0, 3), normal_threshold(amap, 0.01, "pixel"))
    ckpt = {"state_dict": method.state_dict()}
    method.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "last.ckpt")
    onnx_path = tmp_path / "model.onnx"
    assert export_main([f"ckpt_path={tmp_path / 'last.ckpt'}", "format=onnx", f"output={onnx_path}"]) == 0
    meta = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    stored = json.loads(meta["iad_preprocess"])  # every Preprocess field (data/geometry.py), plain JSON
    assert {k: stored[k] for k in ("resize", "crop", "mean", "std", "resize_backend")} == {
        "resize": [64, 64], "crop": None, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
        "resize_backend": "pil"}
    assert preprocess_from_dict(stored) == method.preprocess
    assert json.loads(meta["iad_thresholds"])["image_threshold"] == pytest.approx(float(method.image_threshold))
    out = tmp_path / "pred"
    run("predict.py", f"ckpt_path={onnx_path}", f"input={folder}", "batch_size=2", f"hydra.run.dir={out}")
    rows = _rows(out / "predictions.csv")
    eager = iad_lightning.load(tmp_path / "last.ckpt", device="cpu").predict(sorted(folder.iterdir()))
    assert [r["decision"] for r in rows.values()] == eager.decisions
    assert sorted(eager.decisions) == ["anomalous", "normal", "normal"]
    np.testing.assert_allclose([float(r["score"]) for r in rows.values()], eager.scores, rtol=1e-4)
    # the ONNX path needs no training stack: predicting imports neither Lightning, timm nor faiss
    code = ("import sys, iad_lightning; p = iad_lightning.load(sys.argv[1], device='cpu'); p.predict(sys.argv[2]); "
            "sys.exit(sorted({'lightning', 'timm', 'faiss'} & set(sys.modules)) or 0)")
    proc = subprocess.run([sys.executable, "-c", code, str(onnx_path), str(folder / "0.png")], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
