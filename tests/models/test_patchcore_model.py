"""PatchCore torch model: the test vectors of specs/patchcore.md section 10 that need no weights."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from iad_lightning.models import nn_search as nn_search_module
from iad_lightning.models.coreset import approximate_greedy_coreset
from iad_lightning.models.nn_search import NearestNeighbourSearch, torch_knn
from iad_lightning.models.patchcore import (
    Aggregator,
    MeanMapper,
    PatchCoreModel,
    PatchEmbedding,
    adaptive_avg_pool_channels,
    adaptive_pool_windows,
    align_to_grid,
    embed_reference,
    gaussian_blur,
    gaussian_kernel1d,
    resolve_embed_dimensions,
    unfold_neighbourhood,
)


def _wr50_like(batch: int = 1, seed: int = 0, size: int = 224) -> list[torch.Tensor]:
    """Random layer2/layer3 maps with WR50 shapes (non-negative, like post-ReLU activations)."""
    g = torch.Generator().manual_seed(seed)
    s2, s3 = size // 8, size // 16
    return [torch.rand(batch, 512, s2, s2, generator=g), torch.rand(batch, 1024, s3, s3, generator=g)]


# ------------------------------------------------------------------------------ embedding
def test_unfold_shapes_and_official_layout():
    layer2, layer3 = _wr50_like()
    u2, u3 = unfold_neighbourhood(layer2), unfold_neighbourhood(layer3)
    assert u2.shape == (1, 784, 512, 3, 3)
    assert u3.shape == (1, 196, 1024, 3, 3)
    assert align_to_grid(u3, (14, 14), (28, 28)).shape == (1, 784, 1024, 3, 3)
    # Official PatchMaker.patchify: nn.Unfold(3, stride 1, padding 1), reshape, permute(0, 4, 1, 2, 3).
    official = F.unfold(layer3, kernel_size=3, padding=1).reshape(1, 1024, 3, 3, -1).permute(0, 4, 1, 2, 3)
    assert torch.equal(u3, official)
    # Patch (row 0, col 0) of the zero-padded unfold: its top-left neighbour is padding.
    assert torch.equal(u2[0, 0, :, 0, 0], torch.zeros(512))
    assert torch.equal(u2[0, 0, :, 1, 1], layer2[0, :, 0, 0])


def test_adaptive_pool_windows():
    start, size = adaptive_pool_windows(4608, 1024)
    i = torch.arange(1024)
    assert torch.equal(size, torch.full((1024,), 5))
    assert torch.equal(start, torch.floor(4.5 * i).long())
    assert torch.equal(start + size, torch.ceil(4.5 * (i + 1)).long())
    assert torch.equal(adaptive_pool_windows(9216, 1024)[1], torch.full((1024,), 9))
    assert torch.equal(adaptive_pool_windows(2048, 1024)[1], torch.full((1024,), 2))


@pytest.mark.parametrize("in_size,out_size", [(4608, 1024), (9216, 1024), (2048, 1024), (100, 7), (4607, 1024), (3, 8)])
def test_channel_pooling_equals_adaptive_avg_pool1d(in_size, out_size):
    x = torch.randn(2, in_size, 3)
    expected = F.adaptive_avg_pool1d(x.transpose(1, 2).reshape(-1, 1, in_size), out_size)
    expected = expected.view(2, 3, out_size).transpose(1, 2)
    torch.testing.assert_close(adaptive_avg_pool_channels(x, out_size), expected, rtol=1e-6, atol=1e-6)


def test_mean_mapper_layer3_is_3x3_avg_pool_and_aggregator_averages_pairs():
    layer3 = torch.randn(1, 1024, 14, 14)
    mapped = MeanMapper(1024)(unfold_neighbourhood(layer3).reshape(-1, 1024, 3, 3))  # (196, 1024)
    pooled = F.avg_pool2d(layer3, 3, stride=1, padding=1, count_include_pad=True)  # divisor 9
    torch.testing.assert_close(mapped, pooled.flatten(2)[0].t(), rtol=1e-5, atol=1e-6)
    stacked = torch.randn(5, 2, 1024)
    flat = stacked.reshape(5, 2048)
    torch.testing.assert_close(Aggregator(1024)(stacked), (flat[:, 0::2] + flat[:, 1::2]) / 2)


def test_embedding_matches_official_order():
    # Fast path (pool, then align) == literal official order (align unfolded, then pool).
    feats = _wr50_like(batch=2)
    fast, grid = PatchEmbedding()(feats)
    ref, ref_grid = embed_reference(feats)
    assert grid == ref_grid == (28, 28) and fast.shape == (2, 784, 1024)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)
    # Non-square grids, odd ratios, small dims, three layers.
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(2, 6, 10, 12, generator=g), torch.randn(2, 10, 5, 6, generator=g),
             torch.randn(2, 7, 3, 3, generator=g)]
    fast, grid = PatchEmbedding(40, 24)(feats)
    ref, _ = embed_reference(feats, 40, 24)
    assert grid == (10, 12) and fast.shape == (2, 120, 24)
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-5)


def test_constant_layer3_rows_3_to_24_and_layer_dims():
    c = 0.7
    layer2, _ = _wr50_like()
    layer3 = torch.full((1, 1024, 14, 14), c)
    emb, _ = PatchEmbedding()([layer2, layer3])
    grid = emb[0].view(28, 28, 1024)
    inner = torch.zeros(28, 28, dtype=torch.bool)
    inner[3:25, 3:25] = True
    torch.testing.assert_close(grid[inner][:, 512:], torch.full((int(inner.sum()), 512), c), rtol=0, atol=1e-6)
    edge = grid[~inner][:, 512:]
    assert (edge < c - 1e-4).all(), "edge patches must be pulled toward 0 by the zero padding"
    # Dims 0..511 come from layer2 only, 512..1023 from layer3 only.
    emb_other, _ = PatchEmbedding()([layer2, torch.rand(1, 1024, 14, 14)])
    torch.testing.assert_close(emb_other[..., :512], emb[..., :512], rtol=0, atol=0)
    emb_l2, _ = PatchEmbedding()([torch.rand(1, 512, 28, 28), layer3])
    torch.testing.assert_close(emb_l2[..., 512:], emb[..., 512:], rtol=0, atol=0)


def test_embed_dimension_rules():
    # the paper's backbone keeps 1024/1024; a small one (Lite0: 40, 112 channels) is not stretched
    assert resolve_embed_dimensions("auto", "auto", [512, 1024]) == (1024, 1024)
    assert resolve_embed_dimensions(1024, 1024, [40, 112]) == (1024, 1024)
    assert resolve_embed_dimensions("auto", "auto", [40, 112]) == ([40, 112], 152)
    assert resolve_embed_dimensions("channels", "auto", [40, 112]) == ([40, 112], 152)
    assert resolve_embed_dimensions("unfolded", "auto", [40, 112]) == ([360, 1008], 1024)
    assert resolve_embed_dimensions("unfolded", 1368, [40, 112]) == ([360, 1008], 1368)
    assert resolve_embed_dimensions([64, 64], "auto", [40, 112]) == (64, 128)
    for bad in (("pca", "auto"), (1024, "sum"), ([1, 2, 3], "auto")):
        with pytest.raises(ValueError):
            resolve_embed_dimensions(*bad, [40, 112])


@pytest.mark.parametrize("rule", ["channels", "unfolded"])
def test_per_layer_embedding_matches_reference(rule):
    g = torch.Generator().manual_seed(0)
    feats = [torch.rand(2, 40, 28, 28, generator=g), torch.rand(2, 112, 14, 14, generator=g)]
    pre, target = resolve_embed_dimensions(rule, "auto", [40, 112])
    ours, grid = PatchEmbedding(pre, target)(feats)
    ref, _ = embed_reference(feats, pre, target)
    assert grid == (28, 28) and ours.shape == (2, 784, target)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    if rule == "channels":  # each channel's zero-padded 3x3 mean, layer 3 bilinearly aligned (anomalib's feature)
        l2 = F.avg_pool2d(feats[0], 3, 1, 1)
        l3 = F.interpolate(F.avg_pool2d(feats[1], 3, 1, 1), size=(28, 28), mode="bilinear", align_corners=False)
        torch.testing.assert_close(ours, torch.cat([l2, l3], 1).flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_wide_resnet50_shapes_random_weights():
    timm = pytest.importorskip("timm")
    backbone = timm.create_model("wide_resnet50_2", pretrained=False, features_only=True, out_indices=(2, 3)).eval()
    with torch.no_grad():
        feats = backbone(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, 512, 28, 28), (1, 1024, 14, 14)]
    emb, grid = PatchCoreModel().embed(feats)
    assert emb.shape == (1, 784, 1024) and grid == (28, 28)


# -------------------------------------------------------------------------------- coreset
@pytest.fixture
def one_thread():
    """The greedy loop is a chain of small ops: on a shared, oversubscribed CI box OpenMP barriers
    make multi-threaded runs 5-15x slower, so the coreset tests run single-threaded."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _official_coreset(features: torch.Tensor, ratio: float, seed: int = 0) -> list[int]:
    """The official ApproximateGreedyCoresetSampler loop (sqrt domain, cat + min), with the same
    torch.Generator draws as ours, to check that our squared-domain loop selects the same points."""
    g = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(features.shape[1])
    w = torch.empty(128, features.shape[1]).uniform_(-bound, bound, generator=g)
    starts = torch.randperm(len(features), generator=g)[:10]
    x = features @ w.t()

    def dist(a, b):
        aa = (a * a).sum(1, keepdim=True)
        bb = (b * b).sum(1)[None]
        return (-2 * a @ b.t() + aa + bb).clamp(0, None).sqrt()

    anchor = dist(x, x[starts]).mean(-1).reshape(-1, 1)
    out = []
    for _ in range(int(len(features) * ratio)):
        i = torch.argmax(anchor).item()
        out.append(i)
        anchor = torch.cat([anchor, dist(x, x[i : i + 1])], dim=-1).min(dim=1).values.reshape(-1, 1)
    return out


def test_coreset_sizes_and_official_selection(one_thread):
    assert int(163856 * 0.1) == 16385 and int(163856 * 0.01) == 1638  # bottle, spec section 10
    feats = torch.randn(1000, 64, generator=torch.Generator().manual_seed(3))
    for ratio, expected in [(0.1, 100), (0.015, 15), (0.2567, 256)]:
        assert len(approximate_greedy_coreset(feats, ratio)) == expected == int(1000 * ratio)
    assert torch.equal(approximate_greedy_coreset(feats, 1.0), torch.arange(1000))
    idx = approximate_greedy_coreset(feats, 0.1, seed=5)
    assert idx.tolist() == _official_coreset(feats, 0.1, seed=5)
    assert torch.equal(approximate_greedy_coreset(feats, 0.1, seed=5, chunk_size=37), idx)
    with pytest.raises(ValueError, match="selects 0 rows"):
        approximate_greedy_coreset(feats, 0.0001)


def test_coreset_ramp_unique_and_deterministic(one_thread):
    # The repo's test/test_sampler.py dummy: a 5000 x 2 ramp.
    ramp = torch.arange(10000, dtype=torch.float32).reshape(5000, 2)
    idx = approximate_greedy_coreset(ramp, 0.1, seed=0)
    assert len(idx) == 500 and len(torch.unique(ramp[idx], dim=0)) == 500
    assert torch.equal(approximate_greedy_coreset(ramp, 0.1, seed=0), idx)
    feats = torch.randn(800, 32, generator=torch.Generator().manual_seed(0))
    a, b = approximate_greedy_coreset(feats, 0.1, seed=1), approximate_greedy_coreset(feats, 0.1, seed=2)
    assert torch.equal(a, approximate_greedy_coreset(feats, 0.1, seed=1)) and not torch.equal(a, b)


# -------------------------------------------------------------------------------- scoring
def _small_model(**kwargs) -> PatchCoreModel:
    return PatchCoreModel(pretrain_embed_dimension=64, target_embed_dimension=32, **kwargs)


def _small_feats(batch: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(batch, 16, 8, 8, generator=g) * 3, torch.rand(batch, 32, 4, 4, generator=g) * 3]


def test_features_in_bank_score_zero_and_map_shape():
    model = PatchCoreModel()
    feats = _wr50_like(batch=2)
    emb, _ = model.embed(feats)
    other, _ = model.embed(_wr50_like(batch=1, seed=7))
    model.fit(torch.cat([emb.reshape(-1, 1024), other.reshape(-1, 1024)]))
    maps, scores = model.predict(feats, (224, 224))
    assert maps.shape == (2, 1, 224, 224) and scores.shape == (2,)
    assert torch.equal(scores, torch.zeros(2)) and torch.equal(maps, torch.zeros_like(maps))
    maps, scores = model.predict(_wr50_like(batch=1, seed=9), 224)
    assert (scores > 0).all() and (maps > 0).all()


def test_gaussian_blur_matches_scipy():
    kernel = gaussian_kernel1d(4.0)
    assert kernel.numel() == 33  # radius 16 = int(4 * 4 + 0.5)
    g = torch.Generator().manual_seed(0)
    maps = torch.rand(2, 1, 224, 224, generator=g) * 3
    ours = gaussian_blur(maps, 4.0)[:, 0].numpy()
    ref = np.stack([gaussian_filter(m, sigma=4) for m in maps[:, 0].numpy()])
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)
    small = torch.rand(1, 1, 9, 6, generator=g)  # radius 16 > size: reflection repeats
    np.testing.assert_allclose(gaussian_blur(small)[0, 0].numpy(), gaussian_filter(small[0, 0].numpy(), sigma=4),
                               rtol=0, atol=1e-6)


def test_anomaly_map_is_official_rescale_segmentor():
    model = _small_model()
    emb, _ = model.embed(_small_feats(2, 0))
    model.fit(emb[0])
    feats = _small_feats(2, 1)
    maps, scores = model.predict(feats, (64, 48))
    emb, grid = model.embed(feats)
    patch, _ = model.patch_scores(emb)
    up = F.interpolate(patch.view(2, 1, *grid), size=(64, 48), mode="bilinear", align_corners=False)
    ref = np.stack([gaussian_filter(m, sigma=4) for m in up[:, 0].numpy()])
    np.testing.assert_allclose(maps[:, 0].numpy(), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(scores, patch.amax(1))  # official: max of the patch scores


def test_num_neighbors_mean_of_k_squared_distances():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0]])
    model = PatchCoreModel(target_embed_dimension=2, num_neighbors=2).fit(bank)
    scores, nn = model.patch_scores(torch.tensor([[[0.0, 1.0]]]))
    assert nn.item() == 0
    torch.testing.assert_close(scores, torch.tensor([[(1.0 + 2.0) / 2]]))


def test_paper_reweighting_hand_made():
    bank = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [4.0, 4.0], [10.0, 10.0]])
    model = PatchCoreModel(target_embed_dimension=2, paper_reweighting=True, reweight_neighbors=3).fit(bank)
    emb = torch.tensor([[[0.1, 0.1], [0.0, -1.0]]])  # the 2nd patch is the most anomalous
    scores, nn = model.patch_scores(emb)
    torch.testing.assert_close(scores, torch.tensor([[0.02, 1.0]]))
    # m_test* = (0, -1), s* = 1, m* = bank[0]; N_3(m*) = bank rows 0, 1, 2 at distances 1, sqrt 2, 3.
    d = np.array([1.0, math.sqrt(2.0), 3.0])
    expected = (1 - math.exp(d[0]) / np.exp(d).sum()) * 1.0
    got = model.reweighted_image_scores(emb, scores, nn)
    torch.testing.assert_close(got, torch.tensor([expected], dtype=torch.float32))
    # End to end: predict uses Eq. 7 when paper_reweighting is on, the plain max otherwise.
    small = _small_model(paper_reweighting=True)
    small.fit(small.embed(_small_feats(2, 0))[0].reshape(-1, 32))
    feats = _small_feats(2, 1)
    emb, _ = small.embed(feats)
    patch, nn = small.patch_scores(emb)
    _, image_scores = small.predict(feats, 16)
    torch.testing.assert_close(image_scores, small.reweighted_image_scores(emb, patch, nn))
    assert (image_scores < patch.amax(1)).all()


def test_memory_bank_state_dict_round_trip():
    model = _small_model()
    emb, _ = model.embed(_small_feats(3, 0))
    model.fit(emb.reshape(-1, 32)[:150])
    feats = _small_feats(1, 4)
    maps, scores = model.predict(feats, 32)
    state = model.state_dict()
    assert state["memory_bank"].shape == (150, 32)
    fresh = _small_model()  # empty (0, 32) bank
    fresh.load_state_dict(state)
    assert torch.equal(fresh.memory_bank, model.memory_bank)
    other = _small_model().fit(torch.randn(10, 32))  # different bank size, and a built index
    other.predict(feats, 32)
    parent = torch.nn.Sequential(other)
    parent.load_state_dict({"0.memory_bank": state["memory_bank"]})  # nested prefix
    for m in (fresh, other):
        maps2, scores2 = m.predict(feats, 32)
        torch.testing.assert_close(scores2, scores)
        torch.testing.assert_close(maps2, maps)


def test_bank_built_and_used_under_inference_mode():
    # Lightning runs test/predict under torch.inference_mode: inference tensors have no version counter.
    model = _small_model()
    feats = _small_feats(2, 0)
    with torch.inference_mode():
        model.fit(model.embed(feats)[0].reshape(-1, 32))
        _, scores = model.predict(feats, 16)
    assert torch.equal(model.predict(feats, 16)[1], scores)
    fresh = _small_model()
    with torch.inference_mode():
        fresh.fit(torch.zeros(128, 32))  # same size, inference buffer: load must replace, not copy_
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.predict(feats, 16)[1], scores)


# ------------------------------------------------------------------------------- NN search
def test_faiss_and_torch_search_agree():
    pytest.importorskip("faiss")
    g = torch.Generator().manual_seed(0)
    bank, queries = torch.randn(700, 48, generator=g), torch.randn(300, 48, generator=g)
    results = {}
    for backend in ("faiss", "torch"):
        for refine in (False, True):
            search = NearestNeighbourSearch(backend=backend, refine_distances=refine).fit(bank)
            results[backend, refine] = search.search(queries, k=5)
    brute = ((queries[:, None] - bank[None]) ** 2).sum(-1).topk(5, largest=False)
    for d, i in results.values():
        assert d.dtype == torch.float32 and i.dtype == torch.long and d.shape == i.shape == (300, 5)
        assert torch.equal(i, brute.indices)
        torch.testing.assert_close(d, brute.values, rtol=1e-4, atol=1e-4)
    d_ref, _ = torch_knn(queries, bank, 5, chunk_size=7)
    torch.testing.assert_close(d_ref, results["torch", False][0])


def test_search_threads_and_float16_rerank_give_the_exact_neighbours():
    g = torch.Generator().manual_seed(1)
    bank, queries = torch.randn(500, 40, generator=g), torch.randn(200, 40, generator=g)
    brute = ((queries[:, None] - bank[None]) ** 2).sum(-1).topk(3, largest=False)
    backends = ["torch"] + (["faiss"] if nn_search_module.faiss_available() else [])
    for backend in backends:
        search = NearestNeighbourSearch(backend=backend, num_threads=1).fit(bank)
        assert torch.equal(search.search(queries, 3)[1], brute.indices)
    if "faiss" in backends:  # the thread count is restored after the search
        before = nn_search_module.faiss.omp_get_max_threads()
        NearestNeighbourSearch(backend="faiss", num_threads=1).fit(bank).search(queries, 1)
        assert nn_search_module.faiss.omp_get_max_threads() == before
    half = NearestNeighbourSearch(backend="torch", precision="float16", rerank=8).fit(bank)
    d, i = half.search(queries, 3)
    assert half._built.dtype == torch.float16 and d.dtype == torch.float32
    assert torch.equal(i, brute.indices)  # float32 re-ranking of the fp16 candidates
    torch.testing.assert_close(d, brute.values, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="precision"):
        NearestNeighbourSearch(precision="int8")


def test_search_rebuilds_when_the_bank_changes(monkeypatch):
    bank = torch.zeros(4, 3)
    bank[1] = 1.0
    search = NearestNeighbourSearch().fit(bank)
    q = torch.ones(1, 3)
    assert search.search(q, 1)[1].item() == 1
    bank[1] = -1.0  # in-place write
    bank[3] = 1.0
    assert search.search(q, 1)[1].item() == 3
    search.fit(torch.ones(2, 3) * 5)
    assert search.search(q, 2)[0].tolist() == [[48.0, 48.0]]
    with pytest.raises(ValueError, match="k=3"):
        search.search(q, 3)
    # Without faiss the torch backend takes over.
    monkeypatch.setattr(nn_search_module, "_FAISS_AVAILABLE", False)
    fallback = NearestNeighbourSearch().fit(bank)
    assert fallback._plan(q)[0] == "torch" and fallback.search(q, 1)[1].item() == 3


def test_ivfpq_needs_enough_rows():
    pytest.importorskip("faiss")
    search = NearestNeighbourSearch(index="ivfpq", backend="faiss").fit(torch.randn(100, 64))
    assert not search.exact
    with pytest.raises(ValueError, match="at least 512"):
        search.search(torch.randn(2, 64), 1)


def test_unfold_accepts_channels_last_maps():
    from iad_lightning.models.patchcore import _unfold_components

    x = torch.randn(2, 5, 7, 7)
    assert torch.equal(_unfold_components(x), _unfold_components(x.to(memory_format=torch.channels_last)))


def test_exportable_knn_equals_faiss_over_several_bank_chunks():
    """The matmul + topk search of the export graph, the bank split into uneven chunks, returns
    faiss IndexFlatL2's neighbours and the refined eager distances."""
    from iad_lightning.models.nn_search import exportable_knn

    g = torch.Generator().manual_seed(3)
    bank, queries = torch.randn(1000, 48, generator=g) * 4, torch.randn(257, 48, generator=g) * 4
    queries[:5] = bank[[3, 400, 999, 0, 512]]  # exact hits: distance 0 without cancellation error
    backend = "faiss" if nn_search_module.faiss_available() else "torch"
    ref_d, ref_i = NearestNeighbourSearch(backend=backend).fit(bank).search(queries, k=4)
    for chunk in (1000, 333, 64):  # 1, 4 and 16 chunks (the last ones shorter)
        rows_per_chunk = bank.split(chunk)
        d, i, rows = exportable_knn(queries, [r.t() for r in rows_per_chunk], [(r * r).sum(1) for r in rows_per_chunk], 4)
        assert torch.equal(i, ref_i), chunk
        torch.testing.assert_close(d, ref_d, rtol=1e-6, atol=1e-6)
        assert torch.equal(rows, bank[i])
    assert float(d[:5, 0].abs().max()) == 0.0


@pytest.mark.parametrize("k, reweight", [(1, False), (3, True)])
def test_inference_graph_equals_the_faiss_model(k, reweight):
    from iad_lightning.models.patchcore import PatchCoreInference

    model = _small_model(num_neighbors=k, paper_reweighting=reweight, reweight_neighbors=5).eval()
    emb, _ = model.embed(_small_feats(4, seed=0))
    model.fit(emb.reshape(-1, 32)[::2].clone())
    graph = PatchCoreInference(lambda images: _small_feats(images.shape[0], seed=1), model, bank_chunk=50)
    images = torch.zeros(2, 3, 64, 64)
    with torch.no_grad():
        ref_map, ref_score = model.predict(_small_feats(2, seed=1), (64, 64))
        got_map, got_score = graph(images)
    torch.testing.assert_close(got_map, ref_map, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_score, ref_score, rtol=1e-5, atol=1e-5)
