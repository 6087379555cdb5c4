"""How a run is named, tagged and summarised (iad_lightning/tracking.py, console.py), without a run."""

from pathlib import Path
from types import SimpleNamespace

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from iad_lightning import console, tracking
from iad_lightning.callbacks.progress import epoch_label
from iad_lightning.metrics import METRIC_KEYS

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=overrides)


@pytest.mark.parametrize("category, label", [
    ("all", "all"), ("bottle", "bottle"), ("bottle,screw", "bottle+screw"), (["bottle", "screw"], "bottle+screw"),
    (["a", "b", "c"], "a+b+c"), (["a", "b", "c", "d", "e"], "a+b+3more"), ([], "all")])
def test_categories_label(category, label):
    assert tracking.categories_label(category) == label


def test_describe_names_and_tags_what_the_run_is_and_keeps_the_users_values():
    cfg = _compose(["data=mvtec", "data.category=[bottle,screw]", "+tracking.tags.owner=me"])
    info = tracking.describe(cfg)
    assert info["name"] == "patchcore-mvtec-bottle+screw" and info["group"] is None
    tags = info["tags"]
    assert {k: tags[k] for k in ("method", "data", "categories", "backbone", "task", "owner")} == {
        "method": "patchcore", "data": "mvtec", "categories": "bottle,screw", "backbone": "wide_resnet50_2.tv_in1k",
        "task": "train", "owner": "me"}
    assert cfg.logger.csv is not None  # the default logger still composes
    mine = _compose(["tracking.name=baseline", "tracking.description=first try", "logger=many"])
    info = tracking.describe(mine)
    assert (info["name"], info["description"]) == ("baseline", "first try")
    assert mine.logger.mlflow.run_name == mine.logger.wandb.name == "baseline"  # every logger gets the name
    assert mine.logger.tensorboard.name == "baseline" and mine.logger.wandb.tags["task"] == "train"


def test_flat_config_keys_are_the_config_keys():
    """Every flattened key is a dotted config path (an override) holding that very value."""
    cfg = _compose(["data=mvtec", "logger=many", "paths.output_dir=/tmp/run"])
    tracking.describe(cfg)
    flat = tracking.flat_config(cfg)
    assert {"method._target_", "method.backbone.name", "data.format", "data.category", "trainer.max_epochs",
            "threshold.normal_fpr", "seed", "tracking.name"} <= set(flat)
    for key, value in flat.items():
        node = OmegaConf.select(cfg, key)
        assert (OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node) == value, key


def test_results_markdown_renders_both_tables_in_tensorboard():
    from tensorboard import plugin_util

    row = dict.fromkeys(METRIC_KEYS, 0.5)
    cal = {"image_precision": 1.0, "image_recall": 0.5, "image_f1": 0.6, "image_fpr": 0.0, "pixel_iou": 0.1}
    results = {"categories": {"a": row, "b": row}, "mean": row,
               "calibrated": {"categories": {"a": cal, "b": cal}, "mean": cal, "thresholds": {}}}
    html = plugin_util.markdown_to_safe_html(tracking.results_markdown(results))
    assert html.count("<table>") == 2 and html.count("<td>a</td>") == 2 and "|---" not in html


def test_run_summary_lists_what_exists_and_the_dashboards(tmp_path):
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "plots").mkdir()
    text = console.run_summary(tmp_path, "| table |", [("TensorBoard", "tensorboard --logdir x")])
    assert f"Run folder: {tmp_path.resolve()}" in text and "  results.json" in text and "  plots/" in text
    assert "checkpoints/last.ckpt" not in text and "images/" not in text  # not written: not listed
    assert "TensorBoard  tensorboard --logdir x" in text


@pytest.mark.parametrize("epoch, max_epochs, max_steps, label", [
    (0, 1, -1, "Epoch 1/1"), (4, 20, -1, "Epoch 5/20"), (2, -1, 70000, "Epoch 3"), (0, None, -1, "Epoch 1")])
def test_progress_bar_epoch_label(epoch, max_epochs, max_steps, label):
    trainer = SimpleNamespace(current_epoch=epoch, max_epochs=max_epochs, max_steps=max_steps)
    assert epoch_label(trainer) == label
