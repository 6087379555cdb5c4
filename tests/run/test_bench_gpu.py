"""bench/gpu.py at tiny sizes on the CPU (``--device cpu --tiny``), so that the prepared GPU
benchmark cannot rot: every method of its table fits (fp32) through the real datamodule and
Trainer and is timed, one method also in bf16-mixed, and the PatchCore paths agree with the CPU
reference. Budget: ~16 tiny fits are ~1 min on 2 cores; this runs 9 (the GPU test, where CUDA is
present, fits every method in both precisions)."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu.py"


def load_bench():
    if "bench_gpu" in sys.modules:
        return sys.modules["bench_gpu"]
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def test_every_method_runs_on_cpu_at_tiny_sizes(bench, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    rc = bench.main(["--device", "cpu", "--tiny", "--precisions", "32-true", "--cache", str(tmp_path / "cache"),
                     "--out", str(out)])
    printed = capsys.readouterr().out
    res = json.loads(out.read_text())
    assert rc == 0, {k: v.get("error") for k, v in res["methods"].items()}
    assert list(res["methods"]) == [e.name for e in bench.ENTRIES]
    assert res["meta"]["tiny"] and res["meta"]["device"]
    for entry in bench.ENTRIES:
        r = res["methods"][entry.name]
        if not bench.available(entry):  # e.g. Dinomaly before it lands: skipped with a note
            assert entry.requires in r["skipped"]
            continue
        assert set(r["train"]) == {"32-true"}
        for precision, fit in r["train"].items():
            assert fit["precision"] == precision and fit["peak_memory_gib"] > 0 and fit["pin_memory"] is False
            assert fit["fit_seconds"] > 0
            if entry.trains:
                assert fit["steps_measured"] == 1 and fit["step_ms"] > 0 and 0 <= fit["data_share"] < 1
                assert fit["train_images_per_s"] > 0
            else:  # FeatureNorm: the fit is the k-shot bank, no step
                assert "step_ms" not in fit
        if entry.infers:
            inf = r["inference"]
            assert inf["batch1"]["batch_size"] == 1 and inf["eval_batch"]["batch_size"] == 2
            assert inf["batch1"]["images_per_s"] > 0 and inf["eval_batch"]["images_per_s"] > 0
        else:
            assert "skipped" in r["inference"]
        assert f"| {entry.name} |" in printed
    pc = res["patchcore_paths"]
    assert pc["coreset"]["selected"] == pc["coreset"]["rows"] // 10 and pc["coreset"]["seconds"] > 0
    assert pc["coreset_check"]["same_selection"]  # CPU vs the device (here the CPU again)
    paths = {k: v for k, v in pc["knn"].items() if isinstance(v, dict) and "seconds" in v}
    assert "torch_matmul_topk_fp32_cpu" in paths and "faiss_cpu_flat" in paths  # faiss-cpu is a dependency
    assert all(v["same_or_tied"] == 1.0 and v["max_abs_distance_error"] < 1e-3 for v in paths.values())
    assert "EfficientAD-S batch-1 latency" in printed and "PatchCore 1-NN" in printed


def test_bf16_mixed_fit_and_json(bench, tmp_path, capsys):
    out = tmp_path / "gpu.json"
    assert bench.main(["--device", "cpu", "--tiny", "--methods", "uniad", "--no-patchcore-paths",
                       "--cache", str(tmp_path / "cache"), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    fits = res["methods"]["uniad"]["train"]
    assert set(fits) == {"32-true", "bf16-mixed"} and all(f["step_ms"] > 0 for f in fits.values())
    assert "patchcore_paths" not in res
    assert "step ms bf16" in capsys.readouterr().out


def test_unknown_method_and_missing_cuda_are_clear(bench, capsys):
    assert bench.main(["--device", "cpu", "--tiny", "--methods", "nope"]) == 2
    assert "unknown --methods ['nope']" in capsys.readouterr().err
    if not __import__("torch").cuda.is_available():
        assert bench.main(["--device", "cuda"]) == 2
        assert "no CUDA device" in capsys.readouterr().err
