"""Safe checkpoint loading: tensors and plain config only (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from iad_lightning.calibration import CALIBRATION_KEY  # calibration details; the thresholds are buffers
from iad_lightning.errors import ConfigError

CONFIG_KEY = "iad_method_config"

# Files a method reads only while fitting (their tensors are in the checkpoint): nulled on reload,
# so test.py needs neither the file nor its path (EfficientAD's teacher and penalty images,
# UniAD's official checkpoint, AnomalyCLIP's CLIP weights and official prompts, Dinomaly's encoder weights).
FIT_ONLY_FILES = ("teacher_weights", "penalty_dir", "official_checkpoint", "clip_weights", "prompt_checkpoint",
                  "encoder_weights")


def _offline_backbones(cfg: Any) -> Any:
    """Set every nested ``backbone.weights`` to "none" and every ``FIT_ONLY_FILES`` key to None:
    the checkpoint holds those tensors."""
    if isinstance(cfg, dict):
        out = {k: _offline_backbones(v) for k, v in cfg.items()}
        if isinstance(out.get("backbone"), dict) and "weights" in out["backbone"]:
            out["backbone"] = {**out["backbone"], "weights": "none"}
        for key in FIT_ONLY_FILES:
            if key in out:
                out[key] = None
        return out
    if isinstance(cfg, list):
        return [_offline_backbones(v) for v in cfg]
    return cfg


def load_method(ckpt_path: str | Path) -> torch.nn.Module:
    """Rebuild a method from a training checkpoint without re-fitting or downloading weights."""
    path = Path(ckpt_path).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path='{path}' does not exist; point it at a training run's checkpoints/last.ckpt")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if CONFIG_KEY not in ckpt:
        raise ConfigError(f"'{path}' was not written by iad_lightning (no '{CONFIG_KEY}' entry)")
    cfg = _offline_backbones(copy.deepcopy(ckpt[CONFIG_KEY]))
    model = instantiate(cfg)
    model.method_config = ckpt[CONFIG_KEY]
    model.load_state_dict(ckpt["state_dict"])  # thresholds included (NaN in older checkpoints)
    model.on_load_checkpoint(ckpt)  # Lightning's hook: a method restores its non-tensor state (calibration info)
    return model
