"""Preprocessing set by the method: resize, centre crop, normalisation, applied to image and mask.

The method owns these numbers (e.g. PatchCore: shorter side 256, crop 224, the backbone's
mean/std) and hands a ``Preprocess`` to the datamodule. Masks go through the same geometry with
nearest-neighbour interpolation, so they stay binary; metrics are computed at this model
resolution (the centre crop), as in the official PatchCore evaluation.

``resize_backend`` says where the resize happens. ``pil``: on the 8-bit PIL image (Pillow's
bilinear, which antialiases when shrinking), then the conversion to float; the order of the
official PatchCore, EfficientAD and UniAD pipelines (torchvision ``Resize`` on the PIL image, then
``ToTensor``), bit for bit. ``tensor``: conversion to float first, then torchvision's antialiased
bilinear on the float tensor; the two differ by up to about 1/255 per pixel before normalisation.
Crop, augmentations and normalisation come after the resize in both cases.

Crop safety: ``PairTransform.apply`` also returns the fraction of the mask's pixels (counted at
the resize resolution) that the centre crop keeps, so that every test run can count defects the
crop cuts off (``iad_lightning.data.crop_check``). ``without_crop`` is the no-crop geometry
(``method.crop: null``, ``data.center_crop: false``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

from iad_lightning.errors import ConfigError

RESIZE_BACKENDS = ("pil", "tensor")


@dataclass(frozen=True)
class Preprocess:
    """Image geometry and normalisation of a method.

    resize: an int resizes the shorter side to it (keeping the aspect ratio, torchvision
        ``Resize(int)``); a pair resizes to exactly (height, width).
    crop: centre-crop size after resizing (int or (h, w)), or None for no crop.
    """

    resize: int | tuple[int, int] = 256
    crop: int | tuple[int, int] | None = 224
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    extra: tuple = field(default=(), compare=False)  # method-specific train augmentations (v2)
    resize_backend: str = "tensor"  # pil | tensor (module docstring); methods pass their official one
    # nearest: binary masks (the project's protocol); bilinear: Pillow's bilinear resize of the 0/255
    # mask image, grey edges in [0, 1] (the official Dinomaly transform; binarised by its own rule)
    mask_interpolation: str = "nearest"

    def __post_init__(self) -> None:
        if self.mask_interpolation not in ("nearest", "bilinear"):
            raise ConfigError(f"mask_interpolation='{self.mask_interpolation}' must be nearest or bilinear")
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ConfigError(
                f"method.resize_backend='{self.resize_backend}' must be one of {RESIZE_BACKENDS} "
                f"(pil: resize the 8-bit image as the official code does; tensor: resize the float tensor)"
            )

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(h, w) of the transformed image when it does not depend on the input aspect ratio."""
        size = self.crop if self.crop is not None else self.resize
        if isinstance(size, int):
            return (size, size) if self.crop is not None else None
        return tuple(size)  # type: ignore[return-value]


def without_crop(preprocess: Preprocess) -> Preprocess:
    """The same preprocess with no centre crop: an int ``resize`` r becomes the exact square
    (r, r), so the whole image is seen (its aspect ratio is not kept, like anomalib's default
    PatchCore pre-processor) and images of different sizes still batch. Image and mask share the
    resize, so map and mask stay aligned; metrics are then computed at r x r."""
    if preprocess.crop is None:
        return preprocess
    r = preprocess.resize
    return replace(preprocess, resize=(r, r) if isinstance(r, int) else tuple(r), crop=None)


class PairTransform:
    """Applies a ``Preprocess`` to a PIL image and its boolean mask together."""

    def __init__(self, preprocess: Preprocess) -> None:
        size = preprocess.resize if isinstance(preprocess.resize, int) else list(preprocess.resize)
        # On a PIL image v2.Resize calls Pillow's resize (BILINEAR), as torchvision's v1 Resize does;
        # the mask (a tv_tensors.Mask) is always resized nearest-neighbour.
        resize = v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        self.pil_resize = resize if preprocess.resize_backend == "pil" else None
        self.tensor_resize = None if self.pil_resize is not None else resize
        self.crop = v2.CenterCrop(preprocess.crop) if preprocess.crop is not None else None
        self.extra = v2.Compose(list(preprocess.extra)) if preprocess.extra else None
        self.normalize = v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std))
        self.grey_masks = preprocess.mask_interpolation == "bilinear"

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk, _ = self.apply(image, mask)
        return img, msk

    def apply(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(image, mask, kept): ``kept`` is the fraction of the mask's pixels at the resize
        resolution that survive the centre crop (1.0 without a crop or without mask pixels)."""
        msk = tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))[None])
        if self.grey_masks:  # the official Dinomaly mask: Pillow's bilinear on the 0/255 image, then [0, 1]
            grey = (self.pil_resize or self.tensor_resize)(Image.fromarray(mask.astype(np.uint8) * 255))
            msk = tv_tensors.Mask(v2.functional.pil_to_tensor(grey).to(torch.float32).div_(255))
        if self.pil_resize is not None:
            image, msk = (self.pil_resize(image), msk) if self.grey_masks else self.pil_resize(image, msk)
        img = tv_tensors.Image(v2.functional.pil_to_tensor(image).to(torch.float32).div_(255))  # = ToTensor
        if self.tensor_resize is not None:
            img, msk = (self.tensor_resize(img), msk) if self.grey_masks else self.tensor_resize(img, msk)
        kept = 1.0
        if self.crop is not None:
            total = float(msk.sum())
            img, msk = self.crop(img, msk)
            if total:
                kept = float(msk.sum()) / total
        if self.extra is not None:
            img, msk = self.extra(img, msk)
        return self.normalize(img).as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).float(), kept
