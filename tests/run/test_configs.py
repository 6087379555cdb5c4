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


DATA_CONFIGS = ["synthetic", "mvtec", "mpdd", "btad", "visa", "realiad", "mvtec_loco", "anomalyclip", "folder", "images"]


@pytest.mark.parametrize("data", DATA_CONFIGS)
def test_every_format_option_is_declared_with_the_code_default(data):
    """Each data config declares every keyword option of its format with the format's own default,
    so that data.options.<key>=... overrides compose without '+'."""
    import inspect

    from iad_lightning.data.formats.base import FORMATS, get_index  # noqa: F401
    import iad_lightning.data.formats  # noqa: F401  (registers the formats)

    cfg = _compose("train", [f"data={data}", "data.root=/x"])
    params = inspect.signature(FORMATS[cfg.data.format].__init__).parameters
    code = {k: p.default for k, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
    declared = OmegaConf.to_container(cfg.data.options)
    assert set(declared) == set(code), f"data/{data}.yaml options {sorted(declared)} != the format's {sorted(code)}"
    # the defaults agree, except the main job's deliberately smaller synthetic set
    differ = {k for k in code if declared[k] != code[k]}
    assert differ <= ({"n_train", "n_test_good", "n_test_defect"} if data == "synthetic" else set()), differ


def test_folder_options_compose_without_plus():
    overrides = ["data=folder", "data.root=/parts", "data.options.normal_dir=ok", "data.options.abnormal_dirs=[scratch,dent]",
                 "data.options.normal_test_dir=ok_test", "data.options.mask_dir=masks", "data.options.test_fraction=0.3",
                 "data.center_crop=true"]
    o = _compose("train", overrides).data.options
    assert (o.normal_dir, list(o.abnormal_dirs), o.normal_test_dir, o.mask_dir, o.test_fraction) == (
        "ok", ["scratch", "dent"], "ok_test", "masks", 0.3)
    assert _compose("train", ["data=mvtec", "data.center_crop=false"]).data.center_crop is False  # the crop warning's advice
    assert _compose("train", ["data.options.image_size=64"]).data.options.image_size == 64
