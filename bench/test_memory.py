"""Benchmark: peak memory of testing, per-category reduction against keeping every map to the end.

    python bench/test_memory.py [--images 3000] [--categories 6] [--size 224] [--batch 32]
                                [--baseline-commit b27ebfa] [--out /tmp/test_memory_<host>.json]

Synthetic predictions (no model, no images on disk): ``--images`` test images split evenly
into ``--categories`` category-grouped categories, as a unified datamodule serves them; per
image a float32 anomaly map (seeded noise plus a bright square on anomalous images) and its
mask (the square), 1 in 3 images anomalous. A probe method reads the map for each image from
its index, so both runs see identical predictions. ``trainer.test`` (Lightning, one CPU
device) runs twice, each in a fresh subprocess:

- ``streaming``: this tree's ``AnomalyModule`` (a category's maps are reduced to metrics and
  freed once all its images are in; masks bit-packed while buffered);
- ``all-at-end``: the ``AnomalyModule`` of ``--baseline-commit`` (``git show`` of its
  ``iad_lightning/methods/base.py``; the rest of the package is this tree's), which keeps every
  map and mask until the end of testing.

Printed: peak RSS of each process (``ru_maxrss``), its RSS before testing, the test time, and
whether the metrics of both runs are identical (they must be).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _module_class(mode: str, commit: str):
    if mode == "streaming":
        from iad_lightning.methods.base import AnomalyModule

        return AnomalyModule
    src = subprocess.run(["git", "-C", str(REPO), "show", f"{commit}:iad_lightning/methods/base.py"],
                         check=True, capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "base_baseline.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("base_baseline", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.AnomalyModule


def child(args: argparse.Namespace) -> dict:
    """One ``trainer.test`` in this process; returns its measurements."""
    import warnings

    import lightning as L
    import numpy as np
    import torch
    from torch.utils.data import DataLoader, Dataset

    sys.path.insert(0, str(REPO))
    from iad_lightning.data.transforms import Preprocess

    warnings.filterwarnings("ignore")
    n, size = args.images, args.size
    cats = [f"cat{c}" for c in range(args.categories)]
    per_cat = -(-n // len(cats))
    category = [cats[min(i // per_cat, len(cats) - 1)] for i in range(n)]
    label = np.arange(n) % 3 == 2
    lo, hi = size // 4, size // 4 + size // 8

    def mask_of(i: int) -> torch.Tensor:
        m = torch.zeros(1, size, size)
        if label[i]:
            m[:, lo:hi, lo + i % 7:hi + i % 7] = 1.0
        return m

    class Predictions(Dataset):  # the image carries its index; the probe turns it into a map
        def __len__(self) -> int:
            return n

        def __getitem__(self, i: int) -> dict:
            image = torch.zeros(1, 1, 1)
            image[0, 0, 0] = i
            return {"image": image, "mask": mask_of(i), "label": int(label[i]), "category": category[i],
                    "path": f"{i}.png", "index": i}

    class Data(L.LightningDataModule):
        categories = cats

        def test_dataloader(self) -> DataLoader:
            return DataLoader(Predictions(), batch_size=args.batch, shuffle=False)

        def category_ends(self, split: str = "test") -> dict[str, int]:
            return {c: i + 1 for i, c in enumerate(category)}

    base = _module_class(args.child, args.baseline_commit)

    class Probe(base):
        def __init__(self) -> None:
            super().__init__()

        @property
        def preprocess(self) -> Preprocess:
            return Preprocess(resize=(size, size), crop=None)

        def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            maps = []
            for i in images[:, 0, 0, 0].long().tolist():
                g = torch.Generator().manual_seed(i)
                amap = torch.rand(1, size, size, generator=g)
                maps.append(amap + 0.8 * mask_of(i) * torch.rand((), generator=g))
            amap = torch.stack(maps)
            return {"anomaly_map": amap, "pred_score": amap.flatten(1).amax(1)}

        def _predict_with_size(self, batch: dict) -> dict[str, torch.Tensor]:
            return self.predict_batch(batch["image"])  # maps at mask size, no resize

    model = Probe()
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    trainer.test(model, datamodule=Data(), verbose=False)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": args.child, "rss_before_mb": rss0, "peak_rss_mb": peak, "test_s": seconds,
            "results": model.results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--categories", type=int, default=6)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--baseline-commit", default="b27ebfa", help="the all-at-end AnomalyModule's commit")
    parser.add_argument("--out", default=None)
    parser.add_argument("--child", choices=("streaming", "all-at-end"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("BENCH_RESULT " + json.dumps(child(args)), flush=True)
        return
    runs = []
    passthrough = [f"--images={args.images}", f"--categories={args.categories}", f"--size={args.size}",
                   f"--batch={args.batch}", f"--baseline-commit={args.baseline_commit}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    for mode in ("all-at-end", "streaming"):
        proc = subprocess.run([sys.executable, __file__, *passthrough, f"--child={mode}"], capture_output=True,
                              text=True, env=env)
        if proc.returncode:
            sys.exit(f"{mode} run failed:\n{proc.stderr[-3000:]}")
        line = [x for x in proc.stdout.splitlines() if x.startswith("BENCH_RESULT ")][-1]
        runs.append(json.loads(line.removeprefix("BENCH_RESULT ")))
        print(f"[bench] {mode}: peak RSS {runs[-1]['peak_rss_mb']:.0f} MB, {runs[-1]['test_s']:.1f} s", flush=True)
    same = runs[0]["results"] == runs[1]["results"]
    pixels = args.images * args.size**2
    print(f"\n{args.images} test maps of {args.size}x{args.size} in {args.categories} categories "
          f"({pixels / 1e6:.0f} M pixels; a float32 map + bool mask = {5 * pixels / 2**20:.0f} MiB), batch {args.batch}, "
          f"host {platform.node()} ({os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})\n")
    print("| test path | RSS before test (MB) | peak RSS (MB) | test time (s) |")
    print("|---|---:|---:|---:|")
    for r in runs:
        print(f"| {r['mode']} | {r['rss_before_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['test_s']:.1f} |")
    print(f"\nmetrics identical: {same}  (mean image AUROC {runs[1]['results']['mean']['image_auroc']:.4f}, "
          f"pixel AUPRO {runs[1]['results']['mean']['pixel_aupro']:.4f})")
    out = Path(args.out or f"/tmp/test_memory_{platform.node() or 'host'}.json")
    out.write_text(json.dumps({"args": vars(args), "runs": runs, "identical": same}, indent=1))
    if not same:
        sys.exit("metrics differ between the two test paths")


if __name__ == "__main__":
    main()
