"""Random crops of scikit-image's bundled colour photographs, written as PNG files.

    python bench/natural_images.py OUT_DIR [--n 1000] [--size 256] [--seed 0]

The offline stand-in for ImageNet (a documented deviation from spec §3 and §1, which use ImageNet
for the teacher distillation and the penalty images): with no network, the EfficientAD teacher can
still be distilled on natural-image statistics, e.g.

    python bench/natural_images.py /tmp/natural --n 2000
    python train.py method=efficientad_teacher data=images data.root=/tmp/natural backbone=lite0

Sources: the colour photographs shipped inside the ``scikit-image`` wheel (``skimage.data``; no
download), see ``PHOTOS``. Grey-level images, drawings and synthetic patterns are left out. Each
output is a random-resized crop (area 8-100 % of the photo, aspect ratio 3/4-4/3, as torchvision's
``RandomResizedCrop``) resized to ``size`` x ``size`` with antialiasing, then flipped horizontally
and vertically, each with probability 0.5. Seeded: the same arguments give the same files.
Eight photographs are far less varied than ImageNet; expect a weaker teacher.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
from PIL import Image

# skimage.data functions returning colour photographs bundled with the package
PHOTOS = (
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "stereo_motorcycle",  # its left view
    "hubble_deep_field",
    "retina",
    "immunohistochemistry",
)


def load_photos(names: tuple[str, ...] = PHOTOS) -> list[Image.Image]:
    """The bundled photographs as RGB PIL images."""
    from skimage import data

    photos = []
    for name in names:
        arr = getattr(data, name)()
        arr = np.asarray(arr[0] if isinstance(arr, tuple) else arr)
        if arr.ndim != 3 or arr.shape[2] < 3:
            raise ValueError(f"skimage.data.{name} is not a colour image")
        photos.append(Image.fromarray(arr[..., :3].astype(np.uint8)))
    return photos


def random_resized_box(rng: np.random.Generator, width: int, height: int,
                       scale: tuple[float, float] = (0.08, 1.0),
                       ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """A (left, top, right, bottom) crop box with torchvision ``RandomResizedCrop``'s rule."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(rng.integers(0, width - w + 1))
            top = int(rng.integers(0, height - h + 1))
            return left, top, left + w, top + h
    side = min(width, height)  # fallback: central square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def write_natural_images(out_dir: str | Path, n: int = 1000, size: int = 256, seed: int = 0,
                         names: tuple[str, ...] = PHOTOS) -> list[Path]:
    """Write ``n`` crops as ``out_dir/NNNNNN.png``; returns their paths (sorted)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    photos = load_photos(names)
    rng = np.random.default_rng(seed)
    width = max(6, len(str(n - 1)))
    paths = []
    for i in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        box = random_resized_box(rng, *photo.size)
        img = photo.resize((size, size), Image.Resampling.BILINEAR, box=box, reducing_gap=2.0)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        path = out / f"{i:0{width}d}.png"
        img.save(path, compress_level=1)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir")
    parser.add_argument("--n", type=int, default=1000, help="number of crops")
    parser.add_argument("--size", type=int, default=256, help="side of the square output images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    paths = write_natural_images(args.out_dir, args.n, args.size, args.seed)
    print(f"wrote {len(paths)} images of {args.size}x{args.size} to {Path(args.out_dir).resolve()}")


if __name__ == "__main__":
    main()
