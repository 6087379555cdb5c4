"""Benchmark: iad_lightning.metrics.compute_metrics vs a plain scikit-learn + official-AU-PRO
reference, on an MVTec-sized synthetic category.

    python bench/metrics.py [--n-images 200 --size 256 --seed 0 --repeats 1]

The parent process builds the category and saves it to a temporary folder; every measurement
runs in its own fresh subprocess (imports and data loading excluded from the measurement):
  * wall time of the metric computation (time.perf_counter), best of --repeats runs;
  * peak RSS increase: ru_maxrss (peak RSS) after the computation minus the current RSS
    (VmRSS) just before it, i.e. the most memory the computation added to the process;
  * tracemalloc peak during the computation (a separate run, since tracing costs time).
    numpy, scipy.ndimage and scikit-learn array buffers are traced by tracemalloc.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = (
    "image_auroc",
    "image_ap",
    "image_f1max",
    "pixel_auroc",
    "pixel_ap",
    "pixel_f1max",
    "pixel_aupro",
)


# ---------------------------------------------------------------------------- synthetic data
def make_category(n_images: int, size: int, seed: int, defect_frac: float):
    """Smooth-noise anomaly maps; a fraction of images has 1-3 elliptic blob defects of
    varying size (radius 2..size/6) and strength, which the maps partly detect."""
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    maps = rng.standard_normal((n_images, size, size), dtype=np.float32)
    maps = ndimage.gaussian_filter(maps, sigma=(0, 4, 4))
    maps /= maps.std()
    masks = np.zeros((n_images, size, size), dtype=np.uint8)
    signal = np.zeros((n_images, size, size), dtype=np.float32)
    yy, xx = np.mgrid[:size, :size]
    n_bad = int(round(defect_frac * n_images))
    for i in range(n_bad):
        for _ in range(rng.integers(1, 4)):
            ry, rx = rng.uniform(2, size / 6, size=2)
            cy, cx = rng.uniform(0, size, size=2)
            blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
            masks[i][blob] = 1
            signal[i][blob] += rng.uniform(1.0, 4.0)
    maps += ndimage.gaussian_filter(signal, sigma=(0, 2, 2))
    labels = masks.reshape(n_images, -1).any(axis=1).astype(np.int64)
    scores = maps.reshape(n_images, -1).max(axis=1)
    return scores, labels, maps, masks


# ---------------------------------------------------------------------------- reference
def official_style_aupro(maps: np.ndarray, masks: np.ndarray, limit: float) -> float:
    """AU-PRO computed plainly, step by step as the official MVTec AD v1.0 code does:
    label per image (8-conn), per-pixel FPR/PRO increments, argsort descending, cumsum (FPR in
    float32 as the official code), tie merge, clip, (0,0)/(1,1) anchors, trapezoid to limit."""
    from scipy import ndimage

    structure = np.ones((3, 3), dtype=int)
    fp_changes = np.zeros(maps.shape, dtype=np.uint32)
    pro_changes = np.zeros(maps.shape, dtype=np.float64)
    num_ok, num_regions = 0, 0
    for i, gt in enumerate(masks):
        labelled, n = ndimage.label(gt, structure)
        num_regions += n
        ok = labelled == 0
        num_ok += int(ok.sum())
        fp_changes[i][ok] = 1
        for k in range(1, n + 1):
            region = labelled == k
            pro_changes[i][region] = 1.0 / region.sum()
    scores = maps.ravel().copy()
    order = np.argsort(scores)[::-1]
    scores = scores[order]
    fprs = np.cumsum(fp_changes.ravel()[order]).astype(np.float32) / np.float32(num_ok)
    pros = np.cumsum(pro_changes.ravel()[order]) / num_regions
    keep = np.append(np.diff(scores) != 0, True)  # one point per distinct score
    fprs = np.clip(fprs[keep], None, 1.0)
    pros = np.clip(pros[keep], None, 1.0)
    x = np.concatenate(([0.0], fprs, [1.0]))
    y = np.concatenate(([0.0], pros, [1.0]))
    return trapezoid(x, y, limit) / limit


def trapezoid(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Area under y(x) on [0, x_max]; linear interpolation at x_max (official generic_util)."""
    correction = 0.0
    if x_max not in x:
        ins = int(np.searchsorted(x, x_max, side="right"))  # bisect.bisect
        assert 0 < ins < len(x)
        y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
        correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
    return float(0.5 * np.sum((y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def reference_metrics(scores, labels, maps, masks, limit: float = 0.3) -> dict:
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

    def f1max(y, s):
        p, r, _ = precision_recall_curve(y, s)
        with np.errstate(invalid="ignore", divide="ignore"):
            return float(np.nanmax(2 * p * r / (p + r)))

    y_px, s_px = (masks > 0).ravel(), maps.ravel()
    return {
        "image_auroc": float(roc_auc_score(labels, scores)),
        "image_ap": float(average_precision_score(labels, scores)),
        "image_f1max": f1max(labels, scores),
        "pixel_auroc": float(roc_auc_score(y_px, s_px)),
        "pixel_ap": float(average_precision_score(y_px, s_px)),
        "pixel_f1max": f1max(y_px, s_px),
        "pixel_aupro": official_style_aupro(maps, masks, limit),
    }


# ---------------------------------------------------------------------------- worker
def current_rss_kib() -> int:
    """Resident set size now (Linux /proc); falls back to the peak so far elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def worker(impl: str, data_dir: str, trace: bool) -> None:
    """Load the data, import the implementation, then measure one computation."""
    names = ("scores", "labels", "maps", "masks")
    data = [np.load(os.path.join(data_dir, f"{k}.npy")) for k in names]
    if impl == "ours":
        sys.path.insert(0, ROOT)
        from iad_lightning.metrics import compute_metrics as fn
    else:
        import sklearn.metrics  # noqa: F401  (import outside the measurement)
        from scipy import ndimage  # noqa: F401

        fn = reference_metrics
    rss0 = current_rss_kib()
    if trace:
        tracemalloc.start()
    t0 = time.perf_counter()
    values = fn(*data)
    wall = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] if trace else None
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"values": values, "wall_s": wall, "rss_delta_kib": rss1 - rss0,
                      "tracemalloc_peak_b": peak}))


def run_worker(impl: str, data_dir: str, trace: bool) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", impl, "--data", data_dir]
    if trace:
        cmd.append("--trace")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n-images", type=int, default=200)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--defect-frac", type=float, default=0.6)
    ap.add_argument(
        "--repeats", type=int, default=1, help="timing runs per implementation (best kept)"
    )
    ap.add_argument("--worker", choices=("ours", "reference"), help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--trace", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.data, args.trace)
        return

    scores, labels, maps, masks = make_category(
        args.n_images, args.size, args.seed, args.defect_frac
    )
    print(
        f"category: {args.n_images} maps of {args.size}x{args.size} = "
        f"{maps.size / 1e6:.1f} M pixels "
        f"(float32), {labels.sum()} anomalous images, {100 * masks.mean():.2f}% anomalous pixels"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k, v in zip(("scores", "labels", "maps", "masks"), (scores, labels, maps, masks)):
            np.save(os.path.join(tmp, f"{k}.npy"), v)
        del maps, masks
        for impl in ("ours", "reference"):
            runs = [run_worker(impl, tmp, trace=False) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r["wall_s"])
            best["rss_delta_kib"] = max(r["rss_delta_kib"] for r in runs)
            best["tracemalloc_peak_b"] = run_worker(impl, tmp, trace=True)["tracemalloc_peak_b"]
            results[impl] = best

    ours, ref = results["ours"], results["reference"]
    print(f"\n{'metric':<14}{'ours':>20}{'reference':>20}{'|diff|':>12}")
    diffs = []
    for k in KEYS:
        a, b = ours["values"][k], ref["values"][k]
        diffs.append(abs(a - b))
        print(f"{k:<14}{a:>20.12f}{b:>20.12f}{diffs[-1]:>12.2e}")
    verdict = "OK" if max(diffs) <= 1e-6 else "MISMATCH"
    print(f"max |diff| = {max(diffs):.2e}  ({verdict}, tolerance 1e-6)")

    mib = 1024 * 1024
    rows = [
        ("wall time [s]", ours["wall_s"], ref["wall_s"]),
        ("peak RSS increase [MiB] (maxrss-VmRSS0)",
         ours["rss_delta_kib"] / 1024, ref["rss_delta_kib"] / 1024),
        ("tracemalloc peak [MiB]",
         ours["tracemalloc_peak_b"] / mib, ref["tracemalloc_peak_b"] / mib),
    ]
    print(f"\n{'measure':<38}{'ours':>10}{'reference':>11}{'ref/ours':>10}")
    for name, a, b in rows:
        print(f"{name:<38}{a:>10.2f}{b:>11.2f}{b / a if a else float('inf'):>10.1f}")


if __name__ == "__main__":
    main()
