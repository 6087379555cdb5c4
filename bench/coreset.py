"""Plain vs deferred approximate greedy coreset (``iad_lightning.models.coreset``) on PatchCore features.

Features: real Lite0 PatchCore patch embeddings of MVTec screw train/good (320 images x 784 patches
= 250,880 rows x 1024; ``FeatureExtractor('tf_efficientnet_lite0', [2, 3], weights='lite0')`` +
``PatchEmbedding``; grayscale PNG -> RGB, resize 256, centre crop 224, normalise mean = std = 0.5),
or, when that folder is absent (or with ``--synthetic``), clustered synthetic features of the same
shape. For every thread setting (the machine default, then 1) and ratio, both methods run after
one warm-up, the wall times are printed side by side and the selections are asserted identical.

    python bench/coreset.py                        # 320 images, ratios 0.1 and 0.01, threads default + 1
    python bench/coreset.py --cache /tmp/screw.npy # reuse the features between runs
    python bench/coreset.py --images 64 --ratios 0.1 --threads 1

Measured on the shared 2-core Xeon 2.5 GHz (AVX-512, MKL; other jobs running, so timings vary
a lot with their load), real screw features, N = 250,880 x 1024, ``--cache`` run:

    threads  ratio  picks   plain s  deferred s  plain/deferred
          2    0.1  25088     211.4        25.5             8.3
          2   0.01   2508      36.5         4.4             8.3
          1    0.1  25088     358.6        38.9             9.2
          1   0.01   2508      36.3         4.5             8.0

(an earlier run under heavier load: 2 threads 831 s vs 42 s at 0.1, 1 thread 359 s vs 28 s).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from iad_lightning.models.coreset import approximate_greedy_coreset  # noqa: E402

DATA = Path("/work/shared/data/mvtec_screw/train/good")


def _load_image(path: Path) -> torch.Tensor:
    from PIL import Image

    image = Image.open(path).convert("RGB")
    w, h = image.size
    scale = 256 / min(w, h)
    image = image.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
    w, h = image.size
    left, top = (w - 224) // 2, (h - 224) // 2
    image = image.crop((left, top, left + 224, top + 224))
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return (x - 0.5) / 0.5


@torch.no_grad()
def real_features(num_images: int, batch: int = 16) -> torch.Tensor:
    from iad_lightning.models.backbones import FeatureExtractor
    from iad_lightning.models.patchcore import PatchEmbedding

    files = sorted(DATA.glob("*.png"))[:num_images]
    backbone = FeatureExtractor("tf_efficientnet_lite0", [2, 3], weights="lite0")
    embed = PatchEmbedding(1024, 1024)
    out = []
    for i in range(0, len(files), batch):
        images = torch.stack([_load_image(p) for p in files[i : i + batch]])
        emb, _ = embed(backbone(images))
        out.append(emb.reshape(-1, emb.shape[-1]))
    return torch.cat(out)


def synthetic_features(n: int, d: int = 1024, seed: int = 0) -> torch.Tensor:
    """Clustered, non-negative, low intrinsic dimension: closer to patch embeddings than white noise."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(300, 24, generator=g) * 2
    which = torch.randint(300, (n,), generator=g)
    z = latent[which] + 0.4 * torch.randn(n, 24, generator=g)
    lift = torch.randn(24, d, generator=g) / 24**0.5
    return torch.relu(z @ lift + 0.1 * torch.randn(n, d, generator=g))


def timed(features: torch.Tensor, ratio: float, method: str) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    idx = approximate_greedy_coreset(features, ratio, method=method)
    return time.perf_counter() - start, idx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.01])
    parser.add_argument("--threads", nargs="+", default=["default", "1"])
    parser.add_argument("--cache", type=Path, help=".npy file to load / save the features")
    parser.add_argument("--synthetic", action="store_true")
    args = parser.parse_args()

    default_threads = torch.get_num_threads()
    start = time.perf_counter()
    if args.cache is not None and args.cache.exists():
        features, source = torch.from_numpy(np.load(args.cache)), f"cache {args.cache}"
    elif DATA.is_dir() and not args.synthetic:
        features, source = real_features(args.images), f"Lite0 PatchCore features of {DATA}"
    else:
        features, source = synthetic_features(args.images * 784), "synthetic clustered features"
    features = features[: args.images * 784].contiguous()
    if args.cache is not None and not args.cache.exists():
        np.save(args.cache, features.numpy())
    print(f"features: {source}: {tuple(features.shape)} ({time.perf_counter() - start:.0f} s)")
    print(f"torch {torch.__version__}, default threads {default_threads}")
    print(f"{'threads':>7} {'ratio':>6} {'N':>8} {'picks':>6} {'plain s':>9} {'deferred s':>10} {'plain/deferred':>14}")
    for threads in args.threads:
        torch.set_num_threads(default_threads if threads == "default" else int(threads))
        warm = features[:20000]
        for method in ("plain", "deferred"):
            timed(warm, 0.01, method)
        for ratio in args.ratios:
            t_plain, plain = timed(features, ratio, "plain")
            t_deferred, deferred = timed(features, ratio, "deferred")
            assert torch.equal(plain, deferred), f"selections differ (threads={threads}, ratio={ratio})"
            print(f"{torch.get_num_threads():>7} {ratio:>6} {len(features):>8} {len(plain):>6} {t_plain:>9.1f} "
                  f"{t_deferred:>10.1f} {t_plain / t_deferred:>14.1f}", flush=True)
    torch.set_num_threads(default_threads)
    print("selections identical: yes")


if __name__ == "__main__":
    main()
