"""Cross-fitting (iad_lightning/crossfit.py) with PatchCore's streaming fit: every train image gets
one out-of-sample score, from a fold coreset equal to a fit on the other folds alone, and the final
bank is bit-equal to a fit without cross-fitting."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from iad_lightning.crossfit import CrossFit
from iad_lightning.methods.patchcore import _StreamingBank
from iad_lightning.models.patchcore import PatchCoreModel

DIM, PATCHES, GRID = 24, 49, (7, 7)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, PATCHES, DIM, generator=g) * torch.linspace(0.5, 2, DIM)


def _stream(images: torch.Tensor, order: list[int], batch: int = 4) -> _StreamingBank:
    stream = _StreamingBank(DIM, 8, seed=3, device=torch.device("cpu"), num_images=len(images))
    stream.grid, stream.input_size = GRID, (28, 28)
    for start in range(0, len(order), batch):
        b = order[start:start + batch]
        stream.add(images[b], torch.tensor(b))
    return stream


def _records(cats: list[str]) -> list:
    return [SimpleNamespace(category=c, image=f"/data/{c}/{i:03d}.png") for i, c in enumerate(cats)]


def test_folds_are_stratified_seeded_and_balanced():
    cats = ["a"] * 11 + ["b"] * 7
    plan = CrossFit.for_records(_records(cats), folds=3, seed=0)
    for cat, n in (("a", 11), ("b", 7)):
        counts = np.bincount(plan.fold_of[np.asarray(cats) == cat], minlength=3)
        assert counts.sum() == n and counts.max() - counts.min() <= 1
    assert np.array_equal(plan.fold_of, CrossFit.for_records(_records(cats), 3, 0).fold_of)
    small = CrossFit.for_records(_records(["a"] * 3 + ["b"]), folds=5)  # fewer images than folds
    assert sorted(small.fold_of[:3].tolist()) == [0, 1, 2] and small.excluded == {3}  # a lone image: unscored


def test_crossfit_scores_every_train_image_and_leaves_the_final_bank_bit_equal():
    n, ratio = 14, 0.1
    images = _images(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(1)).tolist()
    plan = CrossFit.for_records(_records(["a"] * 8 + ["b"] * 6), folds=3, seed=0)
    plan.exclude([SimpleNamespace(image="/data/a/002.png")])  # e.g. a k-shot reference image
    model = PatchCoreModel(target_embed_dimension=DIM, blur_sigma=1.0)
    stream = _stream(images, order)
    folds_seen = []

    def score_fold(train, held):  # what PatchCore._score_fold does
        folds_seen.append((train.clone(), held.clone()))
        model.fit(stream.select_subset(train, ratio, 2, torch.device("cpu")))
        for index, embedding in stream.rows_of(held, batch=3):
            amap, score = model.score_embedding(embedding, stream.grid, stream.input_size)
            yield index, amap, score

    normal = plan.run(stream.prepare(torch.device("cpu")), score_fold)
    bank, _ = stream.select(ratio, 2, torch.device("cpu"))
    # every train image but the excluded one: one score each, its category attached
    assert normal.index.tolist() == [i for i in range(n) if i != 2] and normal.excluded == 1
    assert normal.category == ["a"] * 7 + ["b"] * 6 and normal.pixels.shape == (13, 28 * 28)
    # the final bank: bit-equal to a fit without cross-fitting
    reference, _ = _stream(images, order).select(ratio, 2, torch.device("cpu"))
    assert torch.equal(bank, reference)
    # each fold's scores: a model fitted on the other folds ALONE (its own streaming fit), never on them
    for train, held in folds_seen:
        assert not set(train.tolist()) & set(held.tolist())
        alone, _ = _stream(images, [i for i in order if i in set(train.tolist())]).select(ratio, 2, torch.device("cpu"))
        model.fit(alone)
        _, expected = model.score_embedding(images[held], GRID, (28, 28))
        got = normal.score[np.searchsorted(normal.index, held.numpy())]
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-6)
    assert sum(len(h) for _, h in folds_seen) == 13


def test_torch_knn_never_matches_a_row_of_the_query_owner():
    from iad_lightning.models.nn_search import torch_knn

    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(90, 16, generator=g)
    bank_owner, query_owner = torch.randint(0, 7, (300,), generator=g), torch.randint(0, 7, (90,), generator=g)
    dist, idx = torch_knn(queries, bank, 3, chunk_size=16, query_owner=query_owner, bank_owner=bank_owner)
    full = torch.cdist(queries.double(), bank.double()).pow(2)
    full[query_owner[:, None] == bank_owner[None]] = float("inf")  # brute force, own rows removed
    expected, expected_idx = full.topk(3, dim=1, largest=False)
    assert (bank_owner[idx] != query_owner[:, None]).all()
    torch.testing.assert_close(dist.double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(idx, expected_idx)


def test_leave_one_out_scores_each_image_against_the_final_bank_without_its_own_rows():
    """One coreset (the final bank, bit-equal to a fit without calibration); each image's score is
    the official max over its patches of the squared distance to the nearest bank row of ANOTHER
    image, computed here by brute force from the images themselves."""
    n, ratio = 12, 0.2
    images = _images(n, seed=4)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(2)).tolist()
    plan = CrossFit.for_records(_records(["a"] * 7 + ["b"] * 5), folds=5, seed=0, leave_one_out=True)
    plan.exclude([SimpleNamespace(image="/data/a/001.png")])
    model = PatchCoreModel(target_embed_dimension=DIM, blur_sigma=1.0)
    stream = _stream(images, order)
    present = stream.prepare(torch.device("cpu"))
    bank, _ = stream.select(ratio, 2, torch.device("cpu"))
    model.fit(bank)

    def score_held(held):  # what PatchCore._score_leaving_out does
        for index, embedding in stream.rows_of(held, batch=5):
            amap, score = model.score_embedding(embedding, stream.grid, stream.input_size,
                                                leave_out=(index, stream.bank_images))
            yield index, amap, score

    normal = plan.run_leave_one_out(present, score_held)
    stream.close()
    assert torch.equal(bank, _stream(images, order).select(ratio, 2, torch.device("cpu"))[0])
    assert normal.index.tolist() == [i for i in range(n) if i != 1] and normal.excluded == 1
    assert normal.source.startswith("leave-one-image-out") and normal.pixels.shape == (11, 28 * 28)
    # owners recovered independently: each bank row is a copy of exactly one train patch
    flat = images.reshape(-1, DIM)
    owner = torch.cdist(bank.double(), flat.double()).argmin(1) // PATCHES
    assert torch.equal(owner, stream.bank_images) and len(set(owner.tolist())) > 1
    for i, score in zip(normal.index.tolist(), normal.score):
        others = bank[owner != i].double()
        expected = torch.cdist(images[i].double(), others).pow(2).min(1).values.max()
        assert score == pytest.approx(float(expected), rel=1e-5)
        in_sample = torch.cdist(images[i].double(), bank.double()).pow(2).min(1).values.max()
        assert score >= float(in_sample) * (1 - 1e-5)  # never below the final model's in-sample score
    with pytest.raises(ValueError, match="reweighting"):
        PatchCoreModel(target_embed_dimension=DIM, paper_reweighting=True).fit(bank).score_embedding(
            images[:1], GRID, (28, 28), leave_out=(torch.tensor([0]), torch.zeros(len(bank), dtype=torch.long)))


def test_padim_fold_fit_equals_a_fit_on_those_images_alone():
    from iad_lightning.models.padim import PaDiMModel

    feats = torch.randn(9, 6, 4, 4, generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 2, 3, 5, 8])
    fold, alone = PaDiMModel(chunk=5).fit([feats], rows=rows), PaDiMModel(chunk=5).fit([feats[rows]])
    torch.testing.assert_close(fold.mean_0, alone.mean_0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fold.cov_inv_0, alone.cov_inv_0, rtol=1e-5, atol=1e-5)
