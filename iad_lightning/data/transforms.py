"""Preprocessing set by the method: resize, centre crop, normalisation, applied to image and mask.

The method owns these numbers (e.g. PatchCore: shorter side 256, crop 224, the backbone's
mean/std) and hands a ``Preprocess`` to the datamodule. Masks go through the same geometry with
nearest-neighbour interpolation, so they stay binary; metrics are computed at this model
resolution (the centre crop), as in the official PatchCore evaluation.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2


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
        resize = preprocess.resize if isinstance(preprocess.resize, int) else list(preprocess.resize)
        geometry: list = [v2.Resize(resize, interpolation=v2.InterpolationMode.BILINEAR, antialias=True)]
        if preprocess.crop is not None:
            geometry.append(v2.CenterCrop(preprocess.crop))
        self.geometry = v2.Compose([*geometry, *preprocess.extra])
        self.to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
        self.normalize = v2.Normalize(mean=list(preprocess.mean), std=list(preprocess.std))

    def __call__(self, image: Image.Image, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.to_tensor(image)
        msk = tv_tensors.Mask(torch.from_numpy(mask.astype(np.uint8))[None])
        img, msk = self.geometry(tv_tensors.Image(img), msk)
        return self.normalize(img).as_subclass(torch.Tensor), msk.as_subclass(torch.Tensor).float()
