"""Bench: why a calibrated false-alarm rate differs on the test normals: the rule, or the data?

    python bench/calibration_shift.py [--datasets mvtec_screw kolektorsdd_commutator]
                                      [--group kolektorsdd_commutator='^(kos\\d+)_'] [--splits 2000]
                                      [--data-root ../shared/data] [--out /tmp/calibration_shift.json]

``bench/calibration.py`` measures the realised false-alarm rate on the test normals at the
threshold calibrated on cross-fitted train scores. When it is far from the requested rate, three
causes are possible, and this script measures each, PatchCore ``backbone=lite0`` (the project's
config), the backbone run ONCE per image (train and test patch embeddings kept in memory):

1. **The fold models are weaker than the final one** (they fit 1 - 1/K of the images): the
   out-of-sample (OOS) train scores of several variants, from most to least like the final model:
   K-fold (K = 5, 10) with the method's coreset ratio; 5-fold with the ratio raised so that each
   fold bank has as many rows as the final bank (``K5 same bank size``); leave-one-image-out on the
   final coreset itself (its rows from that image removed: the final model up to one image).
2. **Images of a group are alike** (Kolektor: the 7-8 parts of one commutator, ``kosNN_PartM``):
   5-fold with whole groups per fold, and leave-one-group-out on the final coreset. The test
   normals come from other commutators (kos36-50) than the train ones (kos01-35).
3. **The test normals differ from the train normals** (a shift no train-only rule can see): the
   quantiles of each OOS set against the test normals' scores on the final model, and a
   Mann-Whitney U test (two-sided) of the two samples.

Plus the spread that the test set's size alone gives, from train images only: ``--splits`` random
splits of the train groups into a calibration part and a pseudo-test part with as many groups as
the test normals have; the threshold from the calibration part's leave-one-group-out scores (the
project's rule, ``normal_threshold``); the rate on the pseudo-test part. Its mean is the rule's
calibration (the request when the groups are exchangeable); its 5-95 % range, the spread a test set
of that size shows for a perfectly calibrated rule. Test images are only scored, never fitted on.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/calibration.py: shared helpers
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
GROUPS = {"kolektorsdd_commutator": r"^(kos\d+)_"}  # file-name pattern of an image's group


def embeddings(data_root: Path, dataset: str) -> dict:
    """Patch embeddings (N, P, D) of the train (dataset order) and test images, the method and labels."""
    import torch

    from calibration import patchcore_on  # bench/calibration.py

    method, dm = patchcore_on(data_root, dataset)
    method.eval()
    dm.setup("fit")
    dm.setup("test")
    out = {"method": method}
    for split in ("train", "test"):
        ds = dm.dataset(split)
        loader = torch.utils.data.DataLoader(ds, batch_size=16, shuffle=False)
        rows, labels = [], []
        with torch.no_grad():
            for batch in loader:
                emb, grid = method.model.embed(method.feature_extractor(batch["image"]))
                rows.append(emb)
                labels.append(torch.as_tensor(batch["label"]))
        out[split] = {"emb": torch.cat(rows), "label": torch.cat(labels).numpy().astype(bool),
                      "names": [Path(str(r.image)).name for r in ds.records]}
        out["grid"], out["size"] = grid, tuple(batch["image"].shape[-2:])
    return out


def group_of(names: list[str], pattern: str | None) -> list[str]:
    """Each image's group: the pattern's first group in its file name, else the image itself."""
    if pattern is None:
        return list(names)
    found = [re.search(pattern, n) for n in names]
    return [m.group(1) if m else n for m, n in zip(found, names)]


class Scorer:
    """The method's own scoring (``PatchCoreModel.score_embedding``) against any bank."""

    def __init__(self, data: dict) -> None:
        self.model, self.grid, self.size = data["method"].model, data["grid"], data["size"]

    def __call__(self, bank, emb, owner=None, bank_owner=None):
        """Scores of ``emb`` against ``bank``; with owners (the unit of each query image and of each
        bank row), each image without the rows of its own unit (the method's leave-out search)."""
        import numpy as np
        import torch

        self.model.fit(bank)
        out = []
        for start in range(0, emb.shape[0], 16):
            leave_out = None if owner is None else (owner[start:start + 16], bank_owner)
            _, score = self.model.score_embedding(emb[start:start + 16], self.grid, self.size, leave_out=leave_out)
            out.append(score)
        return np.asarray(torch.cat(out), dtype=np.float64)


def coreset(emb, hp: dict, ratio: float):
    """The method's coreset of ``emb``'s patches: (rows (M, D), the image of each row)."""
    from iad_lightning.models.coreset import approximate_greedy_coreset

    n, p, d = emb.shape
    flat = emb.reshape(-1, d)
    keep = approximate_greedy_coreset(flat, min(ratio, 1.0), hp["projection_dim"], hp["num_starts"], hp["seed"])
    return flat[keep], (keep // p).numpy()


def oos_variants(data: dict, groups: list[str], grouped: bool) -> dict:
    """Out-of-sample scores of every train image, per variant (see the module docstring)."""
    import numpy as np
    import torch

    hp = dict(data["method"].hparams)
    ratio = hp["coreset_ratio"]
    emb = data["train"]["emb"]
    n = emb.shape[0]
    score = Scorer(data)
    g = np.asarray(groups)
    unique = sorted(set(groups))

    def kfold(k: int, by_group: bool = False, same_bank: bool = False) -> np.ndarray:
        rng = np.random.default_rng([0, k, by_group])
        if by_group:
            fold_of_group = dict(zip([unique[j] for j in rng.permutation(len(unique))], np.arange(len(unique)) % k))
            fold = np.array([fold_of_group[x] for x in groups])
        else:
            fold = np.empty(n, dtype=np.int64)
            fold[rng.permutation(n)] = np.arange(n) % k
        out = np.empty(n)
        for f in range(k):
            fit = np.flatnonzero(fold != f)
            bank, _ = coreset(emb[torch.from_numpy(fit)], hp, ratio * n / len(fit) if same_bank else ratio)
            out[fold == f] = score(bank, emb[torch.from_numpy(np.flatnonzero(fold == f))])
        return out

    final_bank, owner = coreset(emb, hp, ratio)

    def leave_out(key: np.ndarray) -> np.ndarray:  # key: the unit left out (an image, or its group)
        unit = torch.from_numpy(np.unique(key, return_inverse=True)[1])
        return score(final_bank, emb, owner=unit, bank_owner=unit[torch.from_numpy(owner)])

    variants = {"K5": kfold(5), "K10": kfold(10), "K5 same bank size": kfold(5, same_bank=True),
                "leave-one-image-out": leave_out(np.arange(n))}
    if grouped:
        variants["K5 by group"] = kfold(5, by_group=True)
        variants["leave-one-group-out"] = leave_out(g)
    return {"final_bank": final_bank, "variants": variants}


def group_resampling(scores, groups: list[str], test_groups: int, fprs: list[float], splits: int) -> dict:
    """Mean and 5-95 % of the pseudo-test rate over random group splits of the train images."""
    import numpy as np

    from iad_lightning.calibration import normal_threshold

    g = np.asarray(groups)
    unique = np.unique(g)
    hold = min(test_groups, len(unique) // 2)
    rng = np.random.default_rng(0)
    out = {}
    for a in fprs:
        rates = []
        for _ in range(splits):
            pseudo = np.isin(g, unique[rng.permutation(len(unique))[:hold]])
            t = normal_threshold(scores[~pseudo], a).value
            rates.append(float((scores[pseudo] > t).mean()))
        out[a] = {"mean": float(np.mean(rates)), "p05": float(np.quantile(rates, 0.05)),
                  "p95": float(np.quantile(rates, 0.95)), "pseudo_test_groups": int(hold)}
    return out


def run(data_root: Path, dataset: str, pattern: str | None, fprs: list[float], splits: int) -> dict:
    import numpy as np
    from scipy.stats import mannwhitneyu

    from iad_lightning.calibration import clopper_pearson, normal_threshold

    from calibration import at_threshold, oracle_recall  # bench/calibration.py

    start = time.perf_counter()
    data = embeddings(data_root, dataset)
    groups = group_of(data["train"]["names"], pattern)
    oos = oos_variants(data, groups, grouped=pattern is not None)
    test_scores = Scorer(data)(oos["final_bank"], data["test"]["emb"])
    labels = data["test"]["label"]
    normal = test_scores[~labels]
    test_groups = len(set(group_of([n for n, lab in zip(data["test"]["names"], labels) if not lab], pattern)))
    rows = {}
    for name, s in oos["variants"].items():
        row = {"quantiles": np.quantile(s, [0.5, 0.75, 0.9, 0.95]).tolist(),
               "mannwhitney_p": float(mannwhitneyu(s, normal).pvalue), "at": {}}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for a in fprs:
                t = normal_threshold(s, a).value
                f, r = at_threshold(t, test_scores, labels)
                above = int(round(f * len(normal)))
                row["at"][a] = {"fpr": f, "recall": r, "above": above,
                                "fpr_interval": list(clopper_pearson(above, len(normal)))}
        rows[name] = row
    resample_key = "leave-one-group-out" if pattern is not None else "leave-one-image-out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spread = group_resampling(oos["variants"][resample_key], groups, test_groups if pattern else len(normal),
                                  fprs, splits)
    return {"variants": rows, "test_normal_quantiles": np.quantile(normal, [0.5, 0.75, 0.9, 0.95]).tolist(),
            "test_normals": int(len(normal)), "test_normal_groups": test_groups, "train_images": len(groups),
            "train_groups": len(set(groups)), "oracle_recall": {a: oracle_recall(a, test_scores, labels) for a in fprs},
            "resampling": {"scores": resample_key, "splits": splits, "rates": spread},
            "seconds": time.perf_counter() - start}


def report(dataset: str, res: dict, fprs: list[float]) -> str:
    pct = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [f"\n## {dataset}: {res['train_images']} train images ({res['train_groups']} groups), "
             f"{res['test_normals']} test normals ({res['test_normal_groups']} groups); {res['seconds']:.0f} s\n",
             "| out-of-sample train scores | q50 | q75 | q90 | q95 | vs test normals: Mann-Whitney p | "
             + " | ".join(f"{pct(a)} %: test FPR [95 % CI], recall" for a in fprs) + " |",
             "|---|---:|---:|---:|---:|---:|" + "---|" * len(fprs)]
    for name, row in res["variants"].items():
        cells = [f"{q:.1f}" for q in row["quantiles"]] + [f"{row['mannwhitney_p']:.3g}"]
        cells += [f"{pct(v['fpr'])} [{pct(v['fpr_interval'][0])}-{pct(v['fpr_interval'][1])}], {pct(v['recall'])}"
                  for v in row["at"].values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| *test normals, final model* | " + " | ".join(f"{q:.1f}" for q in res["test_normal_quantiles"])
                 + " | | " + " | ".join(f"oracle recall {pct(r)}" for r in res["oracle_recall"].values()) + " |")
    rs = res["resampling"]
    unit = "groups" if rs["scores"] == "leave-one-group-out" else "images"
    lines.append(f"\nSpread from the test set's size alone ({rs['splits']} random splits of the train {unit}, "
                 f"pseudo-test {next(iter(rs['rates'].values()))['pseudo_test_groups']} {unit}, "
                 f"{rs['scores']} scores): " + "; ".join(
                     f"requested {pct(a)} % -> mean {pct(v['mean'])} %, 5-95 % {pct(v['p05'])}-{pct(v['p95'])} %"
                     for a, v in rs["rates"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["mvtec_screw", "kolektorsdd_commutator"])
    p.add_argument("--group", action="append", default=[], metavar="SET=REGEX",
                   help="file-name pattern of an image's group (default: Kolektor's commutator)")
    p.add_argument("--fprs", nargs="+", type=float, default=[0.01, 0.05, 0.1])
    p.add_argument("--splits", type=int, default=2000)
    p.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    p.add_argument("--out", type=Path, default=Path("/tmp/calibration_shift.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    patterns = dict(GROUPS, **dict(g.split("=", 1) for g in args.group))
    results = {}
    for dataset in args.datasets:
        if not (args.data_root / dataset).is_dir():
            print(f"skipping {dataset}: not under {args.data_root}")
            continue
        results[dataset] = run(args.data_root, dataset, patterns.get(dataset), args.fprs, args.splits)
        print(report(dataset, results[dataset], args.fprs), flush=True)
    if not results:
        return 1
    args.out.write_text(json.dumps(results, default=str) + "\n")
    print(f"\nraw figures: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
