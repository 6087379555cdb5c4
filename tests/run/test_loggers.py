"""Every logger gets the metrics; those that take images get the anomaly-map grids and the curve plots."""

import json
from pathlib import Path

import pytest

from .test_entrypoints import TINY, fx, run


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> Path:
    root = fx.make_mvtec(tmp_path_factory.mktemp("mv"), ("bottle",))
    out = tmp_path_factory.mktemp("logged")
    run("train.py", "data=mvtec", f"data.root={root}", *TINY, "logger=many", f"hydra.run.dir={out}",
        f"paths.log_dir={out}")
    return out


def test_csv(logged):
    assert "test/mean/image_auroc" in (logged / "csv" / "metrics.csv").read_text()


def test_tensorboard_scalars_images_and_table(logged):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logged / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert "test/bottle/image_auroc" in tags["scalars"]
    assert "anomaly_maps/bottle" in tags["images"]
    assert {"plots/bottle_roc", "plots/bottle_pro", "plots/metrics"} <= set(tags["images"])  # curve plots too
    assert any("results" in t for t in tags["tensors"])  # the markdown table as text


def test_wandb_offline_run_has_images_and_table(logged):
    runs = list((logged / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    media = list(runs[0].rglob("*.png"))
    assert media, "no anomaly-map image in the W&B run"
    assert list(runs[0].rglob("results_*.table.json"))


def test_mlflow_local_store_has_metrics_and_artifacts(logged):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{logged / 'mlflow.db'}")
    (exp,) = client.search_experiments(filter_string="name = 'iad_lightning'")
    (mlrun,) = client.search_runs([exp.experiment_id])
    assert "test/mean/image_auroc" in mlrun.data.metrics
    artifacts = {p.name for p in (logged / "mlartifacts").rglob("*") if p.is_file()}
    assert {"bottle.png", "results.md", "results.json"} <= artifacts
    assert {"bottle_roc.png", "bottle_pro.png", "metrics.png"} <= artifacts  # the curve plots
    saved = json.loads(next((logged / "mlartifacts").rglob("results.json")).read_text())
    assert set(saved) == {"categories", "mean", "crop_check", "calibrated"}
