"""Runs you can find and compare: two methods swept into one MLflow store, W&B offline runs and
TensorBoard event files, read back through each tool's own API as its dashboard would."""

import importlib.util
import json
import os
from pathlib import Path

import pytest

from iad_lightning.metrics import METRIC_KEYS

from .test_entrypoints import REPO, run
from .wandb_offline import read_run, records

COMMON = ["backbone=lite0", "method.resize=64", "method.crop=64", "data.options.image_size=64", "data.options.n_train=6",
          "data.options.n_test_good=2", "data.options.n_test_defect=2", "data.category=[fabric,wood]",
          "data.batch_size=4", "trainer.accelerator=cpu", "callbacks.visualizer.n_images=2", "logger=many",
          "logger.mlflow.log_model=true", "logger.wandb.log_model=true"]
METHODS = ("patchcore", "padim")
NAMES = [f"{m}-synthetic-fabric+wood-job{i}" for i, m in enumerate(METHODS)]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> tuple[Path, str]:
    """``python train.py -m method=patchcore,padim ... logger=many``: one MLflow store in the log dir."""
    out = tmp_path_factory.mktemp("logged")
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "1"  # a few samples in a short run
    try:
        proc = run("train.py", "-m", f"method={','.join(METHODS)}", *COMMON, f"paths.log_dir={out}",
                   f"paths.cache_dir={out / 'cache'}", f"hydra.sweep.dir={out / 'sweep'}")
    finally:
        del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]
    return out, proc.stdout


def test_csv(sweep):
    assert "test/mean/image_auroc" in (sweep[0] / "sweep" / "0" / "csv" / "metrics.csv").read_text()


def test_mlflow_runs_are_named_described_and_comparable(sweep):
    from mlflow.tracking import MlflowClient

    out, _ = sweep
    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow.db'}")
    (exp,) = client.search_experiments(filter_string="name = 'iad_lightning'")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert sorted(runs) == sorted(NAMES)
    for (method, target), name in zip({"patchcore": "PatchCore", "padim": "PaDiM"}.items(), NAMES):
        r = runs[name]
        assert r.info.status == "FINISHED"
        p, tags = r.data.params, r.data.tags
        # the whole resolved config, flattened to override keys: method target, data, backbone, trainer
        assert p["method._target_"].endswith(f".{target}") and p["data.format"] == "synthetic"
        assert p["data.category"] == '["fabric", "wood"]' and p["method.backbone.name"] == "tf_efficientnet_lite0"
        assert p["trainer.max_epochs"] == "1" and p["trainer.accelerator"] == "cpu" and p["seed"] == "0"
        assert p["threshold.normal_fpr"] == "0.01" and p["tracking.name"] == name
        assert "backbone" not in p  # no second, unprefixed copy of the method's arguments
        assert {k: tags[k] for k in ("method", "data", "categories", "backbone", "task")} == {
            "method": method, "data": "synthetic", "categories": "fabric,wood", "backbone": "tf_efficientnet_lite0",
            "task": "train"}
        assert tags["group"] == f"train-{(out / 'sweep').name}" and tags["job"] in ("0", "1")
        assert len(tags["git_commit"].split("-")[0]) == 40  # this checkout's commit
        assert tags["mlflow.note.content"].startswith("python train.py") and f"method={method}" in tags["mlflow.note.content"]
        assert {f"test/mean/{k}" for k in METRIC_KEYS} <= set(r.data.metrics)
        assert 0.0 <= r.data.metrics["test/mean/image_auroc"] <= 1.0
        files = {Path(a).name for a in _artifacts(client, r.info.run_id)}
        assert {"fabric.png", "wood.png", "fabric_roc.png", "metrics.png", "results.md", "results.json",
                "results_table.json", "last.ckpt"} <= files  # last.ckpt: logger.mlflow.log_model=true
        table = json.loads(Path(client.download_artifacts(r.info.run_id, "results_table.json")).read_text())
        assert table["columns"][0] == "category" and [row[0] for row in table["data"]] == ["fabric", "wood", "mean"]
        saved = json.loads(Path(client.download_artifacts(r.info.run_id, "results.json")).read_text())
        assert {"categories", "mean", "crop_check", "calibrated"} <= set(saved)
        system = [k for k in r.data.metrics if k.startswith("system/")]
        if importlib.util.find_spec("psutil"):  # MLflow's optional dependency of system metrics
            assert "system/cpu_utilization_percentage" in system, system
        else:
            assert not system


def _artifacts(client, run_id: str, path: str | None = None) -> list[str]:
    out = []
    for a in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return out


def test_wandb_offline_runs_share_a_group_with_config_and_summary(sweep):
    out, _ = sweep
    runs = {}
    for job in ("0", "1"):
        (folder,) = (out / "sweep" / job / "wandb").glob("offline-run-*")
        runs[job] = read_run(folder)
        assert list(folder.rglob("results_*.table.json")) and list(folder.rglob("results_calibrated_*.table.json"))
        assert list(folder.rglob("*.png")), "no anomaly-map image in the W&B run"
        kinds = [r.artifact.type for r in records(next(folder.glob("run-*.wandb"))) if r.WhichOneof("record_type") == "artifact"]
        assert "model" in kinds  # logger.wandb.log_model=true: the checkpoint as a model artifact
    for job, method in zip(("0", "1"), METHODS):
        r = runs[job]
        assert r["name"] == NAMES[int(job)] and r["job_type"] == "train"
        assert {"method:" + method, "data:synthetic", "categories:fabric,wood", "backbone:tf_efficientnet_lite0"} <= set(r["tags"])
        assert r["config"]["method"]["_target_"].rsplit(".", 1)[-1].lower() == method
        assert r["config"]["data"]["format"] == "synthetic" and r["config"]["trainer"]["max_epochs"] == 1
        assert 0.0 <= r["history"]["test/mean/image_auroc"] <= 1.0
        assert "test/mean/image_auroc" in r["summary"]
    assert runs["0"]["group"] == runs["1"]["group"] == f"train-{(out / 'sweep').name}"  # one multirun, one group


def test_tensorboard_hparams_are_config_and_test_metrics(sweep):
    from tensorboard import plugin_util
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    out, _ = sweep
    folder = out / "sweep" / "0" / "tensorboard" / NAMES[0]  # the run is named in TensorBoard too
    acc = EventAccumulator(str(folder), size_guidance={"images": 0, "tensors": 0}).Reload()
    tags = acc.Tags()
    assert {"test/fabric/image_auroc", "test/mean/image_auroc"} <= set(tags["scalars"])
    assert "hp_metric" not in tags["scalars"]
    assert "anomaly_maps/fabric" in tags["images"]
    assert {"plots/fabric_roc", "plots/fabric_pro", "plots/metrics"} <= set(tags["images"])
    hparams, metrics, html = {}, [], ""
    for events in folder.glob("events.*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    if data.WhichOneof("data") == "experiment":
                        metrics = [m.name.tag for m in data.experiment.metric_infos]
                    elif data.WhichOneof("data") == "session_start_info":
                        hparams = dict(data.session_start_info.hparams)
                elif value.tag.startswith("results"):
                    html = plugin_util.markdown_to_safe_html(tensor_util.make_ndarray(value.tensor).item().decode())
    assert hparams["method._target_"].string_value.endswith(".PatchCore")
    assert hparams["data.format"].string_value == "synthetic" and hparams["trainer.max_epochs"].number_value == 1
    assert hparams["method.backbone.name"].string_value == "tf_efficientnet_lite0"
    assert "test/mean/image_auroc" in metrics and "test/calibrated/image_fpr" in metrics  # real metrics, no hp_metric
    assert html.count("<table>") == 2 and "<td>fabric</td>" in html  # both results tables render as tables


def test_console_names_where_everything_went(sweep):
    out, stdout = sweep
    run_dir = (out / "sweep" / "1").resolve()
    assert f"Run folder: {run_dir}" in stdout
    for line in ("results.json", "checkpoints/last.ckpt", "images/", "plots/",
                 f"mlflow ui --backend-store-uri sqlite:///{out.resolve() / 'mlflow.db'}",
                 f"tensorboard --logdir {out.resolve()}", f"wandb sync {run_dir / 'wandb'}"):
        assert line in stdout, line
    # the multirun ends with its report: one column group per method, the mean over the categories
    tail = stdout[stdout.index("Multirun report"):]
    assert f"python -m iad_lightning.report {(out / 'sweep').resolve()}" in tail
    header = tail.splitlines()[1]
    assert "method=patchcore<br>I-AUROC" in header and "method=padim<br>I-AUROC" in header
    assert "| **mean** |" in tail and (out / "sweep" / "report.md").is_file()
    assert "v_num" not in stdout and "Epoch 1/1" in stdout
    assert REPO.name  # the runs wrote nothing into the checkout
    assert not (REPO / "mlruns").exists()
