"""Cross-fitting: an out-of-sample score for every normal train image, with no method branches.

``CrossFit`` (built by ``callbacks.calibration.ThresholdCalibration`` before fitting, on
``AnomalyModule.crossfit``) splits the train good images of each category into ``folds`` seeded
folds of near-equal size (stratified by category, so that every category's threshold comes from
its own images; a category with fewer images than folds has one image per fold, one with a single
image cannot be cross-fitted and is left out). A method that supports it (``supports_crossfit``) calls ``run`` at the end of its
fit, before the final fit on all images, with one hook:

    score_fold(train: Tensor, held: Tensor) -> iterable of (index, maps, scores)

``train`` and ``held`` are sorted train-set indices; the hook fits a fold model on ``train`` from
the features it already holds (the backbone runs once) and yields the maps and scores of the
``held`` images THIS rank holds (its shard; the results are gathered). ``run`` returns the
``calibration.NormalScores`` that the calibration callback turns into thresholds; the method's
final fit must not depend on the fold fits (PatchCore: the fold coresets draw from copies of the
projection and of the generator, so the final bank is bit-equal to a fit without cross-fitting).

Images that a method fits on by construction whatever the fold (ADPretrain's k-shot reference
bank) are ``exclude``-d: never scored, still used for fitting, counted in ``results.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np
import torch

from iad_lightning.calibration import NormalScores, ScoreCollector

FoldScorer = Callable[[torch.Tensor, torch.Tensor], Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]


@dataclass
class CrossFit:
    """The fold of every train-set image (``fold_of``), its category and image path."""

    folds: int
    fold_of: np.ndarray
    categories: list[str]
    paths: list[str]
    excluded: set[int] = field(default_factory=set)

    @classmethod
    def for_records(cls, records: list, folds: int, seed: int = 0) -> "CrossFit":
        """Seeded folds per category: a permutation of the category's images dealt round-robin."""
        fold_of = np.full(len(records), -1, dtype=np.int64)
        by_cat: dict[str, list[int]] = {}
        for i, rec in enumerate(records):
            by_cat.setdefault(rec.category, []).append(i)
        for j, (cat, idx) in enumerate(sorted(by_cat.items())):
            if len(idx) < 2:  # nothing to fit a fold model on without it: never scored
                continue
            order = np.random.default_rng([seed, j, 7]).permutation(len(idx))
            fold_of[np.asarray(idx)[order]] = np.arange(len(idx)) % folds  # fewer images than folds: 1 each
        plan = cls(folds, fold_of, [str(r.category) for r in records], [str(r.image) for r in records])
        plan.excluded = set(np.flatnonzero(fold_of < 0).tolist())
        return plan

    def exclude(self, records: list) -> None:
        """Never score these records' images (a method fits on them whatever the fold)."""
        paths = {str(r.image) for r in records}
        self.excluded |= {i for i, p in enumerate(self.paths) if p in paths}

    def run(self, present: torch.Tensor, score_fold: FoldScorer, group_device: torch.device | None = None) -> NormalScores:
        """Score every ``present`` (non-excluded) image with the model of the folds it is not in."""
        present = torch.as_tensor(present).long().view(-1).sort().values
        fold = torch.from_numpy(self.fold_of)[present]
        skip = torch.tensor([int(i) in self.excluded for i in present], dtype=torch.bool)
        collector = ScoreCollector()
        for k in range(self.folds):
            held = present[(fold == k) & ~skip]
            if held.numel() == 0:
                continue
            for index, maps, scores in score_fold(present[fold != k], held):
                collector.add(index, maps, scores)
        normal = collector.finish(self.categories, f"cross-fitted ({self.folds} folds)", group_device,
                                  excluded=int(skip.sum()))
        missing = sorted(set(present[~skip].tolist()) - set(normal.index.tolist()))
        if missing:
            raise RuntimeError(f"cross-fitting left {len(missing)} train images unscored (e.g. {self.paths[missing[0]]})")
        return normal

    def score_only(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                   group_device: torch.device | None = None) -> NormalScores:
        """For a method whose final model never sees the train images it scores (FeatureNorm: only
        the excluded k-shot bank): the final model's own scores of the others, no folds needed."""
        collector = ScoreCollector()
        for index, maps, scores in batches:
            keep = torch.tensor([int(i) not in self.excluded for i in index], dtype=torch.bool)
            if keep.any():
                collector.add(torch.as_tensor(index)[keep], maps[keep], scores[keep])
        return collector.finish(self.categories, "the final model (train images outside its k-shot bank)",
                                group_device, excluded=len(self.excluded))
