"""results.json/results.md writing and the multirun report table."""

import json

import pytest
import yaml

from iad_lightning.metrics import METRIC_KEYS
from iad_lightning.report import build_report, main
from iad_lightning.results import markdown_table, write_results


def _res(values: dict[str, float], pixel: bool = True) -> dict:
    cats = {c: {k: (v if pixel or k.startswith("image") else None) for k in METRIC_KEYS} for c, v in values.items()}
    mean = {k: (sum(values.values()) / len(values) if pixel or k.startswith("image") else None) for k in METRIC_KEYS}
    return {"categories": cats, "mean": mean}


def _run(folder, results, overrides):
    folder.mkdir(parents=True)
    write_results(results, folder)
    (folder / ".hydra").mkdir()
    (folder / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))


def test_write_results_exact_shape(tmp_path):
    write_results(_res({"a": 0.5, "b": 1.0}, pixel=False), tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert set(data) == {"categories", "mean"} and list(data["categories"]) == ["a", "b"]
    assert set(data["mean"]) == set(METRIC_KEYS) and data["mean"]["pixel_aupro"] is None
    md = (tmp_path / "results.md").read_text()
    assert "| a | 50.00 | 50.00 | 50.00 |" in md and "| **mean** | 75.00" in md and "AUPRO" not in md
    assert not list(tmp_path.glob(".results*"))  # no temporary files left behind


def test_category_sweep_becomes_one_column_group(tmp_path):
    _run(tmp_path / "0", _res({"a": 0.5}), ["data.category=a", "method=patchcore"])
    _run(tmp_path / "1", _res({"b": 1.0}), ["data.category=b", "method=patchcore"])
    _run(tmp_path / "2", _res({"a": 0.25}), ["data.category=a", "method=other"])
    table = build_report(tmp_path, ("image_auroc",))
    lines = table.strip().splitlines()
    assert lines[0] == "| category | method=patchcore<br>I-AUROC | method=other<br>I-AUROC |"
    assert lines[2] == "| a | 50.00 | 25.00 |"
    assert lines[3] == "| b | 100.00 | - |"
    assert lines[4] == "| **mean** | 75.00 | 25.00 |"  # mean over each group's own categories


def test_plain_category_sweep_is_one_table_with_a_mean_row(tmp_path):
    """python train.py -m data.category=fabric,wood: the category is the only override."""
    for i, (cat, v) in enumerate({"fabric": 0.5, "wood": 1.0, "gear": 0.75}.items()):
        _run(tmp_path / str(i), _res({cat: v}), [f"data.category={cat}", "hydra.run.dir=x"])
    lines = build_report(tmp_path, ("image_auroc", "pixel_aupro")).strip().splitlines()
    assert lines[0] == "| category | I-AUROC | AUPRO |"  # no "0", "1" column groups
    assert lines[2:] == ["| fabric | 50.00 | 50.00 |", "| wood | 100.00 | 100.00 |", "| gear | 75.00 | 75.00 |",
                         "| **mean** | 75.00 | 75.00 |"]


def test_method_sweep_is_one_column_group_per_method(tmp_path):
    """-m method=patchcore,padim data.category=a,b data=mvtec: groups by the varying method only."""
    values = {("patchcore", "a"): 0.5, ("patchcore", "b"): 1.0, ("padim", "a"): 0.25, ("padim", "b"): 0.75}
    for i, ((method, cat), v) in enumerate(values.items()):
        _run(tmp_path / str(i), _res({cat: v}), ["data=mvtec", f"method={method}", f"data.category={cat}",
                                                f"logger=many"])
    lines = build_report(tmp_path, ("image_auroc",)).strip().splitlines()
    assert lines[0] == "| category | method=patchcore<br>I-AUROC | method=padim<br>I-AUROC |"
    assert lines[2:] == ["| a | 50.00 | 25.00 |", "| b | 100.00 | 75.00 |", "| **mean** | 75.00 | 50.00 |"]


def test_single_run_folder(tmp_path):
    """A run folder itself (one results.json with several categories, e.g. unified mode)."""
    _run(tmp_path / "run", _res({"a": 0.5, "b": 1.0}), ["data=mvtec", "method=uniad"])
    lines = build_report(tmp_path / "run", ("image_auroc",)).strip().splitlines()
    assert lines == ["| category | I-AUROC |", "|---|---:|", "| a | 50.00 |", "| b | 100.00 |", "| **mean** | 75.00 |"]


def test_report_cli_writes_next_to_runs(tmp_path, capsys):
    _run(tmp_path / "0", _res({"a": 0.5}), [])
    main([str(tmp_path)])
    assert (tmp_path / "report.md").read_text() in capsys.readouterr().out
    with pytest.raises(FileNotFoundError, match="no results.json"):
        build_report(tmp_path / "0" / ".hydra")


def test_markdown_table_single_category_has_no_mean_row():
    assert "mean" not in markdown_table(_res({"a": 0.5}))
