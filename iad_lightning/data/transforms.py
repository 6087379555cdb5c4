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

Three more fields describe other official pipelines (AnomalyCLIP's: ``interpolation="bicubic"``,
``rgb_after_resize=True``, ``mask_interpolation="bilinear"``). ``interpolation``: the image filter
(bilinear | bicubic; Pillow's with ``pil``, torchvision's antialiased one with ``tensor``).
``rgb_after_resize`` (``pil`` only): the image is resized in its file's own mode (8-bit L, P, RGBA,
...) and converted to RGB afterwards, as ``Resize`` then ``convert("RGB")`` does; for RGB and L
images the order changes nothing, for palette images Pillow resizes the indices nearest-neighbour
and for RGBA it resizes with premultiplied alpha, so the order matters there. ``mask_interpolation``:
``nearest`` (the default, masks stay binary) or ``bilinear``: the 0/255 mask is resized bilinearly
(Pillow with ``pil``) and binarised at > 0.5, as ``Resize`` + ``ToTensor`` + ``> 0.5`` does.

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

from iad_lightning.data.io import to_rgb8
from iad_lightning.errors import ConfigError

RESIZE_BACKENDS = ("pil", "tensor")
INTERPOLATIONS = ("bilinear", "bicubic")
MASK_INTERPOLATIONS = ("nearest", "bilinear", "bilinear_grey")


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
    interpolation: str = "bilinear"  # bilinear | bicubic: the image filter
    rgb_after_resize: bool = False  # pil only: resize the file's own mode, then convert to RGB
    # nearest: binary masks (the project's protocol); bilinear: the 0/255 mask resized bilinearly,
    # binarised at > 0.5 (official AnomalyCLIP); bilinear_grey: the same, kept grey in [0, 1] (official
    # Dinomaly transform; its method binarises by its own rule, evaluation_targets)
    mask_interpolation: str = "nearest"

    def __post_init__(self) -> None:
        if self.resize_backend not in RESIZE_BACKENDS:
            raise ConfigError(
                f"method.resize_backend='{self.resize_backend}' must be one of {RESIZE_BACKENDS} "
                f"(pil: resize the 8-bit image as the official code does; tensor: resize the float tensor)"
            )
        if self.interpolation not in INTERPOLATIONS:
            raise ConfigError(f"preprocess interpolation='{self.interpolation}' must be one of {INTERPOLATIONS}")
        if self.mask_interpolation not in MASK_INTERPOLATIONS:
            raise ConfigError(f"preprocess mask_interpolation='{self.mask_interpolation}' must be one of "
                              f"{MASK_INTERPOLATIONS}")
        if self.rgb_after_resize and self.resize_backend != "pil":
            raise ConfigError("preprocess rgb_after_resize=True needs resize_backend='pil' (the float tensor "
                              "path converts to RGB before it can resize)")

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
        # On a PIL image v2.Resize calls Pillow's resize (BILINEAR or BICUBIC), as torchvision's v1
        # Resize does; the mask (a tv_tensors.Mask) is resized nearest-neighbour here.
        mode = v2.InterpolationMode(preprocess.interpolation)
        resize = v2.Resize(size, interpolation=mode, antialias=True)
        self.rgb_after_resize = preprocess.rgb_after_resize
        self.mask_resize = None
        if preprocess.mask_interpolation != "nearest":  # the 0/255 mask resized on its own
            self.mask_resize = v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        self.pil_resize = resize if preprocess.resize_backend == "pil" else None
        self.tensor_resize = None if self.pil_resize is not None else resize
        self.crop = v2.CenterCrop(preprocess.crop) if preprocess.crop is not None else None
        self.extra = v2.Compose(list(preprocess.extra)) if preprocess.extra else None
        self.normalize = v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std))
        self.grey_masks = preprocess.mask_interpolation == "bilinear_grey"  # else binarised at > 0.5

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img, msk, _ = self.apply(image, mask)
        return img, msk

    def apply(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(image, mask, kept): ``kept`` is the fraction of the mask's pixels at the resize
        resolution that survive the centre crop (1.0 without a crop or without mask pixels).
        ``image``: a decoded 8-bit PIL image of any mode (``data.io.load_image_8bit``) or RGB."""
        if not self.rgb_after_resize:
            image = to_rgb8(image)
        msk = tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))[None])
        if self.mask_resize is not None:
            msk = self._bilinear_mask(mask)
        if self.pil_resize is not None:
            if self.mask_resize is not None:
                image = self.pil_resize(image)
            else:
                image, msk = self.pil_resize(image, msk)
            image = to_rgb8(image)  # a no-op unless rgb_after_resize
        img = tv_tensors.Image(v2.functional.pil_to_tensor(image).to(torch.float32).div_(255))  # = ToTensor
        if self.tensor_resize is not None:
            if self.mask_resize is not None:
                img = self.tensor_resize(img)
            else:
                img, msk = self.tensor_resize(img, msk)
        kept = 1.0
        if self.crop is not None:
            total = float(msk.sum())
            img, msk = self.crop(img, msk)
            if total:
                kept = float(msk.sum()) / total
        if self.extra is not None:
            img, msk = self.extra(img, msk)
        return self.normalize(img).as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).float(), kept

    def _bilinear_mask(self, mask: np.ndarray) -> tv_tensors.Mask:
        """The mask as a 0/255 8-bit image, resized bilinearly (Pillow with ``pil``, torchvision's
        antialiased filter with ``tensor``), binarised at > 0.5 of 255, or (``bilinear_grey``) kept
        grey in [0, 1]."""
        m8 = mask.astype(np.uint8) * 255
        if self.pil_resize is not None:
            grey = torch.from_numpy(np.asarray(self.mask_resize(Image.fromarray(m8))).astype(np.float32))
        else:
            grey = self.mask_resize(torch.from_numpy(m8)[None].float())[0]
        out = grey.div_(255) if self.grey_masks else (grey > 127.5).to(torch.uint8)
        return tv_tensors.Mask(out[None])
