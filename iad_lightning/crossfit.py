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

**Leave-one-image-out** (``threshold.leave_one_out``, a memory-bank method that sets
``supports_leave_one_out``: PatchCore with the official image score): instead of K fold banks,
each train image is scored against the FINAL bank without the rows that came from it
(``run_leave_one_out`` with one hook, ``score_held(held)``), so one coreset is selected instead of
K + 1. Its bias, the other way round from the folds': the final coreset was selected with the
image in the pool, so the greedy k-center step covered the image's neighbourhood with the image's
own rows; removing them leaves a gap that a coreset selected without the image would partly fill
with another image's rows. Its scores are therefore at or above those of an exact refit without
the image (conservative), by how much depends on how unique the image's patches are; the fold
models instead fit 1 - 1/K of the images (also conservative). Measured on two real sets
(``bench/calibration_shift.py``): on KolektorSDD the quantiles are within 1-2 % of the 5-fold
scores and give the same realised false-alarm rates up to two test images; on MVTec AD screw the
upper tail is 4-6 % below the 5-fold scores (q90 442 against 463), the fold banks' smaller size
showing, and at a requested 10 % the test normals realise 24.4 % against 12.2 % (5-fold) in
``bench/calibration.py``: leave-one-out is the less conservative of the two there.

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
    leave_one_out: bool = False  # score against the final bank without the image's own rows

    @classmethod
    def for_records(cls, records: list, folds: int, seed: int = 0, leave_one_out: bool = False) -> "CrossFit":
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
        plan = cls(folds, fold_of, [str(r.category) for r in records], [str(r.image) for r in records],
                   leave_one_out=leave_one_out)
        plan.excluded = set(np.flatnonzero(fold_of < 0).tolist())
        return plan

    def exclude(self, records: list) -> None:
        """Never score these records' images (a method fits on them whatever the fold)."""
        paths = {str(r.image) for r in records}
        self.excluded |= {i for i, p in enumerate(self.paths) if p in paths}

    def run(self, present: torch.Tensor, score_fold: FoldScorer, group_device: torch.device | None = None) -> NormalScores:
        """Score every ``present`` (non-excluded) image with the model of the folds it is not in."""
        present, skip = self._present(present)
        fold = torch.from_numpy(self.fold_of)[present]
        collector = ScoreCollector()
        for k in range(self.folds):
            held = present[(fold == k) & ~skip]
            if held.numel() == 0:
                continue
            for index, maps, scores in score_fold(present[fold != k], held):
                collector.add(index, maps, scores)
        return self._finish(collector, f"cross-fitted ({self.folds} folds)", present, skip, group_device)

    def run_leave_one_out(self, present: torch.Tensor, score_held: Callable[[torch.Tensor], Iterable],
                          group_device: torch.device | None = None) -> NormalScores:
        """Score every ``present`` (non-excluded) image with ``score_held(held)``: the final model
        without the image's own contribution (yields (index, maps, scores) of this rank's images)."""
        present, skip = self._present(present)
        collector = ScoreCollector()
        for index, maps, scores in score_held(present[~skip]):
            collector.add(index, maps, scores)
        return self._finish(collector, "leave-one-image-out (the final memory bank without the image's rows)",
                            present, skip, group_device)

    def _present(self, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.as_tensor(present).long().view(-1).sort().values
        return present, torch.tensor([int(i) in self.excluded for i in present], dtype=torch.bool)

    def _finish(self, collector: ScoreCollector, source: str, present: torch.Tensor, skip: torch.Tensor,
                group_device: torch.device | None) -> NormalScores:
        normal = collector.finish(self.categories, source, group_device, excluded=int(skip.sum()))
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
