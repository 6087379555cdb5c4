"""Turn a run or a multirun folder into one markdown table.

    python -m iad_lightning.report outputs/train/multiruns/2026-11-22_10-00-00

Rows are categories plus a mean row; columns are runs x metrics. A run is any folder holding a
``results.json``; it is named by its Hydra overrides (``.hydra/overrides.yaml``), else by its
folder. Runs whose overrides differ only in ``data.category`` (a per-category sweep) form one
column group, whose mean row is the unweighted mean over its categories. The table is printed and
written as ``report.md`` in DIR.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import yaml

from iad_lightning.metrics import METRIC_KEYS
from iad_lightning.results import SHORT_NAMES, _fmt, atomic_write, mean_over_categories


def find_runs(root: Path) -> list[Path]:
    """Folders under ``root`` (itself included) that hold a results.json, in a stable order."""
    runs = sorted({p.parent for p in root.rglob("results.json")}, key=lambda p: (len(p.parts), str(p)))

    def number(p: Path) -> tuple:
        return tuple(int(s) if s.isdigit() else s for s in p.relative_to(root).parts)

    return sorted(runs, key=number)


def run_name(run: Path, root: Path) -> str:
    overrides = run / ".hydra" / "overrides.yaml"
    if overrides.is_file():
        items = yaml.safe_load(overrides.read_text()) or []
        items = [o for o in items if not o.startswith(("hydra.", "paths.", "data.category="))]
        if items:
            return " ".join(items)
    rel = run.relative_to(root)
    return str(rel) if str(rel) != "." else run.name


def build_report(root: str | Path, metrics: tuple[str, ...] | None = None) -> str:
    """The markdown table of every run under ``root``."""
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(f"no results.json under '{root}'")
    results: dict[str, dict[str, Any]] = {}
    for run in runs:
        name = run_name(run, root)
        res = json.loads((run / "results.json").read_text())
        group = results.setdefault(name, {"categories": {}})
        if set(group["categories"]) & set(res["categories"]):  # a repeated run: its own column
            name = f"{name} ({run.relative_to(root)})"
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
    header = ["category"] + [f"{name}<br>{SHORT_NAMES[k]}" for name in results for k in keys]
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
