"""bench/patchcore.py's result tables: runs over several coreset seeds are aggregated per column."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "patchcore.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_patchcore", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(impl: str, seed: int, auroc: float, label: str | None = None) -> dict:
    metrics = {"image_auroc": auroc, "image_ap": 0.5, "image_f1max": 0.5, "pixel_auroc": 0.5, "pixel_aupro": 0.5}
    return {"impl": impl, "label": label or impl, "seed": seed, "dataset": "set", "coreset_ratio": 0.01,
            "n_train": 10, "n_test": 5, "device": "cpu", "fit_s": 1.0, "coreset_s": 0.5, "predict_s": 2.0 + seed,
            "predict_images_per_s": 2.5, "max_rss_mib": 100.0, "memory_bank": [18, 152], "metrics": metrics}


def test_mean_and_standard_error(bench):
    mean, se = bench._mean_se([90.0, 92.0, 94.0])
    assert mean == pytest.approx(92.0)
    assert se == pytest.approx(2.0 / math.sqrt(3))  # sample std 2, n 3
    assert bench._mean_se([91.0]) == (91.0, None)


def test_seed_table_means_and_difference(bench):
    runs = [_run("ours", 0, 0.90, "ours auto/auto pil"), _run("ours", 1, 0.92, "ours auto/auto pil"),
            _run("anomalib", 0, 0.93), _run("anomalib", 1, 0.95)]
    text = bench.render(runs)
    assert "over coreset seeds" in text
    row = next(line for line in text.splitlines() if line.startswith("| image AUROC, mean ± SE"))
    assert "91.00 ± 1.00" in row and "94.00 ± 1.00" in row
    diff = next(line for line in text.splitlines() if line.startswith("| anomalib − this"))
    assert f"+3.00 ± {math.sqrt(2):.2f}" in diff
    # the first table shows the lowest seed's run of each column
    first = text.split("over coreset seeds")[0]
    assert "| image AUROC | 0.9000 | 0.9300 |" in first


def test_single_seed_has_no_seed_table(bench):
    assert "over coreset seeds" not in bench.render([_run("ours", 0, 0.9), _run("anomalib", 0, 0.91)])


def test_seed_of_older_result_files_from_their_command_line(bench, tmp_path):
    run = _run("anomalib", 0, 0.9)
    del run["seed"]
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"argv": ["--seed", "7"], "runs": [run]}))
    assert bench._load_runs(str(path))[0]["seed"] == 7


@pytest.fixture(scope="module")
def seeds_bench():
    spec = importlib.util.spec_from_file_location("bench_patchcore_seeds", BENCH.with_name("patchcore_seeds.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seed_ranges(seeds_bench):
    assert seeds_bench.parse_seeds(["0-3", "7"]) == [0, 1, 2, 3, 7]


def test_kcenter_is_farthest_point_greedy(seeds_bench):
    import torch

    x = torch.randn(200, 5, generator=torch.Generator().manual_seed(1))
    got = seeds_bench.kcenter(x, 12, torch.Generator().manual_seed(3)).tolist()
    start = int(torch.randint(200, (1,), generator=torch.Generator().manual_seed(3)))
    want = [start]
    for _ in range(11):  # naive: the point whose nearest selected point is farthest
        want.append(int(torch.cdist(x, x[want]).amin(1).argmax()))
    assert got == want
    assert len(set(got)) == 12


def test_seed_cache_per_geometry(seeds_bench, tmp_path):
    """The centre-cropped and the uncropped embeddings of a set never share a cache file."""
    cropped = seeds_bench.cache_path(tmp_path, "set", "pil")
    assert cropped == seeds_bench.cache_path(tmp_path, "set", "pil", 224) == tmp_path / "set_pil.pt"
    assert seeds_bench.cache_path(tmp_path, "set", "pil", None) == tmp_path / "set_pil_nocrop.pt"


def test_seed_bench_eq7_weight_is_the_models(seeds_bench):
    """The seed bench's anomalib score is the model's Eq. 7 weight times the Euclidean max distance
    (the model's ``paper_reweighting`` multiplies the squared one), and ``max`` is the official score."""
    import torch

    from iad_lightning.models.patchcore import PatchCoreModel

    gen = torch.Generator().manual_seed(0)
    test, bank = torch.randn(4, 30, 8, generator=gen), torch.randn(50, 8, generator=gen)
    scores = seeds_bench.image_scores(test, bank, ("max", "paper"))
    model = PatchCoreModel(8, 8, paper_reweighting=True).fit(bank)
    patch, nn_index = model.patch_scores(test)
    torch.testing.assert_close(torch.from_numpy(scores["max"]), patch.amax(1))
    weight = model.reweighted_image_scores(test, patch, nn_index) / patch.amax(1)
    torch.testing.assert_close(torch.from_numpy(scores["paper"]), weight * patch.amax(1).sqrt())
