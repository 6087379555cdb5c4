"""The default trainer config exposes Lightning's keys; plain ``ddp`` selects the project's DDP
strategy; test.py / export without ``ckpt_path`` say what to pass in one line."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from iad_lightning.strategies import AnomalyDDPStrategy, resolve_strategy

REPO = Path(__file__).resolve().parents[2]
LIGHTNING_KEYS = ("strategy", "num_nodes", "precision", "accumulate_grad_batches", "gradient_clip_val",
                  "gradient_clip_algorithm", "sync_batchnorm", "max_steps", "max_time", "limit_train_batches",
                  "val_check_interval", "benchmark", "deterministic")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=overrides)


def _trainer(cfg):
    from iad_lightning.run import _build
    from iad_lightning.methods.base import AnomalyModule

    class Dummy(AnomalyModule):
        preprocess = None

    cfg.paths.output_dir = "/tmp/unused"  # no hydra runtime here
    _, trainer = _build(cfg, Dummy())
    return trainer


def test_lightning_keys_are_overridable_and_reach_the_trainer():
    overrides = ["trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.num_nodes=1",
                 "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=4", "trainer.gradient_clip_val=0.5",
                 "trainer.max_time=00:01:00:00", "logger=none", "callbacks=none"]
    cfg = _compose("train", overrides)  # "not in struct" before the keys existed
    assert all(k in cfg.trainer for k in LIGHTNING_KEYS)
    trainer = _trainer(cfg)
    assert type(trainer.strategy) is AnomalyDDPStrategy and trainer.world_size == 2
    assert trainer.accumulate_grad_batches == 4 and trainer.gradient_clip_val == 0.5
    assert trainer.precision == "bf16-mixed" and trainer.num_nodes == 1


def test_method_trainer_settings_still_win_over_the_defaults():
    uniad = _compose("train", ["method=uniad"]).trainer
    assert (uniad.max_epochs, uniad.gradient_clip_val, uniad.limit_val_batches) == (1000, 0.1, 0)
    ead = _compose("train", ["method=efficientad"]).trainer
    assert (ead.max_steps, ead.max_epochs) == (70000, -1)
    assert _compose("train", ["method=efficientad", "trainer.max_steps=5"]).trainer.max_steps == 5
    assert _compose("train", []).trainer.max_epochs == 1 and _compose("train", []).ckpt_path is None


def test_ddp_names_map_to_the_project_strategy():
    spawn = resolve_strategy("ddp_spawn_find_unused_parameters_true")
    assert type(spawn) is AnomalyDDPStrategy and spawn._start_method == "spawn"
    assert spawn._ddp_kwargs["find_unused_parameters"] is True
    assert resolve_strategy("auto") == "auto" and resolve_strategy("fsdp") == "fsdp"
    configured = instantiate(_compose("train", ["trainer=ddp"]).trainer.strategy)
    assert type(configured) is AnomalyDDPStrategy and resolve_strategy(configured) is configured


@pytest.mark.parametrize("cmd", [["test.py"], ["-m", "iad_lightning.export"]])
def test_missing_ckpt_path_is_one_line_without_traceback(cmd, tmp_path):
    args = [str(REPO / cmd[0]), f"hydra.run.dir={tmp_path}"] if cmd == ["test.py"] else cmd
    proc = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "ckpt_path=" in lines[0] and "last.ckpt" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
