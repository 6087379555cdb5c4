"""train.py / test.py through Hydra with tiny overrides, as a user runs them."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iad_lightning.metrics import METRIC_KEYS

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parents[1] / "data"
sys.path.insert(0, str(FIXTURES.parent))
from data import fixtures as fx  # noqa: E402


def run(script: str, *overrides: str, cwd: Path = REPO, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / script), *overrides]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


TINY = [
    "backbone=lite0",
    "method.crop=64",
    "method.resize=64",
    "method.coreset_ratio=0.25",
    "method.target_embed_dimension=128",
    "method.pretrain_embed_dimension=128",
    "data.batch_size=4",
    "data.num_workers=0",
    "trainer.accelerator=cpu",
    "callbacks.visualizer.n_images=2",
]


@pytest.fixture(scope="module")
def mvtec_root(tmp_path_factory) -> Path:
    return fx.make_mvtec(tmp_path_factory.mktemp("mv"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory, mvtec_root) -> Path:
    out = tmp_path_factory.mktemp("run")
    run("train.py", "data=mvtec", f"data.root={mvtec_root}", *TINY, f"hydra.run.dir={out}")
    return out


def test_train_writes_results_checkpoint_and_overlays(trained):
    res = json.loads((trained / "results.json").read_text())
    assert set(res) == {"categories", "mean", "crop_check", "calibrated", "preprocess"}  # calibrated: metrics at the thresholds
    assert list(res["categories"]) == ["bottle", "cable"]
    # resize 64 = crop 64 on square images: nothing is cut (tests/data/test_crop_check.py cuts)
    assert {c: (v["partly_outside"], v["wholly_outside"]) for c, v in res["crop_check"].items()} == {
        "bottle": (0, 0), "cable": (0, 0)}
    assert all(v["defective"] > 0 and v["mask_pixels_kept"] == 1.0 for v in res["crop_check"].values())
    for metrics in [*res["categories"].values(), res["mean"]]:
        assert set(metrics) == set(METRIC_KEYS)
        assert all(v is None or 0.0 <= v <= 1.0 for v in metrics.values())
    assert res["mean"]["image_auroc"] is not None and res["mean"]["pixel_aupro"] is not None
    assert "| **mean** |" in (trained / "results.md").read_text()
    assert (trained / "checkpoints" / "last.ckpt").is_file()
    assert sorted(p.name for p in (trained / "images").glob("*_grid.png")) == ["bottle_grid.png", "cable_grid.png"]
    assert (trained / "csv" / "metrics.csv").read_text().count("test/mean/image_auroc") == 1
    plots = sorted(p.name for p in (trained / "plots").glob("*.png"))  # ROC, PRO, calibration per category, bars
    assert plots == ["bottle_calibration.png", "bottle_pro.png", "bottle_roc.png", "cable_calibration.png",
                     "cable_pro.png", "cable_roc.png", "metrics.png"]


def test_checkpoint_is_safe_and_test_py_reproduces_without_refit(trained, mvtec_root, tmp_path):
    ckpt = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    bank = ckpt["state_dict"]["model.memory_bank"]
    assert bank.ndim == 2 and bank.shape[1] == 128 and bank.shape[0] > 0
    out = tmp_path / "test"
    proc = run(
        "test.py",
        f"ckpt_path={trained / 'checkpoints' / 'last.ckpt'}",
        "data=mvtec",
        f"data.root={mvtec_root}",
        "data.batch_size=4",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={out}",
    )
    assert "PatchCore:" not in proc.stdout  # nothing re-fitted
    assert json.loads((out / "results.json").read_text()) == json.loads((trained / "results.json").read_text())


def test_bad_input_fails_clearly_without_results(tmp_path, mvtec_root):
    out = tmp_path / "bad"
    proc = run("train.py", "data=mvtec", f"data.root={tmp_path / 'nowhere'}", *TINY, f"hydra.run.dir={out}", check=False)
    assert proc.returncode != 0 and "nowhere" in proc.stderr and "data.root" in proc.stderr
    assert not (out / "results.json").exists()
    proc = run("train.py", "data=mvtec", f"data.root={mvtec_root}", "data.category=zipper", *TINY,
               f"hydra.run.dir={out}", check=False)
    assert proc.returncode != 0 and "zipper" in proc.stderr and "available" in proc.stderr
    assert not (out / "results.json").exists()


def test_ddp_two_processes_equal_single_process(trained, mvtec_root, tmp_path):
    """2 CPU processes (gloo): sharded embedding, gathered bank and predictions = 1 process."""
    out = tmp_path / "ddp"
    run("train.py", "data=mvtec", f"data.root={mvtec_root}", *TINY, "trainer=ddp", "trainer.devices=2",
        f"hydra.run.dir={out}")
    single = torch.load(trained / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    ddp = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    bank_1, bank_2 = single["state_dict"]["model.memory_bank"], ddp["state_dict"]["model.memory_bank"]
    assert bank_1.shape == bank_2.shape
    # same rows in the same order; values agree to float32 rounding (per-rank batches differ, and
    # the CPU convolution kernels round differently for different batch compositions)
    torch.testing.assert_close(bank_2, bank_1, rtol=1e-4, atol=5e-5)
    res_1 = json.loads((trained / "results.json").read_text())
    res_2 = json.loads((out / "results.json").read_text())
    for cat in res_1["categories"]:
        for key, value in res_1["categories"][cat].items():
            # metrics of maps equal up to that float32 rounding: near-tied pixels may swap
            assert res_2["categories"][cat][key] == pytest.approx(value, abs=5e-5), (cat, key)
    # cross-fitting (threshold.folds=5, the default) under DDP: each rank scores its shard of every
    # fold against the fold bank; the gathered out-of-sample scores cover every train image once and
    # equal the single process's, so the thresholds do too
    cal_1, cal_2 = single["iad_calibration"], ddp["iad_calibration"]
    assert cal_1["source"] == cal_2["source"] == "cross-fitted (5 folds)"
    assert cal_2["normal_images"] == cal_1["normal_images"] == sum(
        len(list((mvtec_root / cat / "train" / "good").iterdir())) for cat in res_1["categories"])
    for cat in res_1["categories"]:
        s_1, s_2 = (torch.as_tensor(c["categories"][cat]["scores"]) for c in (cal_1, cal_2))
        assert s_1.numel() == s_2.numel() == len(list((mvtec_root / cat / "train" / "good").iterdir()))
        torch.testing.assert_close(s_2, s_1, rtol=1e-4, atol=5e-3)  # same image order (dataset index)
        for key in ("image_threshold", "pixel_threshold"):
            assert cal_2["categories"][cat][key] == pytest.approx(cal_1["categories"][cat][key], rel=1e-4), (cat, key)
    assert res_2["calibrated"]["thresholds"]["image_threshold"] == pytest.approx(
        res_1["calibrated"]["thresholds"]["image_threshold"], rel=1e-4)
    # threshold.leave_one_out=true under DDP: each rank scores its images against the gathered final
    # bank without their own rows; the same scores as one process
    loo = {}
    for name, extra in (("one", []), ("two", ["trainer=ddp", "trainer.devices=2"])):
        run("train.py", "data=mvtec", f"data.root={mvtec_root}", *TINY, *extra, "threshold.leave_one_out=true",
            "test=false", "logger=none", f"hydra.run.dir={tmp_path / name}")
        loo[name] = torch.load(tmp_path / name / "checkpoints" / "last.ckpt", map_location="cpu",
                               weights_only=True)["iad_calibration"]
    assert loo["two"]["source"].startswith("leave-one-image-out")
    assert loo["two"]["normal_images"] == loo["one"]["normal_images"] == cal_1["normal_images"]
    for cat in res_1["categories"]:
        torch.testing.assert_close(torch.as_tensor(loo["two"]["categories"][cat]["scores"]),
                                   torch.as_tensor(loo["one"]["categories"][cat]["scores"]), rtol=1e-4, atol=5e-3)


def test_multirun_category_sweep_in_parallel_and_report(mvtec_root, tmp_path):
    """hydra/launcher=parallel: the 2 jobs run at once in 2 worker processes, one device slot each."""
    sweep = tmp_path / "sweep"
    run("train.py", "-m", "data=mvtec", f"data.root={mvtec_root}", "data.category=bottle,cable",
        *[o for o in TINY if not o.startswith("callbacks.")], "logger=none", "callbacks=none", f"hydra.sweep.dir={sweep}",
        "hydra/launcher=parallel", "hydra.launcher.devices=[3,5]")  # ids only pin CUDA_VISIBLE_DEVICES
    assert sorted(p.parent.name for p in sweep.glob("*/results.json")) == ["0", "1"]
    jobs = []
    for job in ("0", "1"):
        lines = [line for line in (sweep / job / "train.log").read_text().splitlines() if "parallel launcher" in line]
        start = re.search(r"pid (\d+), device slot (\d) \(CUDA_VISIBLE_DEVICES=(\d)\), start ([\d.]+)", lines[0])
        end = re.search(r"pid (\d+), end ([\d.]+)", lines[-1])
        jobs.append((int(start[1]), start[3], float(start[4]), float(end[2])))
    (pid_0, dev_0, start_0, end_0), (pid_1, dev_1, start_1, end_1) = jobs
    assert pid_0 != pid_1 and {dev_0, dev_1} == {"3", "5"}  # own process, own device
    assert start_0 < end_1 and start_1 < end_0  # the two jobs overlapped in time
    proc = subprocess.run([sys.executable, "-m", "iad_lightning.report", str(sweep)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = (sweep / "report.md").read_text()
    rows = [line.split(" | ")[0] for line in table.splitlines()[2:]]
    assert rows == ["| bottle", "| cable", "| **mean**"]
    assert table.splitlines()[0].count("I-AUROC") == 1  # one column group for the sweep


@pytest.mark.parametrize("damage", ["corrupt_image", "mask_wrong_size", "empty_category"])
def test_bad_files_fail_naming_the_path(tmp_path, damage):
    from PIL import Image

    root = fx.make_mvtec(tmp_path / "mv", ("bottle",))
    if damage == "corrupt_image":
        bad = root / "bottle" / "test" / "crack" / "001.png"
        bad.write_bytes(bad.read_bytes()[:60])  # truncated PNG
    elif damage == "mask_wrong_size":
        bad = root / "bottle" / "ground_truth" / "crack" / "000_mask.png"
        Image.new("L", (16, 16)).save(bad)
    else:
        for f in (root / "bottle" / "train" / "good").iterdir():
            f.unlink()
        bad = root / "bottle"  # the error names the category folder
    out = tmp_path / "out"
    proc = run("train.py", "data=mvtec", f"data.root={root}", *TINY, f"hydra.run.dir={out}", check=False)
    assert proc.returncode != 0
    assert str(bad) in proc.stderr, proc.stderr[-2000:]
    assert not (out / "results.json").exists() and not (out / "results.md").exists()
