"""Logger factories: Lightning's loggers plus what a run needs to be found and compared later.

The names, tags and descriptions come from ``iad_lightning.tracking`` (through ``tracking.*`` in
the config); these factories only adapt them to each logger's own API.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any, Mapping

from lightning.pytorch.loggers import MLFlowLogger as _MLFlowLogger
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_only

log = logging.getLogger(__name__)
# MLflow's monitor says "Started monitoring system metrics." each time it (re)starts (fit, test):
# the run summary says once whether system metrics are recorded instead.
logging.getLogger("mlflow.system_metrics.system_metrics_monitor").setLevel(logging.WARNING)


def tag_labels(tags: Mapping[str, Any] | None) -> list[str]:
    """``{"method": "patchcore"}`` -> ``["method:patchcore"]`` (W&B tags are labels of <= 64 chars)."""
    return [f"{k}:{v}"[:64] for k, v in (tags or {}).items() if v not in (None, "")]


def wandb_logger(offline: bool | None = None, tags: Mapping[str, Any] | list | None = None,
                 log_model: bool | str = False, quiet: bool = True, **kwargs: Any) -> WandbLogger:
    """A W&B logger that runs offline (files under save_dir, ``wandb sync`` later) when no API key
    is set; ``tags`` may be a key: value mapping (``tracking.tags``), sent as ``key:value`` labels.
    ``log_model``: the checkpoint as a model artifact when training ends, offline too (W&B keeps an
    offline run's artifacts and uploads them with ``wandb sync``; Lightning's check forbids it).
    ``quiet``: no W&B banner and end-of-run history (the run summary says how to open the run)."""
    if offline is None:
        offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
    labels = tag_labels(tags) if isinstance(tags, Mapping) else list(tags or [])
    kwargs = {k: v for k, v in kwargs.items() if v is not None}  # group: null -> no group
    if quiet and "settings" not in kwargs:
        import wandb

        kwargs["settings"] = wandb.Settings(quiet=True)
    logger = WandbLogger(offline=offline, tags=labels or None, log_model=False if offline else log_model, **kwargs)
    logger._log_model = log_model
    # Lightning always passes anonymous=None to wandb.init, and W&B >= 0.19 warns that the setting
    # "has no effect": a warning about Lightning's call that no user can act on.
    if logger._wandb_init.get("anonymous") is None:
        logger._wandb_init.pop("anonymous", None)
    return logger


def system_metrics_available() -> bool:
    """MLflow's system metrics monitor needs psutil (and nvidia-ml-py for GPU metrics)."""
    return importlib.util.find_spec("psutil") is not None


class MLFlowLogger(_MLFlowLogger):
    """Lightning's MLflow logger, plus:

    - ``system_metrics``: CPU, memory, disk, network (and GPU with nvidia-ml-py) as ``system/*``
      metrics every ``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` seconds (default 10) while the run
      fits and tests, when psutil is installed (the logger builds its run through the client API,
      so MLflow's own ``log_system_metrics`` switch never applies);
    - ``description``: the run's description in the UI (``mlflow.note.content``);
    - the run stays RUNNING while the test after the fit logs (Lightning marks it FINISHED when
      the fit ends) and is FINISHED again after it;
    - ``artifact_location`` made absolute, so that ``mlflow ui`` finds the artifacts from any folder.
    """

    def __init__(self, *args: Any, system_metrics: bool = True, description: str | None = None,
                 tags: Mapping[str, Any] | None = None, artifact_location: str | None = None,
                 **kwargs: Any) -> None:
        tags = {k: str(v) for k, v in (tags or {}).items() if v not in (None, "")}
        if description:
            tags["mlflow.note.content"] = description
        if artifact_location and "://" not in artifact_location:
            artifact_location = str(Path(artifact_location).expanduser().resolve())
        super().__init__(*args, tags=tags, artifact_location=artifact_location, **kwargs)
        self.system_metrics = bool(system_metrics) and system_metrics_available()
        self._monitor: Any = None
        self._finished = False

    @property
    def experiment(self) -> Any:
        if not self._initialized and self._experiment_id is None and self._run_id is None \
                and rank_zero_only.rank == 0:
            self._experiment_id = self._get_or_create_experiment()
        client = _MLFlowLogger.experiment.fget(self)  # type: ignore[attr-defined]
        if self._initialized and self.system_metrics and self._monitor is None and not self._finished:
            self._start_monitor()
        return client

    def _get_or_create_experiment(self) -> str:
        """The experiment's id, created quietly on first use (Lightning warns that it is "not found")."""
        import mlflow

        mlflow.set_tracking_uri(self._tracking_uri)
        exp = self._mlflow_client.get_experiment_by_name(self._experiment_name)
        if exp is not None and exp.lifecycle_stage != "deleted":
            return exp.experiment_id
        return self._mlflow_client.create_experiment(self._experiment_name, artifact_location=self._artifact_location)

    def _start_monitor(self) -> None:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        self._monitor = SystemMetricsMonitor(self._run_id, resume_logging=True, tracking_uri=self._tracking_uri)
        self._monitor.start()

    def _stop_monitor(self) -> None:
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._finished:  # a test after the fit: the run is running again
            self._finished = False
            self.experiment.update_run(self._run_id, status="RUNNING")
        super().log_metrics(metrics, step)

    def finalize(self, status: str = "success") -> None:
        super().finalize(status)
        self._stop_monitor()
        self._finished = self._initialized
