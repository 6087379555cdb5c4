"""One anomalib 2.7.0 EfficientAd-S training run for ``bench/efficientad_screw.py --with-anomalib``;
runs in the anomalib venv, not ours:

    /work/venvs/anomalib/bin/python bench/_anomalib_efficientad_train.py --records RECORDS.json \
        --teacher teacher_small.pth --penalty-dir NATURAL --steps 300 --image-size 128 --out-dir DIR

What is anomalib's own code, unchanged: ``EfficientAd.training_step`` and ``EfficientAdModel``
(losses, hard-feature quantile, augmentation, penalty), ``configure_optimizers`` (Adam, StepLR at
``int(0.95 * max_steps)``), ``teacher_channel_mean_std`` (run by its ``on_train_start``),
``prepare_imagenette_data`` (the penalty transform Resize(2S) -> RandomGrayscale(0.3) ->
CenterCrop(S) -> ToTensor on PIL images, ``ImageFolder``, batch 1, shuffled),
``on_validation_start`` / ``map_norm_quantiles`` (map quantiles on the validation loader's good
images) and the inference graph ``EfficientAdModel.forward`` in eval mode.

What is set up here so that it runs offline under the same conditions as ours:
  * ``prepare_pretrained_model`` is overridden: the teacher comes from ``--teacher`` (our
    ``nn.Sequential`` PDN-S layout ``0/3/6/8.*``, renamed to anomalib's ``conv1..conv4.*``).
  * ``imagenet_dir`` is a temp folder whose one class folder links to ``--penalty-dir``, so that
    anomalib's own ``prepare_imagenette_data`` finds it and downloads nothing.
  * ``--image-size`` < 256: anomalib's encoder's last conv (k8, padding 0) fails on the 4x4 map
    of a 128-px input; it gets the padding ours uses (``(8 - S // 32 + 1) // 2``, 2 at 128), so
    the latent stays 1x1. No other layer changes (at 256 the padding is 0: anomalib's layer).
  * data: the records (train / val / test, from our ``AnomalyDataModule(..., val_fraction=0.1,
    seed=42)``) come from ``--records``; images are loaded and resized by our ``AnomalyDataset``
    with ``Preprocess(resize=(S, S), crop=None)`` and mean 0 / std 1, i.e. the very [0, 1]
    tensors our run sees before its ImageNet normalisation (anomalib's networks normalise
    inside). anomalib's pre-/post-processor, evaluator and visualizer are off; batches are
    anomalib ``ImageBatch`` (image, gt_label). Train: batch 1, shuffled, 2 workers; quantiles:
    the held-out validation records (train good images, never test).
  * Trainer: plain ``lightning.Trainer(max_steps=steps, max_epochs=-1, limit_val_batches=0)``;
    after ``fit`` the quantiles are fitted by calling anomalib's own ``on_validation_start`` in
    eval mode (what its validation loop does first), then the test images are scored.

Writes ``DIR/anomalib_test.npz`` (``path``, ``pred_score`` (N,), ``anomaly_map`` (N, S, S) float32,
test-record order) and ``DIR/anomalib_model.pt`` (the trained torch model's state dict), and prints one JSON line prefixed ``BENCH_RESULT `` with the timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
MARK = "BENCH_RESULT "


def teacher_state(path: Path) -> dict[str, torch.Tensor]:
    """Our teacher file, read and checked by our loader, renamed to anomalib's ``conv1..conv4``."""
    from iad_lightning.models.efficientad import anomalib_key_map, load_teacher_weights

    ours_to_anomalib = {ours: theirs for theirs, ours in anomalib_key_map("small").items()}
    return {ours_to_anomalib[k]: v.float() for k, v in load_teacher_weights(path, "small").items()}


def collate(items: list[dict]):
    from anomalib.data import ImageBatch

    return ImageBatch(image=torch.stack([it["image"] for it in items]),
                      gt_label=torch.as_tensor([it["label"] for it in items]))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=Path, required=True)
    ap.add_argument("--teacher", type=Path, required=True)
    ap.add_argument("--penalty-dir", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--out-dir", type=Path, required=True)
    args = ap.parse_args()

    import lightning as L
    from anomalib.models.image.efficient_ad.lightning_model import EfficientAd
    from torch.utils.data import DataLoader

    from iad_lightning.data.dataset import AnomalyDataset
    from iad_lightning.data.records import Record
    from iad_lightning.data.transforms import Preprocess

    s = args.image_size
    raw = json.loads(args.records.read_text())
    records = {split: [Record(**{**r, "masks": tuple(r["masks"])}) for r in recs] for split, recs in raw.items()}
    pre = Preprocess(resize=(s, s), crop=None, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))

    class Data(L.LightningDataModule):
        train_batch_size = 1

        def train_dataloader(self) -> DataLoader:
            return DataLoader(AnomalyDataset(records["train"], pre), batch_size=1, shuffle=True,
                              num_workers=args.num_workers, collate_fn=collate,
                              persistent_workers=args.num_workers > 0)

        def val_dataloader(self) -> DataLoader:
            return DataLoader(AnomalyDataset(records["val"], pre), batch_size=16, shuffle=False, collate_fn=collate)

        def test_dataloader(self) -> DataLoader:
            return DataLoader(AnomalyDataset(records["test"], pre), batch_size=16, shuffle=False, collate_fn=collate)

    teacher_file = args.teacher

    class OfflineEfficientAd(EfficientAd):
        def prepare_pretrained_model(self) -> None:  # no download: our teacher, anomalib's names
            self.model.teacher.load_state_dict(teacher_state(teacher_file))

    imagenet_dir = Path(tempfile.mkdtemp(prefix="anomalib_penalty_"))
    (imagenet_dir / "natural").symlink_to(args.penalty_dir.resolve(), target_is_directory=True)

    L.seed_everything(args.seed, workers=True)
    model = OfflineEfficientAd(imagenet_dir=imagenet_dir, model_size="small", pre_processor=False,
                               post_processor=False, evaluator=False, visualizer=False)
    enc6 = model.model.ae.encoder.enconv6
    enc_pad = max(0, (8 - max(1, s // 32) + 1) // 2)
    enc6.padding = (enc_pad, enc_pad)  # 0 at 256 (anomalib's layer); 2 at 128 (as ours)

    class Progress(L.Callback):
        def on_train_batch_end(self, trainer, *_) -> None:
            if trainer.global_step % 10 == 0:
                print(f"anomalib step {trainer.global_step}/{args.steps} {time.perf_counter() - t0:.0f}s",
                      file=sys.stderr, flush=True)

    dm = Data()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=-1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        num_sanity_val_steps=0, default_root_dir=str(args.out_dir), callbacks=[Progress()])
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.eval()  # anomalib's validation loop: eval mode, then on_validation_start fits the quantiles
    model.on_validation_start()
    quant_s = time.perf_counter() - t1

    t1 = time.perf_counter()
    scores, maps, paths = [], [], []
    with torch.no_grad():
        net = model.model.eval()
        for batch in dm.test_dataloader():
            out = net(batch.image)
            scores.append(out.pred_score.reshape(-1).float().numpy())
            maps.append(out.anomaly_map[:, 0].float().numpy())
    test_s = time.perf_counter() - t1
    paths = [r.image for r in records["test"]]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(args.out_dir / "anomalib_test.npz", path=np.asarray(paths), pred_score=np.concatenate(scores),
             anomaly_map=np.concatenate(maps))
    torch.save(model.model.state_dict(), args.out_dir / "anomalib_model.pt")  # kept for inspection
    q = {k: float(v.detach()) for k, v in model.model.quantiles.items()}
    result = {
        "impl": "anomalib", "steps": int(trainer.global_step), "image_size": s, "train_s": round(fit_s, 1),
        "quantiles_s": round(quant_s, 1), "test_s": round(test_s, 1),
        "lr_step_size": trainer.lr_scheduler_configs[0].scheduler.step_size,
        "n_train": len(records["train"]), "n_val": len(records["val"]), "n_test": len(records["test"]),
        "encoder_last_padding": enc_pad, "quantiles": q,
        "teacher_mean_abs": float(model.model.mean_std["mean"].abs().mean()),
        "teacher_std_mean": float(model.model.mean_std["std"].mean()),
        "penalty_images": len(model.imagenet_loader.dataset),
    }
    print(MARK + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
