"""A shuffling sampler whose order is a function of (seed, epoch), so that a resumed run sees the
same data order as an uninterrupted one, also when it resumes in the middle of an epoch.

``torch.utils.data.RandomSampler`` draws its permutation from the global RNG (or a generator
that advances every epoch), so after a restart epoch e gets another order. Here epoch e's order
is ``randperm(n, generator=manual_seed(seed + e))`` (Lightning calls ``set_epoch`` before every
epoch), and ``skip_once(epoch, n)`` drops the first n indices of that epoch's order once: the
samples an interrupted run had already trained on. It subclasses ``RandomSampler`` so that
Lightning still sees a shuffled loader (under DDP it swaps in its seeded ``DistributedSampler``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
from torch.utils.data import RandomSampler


class EpochSeededSampler(RandomSampler):
    """Random order per epoch from ``seed + epoch``; resumable mid-epoch with ``skip_once``."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0
        self._skip: tuple[int, int] | None = None  # (epoch, samples already seen)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def skip_once(self, epoch: int, n_samples: int) -> None:
        """The next iteration of ``epoch`` starts after its first ``n_samples`` indices."""
        self._skip = (int(epoch), int(n_samples))

    def order(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.data_source), generator=gen)

    def __iter__(self) -> Iterator[int]:
        start = 0
        if self._skip is not None and self._skip[0] == self.epoch:
            start = self._skip[1]
        self._skip = None
        yield from self.order(self.epoch)[start:].tolist()

    def __len__(self) -> int:
        return len(self.data_source)
