"""Benchmark: a unified UniAD run (one model for several categories) on the shared real data,
and (``--step``) the CPU training step against the matmul floor of its FLOPs.

    python bench/uniad.py --step [--step-batch 8] [--repeats 5]   # no data needed
    python bench/uniad.py [--epochs 4] [--image-size 224] [--batch-size 64]
                          [--datasets mvtec_screw kolektorsdd_commutator]
                          [--no-cache-epochs 1] [--data-root ../shared/data] [--out /tmp/uniad_bench.json]

One model is trained on the union of the train sets of ``--datasets`` (MVTec-layout folders
under ``--data-root``, format ``mvtec``; CC BY-NC-SA 4.0, never copied into the repo), with the
offline EfficientNet-Lite0 backbone (timm ``tf_efficientnet_lite0``, feature indices 0..3:
16+24+40+112 = 192 channels) and the spec's transformer, optimiser and clipping otherwise. The
number of epochs is the CPU budget (the paper trains 1000 epochs on 8 GPUs): figures from a few
epochs are far from converged.

Measured: training throughput (train images / s) per epoch. Epoch 0 fills the feature cache
(a full backbone pass, like training without the cache); later epochs read it. With
``--no-cache-epochs N`` a second, separate run of N epochs with ``cache_features=false`` gives
the no-cache figure directly. Then per category and mean: image AUROC, pixel AUROC, AUPRO (at
0.3 FPR), from ``iad_lightning.metrics`` via the base module, as ``train.py`` reports them.
Missing data: a message and exit 0.

``--step``: one training step of the spec's transformer (272 channels on 14x14, as with the
official B4 backbone; the feature cache means no backbone pass in a step) at ``--step-batch``
on random features, exactly as Lightning runs it: forward in training mode (feature jitter and
dropout on), MSE loss, backward, gradient-norm clipping at 0.1, AdamW step. FLOPs are counted by
``torch.utils.flop_counter`` over forward + backward; the floor is a square fp32 matmul of the
same FLOPs timed in the same process (``bench/efficientad.py``'s helpers). Printed: the median
step time, the floor, their ratio, and the profile's top operators.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
DEFAULT_DATASETS = ("mvtec_screw", "kolektorsdd_commutator")
LITE0 = {"name": "tf_efficientnet_lite0", "layers": [0, 1, 2, 3], "weights": "lite0"}
METRICS = (("image_auroc", "image AUROC"), ("pixel_auroc", "pixel AUROC"), ("pixel_aupro", "pixel AUPRO"))


def run(data_root: Path, datasets: list[str], epochs: int, image_size: int, batch_size: int, cache: bool,
        seed: int, test: bool = True) -> dict:
    """One unified fit (+ test) in this process; returns the measurements."""
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*modules? in eval mode.*")
    import lightning as L
    import torch

    sys.path.insert(0, str(REPO))
    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.methods.uniad import UniAD

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.n: list[int] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._t, self._n = time.perf_counter(), 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self._n += batch["image"].shape[0]
            if batch_idx % 3 == 0:
                print(f"[bench]   batch {batch_idx}: {self._n} images, {time.perf_counter() - self._t:.0f}s", flush=True)

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._t)
            self.n.append(self._n)
            print(f"[bench] epoch {len(self.times) - 1}: {self._n} images in {self.times[-1]:.1f}s "
                  f"({self._n / self.times[-1]:.2f} images/s), loss {float(trainer.callback_metrics['train/loss']):.4f}",
                  flush=True)

    L.seed_everything(seed, verbose=False)
    dm = AnomalyDataModule(format="mvtec", root=str(data_root), category=datasets, batch_size=None,
                           eval_batch_size=32, seed=seed)
    model = UniAD(backbone=LITE0, image_size=image_size, effective_batch_size=batch_size, cache_features=cache)
    dm.preprocess = model.preprocess
    timer = EpochTimer()
    trainer = L.Trainer(accelerator="auto", devices=1, max_epochs=epochs, gradient_clip_val=0.1,
                        gradient_clip_algorithm="norm", limit_val_batches=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer])
    model.configure_data(dm, trainer.world_size)
    t0 = time.perf_counter()
    trainer.fit(model, datamodule=dm)
    fit_s = time.perf_counter() - t0
    out = {
        "datasets": datasets, "epochs": epochs, "image_size": image_size, "batch_size": batch_size,
        "cache_features": cache, "n_train": len(dm.index_records()["train"]),
        "n_test": len(dm.index_records()["test"]), "fit_s": fit_s, "epoch_s": timer.times,
        "epoch_images_per_s": [n / t for n, t in zip(timer.n, timer.times)],
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(), "in_channels": model.model.in_channels,
        "feature_size": list(model.feature_size),
    }
    if test:
        t1 = time.perf_counter()
        trainer.test(model, datamodule=dm, verbose=False)
        out["test_s"] = time.perf_counter() - t1
        out["results"] = model.results
    return out


def step_bench(batch: int, repeats: int, warmup: int = 2, profile: bool = True) -> dict:
    """Median CPU training step of the spec's UniAD transformer vs the same-FLOP matmul floor."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from efficientad import step_against_floor  # the shared timing helpers

    from iad_lightning.models.uniad import UniADModel

    torch.manual_seed(0)
    model = UniADModel(in_channels=272).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
    x = torch.randn(batch, 272, 14, 14, generator=torch.Generator().manual_seed(1))

    def step() -> None:
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()

    counter = FlopCounterMode(display=False)
    with counter:  # on real tensors (the mask check in the constructor needs values): one extra step
        F.mse_loss(model(x), x).backward()
    opt.zero_grad(set_to_none=True)
    flops = int(counter.get_total_flops())
    out = step_against_floor(step, flops, torch.device("cpu"), warmup, repeats, budget_s=120.0,
                             profile=profile, row_limit=12)
    return {"batch": batch, **out}


def fmt(v, d: int = 4) -> str:
    return "–" if v is None else f"{v:.{d}f}"


def render(main: dict, nocache: dict | None) -> str:
    ips = main["epoch_images_per_s"]
    title = (f"UniAD unified over {' + '.join(main['datasets'])} ({main['n_train']} train / {main['n_test']} test "
             f"images), Lite0 [0,1,2,3] -> {main['in_channels']} ch on {main['feature_size']}, "
             f"{main['image_size']} px, batch {main['batch_size']}, {main['epochs']} epochs, device {main['device']} "
             f"({main['torch_threads']} threads)")
    lines = [title, ""]
    lines += ["| category | " + " | ".join(label for _, label in METRICS) + " |", "|---|" + "---:|" * len(METRICS)]
    res = main["results"]
    for cat, m in [*res["categories"].items(), ("**mean**", res["mean"])]:
        lines.append(f"| {cat} | " + " | ".join(fmt(m.get(k)) for k, _ in METRICS) + " |")
    lines += ["", "| training throughput | images/s |", "|---|---:|",
              f"| epoch 0 (backbone pass, fills the cache) | {ips[0]:.2f} |"]
    if len(ips) > 1:
        later = sum(main["n_train"] for _ in ips[1:]) / sum(main["epoch_s"][1:])
        lines.append(f"| epochs 1..{len(ips) - 1} (cached features) | {later:.2f} |")
    if nocache:
        n = nocache["epoch_images_per_s"]
        lines.append(f"| cache_features=false (mean of {len(n)} epochs) | "
                     f"{sum(nocache['n_train'] for _ in n) / sum(nocache['epoch_s']):.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=list(DEFAULT_DATASETS))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=64, help="effective batch (spec: 64)")
    parser.add_argument("--no-cache-epochs", type=int, default=0, help="also time N epochs without the cache")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    parser.add_argument("--out", default=None, help="JSON file (default /tmp/uniad_bench_<host>.json)")
    parser.add_argument("--step", action="store_true", help="only time the CPU training step against its matmul floor")
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.step:
        r = step_bench(args.step_batch, args.repeats)
        print(r.pop("profile", ""))
        print(f"UniAD training step, batch {r['batch']}, 272 ch on 14x14, {r['threads']} threads (load {r['load']:.1f}): "
              f"{r['step_s']:.3f} s (median of {r['steps']}); {r['gflops']:.1f} GFLOP fwd+bwd; matmul floor "
              f"{r['floor_s']:.3f} s ({r['floor_gflops_per_s']:.0f} GFLOP/s at n={r['floor_n']}); "
              f"ratio {r['ratio_to_floor']:.2f}x")
        return

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    data_root = Path(args.data_root).resolve()
    missing = [d for d in args.datasets if not (data_root / d / "train").is_dir()]
    if missing:
        print(f"[bench] skip: no MVTec-layout folder for {missing} under {data_root}", flush=True)
        return
    main_run = run(data_root, args.datasets, args.epochs, args.image_size, args.batch_size, True, args.seed)
    nocache = None
    if args.no_cache_epochs > 0:
        nocache = run(data_root, args.datasets, args.no_cache_epochs, args.image_size, args.batch_size, False,
                      args.seed, test=False)
    out = Path(args.out or f"/tmp/uniad_bench_{platform.node() or 'host'}.json")
    out.write_text(json.dumps({"host": platform.node(), "cpu_count": os.cpu_count(), "main": main_run,
                               "no_cache": nocache}, indent=1))
    print(f"\n[bench] results: {out}\n")
    print(render(main_run, nocache))


if __name__ == "__main__":
    main()
