"""EfficientAD end to end through train.py / test.py on the synthetic set, offline.

CPU budget (2 shared cores): one EfficientAD-S training step at 256 px costs seconds, so this test
runs at ``method.image_size=96`` (maps 16x16 unpadded) on one synthetic category. The teacher is
distilled by ``method=efficientad_teacher`` (Lite0 target) for a handful of steps on the
category's own train images (a deviation: the paper distils on ImageNet; offline there is none and
a few steps is all the budget allows, so this teacher is close to its random initialisation).
Budget: teacher ``TEACHER_STEPS`` steps, EfficientAD ``STEPS`` steps at ``LR``; everything else is
the paper's method, the ST and AE maps averaged included. The run is deterministic. Measured image
AUROC (pixel AUROC) on fabric at lr 3e-4: 150 steps 0.917 (0.772), 200 steps 0.944 (0.874), 250
steps 0.944 (0.868); the training run takes ~90 s here. With the epoch-seeded train order
(data/sampler.py, for exact resume) 200 steps measure 0.917 (0.846). At lr 1e-3 the figures jumped between
0.875 and 0.938 for 40-100 steps, hence the lower lr and more steps. If a change lowers the
AUROC, raise STEPS before touching the threshold. With the packages installed on 2026-12-07 (lightning
2.6.6, timm 1.0.31) 200 steps measured 0.875 on code that passed before (a docs-only tree), so STEPS
is 300, which passes.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_entrypoints import run

CATEGORY = "fabric"
SIZE = 96
TEACHER_SIZE = 64  # the distillation is a smoke run: cheapest size, the weights work at any size
TEACHER_STEPS = 2
STEPS = 300
LR = 3e-4  # 3x the paper's 1e-4: 300 steps instead of 70,000
COMMON = [f"data.category={CATEGORY}", "data.num_workers=0", "trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run("train.py", "method=efficientad_teacher", "data=synthetic", "backbone=lite0", *COMMON,
        f"method.num_steps={TEACHER_STEPS}", f"method.image_size={TEACHER_SIZE}", "method.norm_images=4",
        "data.batch_size=2", "logger=none", "callbacks=none", f"hydra.run.dir={out}")
    files = list(out.glob("teacher_*.pth"))
    assert len(files) == 1, list(out.iterdir())
    return files[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, teacher) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("ead")
    proc = run("train.py", "method=efficientad", "data=synthetic", *COMMON, f"method.teacher_weights={teacher}",
               f"method.image_size={SIZE}", f"method.num_steps={STEPS}", f"method.lr={LR}",
               "callbacks.visualizer.n_images=2", f"hydra.run.dir={out}")
    return out, proc.stdout + proc.stderr


def test_synthetic_run_reaches_auroc_and_warns_once_about_the_penalty(trained):
    out, log = trained
    res = json.loads((out / "results.json").read_text())
    assert res["categories"][CATEGORY]["image_auroc"] >= 0.9, res
    assert log.count("WITHOUT the ImageNet penalty") == 1  # one clear warning, not one per step
    assert "map quantiles from 2 validation images" in log  # val_fraction 0.1 of 16 train images


def test_checkpoint_holds_statistics_and_test_py_needs_no_teacher(trained, teacher, tmp_path):
    out, _ = trained
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    sd = ckpt["state_dict"]
    assert ckpt["global_step"] == STEPS  # steps, not epochs
    assert sd["model.teacher_mean"].shape == (1, 384, 1, 1) and float(sd["model.teacher_std"].min()) > 0
    assert float(sd["model.q_st_end"]) > float(sd["model.q_st_start"])  # fitted, not the defaults
    assert float(sd["model.q_ae_end"]) > float(sd["model.q_ae_start"])
    moved = tmp_path / "moved_teacher.pth"
    teacher.rename(moved)  # the teacher file is gone: test.py must not need it
    try:
        test_out = tmp_path / "test"
        run("test.py", f"ckpt_path={out / 'checkpoints' / 'last.ckpt'}", "data=synthetic", *COMMON,
            "data.batch_size=16", "callbacks.visualizer.n_images=0", f"hydra.run.dir={test_out}")
    finally:
        moved.rename(teacher)
    a = json.loads((out / "results.json").read_text())["categories"][CATEGORY]
    b = json.loads((test_out / "results.json").read_text())["categories"][CATEGORY]
    for key, value in a.items():
        assert b[key] == pytest.approx(value, abs=1e-6), key


def test_missing_teacher_says_both_ways_to_get_one(tmp_path):
    proc = run("train.py", "method=efficientad", "data=synthetic", *COMMON, "method.image_size=64",
               "method.num_steps=1", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode != 0
    assert "method.teacher_weights" in proc.stderr and "method=efficientad_teacher" in proc.stderr
    assert "teacher_small.pth" in proc.stderr and not (tmp_path / "results.json").exists()


def test_screw_bench_skips_cleanly_without_data(tmp_path):
    """bench/efficientad_screw.py (the real-data figures) exits 0 with a message when the data is absent."""
    import subprocess

    bench = Path(__file__).resolve().parents[2] / "bench" / "efficientad_screw.py"
    proc = subprocess.run([sys.executable, str(bench), "--data-root", str(tmp_path / "none")],
                          check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "skipped" in proc.stdout and "mvtec_screw" in proc.stdout
