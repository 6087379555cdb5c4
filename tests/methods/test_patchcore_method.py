"""PatchCore LightningModule pieces: the bank is in dataset order whatever the loader order."""

import pytest
import torch

from iad_lightning.methods.patchcore import _bank_in_dataset_order, _first_occurrence, _StreamingBank
from iad_lightning.models.coreset import approximate_greedy_coreset


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


@pytest.mark.parametrize("n_images, dim, projection_dim, ratio", [
    (24, 64, 16, 0.02),  # 18,816 patches: the deferred coreset path
    (6, 40, 16, 0.1),  # 4,704 patches: the plain loop
    (6, 16, 16, 0.1),  # projection_dim == D: no projection
])
def test_streaming_fit_selects_the_same_bank_as_the_full_bank(n_images, dim, projection_dim, ratio):
    # today's path: the whole (N, D) bank in dataset order, then the coreset, then bank[keep]
    g = torch.Generator().manual_seed(n_images)
    images = torch.rand(n_images, 784, dim, generator=g) * torch.linspace(0.5, 2, dim)
    order = torch.randperm(n_images, generator=g).tolist() + [0]  # shuffled, image 0 padded again
    batches = [order[i : i + 5] for i in range(0, len(order), 5)]
    feats = [images[b].clone() for b in batches]
    idx = [torch.tensor(b) for b in batches]
    bank = _bank_in_dataset_order(feats, idx, torch.device("cpu"))
    keep = approximate_greedy_coreset(bank, ratio, projection_dim=projection_dim, num_starts=10, seed=3)
    # streaming: per batch the projection in memory, the full rows on disk
    stream = _StreamingBank(dim, projection_dim, seed=3, device=torch.device("cpu"))
    for b in batches:
        stream.add(images[b], torch.tensor(b))
    selected, n = stream.select(ratio, 10, torch.device("cpu"))
    assert n == bank.shape[0] == n_images * 784
    assert torch.equal(selected, bank[keep])  # same points, same order, exact rows


@pytest.mark.parametrize("num_images, missing", [
    (None, ()),  # no train-set size: the buffer grows batch by batch
    (7, ()),  # a size hint too small: grows past it
    (24, (5, 17)),  # two images never served (a limited epoch): their columns are compacted away
])
def test_streaming_fit_one_buffer_any_capacity(monkeypatch, num_images, missing):
    # the dataset-ordered full bank of the images served, its coreset (deferred path: 22 x 784 rows)
    import iad_lightning.methods.patchcore as patchcore

    dim, projection_dim, ratio = 48, 16, 0.02
    g = torch.Generator().manual_seed(7)
    images = torch.rand(24, 784, dim, generator=g) * torch.linspace(0.5, 2, dim)
    order = [i for i in torch.randperm(24, generator=g).tolist() if i not in missing] + [3]  # 3 padded again
    batches = [order[i : i + 4] for i in range(0, len(order), 4)]
    bank = _bank_in_dataset_order([images[b].clone() for b in batches], [torch.tensor(b) for b in batches],
                                  torch.device("cpu"))
    keep = approximate_greedy_coreset(bank, ratio, projection_dim=projection_dim, num_starts=10, seed=5)
    stream = _StreamingBank(dim, projection_dim, seed=5, device=torch.device("cpu"), num_images=num_images)
    for b in batches:
        stream.add(images[b], torch.tensor(b))
    storage = stream.projected_t.untyped_storage().data_ptr()
    seen = {}
    original = patchcore.greedy_coreset_from_projection

    def spy(projected_t, *args, **kwargs):  # the coreset reads the buffer the batches were written to
        seen["storage"] = projected_t.untyped_storage().data_ptr()
        seen["shape"] = tuple(projected_t.shape)
        assert projected_t.is_contiguous()
        return original(projected_t, *args, **kwargs)

    monkeypatch.setattr(patchcore, "greedy_coreset_from_projection", spy)
    selected, n = stream.select(ratio, 10, torch.device("cpu"))
    assert n == bank.shape[0] == (24 - len(missing)) * 784
    assert seen == {"storage": storage, "shape": (projection_dim, (n + 63) // 64 * 64)}  # no copy
    assert torch.equal(selected, bank[keep])


def test_train_set_size_sizes_the_fit_buffer_from_the_train_loader():
    from types import SimpleNamespace

    from torch.utils.data import DataLoader

    from iad_lightning.methods.patchcore import PatchCore

    def size(loader):
        return PatchCore._train_set_size(SimpleNamespace(trainer=SimpleNamespace(train_dataloader=loader)))

    assert size(DataLoader(list(range(13)), batch_size=4)) == 13  # the dataset, not the batches
    assert size(None) is None  # no loader: the buffer grows instead
