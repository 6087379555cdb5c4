"""bench/adpretrain.py's pretraining step bench runs and reports what it says (tiny sizes here; the
figures come from `python bench/adpretrain.py --step` on an idle machine)."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench.adpretrain import REAL_IAD_IMAGES, step_bench  # noqa: E402


def test_step_bench_reports_time_memory_and_the_lite0_token_grid():
    row = step_bench("lite0", batch=2, size=28, steps=1, device="cpu", shots=1, bf16=False)
    assert row["tokens_per_level"] == [4, 4, 4, 4]  # 28 px / 14: the ViT grid the stand-in is put on
    assert row["s_per_step"] > 0 and row["peak_gib"] > 0 and row["peak_kind"] == "process RSS"
    assert abs(row["images_per_s"] - 2 / row["s_per_step"]) < 1e-9
    assert abs(row["real_iad_epoch_h"] - REAL_IAD_IMAGES / row["images_per_s"] / 3600) < 1e-6
