"""Test predictions held per category, released as soon as a category is complete on every rank.

Why: keeping every test map until the end of testing needs memory for the whole test set (a
unified Real-IAD run has 100k+ test images); a category's metrics only need that category. Peak
memory is then bounded by the largest category instead of the whole test set.

When is a category complete? The test loader reads the dataset in order (no shuffle); under DDP
a ``DistributedSampler(shuffle=False)`` deals rank ``r`` the indices ``r, r+W, r+2W, ...``, still
increasing, then pads with duplicates of the first indices. So once a rank has seen an index at
or past a category's end (one past its last index), it holds all of its own images of that
category. Each rank then enters that category's gather; the gathers are collectives, and every
rank enters the same ones in the same order (the categories in order of their end, then, at the
end of testing, the remaining ones), so they match even when ranks reach a boundary one batch
apart. No collective runs per batch.

Exactness: a gathered category is concatenated in rank order, each rank's items in arrival
order, and de-duplicated by first occurrence, sorted by index: the same rows as gathering the
whole test set at the end (an index's original always sits on a lower rank than the padding
copy, and padding copies of an already released category are dropped on arrival). Masks are
stored bit-packed (1 bit per pixel) until release; maps stay float32 as the methods give them.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np

from iad_lightning.distributed import gather_objects

Predictions = dict[str, np.ndarray]


class CategoryBuffer:
    """Per-category test predictions of this rank, bit-packed masks, released in order of ``ends``.

    ends: ``{category: one past its last dataset index}`` (the datamodule's ``category_ends``);
        categories not in ``ends`` (or all, when it is empty) are released by ``release_rest``.
    """

    def __init__(self, ends: dict[str, int] | None = None) -> None:
        self.ends = dict(sorted((ends or {}).items(), key=lambda kv: kv[1]))
        self._pending = [c for c in self.ends]  # known categories not yet released, in end order
        self._released: set[str] = set()
        self._released_index: set[int] = set()  # dataset indices of released categories
        self._parts: dict[str, list[Predictions]] = defaultdict(list)
        self._max_index = -1

    def add(self, batch: Predictions) -> None:
        """Store one batch (keys ``index``, ``category``, ``mask`` (B,H,W) bool, any others)."""
        cats = np.asarray(batch["category"])
        for cat in dict.fromkeys(cats.tolist()):  # batch order, unique
            sel = cats == cat
            if cat in self._released:  # DistributedSampler padding: copies of released images
                late = set(np.asarray(batch["index"])[sel].tolist()) - self._released_index
                if late:
                    raise RuntimeError(
                        f"test image(s) {sorted(late)[:5]} of category '{cat}' arrived after that category "
                        "was complete: the test loader must read the dataset in order (no shuffling sampler)"
                    )
                continue
            part = {k: np.asarray(v)[sel] for k, v in batch.items() if k != "mask"}
            part["mask_bits"] = np.packbits(batch["mask"][sel].reshape(int(sel.sum()), -1), axis=1)
            part["mask_shape"] = np.asarray(batch["mask"].shape[1:])
            self._parts[cat].append(part)
        if len(batch["index"]):
            self._max_index = max(self._max_index, int(np.max(batch["index"])))

    def ready(self) -> list[str]:
        """Known categories this rank has passed (seen an index >= their end), in end order."""
        done = []
        while self._pending and self._max_index >= self.ends[self._pending[0]]:
            done.append(self._pending.pop(0))
        return done

    def release(self, cat: str) -> Predictions | None:
        """Collective: the category's predictions from all ranks, de-duplicated and sorted by
        index, masks unpacked to bool (N,H,W); None when no rank had an image of it."""
        self._released.add(cat)
        local = _concat(self._parts.pop(cat, []))
        parts = [p for p in gather_objects(local) if p]
        if not parts:
            return None
        merged = _concat(parts)
        index, first = np.unique(merged["index"], return_index=True)  # sorted unique indices
        self._released_index.update(index.tolist())
        shape = tuple(int(s) for s in parts[0]["mask_shape"])
        out = {k: v[first] for k, v in merged.items() if k not in ("mask_bits", "mask_shape")}
        bits = merged["mask_bits"][first]
        out["mask"] = np.unpackbits(bits, axis=1, count=int(np.prod(shape))).view(bool).reshape(-1, *shape)
        return out

    def rest(self) -> list[str]:
        """Collective: every category not yet released, known ones first in end order, then the
        others seen on any rank, sorted. The same list on every rank."""
        seen = sorted(set(self._parts) - set(self.ends))
        unknown = sorted({c for part in gather_objects(seen) for c in part})
        rest, self._pending = self._pending + unknown, []
        return rest


def _concat(parts: list[Predictions]) -> Predictions:
    if not parts:
        return {}
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "mask_shape"}
    out["mask_shape"] = parts[0]["mask_shape"]
    return out


def category_order(found: list[str], datamodule: Any = None) -> list[str]:
    """The datamodule's category order, then any other category sorted (the results order)."""
    known = [c for c in getattr(datamodule, "categories", []) if c in set(found)]
    return known + sorted(set(found) - set(known))
