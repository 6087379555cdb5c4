"""What ``train.py`` and ``test.py`` do: instantiate from config, fit, test, write results."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from iad_lightning import console, tracking
from iad_lightning.calibration import apply_holdout, cross_fits
from iad_lightning.callbacks.calibration import ThresholdCalibration
from iad_lightning.callbacks.checkpoint import RNGState
from iad_lightning.callbacks.progress import with_progress_bar
from iad_lightning.checkpoint import load_method
from iad_lightning.data.geometry import preprocess_to_dict, serve_fitted_geometry
from iad_lightning.errors import ConfigError
from iad_lightning.results import calibrated_table, markdown_table, write_image_scores, write_results
from iad_lightning.strategies import resolve_strategy

log = logging.getLogger(__name__)


def _instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group dict (callbacks, loggers), skipping nulls."""
    if not cfg:
        return []
    return [instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


MATMUL_PRECISIONS = ("highest", "high", "medium")


def configure_numerics(cfg: DictConfig) -> None:
    """Process-wide numerics decided by config: ``matmul_precision`` (``highest``: exact fp32
    matmuls, the papers' numbers; ``high``: TF32 on Ampere+ GPUs, as ADPretrain's spec)."""
    value = str(cfg.get("matmul_precision") or "highest")
    if value not in MATMUL_PRECISIONS:
        raise ConfigError(f"matmul_precision={value} must be one of {list(MATMUL_PRECISIONS)}")
    torch.set_float32_matmul_precision(value)


def _build(
    cfg: DictConfig, model: L.LightningModule, extra_callbacks: tuple = ()
) -> tuple[L.LightningDataModule, L.Trainer]:
    datamodule = instantiate(cfg.data)
    datamodule.preprocess = model.preprocess
    loggers = tracking.start(cfg, model)  # named, tagged, the whole config logged
    extra = {}
    strategy = cfg.trainer.get("strategy")
    resolved = resolve_strategy(strategy)
    if resolved is not strategy:
        extra["strategy"] = resolved  # plain "ddp" (and ddp_spawn, ...) -> AnomalyDDPStrategy
    trainer = instantiate(
        cfg.trainer,
        **extra,
        callbacks=with_progress_bar([*extra_callbacks, *_instantiate_group(cfg.get("callbacks")), RNGState()],
                                    cfg.trainer.get("enable_progress_bar")),
        logger=loggers or False,
        default_root_dir=cfg.paths.output_dir,
    )
    model.configure_data(datamodule, trainer.world_size)
    return datamodule, trainer


def _finish(trainer: L.Trainer, model: L.LightningModule, cfg: DictConfig) -> dict[str, Any]:
    out_dir = cfg.paths.output_dir
    results = model.results
    if getattr(model, "trained_on", None):  # fitted on other data than it is tested on (zero-shot)
        results = {**results, "trained_on": model.trained_on}
    served = getattr(trainer.datamodule, "input_preprocess", None)
    if served is not None:  # the geometry the test images were served with
        results = {**results, "preprocess": preprocess_to_dict(served)}
    if trainer.is_global_zero:
        write_results(results, out_dir)
        write_image_scores(getattr(model, "image_scores", []), out_dir)
        table = markdown_table(results)
        if results.get("calibrated"):
            table += "\nAt the calibrated thresholds (out-of-sample normal train images):\n" + calibrated_table(results)
        tracking.log_results(trainer.loggers, results)
        boards = tracking.dashboards(trainer.loggers, cfg.paths.get("log_dir"))
        tracking.finish(trainer.loggers)
        print(console.run_summary(out_dir, table, boards, console.log_file_of(out_dir)))
    return results


def resume_path(ckpt_path: str | None) -> str | None:
    """The checkpoint ``train.py ckpt_path=...`` resumes from (None: a fresh run)."""
    if not ckpt_path:
        return None
    path = Path(str(ckpt_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"ckpt_path='{path}' does not exist; to resume, point it at the interrupted run's "
                          "checkpoints/last.ckpt (or drop ckpt_path for a fresh run)")
    return str(path)


def _data_description(data: DictConfig) -> dict[str, Any]:
    return {k: OmegaConf.to_container(data, resolve=True).get(k) for k in ("format", "root", "category", "fit_split")}


def _eval_datamodule(cfg: DictConfig, model: L.LightningModule, world_size: int) -> L.LightningDataModule:
    """The ``eval_data`` datamodule (loader sizes from ``data`` unless it sets its own); warns
    loudly when it is the dataset the method was fitted on (the numbers are then not zero-shot)."""
    sizes = {k: cfg.data[k] for k in ("batch_size", "eval_batch_size") if k in cfg.data and k not in cfg.eval_data}
    datamodule = instantiate(cfg.eval_data, **sizes)
    _use_model_geometry(datamodule, model)
    model.configure_data(datamodule, world_size)
    _warn_if_fitted_on(_data_description(cfg.data), _data_description(cfg.eval_data))
    return datamodule


def _use_model_geometry(datamodule: L.LightningDataModule, model: L.LightningModule, source: str = "model") -> None:
    """Serve a fitted model its own preprocessing (``data/geometry.py``); one line when the data
    config would have given another."""
    notice = serve_fitted_geometry(datamodule, model, source)
    if notice:
        log.warning(notice)


def _warn_if_fitted_on(fit: dict[str, Any] | None, ev: dict[str, Any]) -> None:
    """Loud warning when the evaluation data is the data the method was fitted on."""
    if fit and (fit["format"], Path(str(fit["root"])).resolve()) == (ev["format"], Path(str(ev["root"])).resolve()):
        msg = (f"the evaluation data is the dataset the method was fitted on ({ev['format']} at '{ev['root']}'): "
               "these numbers are NOT zero-shot / not held out")
        log.warning("!" * 20 + " " + msg)
        warnings.warn(msg, stacklevel=3)


def train(cfg: DictConfig) -> dict[str, Any] | None:
    """Fit ``cfg.method`` on ``cfg.data`` (resuming from ``cfg.ckpt_path`` when set); then test it
    and write results unless ``test=false``.

    With ``eval_data`` set, the test runs on that second data config instead (the auxiliary-data
    protocol: fit on ``data`` with ``data.fit_split=test``, evaluate zero-shot on ``eval_data``)."""
    console.setup_logging()
    L.seed_everything(cfg.seed, workers=True)
    configure_numerics(cfg)
    model = instantiate(cfg.method)
    model.method_config = OmegaConf.to_container(cfg.method, resolve=True)
    eval_data = cfg.get("eval_data")
    if eval_data or cfg.data.get("fit_split", "train") != "train":
        model.trained_on = {"data": _data_description(cfg.data)}  # recorded in results.json
    threshold = cfg.get("threshold") or {}
    calibrates = hasattr(model, "image_threshold")  # every AnomalyModule; not e.g. a teacher distillation
    folds = int(threshold.get("folds", 0))
    extra = (ThresholdCalibration(threshold.get("normal_fpr", 0.01), threshold.get("pixel_normal_fpr"), folds=folds,
                                  seed=cfg.seed, tail=threshold.get("tail", "auto"),
                                  min_exceedances=threshold.get("min_exceedances", 5),
                                  tail_fraction=threshold.get("tail_fraction", 0.2),
                                  leave_one_out=threshold.get("leave_one_out", False)),)
    datamodule, trainer = _build(cfg, model, extra if calibrates else ())
    if calibrates and not cross_fits(model, datamodule, folds):  # before the data is indexed
        apply_holdout(datamodule, float(threshold.get("holdout_fraction", 0.0)))
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_path(cfg.get("ckpt_path")))
    if not cfg.get("test", True):
        tracking.finish(trainer.loggers)
        return None
    if eval_data:
        datamodule = _eval_datamodule(cfg, model, trainer.world_size)
    else:  # the fit's own geometry: the same, now read from the model
        _use_model_geometry(datamodule, model)
    trainer.test(model, datamodule=datamodule, verbose=False)
    return _finish(trainer, model, cfg)


def test(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate a training checkpoint (``ckpt_path``) on ``cfg.data``, without re-fitting."""
    console.setup_logging()
    L.seed_everything(cfg.seed, workers=True)
    configure_numerics(cfg)
    model = load_method(cfg.ckpt_path)
    _warn_if_fitted_on((getattr(model, "trained_on", None) or {}).get("data"), _data_description(cfg.data))
    datamodule, trainer = _build(cfg, model)
    _use_model_geometry(datamodule, model, str(cfg.get("geometry", "model")))
    trainer.test(model, datamodule=datamodule, verbose=False)
    return _finish(trainer, model, cfg)
