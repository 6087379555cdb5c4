"""Config composition: every group option composes, and the choices behave as documented."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _compose(name: str, overrides: list[str], hydra_cfg: bool = False):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("data", ["synthetic", "mvtec", "mpdd", "btad", "visa", "realiad", "mvtec_loco", "anomalyclip", "folder", "images"])
def test_every_dataset_config_composes(data):
    cfg = _compose("train", [f"data={data}"])
    assert cfg.data.format == data


def test_backbone_choice():
    assert _compose("train", []).method.backbone.weights == "lite0"  # offline main job
    assert _compose("train", ["data=mvtec"]).method.backbone.name == "wide_resnet50_2.tv_in1k"
    assert _compose("train", ["backbone=paper"]).method.backbone.weights == "hub"
    assert _compose("train", ["data=mvtec", "backbone=lite0"]).method.backbone.name == "tf_efficientnet_lite0"


def test_patchcore_paper_defaults():
    m = _compose("train", ["data=mvtec"]).method
    assert (m.resize, m.crop, m.coreset_ratio, m.projection_dim, m.num_starts) == (256, 224, 0.1, 128, 10)
    # "auto" resolves to the paper's 1024/1024 for wide_resnet50_2 (tests/models: resolve_embed_dimensions)
    assert (m.pretrain_embed_dimension, m.target_embed_dimension, m.patch_size, m.num_neighbors) == ("auto", "auto", 3, 1)
    assert (m.blur_sigma, m.paper_reweighting, list(m.backbone.layers)) == (4.0, False, [2, 3])
    assert m.resize_backend == "pil"  # official: Resize / CenterCrop on the PIL image


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb", "mlflow", "many", "none"])
def test_logger_configs_compose(logger):
    _compose("train", [f"logger={logger}"])


def test_slurm_launcher_and_ddp_trainer():
    cfg = _compose("train", ["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4"], hydra_cfg=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert OmegaConf.select(cfg, "hydra.launcher.tasks_per_node") == 4
    assert cfg.trainer.strategy._target_ == "iad_lightning.strategies.AnomalyDDPStrategy"


def test_test_config_composes_with_any_data():
    for data in ("synthetic", "mvtec"):
        assert _compose("test", [f"data={data}", "ckpt_path=x"]).ckpt_path == "x"


def test_parallel_launcher_one_job_per_device():
    from hydra_plugins.iad_parallel_launcher import ParallelLauncher

    from iad_lightning.errors import ConfigError

    cfg = _compose("train", ["hydra/launcher=parallel", "hydra.launcher.devices=8"], hydra_cfg=True).hydra.launcher
    assert cfg._target_ == "hydra_plugins.iad_parallel_launcher.ParallelLauncher"
    kwargs = {k: v for k, v in cfg.items() if k != "_target_"}
    launcher = ParallelLauncher(**kwargs)
    assert launcher.devices == [str(i) for i in range(8)] and launcher.joblib["n_jobs"] == 8
    assert launcher.joblib["batch_size"] == 1  # never several jobs queued on one worker
    assert ParallelLauncher(devices=[2, 6], n_jobs=-1).joblib["n_jobs"] == 2
    assert ParallelLauncher(devices=None).joblib["n_jobs"] == 2  # CPU: no pinning, 2 jobs
    with pytest.raises(ConfigError, match="n_jobs=3 exceeds"):
        ParallelLauncher(devices="0,1", n_jobs=3)
