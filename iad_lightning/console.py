"""What a run prints: one copy of each log line, and at the end a summary that says where
everything went and how to open it (``run_summary``); a multirun ends with its report
(``MultirunReport``, a Hydra callback in ``conf/hydra/default.yaml``).

Warnings a user cannot act on are filtered where they arise, each with its reason: Lightning's
in ``methods/base.py``, faiss's loader lines in ``models/nn_search.py``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

LIGHTNING_LOGGERS = ("lightning", "lightning.pytorch", "lightning.fabric")


class _DropAdverts(logging.Filter):
    """Lightning's "💡 Tip: ... try installing litlogger" lines advertise a service; nothing to fix."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "💡 Tip" not in record.getMessage()


def setup_logging() -> None:
    """One copy of every Lightning log line. Lightning adds its own console handler to the
    ``lightning`` logger and also propagates to the root logger, which Hydra (or the user) has
    configured: each INFO line would print twice. With a configured root, Lightning's own handlers
    go and the root's format (and Hydra's run log file) is used."""
    if logging.getLogger().handlers:
        for name in LIGHTNING_LOGGERS:
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # noqa: E721 (Lightning's console, not files)
                    logger.removeHandler(handler)
            logger.propagate = True
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero.filters):
        rank_zero.addFilter(_DropAdverts())


# ------------------------------------------------------------------------------ the run summary
RUN_FILES = (  # (path in the run folder, what it is)
    ("results.json", "metrics per category (results.md: the same as tables)"),
    ("scores.csv", "one row per test image: path, category, label, score"),
    ("checkpoints/last.ckpt", "the fitted model, thresholds included: test.py / predict.py ckpt_path=..."),
    ("images", "anomaly maps of test images (<category>_grid.png)"),
    ("plots", "ROC and PRO curves per category, metrics chart"),
)


def run_summary(out_dir: str | Path, table: str, dashboards: Iterable[tuple[str, str]] = (),
                log_file: str | Path | None = None) -> str:
    """The text printed at the end of a run: the results table, the run folder and what is in
    it (only what exists), and how to open each active logger's dashboard."""
    out = Path(out_dir).resolve()
    lines = ["", "Results:", table.rstrip(), "", f"Run folder: {out}"]
    entries = [(rel + ("/" if (out / rel).is_dir() else ""), what) for rel, what in RUN_FILES if (out / rel).exists()]
    if log_file and Path(log_file).is_file():
        entries.append((Path(log_file).name, "this console's log"))
    width = max((len(rel) for rel, _ in entries), default=0)
    lines += [f"  {rel:<{width}}  {what}" for rel, what in entries]
    boards = list(dashboards)
    if boards:
        lines.append("Dashboards:")
        width = max(len(name) for name, _ in boards)
        lines += [f"  {name:<{width}}  {how}" for name, how in boards]
    return "\n".join(lines) + "\n"


def log_file_of(out_dir: str | Path) -> Path | None:
    """Hydra's log file of this run (``<task>.log`` in the run folder), if Hydra writes one."""
    for handler in logging.getLogger().handlers:
        path = getattr(handler, "baseFilename", None)
        if path and Path(path).parent.resolve() == Path(out_dir).resolve():
            return Path(path)
    return None


class MultirunReport(Callback):
    """At the end of a multirun: the report of its runs (``python -m iad_lightning.report``),
    printed with the command that rebuilds it and written as ``report.md`` in the sweep folder."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from iad_lightning.report import build_report
        from iad_lightning.results import atomic_write

        sweep = Path(str(config.hydra.sweep.dir)).resolve()
        try:
            table = build_report(sweep)
        except FileNotFoundError:  # test=false, predict.py, or every job failed
            return
        except Exception as err:  # a damaged results.json: the jobs' own outputs are intact
            print(f"\nNo multirun report for {sweep}: {err}")
            return
        atomic_write(sweep / "report.md", table)
        print(f"\nMultirun report (python -m iad_lightning.report {sweep}):\n{table}"
              f"written to {sweep / 'report.md'}")
