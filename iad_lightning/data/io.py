"""Image and mask loading shared by every dataset format.

Every image becomes 8-bit RGB whatever its file mode, and every mask becomes a boolean
array at the image's native resolution (resizing is the transforms' job). Any unreadable,
missing or inconsistent file raises ``DatasetError`` naming the file, so a broken dataset
fails at the first bad file with a message that says which one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from iad_lightning.errors import DatasetError

# 16-bit modes: scaled to 8 bits by the dtype range (65535 / 255 = 257). Pillow opens some
# 16-bit PNG/TIFF files as the 32-bit mode "I", which holds 16-bit data in practice.
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _open(path: str | Path, what: str) -> Image.Image:
    """Open and fully decode a file (``load()`` so truncation is detected here, not later)."""
    p = Path(path)
    if not p.is_file():
        raise DatasetError(
            f"{what} file '{p}' does not exist or is not a file; check the dataset root and index"
        )
    try:
        with Image.open(p) as im:
            im.load()
            return im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(
            f"{what} file '{p}' is corrupt, truncated or not an image ({type(e).__name__}: {e}); "
            f"re-extract or remove it"
        ) from e


def _to_8bit_grey(im: Image.Image) -> Image.Image:
    """16-bit (and 32-bit int / float) single-channel images to 8-bit 'L'; others unchanged."""
    if im.mode in _SIXTEEN_BIT_MODES:
        arr = np.asarray(im).astype(np.float64) / 257.0
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    if im.mode == "F":  # float: [0, 1] data is scaled, anything else is taken as 0..255
        arr = np.asarray(im, dtype=np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0
        arr = np.nan_to_num(arr, nan=0.0)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
    return im


def to_8bit(im: Image.Image) -> Image.Image:
    """16-bit and float single-channel images scaled to 8-bit 'L' (``load_image``'s rule); others as they are."""
    return _to_8bit_grey(im)


def load_image_8bit(path: str | Path) -> Image.Image:
    """Load an image file decoded in its own mode (L, P, RGBA, RGB, ...), 16-bit and float data
    scaled to 8-bit grey as in ``load_image``, but not converted to RGB: for preprocessing that
    resizes first and converts afterwards (``Preprocess.rgb_after_resize``); ``to_rgb8`` finishes it."""
    return _to_8bit_grey(_open(path, "image"))


def load_image(path: str | Path) -> Image.Image:
    """Load any image file as 8-bit RGB.

    Grayscale (L, LA, P, 1) is replicated to 3 channels, alpha is dropped (not composited),
    16-bit data is divided by 257, CMYK/YCbCr are converted by Pillow.
    Raises ``DatasetError`` naming the path if the file is missing, corrupt or truncated.
    """
    return to_rgb8(_open(path, "image"), str(path))


def to_rgb8(im: Image.Image, name: str = "image") -> Image.Image:
    """Any decoded PIL image as 8-bit RGB, by ``load_image``'s rules (``name`` for errors)."""
    im = _to_8bit_grey(im)
    if im.mode == "RGB":
        return im
    if im.mode == "P":  # via RGBA: Pillow warns when converting transparent palettes to RGB
        im = im.convert("RGBA")
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise DatasetError(
            f"image file '{name}' has mode '{im.mode}' that cannot be converted to RGB; "
            f"convert it to PNG"
        ) from e


def array_to_rgb8(array: np.ndarray, name: str = "array") -> Image.Image:
    """An (H, W), (H, W, 1), (H, W, 3) or (H, W, 4) array as 8-bit RGB: uint8 as is, uint16 / 257,
    float in [0, 1] x 255 (other floats taken as 0..255), alpha dropped, grey replicated."""
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in (3, 4))):
        raise DatasetError(f"{name}: an image array must be HxW, HxWx1, HxWx3 or HxWx4, got shape {arr.shape}")
    if arr.dtype == np.uint16:
        arr = np.rint(arr.astype(np.float64) / 257.0)
    elif arr.dtype.kind == "f":
        arr = np.nan_to_num(arr.astype(np.float64))
        if arr.size and arr.max() <= 1.0:
            arr = arr * 255.0
    elif arr.dtype != np.uint8 and arr.dtype.kind not in "iub":
        raise DatasetError(f"{name}: unsupported image array dtype {arr.dtype}")
    arr = np.clip(arr, 0, 255).astype(np.uint8)
    if arr.ndim == 3 and arr.shape[-1] == 4:
        arr = arr[..., :3]
    return to_rgb8(Image.fromarray(arr), name)


def load_mask(
    paths: Sequence[str | Path],
    size: tuple[int, int],
    threshold: int = 0,
    image_path: str | Path | None = None,
) -> np.ndarray:
    """Load, binarise and OR the mask files of one image.

    paths: mask files (several are OR-ed, e.g. MVTec LOCO channels); empty = all-False mask.
    size: the image size in **PIL order (width, height)**, e.g. ``load_image(p).size``; every
        mask must have exactly this size (masks are not resized here).
    threshold: a pixel is anomalous iff its 8-bit grey value is ``> threshold`` (0 for most
        sets; 127 for Real-IAD's official evaluator or JPEG masks).
    image_path: only used in error messages.
    Returns a bool array of shape (height, width).
    """
    width, height = int(size[0]), int(size[1])
    out = np.zeros((height, width), dtype=bool)
    for p in paths:
        im = _to_8bit_grey(_open(p, "mask"))
        if im.size != (width, height):
            raise DatasetError(
                f"mask file '{p}' has size {im.size[0]}x{im.size[1]} (WxH) but its image "
                f"'{image_path}' is {width}x{height}; masks must match their image's size"
            )
        if im.mode != "L":
            im = im.convert("L")
        out |= np.asarray(im) > threshold
    return out
