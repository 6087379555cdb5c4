"""UniAD maths against the spec's test vectors (specs/uniad.md §11) and the official layout."""

import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from iad_lightning.errors import WeightsError
from iad_lightning.models.uniad import (
    PositionEmbeddingLearned,
    UniADModel,
    align_features,
    anomaly_map,
    count_parameters,
    feature_jitter,
    image_score,
    load_official_checkpoint,
    neighbor_mask,
    official_to_ours,
)
from iad_lightning.safe_load import EASYDICT, safe_torch_load


def _loop_mask(h, w, hm, wm):
    """The official generate_mask (loops), as the reference for the vectorised one."""
    mask = torch.ones(h, w, h, w)
    for i in range(h):
        for j in range(w):
            mask[i, j, max(i - hm // 2, 0): min(i + hm // 2 + 1, h), max(j - wm // 2, 0): min(j + wm // 2 + 1, w)] = 0
    mask = mask.view(h * w, h * w)
    return mask.masked_fill(mask == 0, float("-inf")).masked_fill(mask == 1, 0.0)


def test_neighbor_mask_blocks_the_7x7_neighbourhood():
    m = neighbor_mask((14, 14), (7, 7))
    blocked = torch.isinf(m) & (m < 0)
    assert m.shape == (196, 196) and m.dtype == torch.float32
    assert set(m.unique().tolist()) == {0.0, float("-inf")}
    assert blocked[7 * 14 + 7].sum() == 49  # interior token (7, 7)
    assert blocked[0].sum() == 16  # corner (0, 0): 4 x 4 window
    assert blocked[7].sum() == 28  # edge token (0, 7): 4 x 7
    assert blocked.sum() == 7396
    assert torch.equal(m, m.T) and blocked.diagonal().all()
    assert not blocked.all(dim=1).any()  # no fully masked row -> no NaN
    # what is blocked is the neighbourhood: (7,7) blocks (4..10, 4..10), keeps (3, 7) and (7, 11)
    assert blocked[7 * 14 + 7, 4 * 14 + 4] and blocked[7 * 14 + 7, 10 * 14 + 10]
    assert not blocked[7 * 14 + 7, 3 * 14 + 7] and not blocked[7 * 14 + 7, 7 * 14 + 11]
    assert torch.equal(m, _loop_mask(14, 14, 7, 7))
    assert torch.equal(neighbor_mask((5, 9), (3, 5)), _loop_mask(5, 9, 3, 5))


def test_mask_is_a_non_persistent_buffer_and_too_large_windows_fail():
    model = UniADModel(in_channels=16, feature_size=(8, 8), hidden_dim=32, nhead=4, dim_feedforward=64,
                       num_encoder_layers=1, num_decoder_layers=1)
    assert "mask" in dict(model.named_buffers()) and not any("mask" in k for k in model.state_dict())
    with pytest.raises(ValueError, match="neighbor_size"):
        UniADModel(in_channels=16, feature_size=(7, 7), hidden_dim=32, nhead=4)  # centre blocks all 49


def test_positional_table_layout():
    pe = PositionEmbeddingLearned((14, 14), 128)
    pos = pe()
    assert pos.shape == (196, 256)
    for h, w in [(0, 0), (3, 11), (13, 13), (7, 2)]:
        assert torch.equal(pos[h * 14 + w, :128], pe.col_embed.weight[w])
        assert torch.equal(pos[h * 14 + w, 128:], pe.row_embed.weight[h])
    assert 0.0 <= float(pe.row_embed.weight.detach().min()) and float(pe.row_embed.weight.detach().max()) <= 1.0  # U(0, 1)


def test_jitter_statistics():
    torch.manual_seed(0)
    tokens = torch.randn(196, 16, 272) * torch.rand(196, 16, 1) * 5
    noisy = feature_jitter(tokens, scale=20.0, prob=1.0)
    unit = (noisy - tokens) / (20.0 * tokens.norm(dim=-1, keepdim=True) / 272)  # should be N(0, 1)
    assert abs(float(unit.mean())) < 0.01 and abs(float(unit.std()) - 1.0) < 0.01
    # per-token std = 20 * ||f|| / 272 = 0.0735 ||f|| (C, not sqrt(C))
    std = (noisy - tokens).std(dim=-1) / tokens.norm(dim=-1)
    assert float(std.mean()) == pytest.approx(20 / 272, rel=0.02)
    assert torch.equal(feature_jitter(tokens, 20.0, 0.0), tokens)
    # one coin flip per batch: with prob 0.5 either every token moves or none does
    flips = [feature_jitter(tokens, 20.0, 0.5) for _ in range(40)]
    moved = [bool((f != tokens).any(dim=-1).all()) for f in flips]
    untouched = [bool(torch.equal(f, tokens)) for f in flips]
    assert all(a or b for a, b in zip(moved, untouched)) and 5 < sum(moved) < 35


def _small_model(**kw):
    return UniADModel(in_channels=272, feature_size=(14, 14), **kw)


def test_parameter_count_and_shapes():
    model = _small_model()
    assert count_parameters(model) == 7_717_392
    assert model.input_proj.weight.shape == (256, 272) and model.output_proj.weight.shape == (272, 256)
    assert len(model.encoder.layers) == 4 and len(model.decoder.layers) == 4
    assert model.decoder.layers[0].learned_embed.weight.shape == (196, 256)
    assert not hasattr(model.encoder, "norm") and model.decoder.norm.normalized_shape == (256,)
    x = torch.randn(2, 272, 14, 14)
    tokens = x.flatten(2).permute(2, 0, 1)
    assert tokens.shape == (196, 2, 272) and model.input_proj(tokens).shape == (196, 2, 256)
    assert torch.equal(tokens[3 * 14 + 5, 1], x[1, :, 3, 5])  # token = h * W + w
    model.eval()
    rec = model(x)
    assert rec.shape == x.shape
    # xavier init of every Linear with zero bias (MHA out_proj included)
    assert torch.count_nonzero(model.encoder.layers[0].self_attn.out_proj.bias) == 0
    assert torch.count_nonzero(model.input_proj.bias) == 0


def test_jitter_only_in_training_and_target_is_clean():
    torch.manual_seed(0)
    kw = {"in_channels": 272, "feature_size": (14, 14), "hidden_dim": 64, "nhead": 4, "dim_feedforward": 128,
          "num_encoder_layers": 1, "num_decoder_layers": 1, "dropout": 0.0}  # small: the logic, not the size
    jit, plain = UniADModel(**kw), UniADModel(**kw, jitter_scale=0.0)
    plain.load_state_dict(jit.state_dict())
    x = torch.randn(2, 272, 14, 14)
    jit.eval(), plain.eval()
    assert torch.equal(jit(x), plain(x))  # eval: identical with and without jitter
    jit.train(), plain.train()
    assert torch.equal(plain(x), plain(x))  # no dropout, no jitter: deterministic
    assert not torch.allclose(jit(x), plain(x))  # training: jitter changes the reconstruction
    x0 = x.clone()
    jit(x)
    assert torch.equal(x, x0)  # the input (the target) is not modified in place


def test_backbone_b4_shapes_and_mfcn_alignment():
    from iad_lightning.models.backbones import FeatureExtractor

    fe = FeatureExtractor("tf_efficientnet_b4", [0, 1, 2, 3], weights="none")
    assert fe.channels == [24, 32, 56, 160] and fe.reductions == [2, 4, 8, 16]
    feats = fe(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(1, 24, 112, 112), (1, 32, 56, 56), (1, 56, 28, 28), (1, 160, 14, 14)]
    aligned = align_features(feats, (14, 14))
    assert aligned.shape == (1, 272, 14, 14)
    # bilinear align-corners: corners are sampled exactly, identical to nn.UpsamplingBilinear2d(1/8)
    assert torch.equal(aligned[:, :24, 0, 0], feats[0][:, :, 0, 0])
    assert torch.equal(aligned[:, :24, -1, -1], feats[0][:, :, -1, -1])
    ref = torch.nn.UpsamplingBilinear2d(scale_factor=1 / 8)(feats[0])
    torch.testing.assert_close(aligned[:, :24], ref)
    assert torch.equal(aligned[:, 112:], feats[3])
    const = align_features([torch.full((2, 3, 112, 112), 0.7)], (14, 14))
    torch.testing.assert_close(const, torch.full((2, 3, 14, 14), 0.7))


def test_anomaly_map_and_image_score_rule():
    rec, align = torch.zeros(2, 272, 14, 14), torch.randn(2, 272, 14, 14)
    amap = anomaly_map(rec, align, (224, 224))
    low = align.norm(dim=1, keepdim=True)
    assert amap.shape == (2, 1, 224, 224)
    for (i, j), (a, b) in {(0, 0): (0, 0), (0, -1): (0, -1), (-1, 0): (-1, 0), (-1, -1): (-1, -1)}.items():
        torch.testing.assert_close(amap[:, 0, i, j], low[:, 0, a, b], rtol=0, atol=1e-5)
    pooled = F.avg_pool2d(amap, 16, stride=1)
    assert pooled.shape[-2:] == (209, 209)
    assert torch.equal(image_score(amap), pooled.flatten(1).max(dim=1).values)
    # a single hot pixel scores 1/256 of its value, not its raw max
    hot = torch.zeros(1, 1, 224, 224)
    hot[0, 0, 100, 100] = 256.0
    assert float(image_score(hot)) == pytest.approx(1.0) and float(hot.max()) == 256.0


# ------------------------------------------------------------------------------- official checkpoint
def _official_state_dict(seed=0):
    """A state dict in the layout of zhiyuanyou/UniAD ckpt.pth.tar, random values, written from
    the official module tree (not from our mapping): ModelHelper(backbone, neck, reconstruction)
    wrapped in DDP (``module.``)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g) * 0.1
    p = "module.reconstruction."
    sd = {
        "module.backbone._conv_stem.weight": r(48, 3, 3, 3),  # lukemelas B4 layout (ignored)
        "module.backbone._bn0.weight": r(48),
        p + "pos_embed.row_embed.weight": r(14, 128),
        p + "pos_embed.col_embed.weight": r(14, 128),
        p + "input_proj.weight": r(256, 272), p + "input_proj.bias": r(256),
        p + "output_proj.weight": r(272, 256), p + "output_proj.bias": r(272),
        p + "transformer.decoder.norm.weight": 1 + r(256), p + "transformer.decoder.norm.bias": r(256),
    }

    def mha(prefix):
        sd.update({prefix + "in_proj_weight": r(768, 256), prefix + "in_proj_bias": r(768),
                   prefix + "out_proj.weight": r(256, 256), prefix + "out_proj.bias": r(256)})

    def ffn_norms(prefix, n):
        sd.update({prefix + "linear1.weight": r(1024, 256), prefix + "linear1.bias": r(1024),
                   prefix + "linear2.weight": r(256, 1024), prefix + "linear2.bias": r(256)})
        for k in range(1, n + 1):
            sd.update({prefix + f"norm{k}.weight": 1 + r(256), prefix + f"norm{k}.bias": r(256)})

    for i in range(4):
        e = p + f"transformer.encoder.layers.{i}."
        mha(e + "self_attn.")
        ffn_norms(e, 2)
        d = p + f"transformer.decoder.layers.{i}."
        sd[d + "learned_embed.weight"] = r(196, 256)
        mha(d + "self_attn.")
        mha(d + "multihead_attn.")
        ffn_norms(d, 3)
    return sd


def _official_forward(sd, feature_align):
    """The official eval forward, written from its code with the official keys (no dropout)."""
    p = "module.reconstruction."
    w = lambda k: sd[p + k]
    b, c, h, wd = feature_align.shape
    src = feature_align.flatten(2).permute(2, 0, 1)
    src = F.linear(src, w("input_proj.weight"), w("input_proj.bias"))
    x_emb, y_emb = w("pos_embed.col_embed.weight"), w("pos_embed.row_embed.weight")
    pos = torch.cat([torch.cat([x_emb.unsqueeze(0)] * h, 0), torch.cat([y_emb.unsqueeze(1)] * wd, 1)], -1).flatten(0, 1)
    pos = torch.cat([pos.unsqueeze(1)] * b, dim=1)
    mask = _loop_mask(h, wd, 7, 7)

    def attn(pre, q, k, v):
        return F.multi_head_attention_forward(
            q, k, v, 256, 8, sd[pre + "in_proj_weight"], sd[pre + "in_proj_bias"], None, None, False, 0.0,
            sd[pre + "out_proj.weight"], sd[pre + "out_proj.bias"], training=False, attn_mask=mask, need_weights=False)[0]

    def ln(pre, x):
        return F.layer_norm(x, (256,), sd[pre + ".weight"], sd[pre + ".bias"])

    def ffn(pre, x):
        return F.linear(F.relu(F.linear(x, sd[pre + "linear1.weight"], sd[pre + "linear1.bias"])),
                        sd[pre + "linear2.weight"], sd[pre + "linear2.bias"])

    out = src
    for i in range(4):
        e = p + f"transformer.encoder.layers.{i}."
        out = ln(e + "norm1", out + attn(e + "self_attn.", out + pos, out + pos, out))
        out = ln(e + "norm2", out + ffn(e, out))
    memory = out
    for i in range(4):
        d = p + f"transformer.decoder.layers.{i}."
        tgt = torch.cat([sd[d + "learned_embed.weight"].unsqueeze(1)] * b, dim=1)
        tgt = ln(d + "norm1", tgt + attn(d + "self_attn.", tgt + pos, memory + pos, memory))
        tgt = ln(d + "norm2", tgt + attn(d + "multihead_attn.", tgt + pos, out + pos, out))
        out = ln(d + "norm3", tgt + ffn(d, tgt))
    out = F.layer_norm(out, (256,), w("transformer.decoder.norm.weight"), w("transformer.decoder.norm.bias"))
    rec = F.linear(out, w("output_proj.weight"), w("output_proj.bias"))
    return rec.permute(1, 2, 0).reshape(b, c, h, wd)


def _official_checkpoint_file(path, sd, monkeypatch):
    """Write ``path`` as tools/train_val.py does: {"epoch", "arch": config.net, "state_dict",
    "best_metric", "optimizer"}, with config = EasyDict(yaml), so "arch" is a list of nested
    easydict.EasyDict objects; then make ``easydict`` unimportable, as on our installs."""
    fake = _fake_easydict_module()
    monkeypatch.setitem(sys.modules, "easydict", fake)
    config = fake.EasyDict({"net": [
        {"name": "backbone", "type": "models.backbones.efficientnet_b4", "frozen": True,
         "kwargs": {"pretrained": True, "outlayers": [1, 2, 3, 4]}},
        {"name": "neck", "prev": "backbone", "type": "models.necks.MFCN", "kwargs": {"outstrides": [16]}},
        {"name": "reconstruction", "prev": "neck", "type": "models.reconstructions.UniAD",
         "kwargs": {"hidden_dim": 256, "feature_jitter": {"scale": 20.0, "prob": 1.0},
                    "neighbor_mask": {"neighbor_size": [7, 7], "mask": [True, True, True]}}},
    ]})
    assert type(config.net[2].kwargs.neighbor_mask) is fake.EasyDict
    param = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.AdamW([param], lr=1e-4, weight_decay=1e-4)
    param.grad = torch.ones(3)
    opt.step()
    torch.save({"epoch": 1000, "arch": config.net, "state_dict": sd, "best_metric": 0.97,
                "optimizer": opt.state_dict()}, path)
    monkeypatch.setitem(sys.modules, "easydict", None)  # from here on `import easydict` fails
    with pytest.raises(ImportError):
        import easydict  # noqa: F401


def test_official_checkpoint_loads_strictly_and_reproduces_outputs(tmp_path, monkeypatch):
    sd = _official_state_dict()
    path = tmp_path / "ckpt.pth.tar"
    _official_checkpoint_file(path, sd, monkeypatch)
    with pytest.raises(WeightsError, match="GLOBAL easydict.EasyDict"):
        safe_torch_load(path)  # without the stand-in the safe unpickler refuses the published layout
    arch = safe_torch_load(path, extra_globals=EASYDICT)["arch"]  # the stand-in: nested OrderedDicts
    assert [m["name"] for m in arch] == ["backbone", "neck", "reconstruction"]
    assert arch[2]["kwargs"]["neighbor_mask"] == {"neighbor_size": [7, 7], "mask": [True, True, True]}
    model = _small_model()
    ignored = load_official_checkpoint(model, path)  # strict: no missing / unexpected keys
    assert sorted(ignored) == ["module.backbone._bn0.weight", "module.backbone._conv_stem.weight"]
    mapped, _ = official_to_ours(sd)
    assert set(mapped) == set(model.state_dict())
    assert torch.equal(model.decoder.layers[2].encoder_attn.in_proj_weight,
                       sd["module.reconstruction.transformer.decoder.layers.2.self_attn.in_proj_weight"])
    assert torch.equal(model.decoder.layers[2].out_attn.out_proj.bias,
                       sd["module.reconstruction.transformer.decoder.layers.2.multihead_attn.out_proj.bias"])
    model.eval()
    x = torch.randn(2, 272, 14, 14)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _official_forward(sd, x), rtol=1e-5, atol=1e-5)


def _fake_easydict_module():
    """A module named ``easydict`` whose EasyDict behaves like the real one where pickling sees it:
    a dict subclass that mirrors items as attributes and converts nested dicts / lists of dicts."""
    mod = types.ModuleType("easydict")

    class EasyDict(dict):
        def __init__(self, d=None, **kw):
            super().__init__()
            for k, v in {**(d or {}), **kw}.items():
                setattr(self, k, v)

        def __setattr__(self, name, value):
            if isinstance(value, (list, tuple)):
                value = [EasyDict(x) if isinstance(x, dict) else x for x in value]
            elif isinstance(value, dict) and not isinstance(value, EasyDict):
                value = EasyDict(value)
            super().__setattr__(name, value)
            super().__setitem__(name, value)

        __setitem__ = __setattr__

    EasyDict.__module__, EasyDict.__qualname__ = "easydict", "EasyDict"
    mod.EasyDict = EasyDict
    return mod


def test_official_checkpoint_errors_name_the_problem(tmp_path):
    with pytest.raises(WeightsError, match="official_checkpoint"):
        load_official_checkpoint(_small_model(), tmp_path / "missing.pth.tar")
    path = tmp_path / "ckpt.pth.tar"
    torch.save({"state_dict": _official_state_dict()}, path)
    lite = UniADModel(in_channels=192, feature_size=(14, 14))  # Lite0 channels: does not fit
    with pytest.raises(WeightsError, match="272"):
        load_official_checkpoint(lite, path)
    bad = tmp_path / "bad.pth.tar"
    torch.save({"state_dict": {"module.reconstruction.something.weight": torch.zeros(1)}}, bad)
    with pytest.raises(WeightsError, match="no mapping rule"):
        load_official_checkpoint(_small_model(), bad)
    assert math.isclose(20 / 272, 0.0735, rel_tol=1e-3)


class _KeepAll(torch.nn.Module):
    """A dropout with p > 0 that keeps everything: runs attention()'s training path without noise."""

    p, training = 0.1, True

    def __call__(self, x):
        return x


@pytest.mark.parametrize("shared_query", [False, True])
def test_attention_equals_torch_multihead_attention_forward_and_backward(shared_query):
    """attention() with the module's own parameters = nn.MultiheadAttention (dropout off), on
    both of its paths (training: explicit softmax; eval: fused SDPA), gradients included."""
    from iad_lightning.models.uniad import Dropout, attention

    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 4, dropout=0.1).eval()
    mask = neighbor_mask((4, 4), (3, 3))
    q = torch.randn(16, 1 if shared_query else 3, 32, requires_grad=True)
    k = torch.randn(16, 3, 32, requires_grad=True)
    v = torch.randn(16, 3, 32, requires_grad=True)
    ref = mha(q.expand(-1, 3, -1), k, v, attn_mask=mask, need_weights=False)[0]
    grads_ref = torch.autograd.grad(ref.square().sum(), (q, k, v, mha.in_proj_weight))
    for drop in (_KeepAll(), Dropout(0.1).eval()):
        out = attention(mha, q, k, v, mask, drop)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, mha.in_proj_weight))
        for g, g_ref in zip(grads, grads_ref):
            torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
    x = torch.randn(16, 3, 32)  # self-attention (query is key)
    torch.testing.assert_close(attention(mha, x, x, v, mask, _KeepAll()),
                               mha(x, x, v, attn_mask=mask, need_weights=False)[0], rtol=1e-5, atol=1e-5)


def test_dropout_is_bernoulli_keep_with_inverse_scale_and_same_mask_in_backward():
    from iad_lightning.models.uniad import Dropout

    torch.manual_seed(0)
    x = torch.ones(1_000_000, requires_grad=True)
    y = Dropout(0.1).train()(x)
    kept = y > 0
    assert torch.unique(y).tolist() == [0.0, pytest.approx(1 / 0.9)]
    assert abs(kept.float().mean().item() - 0.9) < 5 * math.sqrt(0.09 / 1e6)  # 5 sigma
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, kept.float() / 0.9)
    assert torch.equal(Dropout(0.1).eval()(x), x)


def test_keep_mask_is_seeded_by_torch_and_keeps_with_probability_one_minus_p():
    """The CPU mask (numpy SFC64 words seeded from torch's generator): torch.manual_seed fixes it,
    successive draws differ, odd sizes work, the keep rate is 1 - p and neighbours (the two 32-bit
    halves of one 64-bit word) are uncorrelated."""
    from iad_lightning.models.uniad import keep_mask

    torch.manual_seed(3)
    a, b = keep_mask((7, 11, 13), 0.3, torch.device("cpu")), keep_mask((7, 11, 13), 0.3, torch.device("cpu"))
    torch.manual_seed(3)
    assert torch.equal(keep_mask((7, 11, 13), 0.3, torch.device("cpu")), a) and not torch.equal(a, b)
    assert a.dtype == torch.bool and a.shape == (7, 11, 13)
    n = 2_000_001
    for p in (0.1, 0.5):
        m = keep_mask((n,), p, torch.device("cpu")).double()
        sigma = math.sqrt(p * (1 - p) / n)
        assert abs(m.mean().item() - (1 - p)) < 5 * sigma
        both = (m[0:-1:2] * m[1::2]).mean().item()  # P(keep, keep) of the halves of one word
        assert abs(both - (1 - p) ** 2) < 5 * math.sqrt(2 / n)
