"""Bench: decision thresholds, today's rule against the new one, side by side in one run.

    python bench/calibration.py [--datasets mvtec_screw kolektorsdd_commutator] [--fprs 0.01 0.05 0.1]
                                [--folds 5 [10 loo ...]] [--no-plain] [--data-root ../shared/data]
                                [--out /tmp/calibration_bench.json]

Per data set, PatchCore with ``backbone=lite0`` (the project's config, composed with Hydra) is
fitted three times through the Lightning ``Trainer`` with the project's ``ThresholdCalibration``
callback:

* **today** (``threshold.folds=0``, ``holdout_fraction=0.1``): fitted on 90 % of the train good
  images, calibrated on the 10 % held out, with the old rule (the ``floor(a n)``-th largest held-out
  score; below ``1 / n`` the closest supported rate, 0 -> the maximum);
* **new** (``threshold.folds=K`` for each ``--folds`` value): fitted on ALL train good images (the
  papers' protocol; the same bit-equal bank for every K), calibrated on the cross-fitted
  out-of-sample scores of every one of them with the new rule (``normal_threshold``: conformal
  rank, GPD tail where no rank exists); ``tail=gpd``: the same scores with the tail model whenever
  < 5 normal images are expected above; ``--folds loo``: ``threshold.leave_one_out=true`` (every
  train image against the final bank without its own rows: one coreset);
* **plain** (``folds=0``, no hold-out): the fit without any calibration, for the fit time.

Then each fitted model is tested (``trainer.test``) and, for every requested rate ``a``:
the realised false-alarm rate on the TEST normal images, the recall on the test defective images
at the calibrated threshold, and the oracle recall at the requested rate (the threshold that the
test normals themselves would give, ``floor(a n)`` of them above: not achievable without test
data; each model its own). Thresholds use train images only; test images are only scored.

Fit times (train pass + coreset + calibration) are printed with the ratio to ``plain``; take them
on an idle machine. Data: MVTec-layout folders ``<data-root>/<set>`` (CC BY-NC-SA, never copied
into the repo); a missing set is skipped.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"


def legacy_threshold(values, fpr: float) -> float:
    """Today's rule (before cross-fitting): the (k+1)-th largest, k = floor(fpr n); k = 0 -> 1 if
    fpr n >= 0.5 (the closest supported rate)."""
    import numpy as np

    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    k = math.floor(fpr * n + 1e-9)
    if k == 0 and fpr > 0:
        k = 1 if fpr * n >= 0.5 else 0
    return float(v[n - k - 1])


def at_threshold(t: float, scores, labels) -> tuple[float, float]:
    """(false-alarm rate on the normals, recall on the defective) at threshold t."""
    import numpy as np

    scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
    return float((scores[~labels] > t).mean()), float((scores[labels] > t).mean())


def oracle_recall(fpr: float, scores, labels) -> float:
    import numpy as np

    scores, labels = np.asarray(scores), np.asarray(labels).astype(bool)
    return at_threshold(legacy_threshold(np.sort(scores[~labels]), fpr) if fpr * (~labels).sum() >= 1
                        else float(scores[~labels].max()), scores, labels)[1]


def patchcore_on(data_root: Path, dataset: str) -> tuple:
    """(method, datamodule) of the project's config: PatchCore ``backbone=lite0`` on ``dataset``."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose("train", overrides=["backbone=lite0", "data=mvtec", f"data.root={data_root}",
                                          f"data.category={dataset}", "data.num_workers=0"])
    model = instantiate(cfg.method)
    dm = instantiate(cfg.data)
    dm.preprocess = model.preprocess
    return model, dm


def fit_and_test(data_root: Path, dataset: str, folds: int, holdout: float, test: bool,
                 leave_one_out: bool = False) -> dict:
    import lightning as L

    from iad_lightning.calibration import apply_holdout
    from iad_lightning.callbacks.calibration import ThresholdCalibration

    L.seed_everything(0, workers=True)
    model, dm = patchcore_on(data_root, dataset)
    if folds == 0:
        apply_holdout(dm, holdout)
    cal = ThresholdCalibration(normal_fpr=0.01, folds=folds, seed=0, leave_one_out=leave_one_out)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        callbacks=[cal], enable_progress_bar=False, enable_model_summary=False)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(model, datamodule=dm)
    out = {"fit_seconds": time.perf_counter() - start, "train_images": len(dm.dataset("train"))}
    info = model.calibration_info or {}
    cat = info.get("categories", {}).get(dataset)
    if cat:
        out["normal_scores"] = cat["scores"]
        out["source"] = info["source"]
    if test:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer.test(model, datamodule=dm, verbose=False)
        scores, labels = model.curves[dataset]["test_scores"]
        out["test_scores"], out["test_labels"] = scores.tolist(), labels.astype(int).tolist()
        out["image_auroc"] = model.results["categories"][dataset]["image_auroc"]
    return out


def with_interval(fpr: float, labels) -> str:
    """The realised rate on the test normals with its Clopper-Pearson 95 % interval: what the test
    set's size can resolve (41 normals: steps of 2.4 %)."""
    from iad_lightning.calibration import clopper_pearson

    n = len(labels) - sum(labels)
    lo, hi = clopper_pearson(round(fpr * n), n)
    return f"{100 * fpr:.1f} [{100 * lo:.1f}-{100 * hi:.1f}]"


def _label(k: str) -> str:
    return "leave-one-out" if k == "loo" else f"K={k}"


def table(results: dict, fprs: list[float], folds: list[str]) -> str:
    import numpy as np

    from iad_lightning.calibration import normal_threshold

    head = ["today: FPR", "today: recall", "today: oracle"]
    for k in folds:
        head += [f"new {_label(k)}: FPR", f"new {_label(k)}: recall"]
    head += [f"new {_label(folds[0])}, tail=gpd: FPR", "recall", "new: oracle", f"new {_label(folds[0])}: rule"]
    lines = ["| data set | requested | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
    for dataset, runs in results.items():
        today = runs["today"]
        for fpr in fprs:
            f, r = at_threshold(legacy_threshold(today["normal_scores"], fpr), today["test_scores"], today["test_labels"])
            cells = [with_interval(f, today["test_labels"]), f"{100 * r:.1f}",
                     f"{100 * oracle_recall(fpr, today['test_scores'], today['test_labels']):.1f}"]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                for k in folds:
                    new = runs[f"new{k}"]
                    t = normal_threshold(np.asarray(new["normal_scores"]), fpr)
                    f, r = at_threshold(t.value, new["test_scores"], new["test_labels"])
                    cells += [with_interval(f, new["test_labels"]), f"{100 * r:.1f}"]
                    if k == folds[0]:
                        first = t
                new = runs[f"new{folds[0]}"]
                gpd = normal_threshold(np.asarray(new["normal_scores"]), fpr, tail="gpd")
            f, r = at_threshold(gpd.value, new["test_scores"], new["test_labels"])
            cells += [f"{100 * f:.1f}", f"{100 * r:.1f}",
                      f"{100 * oracle_recall(fpr, new['test_scores'], new['test_labels']):.1f}",
                      first.rule + (f" (top {first.determined_by})" if first.rule == "gpd" else "")]
            lines.append(f"| {dataset} | {100 * fpr:g} % | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mvtec_screw", "kolektorsdd_commutator"])
    p.add_argument("--fprs", nargs="+", type=float, default=[0.01, 0.05, 0.1])
    p.add_argument("--folds", nargs="+", default=["5"], help="K >= 2, or loo (leave-one-image-out)")
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=Path("/tmp/calibration_bench.json"))
    p.add_argument("--no-plain", action="store_true", help="skip the uncalibrated fit (no fit-time baseline)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    results = {}
    for dataset in args.datasets:
        if not (args.data_root / dataset).is_dir():
            print(f"skipping {dataset}: not under {args.data_root}")
            continue
        runs = {"today": fit_and_test(args.data_root, dataset, 0, 0.1, True)}
        for k in args.folds:
            runs[f"new{k}"] = fit_and_test(args.data_root, dataset, 5 if k == "loo" else int(k), 0.0, True,
                                           leave_one_out=k == "loo")
        if not args.no_plain:
            runs["plain"] = fit_and_test(args.data_root, dataset, 0, 0.0, False)
        results[dataset] = runs
        new = runs[f"new{args.folds[0]}"]
        n_test = len(new["test_labels"])
        print(f"{dataset}: today {len(runs['today']['normal_scores'])} held-out of "
              f"{runs['today']['train_images'] + len(runs['today']['normal_scores'])} train images, new "
              f"{len(new['normal_scores'])} cross-fitted; {n_test} test images ({n_test - sum(new['test_labels'])} "
              f"normal); image AUROC today {100 * runs['today']['image_auroc']:.2f}, new {100 * new['image_auroc']:.2f}",
              flush=True)
    if not results:
        return 1
    print("\nRealised false-alarm rate on the test normals [its 95 % Clopper-Pearson interval] and recall on the "
          "test defects at the calibrated threshold (%), and the oracle recall at the requested rate:\n")
    print(table(results, args.fprs, args.folds))
    print("\nFit time (train pass + coreset + calibration), seconds (ratio to the fit without calibration):\n")
    print("| data set | plain (all images, no thresholds) | today (90 % + hold-out) | "
          + " | ".join("new (all + leave-one-image-out)" if k == "loo" else f"new (all + {k}-fold cross-fitting)"
                       for k in args.folds) + " |\n|---|---:|---:|"
          + "---:|" * len(args.folds))
    for dataset, runs in results.items():
        base = runs.get("plain", {}).get("fit_seconds")
        cell = lambda r: f"{r['fit_seconds']:.1f}" + (f" ({r['fit_seconds'] / base:.2f}x)" if base else "")  # noqa: E731
        print(f"| {dataset} | {f'{base:.1f}' if base else '-'} | {cell(runs['today'])} | "
              + " | ".join(cell(runs[f"new{k}"]) for k in args.folds) + " |")
    args.out.write_text(json.dumps({"fprs": args.fprs, "results": results}) + "\n")
    print(f"\nraw scores: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
