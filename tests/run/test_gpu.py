"""One fit and test per method on a CUDA device through train.py (trainer=gpu), on the synthetic
set at tiny sizes with random weights; fp32 and bf16-mixed. Skipped where CUDA is absent.

The methods, their random-weight overrides and tiny sizes are bench/gpu.py's table, so that the
benchmark and this test cover the same list (Dinomaly once ``iad_lightning.models.dinomaly`` exists)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_bench_gpu import load_bench  # noqa: E402
from test_entrypoints import run  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
GPU_BENCH = load_bench()


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("entry", GPU_BENCH.ENTRIES, ids=lambda e: e.name)
def test_fit_and_test_on_cuda(entry, precision, tmp_path):
    if not GPU_BENCH.available(entry):
        pytest.skip(f"{entry.requires} is not importable")
    out = tmp_path / "run"
    proc = run("train.py", *entry.method_overrides(True, tmp_path), *entry.run_overrides(3),
               *GPU_BENCH.synthetic_overrides(4, 3, True), f"paths.cache_dir={tmp_path / 'cache'}",
               "trainer=gpu", f"trainer.precision={precision}", "data.num_workers=2", "logger=none",
               "callbacks=none", f"hydra.run.dir={out}")
    assert "GPU available: True, used: True" in proc.stdout + proc.stderr
    if entry.name == "adpretrain":  # pretraining only: its output is the projector file
        assert (out / "projector.pt").is_file()
        return
    res = json.loads((out / "results.json").read_text())
    assert set(res["categories"]) == {"fabric", "wood", "gear", "pcb", "blister"}
    for metrics in res["categories"].values():
        assert metrics["image_auroc"] is not None and 0.0 <= metrics["image_auroc"] <= 1.0
