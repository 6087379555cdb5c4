"""The ADPretrain plug-in shared by downstream methods (``method.projector=PATH``, spec section 7).

``build_extractor`` turns a method's backbone config and a projector file into a
``ResidualProjectorExtractor`` (features = projector(residual(backbone(x), bank))), checking that the
file was pretrained on the same backbone and levels; ``set_kshot_bank`` fills its reference bank with
``shots`` seeded train good images per category of the datamodule (the authors' fixed 8-shot set,
at the projector's 224/224 geometry). With several categories (unified mode) the banks of all
categories are merged (the authors run per category).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from iad_lightning.data.dataset import AnomalyDataset
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


@torch.no_grad()
def set_kshot_bank(extractor: ResidualProjectorExtractor, records: list, shots: int, seed: int, image_size: int,
                   device: torch.device) -> list:
    """Fill the extractor's bank from k-shot train good images; returns their records (the method
    fits on them whatever the cross-fitting fold: ``AnomalyModule.exclude_from_calibration``)."""
    if not extractor.uses_bank:
        return []
    chosen = kshot_records(records, shots, seed)
    if not chosen:
        raise DatasetError("method.projector needs train good images for the k-shot reference bank")
    pre = Preprocess(resize=image_size, crop=image_size, mean=extractor.mean, std=extractor.std)
    data = AnomalyDataset(chosen, pre)
    images = torch.stack([data[i]["image"] for i in range(len(data))]).to(device)
    extractor.set_bank(images)
    return chosen
