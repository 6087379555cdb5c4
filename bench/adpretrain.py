"""Benchmark: ADPretrain pretraining offline, then PatchCore / PaDiM / FeatureNorm on real MVTec screw
with and without the projector, side by side.

    python bench/adpretrain.py [--epochs 1] [--image-size 128] [--batch 8] [--ref-tokens 2048]
        [--max-batches N] [--center-images N]
        [--data-root ../shared/data] [--out /tmp/adpretrain_bench]

1. Pretraining (``method=adpretrain`` through the Python API, ``backbone=lite0``, the offline
   stand-in for DINOv2): the labelled test splits of the synthetic set (5 categories, masks) and of
   ``kolektorsdd_commutator`` (real, masks) serve the train loader (``fit_split=test``); reference
   banks come from their train good images. The target (screw) is in neither. One datamodule over
   both sets (``MergedDataModule``: the two indexes' records side by side). Images/s (images of
   the fit split per second of ``trainer.fit``, each encoded as 2 views plus its bank) and the
   process's peak RSS after pretraining are reported.
2. Downstream on ``mvtec_screw``: PatchCore (Lite0 layers 2+3 / projected levels 2-4), PaDiM
   (Lite0 layers 1-3, all 176 channels / projected 4 levels, one Gaussian each) and FeatureNorm
   (raw level norms / projected residual norms), each without and with ``projector``; image
   AUROC, pixel AUROC, AU-PRO (0.3), fit and predict seconds.

Step bench (``--step``): one pretraining step at the authors' defaults (batch 32, 224 px, 8-shot
banks = 256 reference images encoded per step, 2 views, 2,048 reference tokens per level, Adam),
on random images and masks, timed over ``--steps`` steps after one warm-up, each configuration in
its own process so that its peak memory is its own:

    python bench/adpretrain.py --step                      # Lite0 on CPU and DINOv2-B shapes (random
                                                           # weights) on CPU, or on CUDA when present
    python bench/adpretrain.py --step --backbones lite0 --batch 32 --steps 3 --device cpu

It prints per configuration: seconds per step, images/s (batch / step time), peak RSS (CPU) or peak
CUDA memory allocated, and the pretraining time of one epoch over Real-IAD (151,050 images) that this
rate implies.

CPU-sized: 128 px everywhere (PatchCore / PaDiM: resize 146 -> crop 128, the 256/224 ratio), a
few epochs. The numbers show what the pipeline does offline, not the paper's DINOv2 + Real-IAD
accuracy. Without the data folder the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import functools
import json
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
LITE0 = {"name": "tf_efficientnet_lite0", "weights": "lite0", "mean": None, "std": None}


def merged_datamodule(parts, **kwargs):
    """An AnomalyDataModule whose index is the union of several (format, root, category, options)."""
    from iad_lightning.data.datamodule import AnomalyDataModule

    class MergedDataModule(AnomalyDataModule):
        def index_records(self):
            if self._splits is None:
                splits = {"train": [], "val": [], "test": []}
                cats = []
                for fmt, root, category, options in parts:
                    dm = AnomalyDataModule(fmt, root, category, options)
                    for key, recs in dm.index_records().items():
                        splits[key] += recs
                    cats += dm.categories
                self._splits, self.categories = splits, cats
            return self._splits

    first = parts[0]
    return MergedDataModule(first[0], first[1], first[2], first[3], **kwargs)


def pretrain(args, out: Path) -> dict:
    import lightning as L

    from iad_lightning.methods.adpretrain import ADPretrain
    from iad_lightning.models.adpretrain import ADPretrainModel

    L.seed_everything(0, workers=True)
    synthetic = ("synthetic", str(REPO / ".cache" / "synthetic"), "all",
                 {"seed": 0, "n_train": 16, "n_test_good": 6, "n_test_defect": 12})
    kolektor = ("mvtec", str(args.data_root), "kolektorsdd_commutator", {})
    dm = merged_datamodule([synthetic, kolektor], batch_size=args.batch, fit_split="test", num_workers=2)
    model = ADPretrain(
        backbone=LITE0,
        model=functools.partial(ADPretrainModel, num_ref_tokens=args.ref_tokens),
        image_size=args.image_size, cache_references=True, projector_path=str(out / "projector.pt"),
        center_max_images=args.center_images,
    )
    dm.preprocess = model.preprocess
    class Progress(L.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if batch_idx % 5 == 0:
                print(f"  epoch {trainer.current_epoch} batch {batch_idx}: {time.perf_counter() - t0:.0f} s", flush=True)

    trainer = L.Trainer(max_epochs=args.epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(out), callbacks=[Progress()],
                        limit_train_batches=args.max_batches)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    seconds = time.perf_counter() - t0
    n_fit = len(dm.fit_records())
    return {
        "fit_images": n_fit, "reference_pool": len(dm.index_records()["train"]), "epochs": args.epochs,
        "seconds": seconds, "images_per_s": model.images_seen / seconds, "batches": args.max_batches, "images_seen": model.images_seen,
        "skipped_batches": model.skipped_batches,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "final_loss": float(trainer.callback_metrics.get("train/loss_epoch", float("nan"))),
    }


def downstream(args, name: str, projector: str | None) -> dict:
    import lightning as L

    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.methods.featurenorm import FeatureNorm
    from iad_lightning.methods.padim import PaDiM
    from iad_lightning.methods.patchcore import PatchCore

    L.seed_everything(0, workers=True)
    s = args.image_size
    resize = round(s * 256 / 224)
    if name == "patchcore":
        model = PatchCore({**LITE0, "layers": [2, 3]}, resize=resize, crop=s, projector=projector)
    elif name == "padim":
        model = PaDiM({**LITE0, "layers": [1, 2, 3]}, resize=resize, crop=s, projector=projector)
    else:
        model = FeatureNorm(LITE0, projector=projector, image_size=s)
    dm = AnomalyDataModule("mvtec", str(args.data_root), "mvtec_screw", batch_size=16, num_workers=2)
    dm.preprocess = model.preprocess
    trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_train_batches=1 if name == "featurenorm" else None)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    t1 = time.perf_counter()
    trainer.test(model, datamodule=dm, verbose=False)
    t2 = time.perf_counter()
    mean = model.results["mean"]
    return {"method": name, "projector": projector is not None, "image_auroc": mean["image_auroc"],
            "pixel_auroc": mean["pixel_auroc"], "aupro": mean["pixel_aupro"], "fit_s": t1 - t0, "predict_s": t2 - t1}


REAL_IAD_IMAGES = 151_050


def step_bench(backbone: str, batch: int, size: int, steps: int, device: str, shots: int, bf16: bool) -> dict:
    """Time and peak memory of pretraining steps (reference encoding, 2 views, loss, backward, Adam)."""
    import torch

    from iad_lightning.models.adpretrain import ADPretrainModel, LevelBackbone, bank_tokens

    torch.manual_seed(0)
    weights = "lite0" if backbone == "lite0" else "none"  # DINOv2-B: its shapes with random weights
    model = ADPretrainModel(LevelBackbone(backbone, weights=weights)).to(device).train()
    opt = torch.optim.Adam(model.projector.parameters(), lr=1e-4, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    dev = torch.device(device)
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16)

    def one_step() -> float:
        images = torch.randn(batch, 3, size, size, generator=gen).to(dev)
        refs = torch.randn(batch * shots, 3, size, size, generator=gen).to(dev)
        mask = torch.zeros(batch, 1, size, size)
        mask[: batch // 2, :, size // 4: size // 2, size // 4: size // 2] = 1  # half the images abnormal
        mask = mask.to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            chunks = [model.backbone(refs[s:s + 32]) for s in range(0, len(refs), 32)]
            feats = [torch.cat(part) for part in zip(*chunks)]
            banks = [bank_tokens([f.float()])[0].view(batch, -1, f.shape[1]) for f in feats]
            loss, _ = model.loss(images, images.flip(-1), mask, banks)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    one_step()  # warm-up
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = [one_step() for _ in range(steps)]
    sec = sum(times) / len(times)
    peak = (torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)
    return {"backbone": backbone, "device": device, "batch": batch, "image_size": size, "shots": shots,
            "bf16": bf16, "s_per_step": sec, "images_per_s": batch / sec,
            "peak_gib": peak, "peak_kind": "CUDA allocated" if dev.type == "cuda" else "process RSS",
            "tokens_per_level": [f.shape[-1] * f.shape[-2] for f in model.backbone(torch.zeros(1, 3, size, size,
                                                                                             device=dev))],
            "real_iad_epoch_h": REAL_IAD_IMAGES / (batch / sec) / 3600}


def run_step_benches(args) -> None:
    import subprocess

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for bb in args.backbones.split(","):
        dev = "cpu" if bb == "lite0" and args.device is None else device
        cmd = [sys.executable, __file__, "--step-one", bb, "--device", dev, "--batch", str(args.batch),
               "--image-size", str(args.image_size), "--steps", str(args.steps),
               "--shots", str(args.shots)] + (["--bf16"] if args.bf16 or dev == "cuda" else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr[-3000:])
            raise SystemExit(f"step bench {bb} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| backbone | device | batch x px | shots | tokens/level | s/step | images/s | peak GiB | Real-IAD epoch |"
          "\n|---|---|---|---:|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backbone']} | {r['device']}{' bf16' if r['bf16'] else ''} | {r['batch']} x {r['image_size']} | "
              f"{r['shots']} | {r['tokens_per_level']} | {r['s_per_step']:.2f} | {r['images_per_s']:.1f} | "
              f"{r['peak_gib']:.2f} ({r['peak_kind']}) | {r['real_iad_epoch_h']:.1f} h |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", action="store_true", help="the pretraining step bench (no data needed)")
    parser.add_argument("--step-one", type=str, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--backbones", type=str, default="lite0,dinov2-base")
    parser.add_argument("--device", type=str, default=None, help="step bench: cpu | cuda (default: Lite0 on CPU, "
                                                                 "DINOv2-B on CUDA when present)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--shots", type=int, default=8, help="step bench: reference images per image (max of 1/4/8)")
    parser.add_argument("--bf16", action="store_true", help="step bench: bf16 autocast (the authors' setting on GPU)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=None, help="default 128 (step bench: 224)")
    parser.add_argument("--batch", type=int, default=None, help="default 8 (step bench: the authors' 32)")
    parser.add_argument("--ref-tokens", type=int, default=2048)
    parser.add_argument("--max-batches", type=int, default=None, help="pretraining batches per epoch (default all)")
    parser.add_argument("--center-images", type=int, default=None, help="normal images for the centres (default all)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT)
    parser.add_argument("--out", type=Path, default=Path("/tmp/adpretrain_bench"))
    parser.add_argument("--projector", type=str, default=None, help="skip pretraining, use this file")
    parser.add_argument("--methods", type=str, default="patchcore,padim,featurenorm")
    args = parser.parse_args()
    step_mode = args.step or args.step_one
    args.batch = args.batch or (32 if step_mode else 8)
    args.image_size = args.image_size or (224 if step_mode else 128)
    if args.step_one:
        print(json.dumps(step_bench(args.step_one, args.batch, args.image_size, args.steps, args.device or "cpu",
                                    args.shots, args.bf16)))
        return
    if args.step:
        run_step_benches(args)
        return
    if not (args.data_root / "mvtec_screw").is_dir() or not (args.data_root / "kolektorsdd_commutator").is_dir():
        print(f"bench/adpretrain.py: {args.data_root} lacks mvtec_screw / kolektorsdd_commutator; nothing to do")
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict = {"args": {k: str(v) for k, v in vars(args).items()}}
    projector = args.projector
    if projector is None:
        report["pretrain"] = pretrain(args, args.out)
        projector = str(args.out / "projector.pt")
        print("pretrain:", json.dumps(report["pretrain"]), flush=True)
    rows = []
    for name in args.methods.split(","):
        for proj in (None, projector):
            rows.append(downstream(args, name, proj))
            print(json.dumps(rows[-1]), flush=True)
    report["downstream"] = rows
    (args.out / f"results_{args.methods.replace(',', '_')}.json").write_text(json.dumps(report, indent=1))
    print("\n| method | projector | I-AUROC | P-AUROC | AUPRO | fit s | predict s |\n|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [f"{100 * r[k]:.1f}" if r[k] is not None else "-" for k in ("image_auroc", "pixel_auroc", "aupro")]
        print(f"| {r['method']} | {'yes' if r['projector'] else 'no'} | {' | '.join(cells)} | {r['fit_s']:.1f} | "
              f"{r['predict_s']:.1f} |")


if __name__ == "__main__":
    main()
