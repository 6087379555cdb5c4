"""The ADPretrain plug-in shared by downstream methods (``method.projector=PATH``, spec section 7).

``build_extractor`` turns a method's backbone config and a projector file into a
``ResidualProjectorExtractor`` (features = projector(residual(backbone(x), bank))), checking that the
file was pretrained on the same backbone and levels. ``set_reference_bank`` fills its reference
banks, one per category, at the projector's 224/224 geometry (resized with the plug-in method's
``resize_backend`` and filter), from either

- the authors' fixed reference set (``method.reference_set=PATH``: their ``8shot.zip`` layout,
  ``PATH/<class>/train/good/*.png``, or ``PATH/<class>/*.png``): the first ``shots`` files by name
  per class (``num_ref_shot``, default 8), or
- ``shots`` seeded train good images per category of the datamodule (no download needed).

Each image is matched against its own category's bank, in per-category and unified mode alike,
as the authors' ``train_val_*.py`` do; where no category name comes with an image (exported graphs,
``predict.py``), the banks of all categories together (``ResidualProjectorExtractor``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from iad_lightning.data.dataset import AnomalyDataset
from iad_lightning.data.formats._common import list_images
from iad_lightning.data.records import Record
from iad_lightning.data.transforms import Preprocess
from iad_lightning.errors import ConfigError, DatasetError
from iad_lightning.models.adpretrain import LevelBackbone, ResidualProjectorExtractor, load_projector_file

def build_extractor(backbone: dict[str, Any], projector: str | None, levels: Sequence[int]) -> tuple:
    """(extractor, image size of the bank). ``projector=None``: raw levels (the 'w/o pretrain' baseline)."""
    bb = LevelBackbone(**backbone)
    if projector is None:
        return ResidualProjectorExtractor(bb, None, levels), 224
    proj, meta = load_projector_file(projector, backbone=bb.name)
    if list(proj.channels) != list(bb.channels):
        raise ConfigError(f"projector '{projector}' has level widths {proj.channels}, backbone '{bb.name}' "
                           f"{bb.channels}: it was pretrained on another backbone")
    return ResidualProjectorExtractor(bb, proj, levels), int(meta.get("image_size", 224))

def kshot_records(records: list, shots: int, seed: int) -> list:
    """``shots`` train good records per category, a seeded draw without replacement."""
    by_cat: dict[str, list] = {}
    for rec in records:
        by_cat.setdefault(rec.category, []).append(rec)
    out = []
    for i, (cat, recs) in enumerate(sorted(by_cat.items())):
        pick = np.random.default_rng([seed, i]).permutation(len(recs))[: min(shots, len(recs))]
        out += [recs[j] for j in sorted(pick)]
    return out

def reference_set_records(root: str | Path, categories: Sequence[str], shots: int) -> list[Record]:
    """The first ``shots`` images by name of each category's folder in a fixed reference set
    (the authors' ``8shot/<dataset>/<class>/train/good``; ``<class>/*`` also accepted)."""
    base = Path(root).expanduser()
    if not base.is_dir():
        raise ConfigError(f"method.reference_set='{base}' is not a folder; point it at the reference set of "
                          "this dataset, e.g. data/8shot/mvtec (one folder per class)")
    out = []
    for cat in categories:
        folder = base / cat / "train" / "good"
        files = list_images(folder) or list_images(base / cat)
        if not files:
            raise DatasetError(f"method.reference_set='{base}': no images for category '{cat}' in '{folder}' or "
                               f"'{base / cat}'")
        out += [Record(image=str(f), label=0, category=cat, split="train") for f in files[:shots]]
    return out

@torch.no_grad()
def set_reference_bank(extractor: ResidualProjectorExtractor, records: list, shots: int, seed: int, image_size: int,
                       device: torch.device, like: Preprocess | None = None, reference_set: str | None = None) -> list:
    """Fill the extractor's per-category banks; returns the reference records (the method fits on
    them whatever the cross-fitting fold: ``AnomalyModule.exclude_from_calibration``).

    records: the datamodule's train good records (their categories name the banks).
    like: the plug-in method's preprocessing, whose resize backend and filter the bank images follow.
    reference_set: a fixed reference set folder instead of the seeded k-shot draw from ``records``."""
    if not extractor.uses_bank:
        return []
    if reference_set:
        categories = sorted({r.category for r in records})
        if not categories:
            raise DatasetError("method.reference_set: the datamodule has no train images to name the categories")
        chosen = reference_set_records(reference_set, categories, shots)
    else:
        chosen = kshot_records(records, shots, seed)
    if not chosen:
        raise DatasetError("method.projector needs train good images for the k-shot reference bank "
                           "(or method.reference_set=PATH)")
    pre = Preprocess(resize=image_size, crop=image_size, mean=extractor.mean, std=extractor.std,
                     **({"resize_backend": like.resize_backend, "interpolation": like.interpolation} if like else {}))
    data = AnomalyDataset(chosen, pre)
    images = torch.stack([data[i]["image"] for i in range(len(data))]).to(device)
    extractor.set_bank(images, categories=[r.category for r in chosen])
    return chosen
