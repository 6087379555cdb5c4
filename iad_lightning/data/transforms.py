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
"""

from __future__ import annotations

from dataclasses import dataclass, field

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

    def __post_init__(self) -> None:
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


class PairTransform:
    """Applies a ``Preprocess`` to a PIL image and its boolean mask together."""

    def __init__(self, preprocess: Preprocess) -> None:
        size = preprocess.resize if isinstance(preprocess.resize, int) else list(preprocess.resize)
        # On a PIL image v2.Resize calls Pillow's resize (BILINEAR), as torchvision's v1 Resize does;
        # the mask (a tv_tensors.Mask) is always resized nearest-neighbour.
        resize = v2.Resize(size, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        self.pil_resize = resize if preprocess.resize_backend == "pil" else None
        geometry: list = [] if self.pil_resize is not None else [resize]
        if preprocess.crop is not None:
            geometry.append(v2.CenterCrop(preprocess.crop))
        steps = [*geometry, *preprocess.extra]
        self.geometry = v2.Compose(steps) if steps else v2.Identity()
        self.normalize = v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std))

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        msk = tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))[None])
        if self.pil_resize is not None:
            image, msk = self.pil_resize(image, msk)
        img = tv_tensors.Image(v2.functional.pil_to_tensor(image).to(torch.float32).div_(255))  # = ToTensor
        img, msk = self.geometry(img, msk)
        return self.normalize(img).as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).float()
