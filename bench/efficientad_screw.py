"""Benchmark: EfficientAD-S with an offline-distilled Lite0 teacher on real MVTec AD screw.

    python bench/efficientad_screw.py [--steps 150] [--image-size 256] [--teacher PATH]
        [--teacher-steps 20] [--teacher-batch 4] [--natural DIR] [--penalty-dir DIR]
        [--data-root ../shared/data] [--out /tmp/efficientad_screw.json]
        [--with-anomalib [--anomalib-python /work/venvs/anomalib/bin/python]]

1. Teacher (unless ``--teacher``): ``bench/natural_images.py`` writes random crops of scikit-image's
   bundled photos (offline stand-in for ImageNet), then ``python train.py method=efficientad_teacher
   data=images backbone=lite0`` distils a padded PDN-S from Lite0 layer 2+3 PatchCore features for
   ``--teacher-steps`` steps. The paper distils from WideResNet-101 for 60,000 steps on ImageNet.
2. EfficientAD-S (the Python API: ``AnomalyDataModule(format="mvtec", category="mvtec_screw",
   batch_size=1, val_fraction=0.1, seed=42)``, ``EfficientAD(teacher_weights=...)`` with the paper
   defaults except ``num_steps``), with the ImageNet penalty on ``--penalty-dir`` if given (else
   none). ``trainer.fit`` is timed (it includes the teacher statistics and the map quantiles).
3. ``trainer.test``: image AUROC, pixel AUROC, AU-PRO (0.3 FPR), from ``iad_lightning.metrics``.
4. ``--with-anomalib``: anomalib 2.7.0's EfficientAd under the same conditions, in its venv
   (``bench/_anomalib_efficientad_train.py``, which lists what is anomalib's own code and what is
   set up): the same teacher file, train / held-out validation / test records (written to a JSON
   file from our datamodule), input tensors, steps, image size, seed and penalty folder. Its test
   scores and maps (S x S, the input size, as ours) go through the same ``compute_metrics`` with
   the same masks (nearest-resized to S x S by our datamodule). Without the venv it is skipped.

A CPU-feasible number of steps is far from the paper's 70,000: the figures show the pipeline
works on real data, not the paper's accuracy. Without the data folder the script says so and
exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
DATASET = "mvtec_screw"
ANOMALIB_PYTHON = "/work/venvs/anomalib/bin/python"
MARK = "BENCH_RESULT "


def distil_teacher(natural: Path, out: Path, steps: int, batch: int, image_size: int, n_images: int) -> Path:
    if not any(natural.glob("*.png")):
        subprocess.run([sys.executable, str(REPO / "bench" / "natural_images.py"), str(natural),
                        "--n", str(n_images), "--size", str(2 * image_size)], check=True)
    cmd = [sys.executable, str(REPO / "train.py"), "method=efficientad_teacher", "data=images",
           f"data.root={natural}", "backbone=lite0", f"method.num_steps={steps}", f"method.image_size={image_size}",
           f"data.batch_size={batch}", "data.num_workers=0", f"method.norm_images={min(n_images, 16)}",
           "logger=none", "callbacks=none", f"hydra.run.dir={out}"]
    print("teacher:", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
    return out / "teacher_small.pth"


def run_anomalib(args, dm, teacher: Path, penalty_dir: Path, work: Path) -> dict | None:
    """anomalib's EfficientAd on the same records in its venv; metrics from our code."""
    import numpy as np
    import torch

    from iad_lightning.metrics import compute_metrics

    records = {k: [dataclasses.asdict(r) for r in v] for k, v in dm.index_records().items()}
    rec_file = work / "records.json"
    rec_file.write_text(json.dumps(records))
    out_dir = work / "anomalib"
    cmd = [args.anomalib_python, str(REPO / "bench" / "_anomalib_efficientad_train.py"), "--records", str(rec_file),
           "--teacher", str(teacher), "--penalty-dir", str(penalty_dir), "--steps", str(args.steps),
           "--image-size", str(args.image_size), "--out-dir", str(out_dir)]
    print("anomalib:", " ".join(cmd), flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    log = work / "anomalib.log"  # its stderr: progress, tqdm bars, warnings
    with log.open("w") as err:
        proc = subprocess.run(cmd, check=False, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        print(f"anomalib run failed (rc {proc.returncode}), log {log}:\n{log.read_text()[-3000:]}", flush=True)
        return None
    result = json.loads(lines[-1][len(MARK):])
    pred = np.load(out_dir / "anomalib_test.npz")
    test = dm.dataset("test")
    if [str(p) for p in pred["path"]] != [r.image for r in test.records]:
        raise RuntimeError("anomalib's test predictions are not in our test-record order")
    masks = np.stack([test[i]["mask"].numpy()[0] > 0.5 for i in range(len(test))])
    labels = np.asarray([r.label for r in test.records])
    maps = torch.from_numpy(pred["anomaly_map"])
    if tuple(maps.shape[-2:]) != masks.shape[-2:]:  # not expected: both are S x S
        maps = torch.nn.functional.interpolate(maps[:, None], size=masks.shape[-2:], mode="bilinear")[:, 0]
    metrics = compute_metrics(pred["pred_score"], labels, maps.numpy(), masks)
    result.update({k: metrics[k] for k in ("image_auroc", "pixel_auroc", "pixel_aupro")})
    result["train_plus_quantiles_s"] = round(result["train_s"] + result["quantiles_s"], 1)
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--teacher", type=Path, default=None)
    ap.add_argument("--teacher-steps", type=int, default=20)
    ap.add_argument("--teacher-batch", type=int, default=4)
    ap.add_argument("--natural", type=Path, default=None, help="folder of natural images (written if empty)")
    ap.add_argument("--natural-n", type=int, default=200)
    ap.add_argument("--penalty-dir", type=Path, default=None,
                    help="natural images for the ImageNet penalty (both runs); none if unset")
    ap.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    ap.add_argument("--with-anomalib", action="store_true", help="also train anomalib's EfficientAd, same settings")
    ap.add_argument("--anomalib-python", default=ANOMALIB_PYTHON)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "efficientad_screw.json")
    args = ap.parse_args()
    if not (args.data_root / DATASET).is_dir():
        print(f"skipped: {args.data_root / DATASET} not found (MVTec AD screw, see bench/README.md)")
        return 0
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import lightning as L
    import torch

    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.methods.efficientad import EfficientAD

    class Progress(L.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step % 10 == 0:
                print(f"step {trainer.global_step}/{args_.steps} {time.perf_counter() - t_fit:.0f}s", flush=True)

    args_ = args
    work = Path(tempfile.mkdtemp(prefix="ead_screw_"))
    t0 = time.perf_counter()
    teacher = args.teacher or distil_teacher(args.natural or work / "natural", work / "teacher", args.teacher_steps,
                                             args.teacher_batch, args.image_size, args.natural_n)
    teacher_s = time.perf_counter() - t0

    L.seed_everything(0, workers=True)
    penalty = str(args.penalty_dir) if args.penalty_dir else None
    model = EfficientAD(teacher_weights=str(teacher), num_steps=args.steps, image_size=args.image_size,
                        penalty_dir=penalty)
    dm = AnomalyDataModule(format="mvtec", root=str(args.data_root), category=DATASET, batch_size=1,
                           eval_batch_size=16, val_fraction=0.1, seed=42, num_workers=2)
    dm.preprocess = model.preprocess
    trainer = L.Trainer(accelerator="auto", devices=1, max_steps=args.steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        default_root_dir=str(work), callbacks=[Progress()])
    t0 = t_fit = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    test_s = time.perf_counter() - t0
    metrics = model.results["categories"][DATASET]
    result = {
        "dataset": DATASET, "image_size": args.image_size, "steps": args.steps,
        "teacher": str(args.teacher) if args.teacher else f"Lite0-distilled, {args.teacher_steps} steps x {args.teacher_batch}",
        "penalty_dir": penalty,
        "teacher_s": round(teacher_s, 1), "train_s": round(fit_s, 1), "steps_per_s": round(args.steps / fit_s, 3),
        "test_s": round(test_s, 1), "device": str(model.device),
        "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"], "pixel_aupro": metrics["pixel_aupro"],
    }
    torch.save(model.model.state_dict(), work / "ours_model.pt")  # kept for inspection
    if args.with_anomalib:
        if not Path(args.anomalib_python).is_file():
            print(f"anomalib skipped: venv python '{args.anomalib_python}' not found")
        elif penalty is None:
            print("anomalib skipped: it always uses the penalty; pass --penalty-dir")
        else:
            result = {"ours": result, "anomalib": run_anomalib(args, dm, Path(teacher), args.penalty_dir, work)}
            rows = [("ours", result["ours"]), ("anomalib", result["anomalib"] or {})]
            print(f"{'impl':<9} {'image AUROC':>11} {'pixel AUROC':>11} {'AUPRO':>7} {'train s':>8}")
            for name, r in rows:
                if r:
                    print(f"{name:<9} {100 * r['image_auroc']:11.1f} {100 * r['pixel_auroc']:11.1f} "
                          f"{100 * r['pixel_aupro']:7.1f} {r.get('train_plus_quantiles_s', r['train_s']):8.1f}")
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"work dir: {work}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
