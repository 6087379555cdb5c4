"""Benchmark: how much PatchCore's image AUROC moves with the coreset seed, per coreset algorithm.

    python bench/patchcore_seeds.py [--datasets kolektorsdd_commutator mvtec_screw]
                                    [--resize-backend pil tensor] [--variants official exact kcenter]
                                    [--seeds 0-39] [--coreset-ratio 0.01] [--crop 224 none]
                                    [--image-score max paper]
    /work/venvs/anomalib/bin/python bench/patchcore_seeds.py --variants sparse ...   # anomalib's projection

At a 1 % coreset on a set of ~150 test images one seed moves image AUROC by 1-2 points, so one
run of each implementation (``bench/patchcore.py``) cannot say which is more accurate. Full runs
cost ~20 s (ours) and 3-10 min (anomalib) per seed; here the patch embeddings are computed once
and cached, and only the coreset and the nearest-neighbour scores are redone per seed (a few
seconds each), so 40 seeds per variant are cheap.

Embeddings: our ``PatchCore`` with ``tf_efficientnet_lite0`` layers 2 + 3 (offline package
weights), today's defaults (the 152-d ``auto`` embedding, 256 -> 224 centre crop), per
``--resize-backend``; with ``tensor`` they equal anomalib 2.7's PatchCore features to ~1e-6
(relative). Cached in ``--cache-dir`` (never in the repo). Scores: the official image score, the
max over patches of the squared distance to the nearest bank row, exact in float32, and with
``--image-score paper`` also anomalib's Eq. 7 (``image_scores``).

``--crop none`` caches the embeddings of the whole image resized to a 256 square (``method.crop=null``,
anomalib's ``Resize((256, 256))``) instead of the 224 centre crop of the shorter-side-256 image,
which on Kolektor's narrow images keeps a third of the height and cuts the cracks of 49 of the 50
defective test images (3 wholly).

Coreset variants (all at ``--coreset-ratio``):
  * ``official``: ours, ``approximate_greedy_coreset`` (128-d dense random projection, mean
    distance to 10 random starts, official patchcore-inspection), exactly what a run selects;
  * ``exact``: the same without the projection (``projection_dim=None``);
  * ``kcenter``: anomalib's ``KCenterGreedy`` loop (one random start, kept in the coreset) on
    exact distances;
  * ``sparse``: the same loop on anomalib's own ``SparseRandomProjection(eps=0.9)`` (about 300
    dims here), i.e. anomalib's selection; needs anomalib importable, so run it with the anomalib
    venv's Python (bench/README.md) after a run in ours has written the cache.

Data: ``../shared/data`` (CC BY-NC-SA 4.0, see its README.md; never copied into the repo).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "bench")]  # iad_lightning (its numpy/torch parts also import in the
# anomalib venv) and bench/patchcore.py
from iad_lightning.metrics import auroc  # noqa: E402
from iad_lightning.models.coreset import approximate_greedy_coreset  # noqa: E402
from iad_lightning.models.nn_search import torch_knn  # noqa: E402
from iad_lightning.models.patchcore import PatchCoreModel  # noqa: E402
from patchcore import _mean_se  # noqa: E402

DEFAULT_DATA_ROOT = REPO.parent / "shared" / "data"
VARIANTS = ("official", "exact", "kcenter", "sparse")


def parse_seeds(specs: list[str]) -> list[int]:
    """``0-39`` or ``0 1 5`` -> a list of ints."""
    seeds: list[int] = []
    for spec in specs:
        lo, sep, hi = spec.partition("-")
        seeds += list(range(int(lo), int(hi) + 1)) if sep else [int(lo)]
    return seeds


def cache_path(cache_dir: Path, dataset: str, backend: str, crop: int | None = 224) -> Path:
    return cache_dir / f"{dataset}_{backend}{'' if crop else '_nocrop'}.pt"


def extract(data_root: Path, dataset: str, backend: str, path: Path, crop: int | None = 224) -> None:
    """Train and test patch embeddings and test labels of one set, as one full run computes them."""
    from iad_lightning.data.datamodule import AnomalyDataModule
    from iad_lightning.methods.patchcore import PatchCore

    datamodule = AnomalyDataModule(format="mvtec", root=str(data_root), category=dataset, batch_size=32, seed=0)
    model = PatchCore(backbone={"name": "tf_efficientnet_lite0", "layers": [2, 3], "weights": "lite0"},
                      resize_backend=backend, crop=crop).eval()
    datamodule.preprocess = model.preprocess
    datamodule.setup("fit")
    out = {}
    with torch.no_grad():
        for split in ("train", "test"):
            embeddings, labels = [], []
            for batch in datamodule._loader(split, 32, False):
                embedding, _ = model.model.embed(model.feature_extractor(batch["image"]))
                embeddings.append(embedding)
                labels.append(batch["label"])
            out[split], out[f"{split}_label"] = torch.cat(embeddings), torch.cat(labels)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    print(f"[seeds] cached {dataset} ({backend}, crop {crop}): train {tuple(out['train'].shape)}, test "
          f"{tuple(out['test'].shape)} -> {path}", flush=True)


def kcenter(features: torch.Tensor, num_select: int, generator: torch.Generator) -> torch.Tensor:
    """anomalib's ``KCenterGreedy.select_coreset_idxs`` on ``features``: a random start kept in the
    coreset, then the point farthest from the selected ones, repeatedly (squared distances: the
    same argmax as anomalib's Euclidean ones)."""
    n = len(features)
    sq = (features * features).sum(1)
    idx = int(torch.randint(n, (1,), generator=generator))
    min_sq = torch.full((n,), float("inf"))
    selected = [idx]
    for _ in range(num_select - 1):
        dist = (sq - 2 * (features @ features[idx]) + sq[idx]).clamp_(min=0)
        torch.minimum(min_sq, dist, out=min_sq)
        min_sq[idx] = 0
        idx = int(min_sq.argmax())
        min_sq[idx] = 0
        selected.append(idx)
    return torch.tensor(selected)


def select(variant: str, train: torch.Tensor, ratio: float, seed: int) -> torch.Tensor:
    num_select = int(len(train) * ratio)
    if variant in ("official", "exact"):
        return approximate_greedy_coreset(train, ratio, 128 if variant == "official" else None, 10, seed)
    generator = torch.Generator().manual_seed(seed)
    if variant == "kcenter":
        return kcenter(train, num_select, generator)
    try:  # variant == "sparse"
        from anomalib.models.components.dimensionality_reduction import SparseRandomProjection
    except ImportError as err:
        raise SystemExit("--variants sparse needs anomalib: run this script with the anomalib venv's Python "
                         f"(bench/README.md) ({err})") from err
    torch.manual_seed(seed)  # the projection draws from the global generators
    np.random.seed(seed)
    projected = SparseRandomProjection(eps=0.9).fit(train).transform(train).contiguous()
    return kcenter(projected, num_select, generator)


def image_scores(test: torch.Tensor, bank: torch.Tensor, scores: tuple[str, ...] = ("max",)) -> dict:
    """Image scores per test image from one nearest-neighbour pass, for each name in ``scores``:

    * ``max``: the official score, the max over patches of the squared NN distance;
    * ``paper``: anomalib's Eq. 7, its Euclidean max patch distance s* times
      ``PatchCoreModel.reweighting_weights`` (1 - softmax of the distances from that patch to the
      9 nearest bank rows of its nearest bank row).
    """
    b, p, d = test.shape
    dist, idx = torch_knn(test.reshape(-1, d), bank, 1)
    dist, idx = dist.view(b, p), idx.view(b, p)
    out = {"max": dist.amax(1)}
    if "paper" in scores:
        model = PatchCoreModel(d, d, reweight_neighbors=9).fit(bank)
        out["paper"] = model.reweighting_weights(test, dist, idx) * out["max"].clamp(min=0).sqrt()
    return {name: out[name].numpy() for name in scores}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["kolektorsdd_commutator", "mvtec_screw"])
    parser.add_argument("--resize-backend", nargs="+", choices=("pil", "tensor"), default=["pil", "tensor"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=["official", "exact", "kcenter"])
    parser.add_argument("--seeds", nargs="+", default=["0-39"], help="e.g. 0-39 or 0 1 2")
    parser.add_argument("--coreset-ratio", type=float, default=0.01)
    parser.add_argument("--image-score", nargs="+", choices=("max", "paper"), default=["max"],
                        help="max: official; paper: anomalib's Eq. 7 (both from one search per seed)")
    parser.add_argument("--crop", nargs="+", choices=("224", "none"), default=["224"],
                        help="224: shorter side 256, centre crop 224 (default); none: the whole image as a 256 square")
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT))
    parser.add_argument("--cache-dir", default="/tmp/patchcore_seeds")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON of every seed's AUROC (default <cache-dir>/results.json)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seeds = parse_seeds(args.seeds)
    cache_dir, data_root = Path(args.cache_dir), Path(args.data_root)
    out = Path(args.out or cache_dir / "results.json")
    saved = json.loads(out.read_text()) if out.is_file() else {}

    for dataset in args.datasets:
        if not (data_root / dataset / "train").is_dir():
            print(f"[seeds] skip {dataset}: no MVTec-layout folder {data_root / dataset}", flush=True)
            continue
        for backend, crop_arg in [(b, c) for c in args.crop for b in args.resize_backend]:
            crop = None if crop_arg == "none" else int(crop_arg)
            path = cache_path(cache_dir, dataset, backend, crop)
            if not path.is_file():
                extract(data_root, dataset, backend, path, crop)
            cached = torch.load(path, weights_only=True)
            train = cached["train"].reshape(-1, cached["train"].shape[-1])
            test, labels = cached["test"], cached["test_label"].numpy()
            for variant in args.variants:
                key = f"{dataset} {backend} {variant} {args.coreset_ratio}" + ("" if crop else " nocrop")
                keys = {score: key + (" eq7" if score == "paper" else "") for score in args.image_score}
                values: dict = {score: {} for score in args.image_score}
                for seed in seeds:
                    t = time.perf_counter()
                    idx = select(variant, train, args.coreset_ratio, seed)
                    for score, pred in image_scores(test, train[idx], tuple(args.image_score)).items():
                        values[score][seed] = 100 * auroc(pred, labels)
                    print(f"[seeds] {key} seed {seed}: image AUROC "
                          + ", ".join(f"{values[score][seed]:.2f} ({score})" for score in args.image_score)
                          + f" ({time.perf_counter() - t:.1f} s)", flush=True)
                for score in args.image_score:
                    saved[keys[score]] = {str(s): v for s, v in values[score].items()}
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(saved, indent=1))

    print(f"\n[seeds] results: {out}\n")
    print("| set | crop | resize | coreset | image score | ratio | seeds | image AUROC, mean ± SE | min / max |")
    print("|---|---|---|---|---|---:|---:|---:|---:|")
    for key, values in saved.items():
        dataset, backend, variant, ratio, *flags = key.split()
        v = list(values.values())
        mean, se = _mean_se(v)
        spread = f" ± {se:.2f}" if se is not None else ""
        print(f"| {dataset} | {'none' if 'nocrop' in flags else 224} | {backend} | {variant} | "
              f"{'Eq. 7' if 'eq7' in flags else 'max'} | {ratio} | {len(v)} | {mean:.2f}{spread} | "
              f"{min(v):.2f} / {max(v):.2f} |")


if __name__ == "__main__":
    main()
