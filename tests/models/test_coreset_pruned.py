"""The deferred (lazy, exact) greedy coreset selects exactly what the plain loop selects."""

from __future__ import annotations

import warnings

import pytest
import torch

from iad_lightning.models.coreset import approximate_greedy_coreset


@pytest.fixture
def one_thread():
    """As in test_patchcore_model.py: the loops are chains of small ops, single-threaded is faster
    (and steadier) on a shared CI box."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _data(kind: str, n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if kind == "uniform":
        return torch.rand(n, d, generator=g)
    if kind == "blobs":  # clustered, like real patch features, plus a common offset
        centres = torch.randn(40, d, generator=g) * 3 + 2
        return centres[torch.randint(40, (n,), generator=g)] + 0.5 * torch.randn(n, d, generator=g)
    if kind == "duplicates":  # every row repeated ~4x: exact ties in the argmax
        base = torch.randn(n // 4, d, generator=g)
        return base[torch.randint(n // 4, (n,), generator=g)]
    if kind == "relu":  # non-negative, heavy-tailed like post-ReLU pooled features
        return torch.relu(torch.randn(n, d, generator=g)) ** 2
    raise ValueError(kind)


def _check(features: torch.Tensor, ratio: float, seed: int = 0, candidates: int = 128, **kwargs) -> torch.Tensor:
    plain = approximate_greedy_coreset(features, ratio, seed=seed, method="plain", **kwargs)
    with warnings.catch_warnings():  # the deferred path must not fall back to the plain loop
        warnings.simplefilter("error", RuntimeWarning)
        deferred = approximate_greedy_coreset(features, ratio, seed=seed, method="deferred",
                                              candidates=candidates, **kwargs)
    assert len(plain) == int(len(features) * ratio)
    assert deferred.tolist() == plain.tolist()  # same indices, same order
    return plain


@pytest.mark.parametrize(
    "kind, n, d, ratio, seed",
    [
        ("blobs", 6000, 1024, 0.1, 0),
        ("blobs", 30000, 64, 0.01, 1),
        ("uniform", 8000, 128, 0.25, 2),
        ("uniform", 20011, 256, 0.03, 3),  # N not a multiple of the 64-row padding
        ("duplicates", 4000, 64, 0.25, 4),
        ("duplicates", 12000, 512, 0.05, 5),
        ("relu", 9000, 1024, 0.1, 6),
    ],
)
def test_deferred_equals_plain(one_thread, kind, n, d, ratio, seed):
    _check(_data(kind, n, d, seed), ratio, seed=seed)


def test_deferred_seeds_and_candidate_sizes(one_thread):
    features = _data("blobs", 5000, 256, 7)
    for seed in (0, 1, 2):
        _check(features, 0.05, seed=seed, candidates=64)
    for candidates in (1, 17, 700, 100000):  # 1: one point per phase; 100000: S = everything
        _check(features, 0.05, seed=3, candidates=candidates)


def test_deferred_all_covered_ties(one_thread):
    # 300 distinct rows, 600 picks: after the distinct rows, every min-distance is ~0 and the
    # argmax is decided by rounding and by the lowest index among equal values.
    features = _data("duplicates", 1200, 32, 8)
    _check(features, 0.5, candidates=32)
    _check(torch.ones(2000, 16), 0.05, candidates=64)  # all rows equal


def test_deferred_ramp_unique_and_deterministic(one_thread):
    # The official repo's 5000 x 2 ramp (huge norms, tiny gaps: the widest rounding margins).
    ramp = torch.arange(10000, dtype=torch.float32).reshape(5000, 2)
    idx = _check(ramp, 0.1)
    assert len(idx) == 500 and len(torch.unique(ramp[idx], dim=0)) == 500
    again = approximate_greedy_coreset(ramp, 0.1, method="deferred", candidates=128)
    assert torch.equal(again, idx)


def test_deferred_chunk_size_independent(one_thread):
    features = _data("relu", 3000, 96, 9)
    reference = _check(features, 0.1)
    for chunk_size in (37, 1000):
        assert torch.equal(approximate_greedy_coreset(features, 0.1, method="deferred", chunk_size=chunk_size,
                                                      candidates=128), reference)
    # no projection (D == 128 or projection_dim=None) takes the same paths
    _check(features[:, :64].contiguous(), 0.1, projection_dim=None)


def test_deferred_equals_plain_multithreaded():
    # plain loop and filter GEMM with 2 threads, the deferred mat-vecs single-threaded
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _check(_data("blobs", 20000, 128, 11), 0.01, candidates=256)
    finally:
        torch.set_num_threads(threads)


def test_method_choice_and_validation(one_thread):
    features = _data("uniform", 20000, 8, 10)
    # auto == deferred on CPU for N >= 16384, and == plain below; all select the same rows
    auto = approximate_greedy_coreset(features, 0.01)
    assert torch.equal(auto, approximate_greedy_coreset(features, 0.01, method="plain"))
    with pytest.raises(ValueError, match="method"):
        approximate_greedy_coreset(features, 0.01, method="pruned-ish")


def test_deferred_exact_pairs_in_bounded_blocks(one_thread, monkeypatch):
    # many pairs pass the filter on uniform noise: recomputed whenever 700 have accumulated and in
    # blocks of at most 700 (mid-pass and split flushes), the selection is still the plain loop's
    import iad_lightning.models.coreset as coreset

    calls = []
    original = coreset._exact_pairs

    def spy(projected_t, sq, m, centres, centre_rows, pair_x, pair_c, buffer):
        calls.append(len(pair_x))
        return original(projected_t, sq, m, centres, centre_rows, pair_x, pair_c, buffer)

    monkeypatch.setattr(coreset, "_PAIR_BLOCK", 700)
    monkeypatch.setattr(coreset, "_exact_pairs", spy)
    _check(_data("uniform", 8000, 128, 12), 0.05)
    assert max(calls) == 700 and len(calls) > 10  # full blocks, many flushes
