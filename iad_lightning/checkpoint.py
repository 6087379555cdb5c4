"""Safe checkpoint loading: tensors and plain config only (``torch.load(weights_only=True)``)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate

from iad_lightning.data.geometry import PREPROCESS_KEY, describe_preprocess
from iad_lightning.data.transforms import without_crop
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
    if PREPROCESS_KEY not in ckpt and hasattr(model, "fitted_preprocess"):
        model.fitted_preprocess = legacy_preprocess(model, path)
    return model


def legacy_preprocess(model: torch.nn.Module, path: Path) -> Any:
    """The fitted preprocessing of a checkpoint written before models stored it: the method's own,
    without its crop when the run's saved Hydra config (``<run>/.hydra/config.yaml`` beside
    ``checkpoints/``) says ``data.center_crop: false``. Warns with what it assumed."""
    from omegaconf import OmegaConf

    pre, cfg_file = model.preprocess, path.parent.parent / ".hydra" / "config.yaml"
    center_crop, source = True, None
    if cfg_file.is_file():
        try:
            center_crop = bool(OmegaConf.select(OmegaConf.load(cfg_file), "data.center_crop", default=True))
            source = str(cfg_file)
        except Exception as err:  # an unreadable or unresolvable config: say so, keep the method's
            source = None
            warnings.warn(f"could not read data.center_crop from {cfg_file} ({type(err).__name__}: {err})",
                          stacklevel=3)
    if not center_crop:
        pre = without_crop(pre)
    how = (f"data.center_crop={str(center_crop).lower()} from {source}" if source else
           "no .hydra/config.yaml beside checkpoints/ says otherwise; if it was fitted with "
           "data.center_crop=false, put its run's .hydra/config.yaml there")
    warnings.warn(f"'{path}' stores no preprocessing (written before models carried it): using "
                  f"the method's ({describe_preprocess(pre)}; {how})", stacklevel=3)
    return pre


def close_finished_epoch(checkpoint: dict[str, Any], max_steps: int) -> bool:
    """Resume fix for a run that ``max_steps`` stopped on the LAST batch of an epoch (Lightning 2.6).

    Such a checkpoint keeps the finished epoch's batch counters (all its batches, ``is_last_batch``);
    saved by an epoch-end hook it also records the epoch as processed but not completed (the
    counter moves after the hooks), saved at the end of training (``ThresholdCalibration``
    rewrites last.ckpt there) as completed. Resumed iteration-based (``trainer.max_steps`` set,
    e.g. to train longer), Lightning re-enters the finished epoch: one batch too many from a fresh
    loader in the first case, an empty extra epoch (the epoch counter, and so the sampler's
    shuffle, one ahead) in the second, and the result differs from an uninterrupted run. When the
    saved epoch has run all its batches, mark it completed and start the next epoch at its first
    batch, which is what the uninterrupted run does. Called from
    ``AnomalyModule.on_load_checkpoint`` (before Lightning restores its loops); returns whether it
    changed anything. Epoch-based resumes (``max_steps`` -1) are left to Lightning, which
    handles them, and so is a checkpoint from the middle of an epoch.
    """
    if max_steps == -1:
        return False
    try:
        fit = checkpoint["loops"]["fit_loop"]
        epochs, batches = fit["epoch_progress"], fit["epoch_loop.batch_progress"]
        total = epochs["total"]
        started = total["ready"] == total["started"] == total["processed"]
        in_hook, after = total["completed"] + 1 == total["processed"], total["completed"] == total["processed"]
        finished = (started and (in_hook or after) and batches["is_last_batch"]
                    and batches["current"]["completed"] == batches["current"]["ready"] > 0)
    except (KeyError, TypeError):  # another Lightning layout: leave it alone
        return False
    if not finished:
        return False
    for progress in (epochs["total"], epochs["current"]):
        progress["completed"] = progress["processed"]
    batches["current"] = {key: 0 for key in batches["current"]}
    batches["is_last_batch"] = False
    return True
