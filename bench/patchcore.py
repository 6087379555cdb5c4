"""Benchmark: our PatchCore vs anomalib's on the shared real data sets.

    python bench/patchcore.py [--datasets mvtec_screw kolektorsdd_commutator]
                              [--coreset-ratio 0.1] [--with-anomalib] [--resize-backend pil tensor]
                              [--image-score max paper] [--seed 0 1 2 ...]
                              [--data-root ../shared/data] [--out /tmp/patchcore_bench.json]
    python bench/patchcore.py --render A.json [B.json ...]   # tables from saved results

Every configuration (implementation x dataset) runs in its own fresh subprocess, so that peak
memory (max RSS of that process; peak CUDA memory too on a GPU) belongs to that run alone.
Measured per run: fit time (train pass + memory bank / coreset), predict time (the whole test
set, including the implementation's own metric pass), images/s of predict, peak memory, and the
metrics image AUROC / AP / F1max, pixel AUROC / AU-PRO (at 0.3 FPR), always from the same
function, ``iad_lightning.metrics.compute_metrics``, on each implementation's raw scores and maps.

* ours: the Python API: ``AnomalyDataModule(format="mvtec", root=<data-root>, category=<set>)``,
  ``PatchCore(backbone={"name": "tf_efficientnet_lite0", "layers": [2, 3], "weights": "lite0"})``
  with the paper defaults otherwise, a ``lightning.Trainer``; ``trainer.fit`` and
  ``trainer.test`` are timed separately. ``--resize-backend`` (one or more of ``pil``, the
  official order and our default, and ``tensor``) runs ours once per value and per ``--dims``
  entry; columns are labelled ``ours <dims> <backend>``; result files written before the option
  are ``tensor`` runs. ``--image-score max paper`` also runs ours with the paper's Eq. 7 image score
  (``paper_reweighting=True``, anomalib's score; label suffix ``Eq.7``) besides the official max.
* anomalib (``--with-anomalib``): ``bench/_anomalib_patchcore.py`` run by the Python of a
  separate venv (``--anomalib-python``, default ``/work/venvs/anomalib/bin/python``), see
  ``bench/README.md`` for its recipe. Same data folders, backbone, weights, normalisation,
  geometry (shorter side 256, centre crop 224), coreset ratio; anomalib's own
  ``num_neighbors=9``. Its ``engine.fit`` also runs a validation pass over the test set (to fit
  its score normalisation); that pass is reported apart and not counted in "fit".

``--seed S [S ...]`` repeats every run once per seed (each side seeds its own coreset; ours also
its loaders): at a 1 % coreset on a small test set one seed moves image AUROC by 1-2 points, so
accuracy is compared on the mean over seeds (a second table: mean, standard error, min/max, and
anomalib's mean minus each column's, with the standard error of that difference). The first
table shows the lowest seed's run of each column. ``--render`` merges files, e.g. one per seed.

Data: MVTec-layout folders ``<data-root>/<set>`` (default ``<repo>/../shared/data``;
CC BY-NC-SA 4.0, see its README.md for attribution; never copied into the repo). A missing set
is skipped with a message. Results go to ``--out`` as JSON (not into the repo by default) and
are printed as markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
DEFAULT_DATASETS = ("mvtec_screw", "kolektorsdd_commutator")
DEFAULT_ANOMALIB_PYTHON = "/work/venvs/anomalib/bin/python"
MARK = "BENCH_RESULT "
METRICS = (
    ("image_auroc", "image AUROC"),
    ("image_ap", "image AP"),
    ("image_f1max", "image F1max"),
    ("pixel_auroc", "pixel AUROC"),
    ("pixel_aupro", "pixel AUPRO"),
)


# ------------------------------------------------------------------------------- worker: ours
def parse_dims(spec: str) -> tuple:
    """``--dims`` entry ``PRETRAIN/TARGET`` -> PatchCore's two arguments. PRETRAIN: an int, a
    comma list (one per layer) or a rule (auto, channels, unfolded); TARGET: an int or auto."""
    pre, _, target = spec.partition("/")
    target = target or "auto"
    if "," in pre:
        pre = [int(v) for v in pre.split(",")]
    elif pre.isdigit():
        pre = int(pre)
    return pre, int(target) if target.isdigit() else target


def run_ours(data_root: str, dataset: str, coreset_ratio: float, batch_size: int, seed: int,
             dims: str = "auto/auto", search: dict | None = None, resize_backend: str = "pil",
             image_score: str = "max", projection_dim: int | None = 128, crop: int | None = 224) -> dict:
    """One fit + test of our PatchCore in this (fresh) process; returns the measurements."""
    import warnings

    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*configure_optimizers.*")
    import lightning as L
    import torch

    sys.path.insert(0, str(REPO))
    import iad_lightning.methods.patchcore as pc_module
    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.methods.patchcore import PatchCore

    coreset_time = {}
    original = pc_module._StreamingBank.select

    def timed_select(*args, **kwargs):  # records the coreset's share of the fit time (and the read-back)
        t = time.perf_counter()
        out = original(*args, **kwargs)
        coreset_time["s"] = time.perf_counter() - t
        return out

    pc_module._StreamingBank.select = timed_select

    L.seed_everything(seed, verbose=False)
    datamodule = AnomalyDataModule(
        format="mvtec", root=data_root, category=dataset, batch_size=batch_size, seed=seed
    )
    pretrain, target = parse_dims(dims)
    model = PatchCore(
        backbone={"name": "tf_efficientnet_lite0", "layers": [2, 3], "weights": "lite0"},
        coreset_ratio=coreset_ratio,
        seed=seed,
        pretrain_embed_dimension=pretrain,
        target_embed_dimension=target,
        search=search,
        resize_backend=resize_backend,
        paper_reweighting=image_score == "paper",
        projection_dim=projection_dim,
        crop=crop,
    )
    datamodule.preprocess = model.preprocess
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=datamodule)
    if cuda:
        torch.cuda.synchronize()
    t1 = time.perf_counter()
    trainer.test(model, datamodule=datamodule, verbose=False)
    if cuda:
        torch.cuda.synchronize()
    t2 = time.perf_counter()

    splits = datamodule.index_records()
    n_test = len(splits["test"])
    fe = model.feature_extractor
    return {
        "impl": "ours",
        "seed": seed,
        "label": f"ours {dims} {resize_backend}" + (" Eq.7" if image_score == "paper" else "")
                 + ("" if projection_dim == 128 else f" proj {projection_dim}") + ("" if crop else " no crop")
                 + (f" {json.dumps(search, separators=(',', ':'))}" if search else ""),
        "image_score": image_score,
        "projection_dim": projection_dim,
        "crop": crop,
        "dims": dims,
        "resize_backend": resize_backend,
        "embed_dims": [model.model.embedding.pretrain_embed_dimension, model.model.embedding.target_embed_dimension],
        "search": search,
        "dataset": dataset,
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "coreset_ratio": coreset_ratio,
        "n_train": len(splits["train"]),
        "n_test": n_test,
        "memory_bank": list(model.model.memory_bank.shape),
        "fit_s": t1 - t0,
        "coreset_s": coreset_time.get("s"),
        "fit_total_s": t1 - t0,
        "validation_s": None,  # no validation pass
        "predict_s": t2 - t1,  # trainer.test: inference + our metrics
        "predict_images_per_s": n_test / (t2 - t1),
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "metrics": model.results["categories"][dataset],
        "feature_channels": fe.channels,
        "feature_reductions": fe.reductions,
        "normalisation": [list(fe.mean), list(fe.std)],
        "preprocess": {"resize": model.hparams.resize, "crop": model.hparams.crop},
    }


# ------------------------------------------------------------------------------- parent side
def run_subprocess(cmd: list[str], label: str, log_dir: Path, env: dict | None = None) -> dict | None:
    """Run one configuration in a fresh process; parse its result line; keep its log."""
    log_path = log_dir / f"{label}.log"
    print(f"[bench] {label}: {' '.join(cmd)}", flush=True)
    t = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO, env=env)
        out, _ = proc.communicate()
        log.write("\n--- stdout ---\n" + out)
    # ru_maxrss of this child alone (waited for by communicate) is also in the child's own report
    wall = time.perf_counter() - t
    results = [json.loads(line[len(MARK):]) for line in out.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not results:
        tail = log_path.read_text().strip().splitlines()[-15:]
        print(f"[bench] {label} FAILED (exit {proc.returncode}); log {log_path}:\n  " + "\n  ".join(tail), flush=True)
        return None
    result = results[-1]
    result["wall_s"] = wall
    result["log"] = str(log_path)
    print(
        f"[bench] {label}: fit {result['fit_s']:.1f}s, predict {result['predict_s']:.1f}s, "
        f"max RSS {result['max_rss_mib']:.0f} MiB, image AUROC {fmt(result['metrics']['image_auroc'])}",
        flush=True,
    )
    return result


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or None
    except OSError:
        return None


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(a, b) -> str:
    return f"{a / b:.2f}×" if a is not None and b not in (None, 0) else "–"


def label_of(run: dict) -> str:
    return run.get("label") or run["impl"]  # result files before --dims have no label


def table(dataset: str, runs: dict[str, dict]) -> str:
    """Markdown table of one data set: a column per run (ours per embedding size, anomalib).

    With anomalib present, "anomalib / ours" rows give anomalib's time over ours (> 1: ours is
    faster) for every column of ours.
    """
    labels = sorted((k for k in runs if runs[k]["impl"] == "ours"), key=lambda k: runs[k].get("order", 0))
    labels += [k for k in runs if runs[k]["impl"] == "anomalib"]
    ana = next((runs[k] for k in labels if runs[k]["impl"] == "anomalib"), None)
    any_r = next(iter(runs.values()))
    head = (f"**{dataset}** ({any_r['n_train']} train / {any_r['n_test']} test images, coreset ratio "
            f"{any_r['coreset_ratio']}, device {any_r['device']})\n\n")
    lines = ["| " + " | ".join(["", *labels]) + " |", "|" + "|".join(["---"] + ["---:"] * len(labels)) + "|"]

    def row(label, key, digits=1, src=None):
        vals = [(src or (lambda r: r.get(key)))(runs[k]) for k in labels]
        cells = [fmt(v, digits) if isinstance(v, float) else fmt(v) for v in vals]
        lines.append("| " + " | ".join([label, *cells]) + " |")

    row("embedding dims", "embed_dims", src=lambda r: "/".join(
        ",".join(map(str, d)) if isinstance(d, list) else str(d) for d in r["embed_dims"]) if r.get("embed_dims") else "–")
    row("fit (s)", "fit_s")
    row("  of which coreset (s)", "coreset_s")
    if ana:
        row("  + validation pass, anomalib only (s)", "validation_s")
    row("predict (s)", "predict_s")
    if ana:
        def peer(r):  # the anomalib run with the same geometry (crop or none) as this run of ours
            if r["impl"] != "ours":
                return None
            return runs.get("anomalib no crop" if r.get("crop", 224) is None else "anomalib")

        row("  anomalib predict / this predict", "", digits=2, src=lambda r: (
            peer(r)["predict_s"] / r["predict_s"]) if peer(r) else None)
        row("  anomalib fit / this fit", "", digits=2, src=lambda r: (
            peer(r)["fit_s"] / r["fit_s"]) if peer(r) else None)
    row("predict images/s", "predict_images_per_s", digits=2)
    row("peak RSS (MiB)", "max_rss_mib", digits=0)
    if any(r.get("cuda_peak_mib") for r in runs.values()):
        row("peak CUDA (MiB)", "cuda_peak_mib", digits=0)
    row("memory bank", "memory_bank", src=lambda r: "×".join(map(str, r["memory_bank"])))
    for key, label in METRICS:
        row(label, key, digits=4, src=lambda r, k=key: r["metrics"].get(k))
    if ana and ana.get("anomalib_metrics"):
        for key, label in (("image_AUROC", "anomalib's own image AUROC"), ("pixel_AUROC", "anomalib's own pixel AUROC")):
            row(label, "", digits=4, src=lambda r, k=key: (r.get("anomalib_metrics") or {}).get(k)
                if r["impl"] == "anomalib" else None)
    return head + "\n".join(lines)


def _mean_se(values: list[float]) -> tuple[float, float | None]:
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, (sum((v - mean) ** 2 for v in values) / (n - 1) / n) ** 0.5


def seed_table(dataset: str, by_label: dict[str, list[dict]]) -> str:
    """Accuracy over coreset seeds, a column per run label: mean, standard error, min/max of
    each metric (in %), and anomalib's mean image AUROC minus the column's with the standard
    error of that difference (independent seeds on each side)."""
    labels = sorted((k for k in by_label if by_label[k][0]["impl"] == "ours"),
                    key=lambda k: by_label[k][0].get("order", 0))
    labels += [k for k in by_label if by_label[k][0]["impl"] == "anomalib"]
    lines = [f"**{dataset}** over coreset seeds (metrics in %)\n",
             "| " + " | ".join(["", *labels]) + " |", "|" + "|".join(["---"] + ["---:"] * len(labels)) + "|"]
    stats = {k: {key: _mean_se([100 * r["metrics"][key] for r in by_label[k]]) for key, _ in METRICS}
             for k in labels}
    lines.append("| seeds | " + " | ".join(str(len(by_label[k])) for k in labels) + " |")
    for key, name in METRICS:
        cells = [f"{m:.2f}" + (f" ± {se:.2f}" if se is not None else "") for m, se in (stats[k][key] for k in labels)]
        lines.append(f"| {name}, mean ± SE | " + " | ".join(cells) + " |")
    aurocs = {k: [100 * r["metrics"]["image_auroc"] for r in by_label[k]] for k in labels}
    lines.append("| image AUROC min / max | " + " | ".join(
        f"{min(v):.2f} / {max(v):.2f}" for v in aurocs.values()) + " |")
    ana = "anomalib" if "anomalib" in by_label else None  # the cropped run, the peer of ours' default
    if ana:
        am, ase = stats[ana]["image_auroc"]

        def diff(k):
            if k == ana:
                return "–"
            m, se = stats[k]["image_auroc"]
            if se is None or ase is None:
                return f"{am - m:+.2f}"
            return f"{am - m:+.2f} ± {(se ** 2 + ase ** 2) ** 0.5:.2f}"

        lines.append("| anomalib − this, image AUROC | " + " | ".join(diff(k) for k in labels) + " |")
    lines.append("| predict (s), median | " + " | ".join(
        f"{sorted(r['predict_s'] for r in by_label[k])[len(by_label[k]) // 2]:.1f}" for k in labels) + " |")
    per_seed = "; ".join(f"{k}: " + ", ".join(f"{100 * r['metrics']['image_auroc']:.2f} (s{r['seed']})"
                                             for r in by_label[k]) for k in labels)
    return "\n".join(lines) + "\n\nimage AUROC per seed: " + per_seed


def render(results: list[dict]) -> str:
    by_set: dict[tuple, dict[str, list[dict]]] = {}
    for i, r in enumerate(results):
        if r["impl"] == "ours":
            r["validation_s"] = None  # ours has no validation pass (older result files said 0.0)
        r.setdefault("order", i)
        r.setdefault("seed", 0)
        by_set.setdefault((r["dataset"], r["coreset_ratio"]), {}).setdefault(label_of(r), []).append(r)
    parts = []
    for (ds, _), by_label in by_set.items():
        for runs in by_label.values():
            runs.sort(key=lambda r: r["seed"])
        parts.append(table(ds, {k: runs[0] for k, runs in by_label.items()}))
        if any(len(runs) > 1 for runs in by_label.values()):
            parts.append(seed_table(ds, by_label))
    return "\n\n".join(parts)


def _load_runs(path: str) -> list[dict]:
    """Runs of a saved result file; files from before results carried their seed get it from
    the file's command line (``--seed S``), which then ran every run of the file with S."""
    saved = json.loads(Path(path).read_text())
    argv = saved.get("argv") or []
    seed = int(argv[argv.index("--seed") + 1]) if "--seed" in argv and argv.index("--seed") + 1 < len(argv) else 0
    for r in saved["runs"]:
        r.setdefault("seed", seed)
    return saved["runs"]


def run_seed(args: argparse.Namespace, dataset: str, seed: int, data_root: Path, anomalib_ok: bool,
             log_dir: Path, env: dict) -> list[dict]:
    """Every configuration of one data set with one seed, each in a fresh subprocess."""
    results = []
    suffix = f"_s{seed}" if len(args.seed) > 1 else ""
    common = ["--coreset-ratio", str(args.coreset_ratio), "--seed", str(seed),
              "--batch-size", str(args.batch_size), "--data-root", str(data_root)]
    for crop in args.crop if anomalib_ok else []:
        cmd = [args.anomalib_python, str(REPO / "bench" / "_anomalib_patchcore.py"), "--dataset", dataset, *common,
               "--crop", "0" if crop == "none" else crop]
        tag = ("_nocrop" if crop == "none" else "") + suffix
        r = run_subprocess(cmd, f"anomalib_{dataset}_{args.coreset_ratio}{tag}", log_dir, env)
        if r:
            r["label"] = "anomalib" + (" no crop" if crop == "none" else "")
            r["seed"] = seed
            results.append(r)
    runs = [] if args.skip_ours else [(d, b, s, c) for c in args.crop for d in args.dims
                                      for b in args.resize_backend for s in args.image_score]
    for dims, backend, score, crop in runs:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker-ours", dataset, *common,
               "--_worker-dims", dims, "--resize-backend", backend, "--image-score", score,
               "--projection-dim", args.projection_dim, "--crop", crop] + (
                   ["--search", args.search] if args.search else [])
        tag = (dims.replace('/', '-').replace(',', '_') + ("_eq7" if score == "paper" else "")
               + ("_nocrop" if crop == "none" else ""))
        r = run_subprocess(cmd, f"ours_{dataset}_{args.coreset_ratio}_{tag}_{backend}{suffix}", log_dir, env)
        if r:
            results.append(r)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    parser.add_argument("--with-anomalib", action="store_true", help="also run anomalib (needs its venv)")
    parser.add_argument("--anomalib-python", default=DEFAULT_ANOMALIB_PYTHON)
    parser.add_argument("--skip-ours", action="store_true", help="run anomalib only")
    parser.add_argument("--dims", nargs="+", default=["auto/auto"], metavar="PRETRAIN/TARGET",
                        help="embedding sizes of ours, one run each: PRETRAIN an int, a comma list (per "
                             "layer) or auto|channels|unfolded; TARGET an int or auto (default auto/auto)")
    parser.add_argument("--search", default=None, metavar="JSON",
                        help="method.search options of ours as JSON, e.g. '{\"num_threads\": 1}'")
    parser.add_argument("--resize-backend", nargs="+", choices=("pil", "tensor"), default=["pil"],
                        help="ours: resize the 8-bit PIL image (official, default) and/or the float tensor")
    parser.add_argument("--image-score", nargs="+", choices=("max", "paper"), default=["max"],
                        help="ours: the official max patch score and/or the paper's Eq. 7 re-weighting "
                             "(method.paper_reweighting=true; anomalib's score)")
    parser.add_argument("--projection-dim", default="128",
                        help="ours: the coreset's random projection (official 128; 'none': exact distances)")
    parser.add_argument("--crop", nargs="+", choices=("224", "none"), default=["224"],
                        help="centre crop of both (default 224) and/or none: the whole image resized to a "
                             "256 square (ours method.crop=null, anomalib Resize((256, 256)))")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, nargs="+", default=[0],
                        help="coreset (and loader) seeds; every run is repeated once per seed")
    parser.add_argument("--out", default=None, help="JSON file (default /tmp/patchcore_bench_<host>.json)")
    parser.add_argument("--render", nargs="+", metavar="JSON", help="only print tables from saved JSON files")
    parser.add_argument("--_worker-ours", dest="worker", metavar="DATASET", help=argparse.SUPPRESS)
    parser.add_argument("--_worker-dims", dest="worker_dims", default="auto/auto", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # inside the fresh subprocess
        search = json.loads(args.search) if args.search else None
        result = run_ours(args.data_root, args.worker, args.coreset_ratio, args.batch_size, args.seed[0],
                          args.worker_dims, search, args.resize_backend[0], args.image_score[0],
                          None if args.projection_dim == "none" else int(args.projection_dim),
                          None if args.crop[0] == "none" else int(args.crop[0]))
        print(MARK + json.dumps(result), flush=True)
        return
    if args.render:
        results = [r for path in args.render for r in _load_runs(path)]
        print(render(results))
        return

    data_root = Path(args.data_root).resolve()
    out = Path(args.out or f"/tmp/patchcore_bench_{platform.node() or 'host'}.json")
    log_dir = out.with_suffix("").parent / (out.stem + "_logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    anomalib_ok = False
    if args.with_anomalib:
        anomalib_ok = Path(args.anomalib_python).is_file()
        if not anomalib_ok:
            print(f"[bench] anomalib venv python '{args.anomalib_python}' not found: anomalib skipped "
                  "(recipe in bench/README.md)", flush=True)
    env = dict(os.environ, TQDM_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore::FutureWarning")

    results: list[dict] = []
    load_before = os.getloadavg()
    for dataset in args.datasets:
        if not (data_root / dataset / "train").is_dir():
            print(f"[bench] skip {dataset}: no MVTec-layout folder {data_root / dataset}", flush=True)
            continue
        for seed in args.seed:
            results += run_seed(args, dataset, seed, data_root, anomalib_ok, log_dir, env)
        out.write_text(json.dumps({"host": platform.node(), "python": sys.version.split()[0],
                                   "cpu_count": os.cpu_count(), "argv": sys.argv[1:], "commit": _commit(),
                                   "load_before": load_before, "load_after": os.getloadavg(),
                                   "runs": results}, indent=1))

    if not results:
        print("[bench] nothing ran", flush=True)
        return
    print(f"\n[bench] results: {out}; load average before {load_before}, after {os.getloadavg()}\n")
    print(render(results))


if __name__ == "__main__":
    main()
