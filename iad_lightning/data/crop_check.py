"""Crop safety: count the defective test images whose mask the method's centre crop cuts.

A centre crop (PatchCore's 256 -> 224) can remove defects that touch the border; such images
stay labelled defective, so image AUROC then scores defects the model never saw. Every test run
counts them per category from the dataset items' ``mask_kept`` (the fraction of mask pixels,
at the resize resolution, inside the crop; ``data/transforms.py:PairTransform.apply``), and
``results.json`` records the counts under ``crop_check``. It warns when the crop matters: a
defective image keeps less than ``MATTERS_BELOW`` of its mask pixels (``mostly_outside``, which
includes ``wholly_outside``); a defect trimmed at its edge only is one log line.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
MATTERS_BELOW = 0.5  # an image that keeps less than half of its defect's pixels is scored on a defect mostly unseen
FIX = ("method.crop=null (PatchCore: no crop, square resize) or data.center_crop=false "
       "(any method) evaluates the whole image")


def crop_check(category: np.ndarray, label: np.ndarray, mask_kept: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per category: defective test images, how many have mask pixels partly / wholly outside
    the crop, and the mean fraction of mask pixels kept over the defective images."""
    category, label, kept = np.asarray(category), np.asarray(label) == 1, np.asarray(mask_kept, dtype=np.float64)
    out: dict[str, dict[str, Any]] = {}
    for cat in dict.fromkeys(category.tolist()):  # first-seen order
        sel = (category == cat) & label
        k = kept[sel]
        out[str(cat)] = {
            "defective": int(sel.sum()),
            "partly_outside": int(((k > 0) & (k < 1)).sum()),
            "wholly_outside": int((k == 0).sum()),
            "mostly_outside": int((k < MATTERS_BELOW).sum()),
            "mask_pixels_kept": float(k.mean()) if k.size else None,
        }
    return out


def warn_if_cropped(check: dict[str, dict[str, Any]]) -> str | None:
    """Warn (and return the message) when a defective image keeps less than ``MATTERS_BELOW`` of its
    mask pixels in the crop; defects only trimmed at their edge are logged at INFO."""
    hit = {c: v for c, v in check.items() if v["partly_outside"] or v["wholly_outside"]}
    if not hit:
        return None
    parts = [f"{c}: {v['partly_outside']} partly, {v['wholly_outside']} wholly outside of {v['defective']} "
             f"defective ({100 * v['mask_pixels_kept']:.1f} % of mask pixels kept)" for c, v in hit.items()]
    message = ("crop check: defective test images whose mask lies outside the method's centre crop (they stay "
               "labelled defective, so image metrics score defects the model does not see): " + "; ".join(parts)
               + f". {FIX}.")
    if any(v.get("mostly_outside", v["wholly_outside"]) for v in hit.values()):
        warnings.warn(message, UserWarning, stacklevel=2)
    else:
        log.info("crop check: defects trimmed at their edge by the centre crop (each image keeps at least "
                 f"{MATTERS_BELOW:.0%} of its mask pixels): " + "; ".join(parts))
    return message
