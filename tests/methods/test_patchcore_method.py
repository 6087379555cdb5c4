"""PatchCore LightningModule pieces: the bank is in dataset order whatever the loader order."""

import torch

from iad_lightning.methods.patchcore import _bank_in_dataset_order, _first_occurrence


def test_bank_in_dataset_order_drops_padding_duplicates():
    # 5 images of 2 patches x 3 dims; image i has every value equal to i
    images = {i: torch.full((2, 3), float(i)) for i in range(5)}
    order = [3, 0, 4, 1, 2, 3]  # shuffled, and image 3 padded twice (distributed sampler)
    feats = [torch.stack([images[i] for i in order[:4]]), torch.stack([images[i] for i in order[4:]])]
    idx = [torch.tensor(order[:4]), torch.tensor(order[4:])]
    bank = _bank_in_dataset_order(feats, idx, torch.device("cpu"))
    assert bank.shape == (10, 3)
    assert bank[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert feats == []  # consumed while copying


def test_first_occurrence():
    unique, first = _first_occurrence(torch.tensor([5, 2, 5, 7, 2]))
    assert unique.tolist() == [2, 5, 7] and first.tolist() == [1, 0, 3]
