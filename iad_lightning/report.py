"""Turn a run or a multirun folder into one markdown table.

    python -m iad_lightning.report outputs/train/multiruns/2026-11-22_10-00-00
    python -m iad_lightning.report outputs/train/runs/2026-11-22_10-00-00      (a single run)

Rows are categories plus a mean row. A run is any folder holding a ``results.json``. Runs are
grouped by the Hydra overrides (``.hydra/overrides.yaml``) that vary between them, other than the
category: a plain category sweep (``-m data.category=bottle,screw``) is one group, so one column
per metric; a method sweep (``-m method=patchcore,padim data.category=...``) is one column group per
method (``method=patchcore<br>I-AUROC``). A group's mean row is the unweighted mean over its own
categories. The table is printed and written as ``report.md`` in DIR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from iad_lightning.metrics import METRIC_KEYS
from iad_lightning.results import SHORT_NAMES, _fmt, atomic_write, mean_over_categories

IGNORED = ("hydra.", "paths.", "data.category", "logger", "callbacks", "tracking.")  # not what a run is


def find_runs(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that hold a results.json, in a stable order."""
    runs = sorted({p.parent for p in root.rglob("results.json")}, key=lambda p: (len(p.parts), str(p)))

    def number(p: Path) -> tuple:
        return tuple(int(s) if s.isdigit() else s for s in p.relative_to(root).parts)

    return sorted(runs, key=number)


def run_overrides(run: Path) -> dict[str, str]:
    """``{key: value}`` of the run's Hydra overrides, except those that do not change what is
    measured (output paths, loggers, callbacks) and the category."""
    path = run / ".hydra" / "overrides.yaml"
    items = (yaml.safe_load(path.read_text()) or []) if path.is_file() else []
    out = {}
    for item in items:
        key, _, value = str(item).lstrip("+~").partition("=")
        if not key.startswith(IGNORED):
            out[key] = value
    return out


def group_names(runs: list[Path]) -> list[str]:
    """Each run's column group: the overrides that vary between the runs, other than the category
    ('' when none vary: a single group)."""
    overrides = [run_overrides(r) for r in runs]
    keys = {k for o in overrides for k in o}
    varying = [k for k in sorted(keys) if len({o.get(k) for o in overrides}) > 1]
    return [" ".join(f"{k}={o[k]}" for k in varying if k in o) for o in overrides]


def build_report(root: str | Path, metrics: tuple[str, ...] | None = None) -> str:
    """The markdown table of every run under ``root``."""
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no results.json under '{root}'")
    results: dict[str, dict[str, Any]] = {}
    for run, name in zip(runs, group_names(runs)):
        res = json.loads((run / "results.json").read_text())
        group = results.setdefault(name, {"categories": {}})
        if set(group["categories"]) & set(res["categories"]):  # a repeated run: its own column
            rel = str(run.relative_to(root))
            name = f"{name} ({rel})" if name else rel
            group = results.setdefault(name, {"categories": {}})
        group["categories"].update(res["categories"])
    for group in results.values():
        group["mean"] = mean_over_categories(group["categories"])
    keys = metrics or tuple(
        k for k in METRIC_KEYS if any(r["mean"].get(k) is not None for r in results.values())
    )
    categories: list[str] = []
    for r in results.values():
        categories += [c for c in r["categories"] if c not in categories]
    header = ["category"] + [f"{name}<br>{SHORT_NAMES[k]}" if name else SHORT_NAMES[k]
                             for name in results for k in keys]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for cat in categories:
        cells = [_fmt(r["categories"].get(cat, {}).get(k)) for r in results.values() for k in keys]
        lines.append(f"| {cat} | " + " | ".join(cells) + " |")
    cells = [_fmt(r["mean"].get(k)) for r in results.values() for k in keys]
    lines.append("| **mean** | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="a run folder or a multirun folder")
    parser.add_argument("--metrics", nargs="*", choices=METRIC_KEYS, help="columns (default: all present)")
    parser.add_argument("--out", default=None, help="output file (default: DIR/report.md)")
    args = parser.parse_args(argv)
    table = build_report(args.dir, tuple(args.metrics) if args.metrics else None)
    out = Path(args.out) if args.out else Path(args.dir) / "report.md"
    atomic_write(out, table)
    print(table)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
