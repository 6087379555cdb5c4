"""CUDA settings decided by config: trainer=gpu (fp32, cudnn.benchmark), data.pin_memory=auto
(pinned only on a CUDA trainer), matmul_precision (TF32 opt-in; ADPretrain's spec turns it on)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

from iad_lightning.data.datamodule import AnomalyDataModule
from iad_lightning.errors import ConfigError
from iad_lightning.run import configure_numerics

REPO = Path(__file__).resolve().parents[2]


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_trainer_gpu_is_one_fp32_device_with_cudnn_benchmark_in_train_and_test():
    for name, extra in (("train", []), ("test", ["ckpt_path=x.ckpt"])):
        cfg = _compose(name, ["trainer=gpu", *extra])
        t = cfg.trainer
        assert (t.accelerator, t.devices, t.precision, t.benchmark) == ("gpu", 1, "32-true", True)
        assert cfg.data.pin_memory == "auto" and cfg.matmul_precision == "highest"
    assert _compose("train", ["trainer=gpu", "method=adpretrain"]).matmul_precision == "high"  # spec: TF32


def test_pin_memory_auto_follows_the_trainer_and_bad_values_fail():
    dm = AnomalyDataModule("synthetic", "/unused")
    assert dm.pin_memory == "auto" and dm.loader_pin_memory() is False  # no trainer yet
    dm.trainer = SimpleNamespace(accelerator=CUDAAccelerator())
    assert dm.loader_pin_memory() is True
    dm.trainer = SimpleNamespace(accelerator=CPUAccelerator())
    assert dm.loader_pin_memory() is False
    assert AnomalyDataModule("synthetic", "/unused", pin_memory=True).loader_pin_memory() is True
    with pytest.raises(ConfigError, match="data.pin_memory"):
        AnomalyDataModule("synthetic", "/unused", pin_memory="yes")


def test_matmul_precision_is_applied_and_checked():
    before = torch.get_float32_matmul_precision()
    try:
        configure_numerics(_compose("train", ["matmul_precision=high"]))
        assert torch.get_float32_matmul_precision() == "high"
        configure_numerics(_compose("train", []))
        assert torch.get_float32_matmul_precision() == "highest"
        with pytest.raises(ConfigError, match="matmul_precision=tf32"):
            configure_numerics(_compose("train", ["matmul_precision=tf32"]))
    finally:
        torch.set_float32_matmul_precision(before)
