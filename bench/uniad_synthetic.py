"""Benchmark: UniAD's learning curve on the unified synthetic set, next to reference scores.

    python bench/uniad_synthetic.py [--image-size 224] [--steps 600] [--eval-every 200]
        [--batch-size 16] [--lr 1e-4] [--hidden-dim 256] [--layers 4] [--dim-feedforward 1024]
        [--dropout 0.1] [--device auto] [--cache-root .cache/synthetic] [--out /tmp/uniad_synthetic.json]

The data and backbone of issue 4's CPU criterion: ``data=synthetic`` (five categories; 16 train,
6 good and 12 defective test images each, as ``conf/data/synthetic.yaml``), one unified model,
``backbone=lite0`` stages 0..3 (16+24+40+112 = 192 channels on the stride-16 grid).

1. Aligned features (``UniAD.aligned_features``) of every train and test image, once: the backbone
   is frozen and UniAD trains without augmentation, so this is what ``cache_features`` does.
2. Two reference scores with UniAD's own map and score rule (``anomaly_map``: L2 over channels,
   upsampled; ``image_score``: max of the 16x16 average-pooled map):
   - ``kNN``: a test token's "reconstruction" is its nearest train token of any category, i.e. the
     best a reconstruction can do that only ever outputs normal features (PatchCore's score
     without coreset). A reference, not a bound: a trained model may do better or worse.
   - ``position mean``: the category's mean train feature at each grid position (an oracle that
     knows the category; a model that learnt nothing else).
3. ``UniADModel`` (spec sizes by default) trained on the cached features: AdamW (wd 1e-4),
   gradient clipping 0.1 (norm), jitter and dropout in train mode, random batches of
   ``--batch-size``; every ``--eval-every`` steps the mean and per-category image AUROC
   (``iad_lightning.metrics.auroc``). The spec's lr is 1e-4 for 1000 epochs of batch 64; a CPU
   budget has a few hundred steps, hence ``--lr``.

The seconds per step are printed: on a CPU they are the reason the criterion is a GPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LITE0 = {"name": "tf_efficientnet_lite0", "layers": [0, 1, 2, 3], "weights": "lite0"}
SYNTHETIC = {"seed": 0, "n_train": 16, "n_test_good": 6, "n_test_defect": 12}  # conf/data/synthetic.yaml


def extract(model, dm, split: str, device) -> dict:
    import torch
    from torch.utils.data import DataLoader

    feats, labels, cats = [], [], []
    loader = DataLoader(dm.dataset(split), batch_size=16, shuffle=False)
    with torch.no_grad():
        for batch in loader:
            feats.append(model.aligned_features(batch["image"].to(device)))
            labels.append(batch["label"])
            cats += list(batch["category"])
    return {"f": torch.cat(feats), "label": torch.cat(labels).cpu(), "cat": cats}


def per_category_auroc(scores, test: dict) -> dict[str, float]:
    import numpy as np

    from iad_lightning.metrics import auroc

    cats = np.array(test["cat"])
    labels = test["label"].numpy()
    return {c: auroc(scores[cats == c], labels[cats == c]) for c in dict.fromkeys(test["cat"])}


def summary(per: dict[str, float]) -> dict:
    return {"mean": sum(per.values()) / len(per), "categories": per}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--hidden-dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4, help="encoder and decoder layers each")
    ap.add_argument("--dim-feedforward", type=int, default=1024)
    ap.add_argument("--nhead", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-root", default=str(REPO / ".cache" / "synthetic"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/uniad_synthetic.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(REPO))
    import torch
    import torch.nn.functional as F

    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.methods.uniad import UniAD
    from iad_lightning.models.uniad import UniADModel, anomaly_map, image_score

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.manual_seed(args.seed)
    method = UniAD(backbone=LITE0, image_size=args.image_size).to(device).eval()
    dm = AnomalyDataModule(format="synthetic", root=args.cache_root, category="all", options=SYNTHETIC,
                           batch_size=16, val_fraction=0.0, num_workers=0)
    dm.preprocess = method.preprocess
    dm.setup("fit")
    t0 = time.perf_counter()
    train, test = extract(method, dm, "train", device), extract(method, dm, "test", device)
    print(f"features: {len(train['f'])} train, {len(test['f'])} test images, {tuple(train['f'].shape[1:])}, "
          f"{time.perf_counter() - t0:.0f}s", flush=True)
    size = (args.image_size, args.image_size)

    def scores(rec: torch.Tensor) -> torch.Tensor:
        return image_score(anomaly_map(rec, test["f"], size)).cpu().numpy()

    c = train["f"].shape[1]
    bank = train["f"].permute(0, 2, 3, 1).reshape(-1, c)
    tokens = test["f"].permute(0, 2, 3, 1).reshape(-1, c)
    nearest = torch.cat([bank[torch.cdist(q, bank).argmin(1)] for q in tokens.split(4096)])
    knn = nearest.reshape(test["f"].shape[0], *test["f"].shape[2:], c).permute(0, 3, 1, 2)
    means = {cat: train["f"][[i for i, x in enumerate(train["cat"]) if x == cat]].mean(0) for cat in set(train["cat"])}
    pos_mean = torch.stack([means[cat] for cat in test["cat"]])
    refs = {"kNN": summary(per_category_auroc(scores(knn), test)),
            "position mean": summary(per_category_auroc(scores(pos_mean), test))}
    for name, r in refs.items():
        print(f"{name:>14}: mean image AUROC {r['mean']:.3f} {json.dumps({k: round(v, 3) for k, v in r['categories'].items()})}")

    model = UniADModel(in_channels=c, feature_size=tuple(train["f"].shape[2:]), hidden_dim=args.hidden_dim,
                       nhead=args.nhead, num_encoder_layers=args.layers, num_decoder_layers=args.layers,
                       dim_feedforward=args.dim_feedforward, dropout=args.dropout).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=1e-4)
    curve, t_train = [], 0.0
    gen = torch.Generator().manual_seed(args.seed)
    for step in range(1, args.steps + 1):
        t = time.perf_counter()
        model.train()
        x = train["f"][torch.randperm(len(train["f"]), generator=gen)[: args.batch_size].to(device)]
        loss = F.mse_loss(model(x), x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train += time.perf_counter() - t
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                r = summary(per_category_auroc(scores(model(test["f"])), test))
            curve.append({"step": step, "train_s": round(t_train, 1), "loss": loss.item(), **r})
            print(f"step {step:>6} ({t_train / step:.2f} s/step, {t_train:.0f}s): loss {loss.item():.3f}, mean image AUROC "
                  f"{r['mean']:.3f} {json.dumps({k: round(v, 3) for k, v in r['categories'].items()})}", flush=True)
    out = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}, "device": str(device),
           "references": refs, "curve": curve}
    args.out.write_text(json.dumps(out, indent=2))
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
