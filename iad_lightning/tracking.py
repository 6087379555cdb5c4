"""Runs you can find and compare: every logger run is named, tagged and described by what it is.

- **Name** (``tracking.name``, null by default): ``<method>-<data format>-<categories>``, e.g.
  ``patchcore-mvtec-bottle+screw``; ``-job<N>`` in a multirun, ``-<task>`` for other tasks than
  train (``test``). MLflow run name, W&B run name, TensorBoard run folder.
- **Tags** (``tracking.tags`` adds yours): method, data format, categories, backbone, task, the
  project's git commit (when it is a git checkout, ``-dirty`` with uncommitted changes), the
  multirun job number: MLflow tags, W&B ``key:value`` labels. A multirun shares one **group**
  (``tracking.group``, default ``<task>-<multirun folder>``): W&B's group, an MLflow tag. The
  **description** (``tracking.description``, default the command line): MLflow's run
  description, W&B's notes.
- **Config**: the whole resolved config, flattened to dotted keys that are also command-line
  overrides (``method.backbone.name``): MLflow params, W&B config, TensorBoard hparams whose metric
  columns are the test metrics (``test/mean/image_auroc``, ...). The method's constructor
  arguments are in it (``method.*``), so Lightning's own logging of them is switched off.
- **Results**: the per-category tables as tables (W&B Table, MLflow ``log_table`` + markdown +
  JSON, TensorBoard markdown text).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Iterable

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from iad_lightning.calibration import CALIBRATED_KEYS
from iad_lightning.loggers import system_metrics_available
from iad_lightning.metrics import METRIC_KEYS
from iad_lightning.results import calibrated_table, markdown_table

PACKAGE_DIR = Path(__file__).resolve().parent
MAX_NAMED_CATEGORIES = 3  # more: "bottle+cable+13more"
BACKBONE_KEYS = (("backbone", "name"), ("model", "model_name"), ("model", "backbone", "name"))


# ------------------------------------------------------------------------------ what a run is
def _hydra() -> Any | None:
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def method_name(cfg: DictConfig, method_config: dict | None = None) -> str:
    """The ``method=`` choice (``patchcore``), else the method class name in lower case."""
    hc = _hydra()
    choice = hc.runtime.choices.get("method") if hc is not None else None
    if choice:
        return str(choice)
    method = method_config or OmegaConf.to_container(cfg.get("method") or {}, resolve=True) or {}
    target = str(method.get("_target_", "method"))
    return target.rsplit(".", 1)[-1].lower()


def backbone_name(method_config: dict | None) -> str | None:
    """The method's backbone (``method.backbone.name``, CLIP ``method.model.model_name``, ...)."""
    for path in BACKBONE_KEYS:
        node: Any = method_config or {}
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, str) and node:
            return node
    return None


def categories_label(category: Any, sep: str = "+") -> str:
    """``"all"``, ``"bottle"``, ``"bottle+screw"`` or ``"bottle+cable+13more"``."""
    if isinstance(category, str):
        names = [c.strip() for c in category.split(",") if c.strip()]
    else:
        names = [str(c) for c in category or []]
    if not names:
        return "all"
    if len(names) > MAX_NAMED_CATEGORIES:
        return sep.join(names[:2]) + f"{sep}{len(names) - 2}more"
    return sep.join(names)


def git_commit(folder: Path = PACKAGE_DIR) -> str | None:
    """The commit of the project's checkout (``<sha>-dirty`` with uncommitted changes), or None."""
    try:
        sha = subprocess.run(["git", "-C", str(folder), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(folder), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{sha}-dirty" if dirty else sha or None


def describe(cfg: DictConfig, method_config: dict | None = None) -> dict[str, Any]:
    """Fill ``cfg.tracking`` (name, group, tags, description) from what the run is; the values a user set win.
    Returns the filled ``tracking`` node as a dict (nothing when the config has none)."""
    if cfg.get("tracking") is None:
        return {}
    hc = _hydra()
    task = str(cfg.get("task_name") or "train")
    method_config = method_config or OmegaConf.to_container(cfg.get("method") or {}, resolve=True)
    data = cfg.get("eval_data") or cfg.data  # what the run's numbers are measured on
    job = None
    if hc is not None and str(hc.mode) == "RunMode.MULTIRUN":
        job = hc.job.num
    name = "-".join([method_name(cfg, method_config), str(data.format), categories_label(data.get("category"))])
    name += f"-job{job}" if job is not None else ""
    name += f"-{task}" if task != "train" else ""
    commit = git_commit()
    tags = {
        "fit_data": str(cfg.data.format) if cfg.get("eval_data") else None,  # zero-shot: fitted on other data
        "method": method_name(cfg, method_config),
        "data": str(data.format),
        "categories": categories_label(data.get("category"), ","),
        "backbone": backbone_name(method_config),
        "task": task,
        "git_commit": commit,
        "job": job,
    }
    group = f"{task}-{Path(str(hc.sweep.dir)).name}" if job is not None else None
    with open_dict(cfg):
        tr = cfg.tracking
        tr.name = tr.get("name") or name
        tr.group = tr.get("group") or group
        user = tr.get("tags")
        user = OmegaConf.to_container(user, resolve=True) if isinstance(user, DictConfig) else dict(user or {})
        tr.tags = {**{k: str(v) for k, v in tags.items() if v is not None}, **{k: str(v) for k, v in user.items()}}
        tr.description = tr.get("description") or command_line(cfg)
        if tr.group:
            tr.tags.group = tr.group
    return OmegaConf.to_container(cfg.tracking, resolve=True)


def command_line(cfg: DictConfig) -> str:
    """``python train.py <overrides>`` of this run (the run's description)."""
    hc = _hydra()
    overrides = list(hc.overrides.task) if hc is not None else []
    return " ".join([f"python {cfg.get('task_name') or 'train'}.py", *overrides])


def flat_config(cfg: DictConfig | dict, method_config: dict | None = None) -> dict[str, Any]:
    """The resolved config as ``{"method.backbone.name": "...", ...}``; lists stay values.
    ``method_config``: the method's config when ``cfg`` has none (test.py: from the checkpoint)."""
    tree = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    if method_config and not tree.get("method"):
        tree["method"] = method_config
    out: dict[str, Any] = {}

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}.{k}" if prefix else str(k))
        elif prefix:
            out[prefix] = node

    walk(tree, "")
    return out


def _scalar(value: Any) -> str | int | float | bool:
    if isinstance(value, (bool, int, float, str)):
        return value
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# ------------------------------------------------------------------------------ the loggers
def start(cfg: DictConfig, model: Any | None = None) -> list[Any]:
    """Describe the run (``describe``), build ``cfg.logger``'s loggers and log the config to each."""
    method_config = getattr(model, "method_config", None)
    describe(cfg, method_config)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c is not None and "_target_" in c]
    if loggers and model is not None:
        model._log_hyperparams = False  # the method's arguments are logged with the whole config
    log_config(loggers, cfg, method_config)
    return loggers


def log_config(loggers: Iterable[Any], cfg: DictConfig, method_config: dict | None = None) -> None:
    """The flattened resolved config to every logger, in the form each one shows best."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:  # other DDP ranks hold no logger runs
        return
    flat = flat_config(cfg, method_config)
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            _mlflow_params(logger, flat)
        elif isinstance(logger, WandbLogger):
            tree = OmegaConf.to_container(cfg, resolve=True)
            if method_config and not tree.get("method"):
                tree["method"] = method_config
            logger.experiment.config.update(tree, allow_val_change=True)  # nested: the UI shows dotted keys
        elif isinstance(logger, TensorBoardLogger):
            logger.log_hyperparams(flat)  # hparams.yaml (no hp_metric: default_hp_metric false)
            _tensorboard_hparams(logger, flat)
        else:
            logger.log_hyperparams(flat)


def _mlflow_params(logger: Any, flat: dict[str, Any]) -> None:
    from mlflow.entities import Param

    params = [Param(k, str(_scalar(v))[:6000]) for k, v in flat.items()]  # MLflow's value limit
    for i in range(0, len(params), 100):  # MLflow's batch limit
        logger.experiment.log_batch(logger.run_id, params=params[i:i + 100])


def test_metric_names() -> list[str]:
    """The metric columns of TensorBoard's HParams tab (their values: the test scalars)."""
    return [f"test/mean/{k}" for k in METRIC_KEYS] + [f"test/calibrated/{k}" for k in CALIBRATED_KEYS]


def _tensorboard_hparams(logger: Any, flat: dict[str, Any]) -> None:
    """The HParams tab: every config key as a column and the test metrics as metric columns; their
    values are read from the test scalars of the same run, so the session is written now (a run
    that fails later still shows its config)."""
    from torch.utils.tensorboard.summary import hparams

    writer = logger.experiment
    exp, ssi, sei = hparams({k: _scalar(v) for k, v in flat.items()}, dict.fromkeys(test_metric_names(), 0.0))
    file_writer = writer._get_file_writer()
    for summary in (exp, ssi, sei):
        file_writer.add_summary(summary)
    writer.flush()


def results_markdown(results: dict[str, Any]) -> str:
    """Both results tables as markdown that renders (blank lines around each table)."""
    text = "### Threshold-free metrics\n\n" + markdown_table(results)
    if results.get("calibrated"):
        text += "\n\n### At the calibrated thresholds (out-of-sample normal train images)\n\n" + calibrated_table(results)
    return text + "\n"


def _rows(per_cat: dict[str, dict], mean: dict, keys: list[str]) -> list[list[Any]]:
    rows = [[c, *[m.get(k) for k in keys]] for c, m in per_cat.items()]
    return rows + [["mean", *[mean.get(k) for k in keys]]]


def log_results(loggers: Iterable[Any], results: dict[str, Any]) -> None:
    """The results tables to every logger that shows tables or text."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    keys = list(results["mean"])
    cal = results.get("calibrated") or {}
    cal_keys = list(cal.get("mean") or {})
    for logger in loggers:
        if isinstance(logger, TensorBoardLogger):
            logger.experiment.add_text("results", results_markdown(results))
            logger.experiment.flush()
        elif isinstance(logger, WandbLogger):
            logger.log_table("results", columns=["category", *keys],
                             data=_rows(results["categories"], results["mean"], keys))
            if cal_keys:
                logger.log_table("results_calibrated", columns=["category", *cal_keys],
                                 data=_rows(cal["categories"], cal["mean"], cal_keys))
        elif isinstance(logger, MLFlowLogger) and logger.run_id is not None:
            client, run = logger.experiment, logger.run_id
            client.log_text(run, results_markdown(results), "results.md")
            client.log_dict(run, results, "results.json")
            rows = _rows(results["categories"], results["mean"], keys)
            client.log_table(run, {"category": [r[0] for r in rows],
                                   **{k: [r[i + 1] for r in rows] for i, k in enumerate(keys)}}, "results_table.json")
            client.set_tag(run, "categories", ",".join(results["categories"]))


def dashboards(loggers: Iterable[Any], log_dir: str | Path | None = None) -> list[tuple[str, str]]:
    """(logger, how to open its dashboard) for each active logger."""
    from lightning.pytorch.loggers import CSVLogger, MLFlowLogger, TensorBoardLogger, WandbLogger

    out = []
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            uri = logger._tracking_uri
            if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
                uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
            hint = "" if getattr(logger, "system_metrics", True) or system_metrics_available() else \
                "; system metrics: pip install psutil"
            out.append(("MLflow", f"mlflow ui --backend-store-uri {uri}"
                                  f"    (run '{logger._run_name}', experiment '{logger._experiment_name}'{hint})"))
        elif isinstance(logger, TensorBoardLogger):
            root = Path(log_dir).resolve() if log_dir else Path(logger.log_dir).resolve()
            out.append(("TensorBoard", f"tensorboard --logdir {root}    (this run: {Path(logger.log_dir).resolve()})"))
        elif isinstance(logger, WandbLogger):
            run = logger.experiment
            if getattr(run, "offline", False) or getattr(getattr(run, "settings", None), "_offline", False):
                out.append(("W&B", f"wandb sync {Path(run.dir).parent.resolve()}    (offline run '{run.name}')"))
            else:
                out.append(("W&B", str(getattr(run, "url", "") or run.name)))
        elif isinstance(logger, CSVLogger):
            out.append(("CSV", str(Path(logger.log_dir).resolve() / "metrics.csv")))
    return out


def finish(loggers: Iterable[Any]) -> None:
    """End the loggers' runs: W&B's run stays open after Lightning is done with it, and the next
    job of a multirun in the same process (Hydra's local launcher) would log into it."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()
