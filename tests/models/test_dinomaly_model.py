"""Dinomaly maths against the test vectors of ``specs/dinomaly.md`` §15 that need no real
weights, the official token layout (Meta's file, official position resampling), and the
official ``model.pth`` layout (built here, loaded safely, same scores as its source)."""

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from iad_lightning.errors import WeightsError
from iad_lightning.models.dinomaly import (
    Bottleneck,
    DecoderBlock,
    DinomalyModel,
    LinearAttention,
    StableAdamW,
    build_encoder,
    count_parameters,
    gaussian_kernel,
    hard_mining_cosine_loss,
    hard_mining_p,
    official_pos_resample,
    official_state_dict,
    smooth,
    top_ratio_score,
    warm_cosine_lr,
)

TINY_ARCH = {"embed_dim": 128, "num_heads": 2, "depth": 12, "img_size": 70}  # native grid 5 x 5; 128/64 = 2 heads
CROP = 42  # 3 x 3 patches


def tiny_model(**kw) -> DinomalyModel:
    kw = {"encoder": "vit_small_patch14_reg4_dinov2", "encoder_weights": "random", "crop": CROP, "arch": TINY_ARCH,
          "map_size": 32, **kw}
    return DinomalyModel(**kw)


def meta_layout(timm_sd: dict, seed: int = 0) -> dict:
    """A timm DINOv2-reg state dict in Meta's file layout: CLS position split off the CLS token
    (a random split: only the sum is defined), a 1 + G*G row table, ``register_tokens``, ``mask_token``."""
    gen = torch.Generator().manual_seed(seed)
    pos0 = torch.randn(1, 1, timm_sd["cls_token"].shape[-1], generator=gen)
    out = {k: v.clone() for k, v in timm_sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    out["cls_token"] = timm_sd["cls_token"] - pos0
    out["pos_embed"] = torch.cat([pos0, timm_sd["pos_embed"]], dim=1)
    out["register_tokens"] = timm_sd["reg_token"].clone()
    out["mask_token"] = torch.zeros(1, timm_sd["cls_token"].shape[-1])
    return out


def random_timm_state(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=False, num_classes=0, **TINY_ARCH)
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in vit.state_dict().items()}


# ----------------------------------------------------------------------------- vectors (§3.3, §8, §7)
def test_position_resampling_is_the_official_scale_factor_bicubic():
    ramp = torch.arange(37.0).repeat_interleave(37).reshape(1, 37 * 37, 1)  # value = row index
    out = official_pos_resample(ramp, 28).reshape(28, 28)
    official = torch.tensor([0.1197650, 1.4813014, 18.5701866, 34.4187012, 35.7763710])
    for col in (0, 13, 27):
        torch.testing.assert_close(out[[0, 1, 14, 26, 27], col], official, atol=1e-5, rtol=0)  # float32 ulp at 35: 4e-6
    sized = F.interpolate(ramp.reshape(1, 37, 37, 1).permute(0, 3, 1, 2), size=28, mode="bicubic")[0, 0, [0, 1, 14, 26, 27], 0]
    assert (sized - official).abs().max() > 0.05  # size=28 is another resampling
    assert official_pos_resample(ramp, 37) is ramp  # native size: unchanged (official short cut)


def test_gaussian_is_5x5_sigma4_zero_padded():
    k = gaussian_kernel(5, 4.0)[0, 0]
    assert k.shape == (5, 5) and float(k.sum()) == pytest.approx(1.0, abs=1e-6)
    assert [float(k[2, 2]), float(k[0, 2]), float(k[0, 0])] == pytest.approx([0.0452028, 0.0398913, 0.0352040], abs=1e-7)
    ones = smooth(torch.ones(1, 1, 256, 256))[0, 0]
    assert float(ones[0, 0]) == pytest.approx(0.3676, abs=1e-4)
    assert float(ones[0, 128]) == pytest.approx(0.6063, abs=1e-4)
    assert float(ones[1, 128]) == pytest.approx(0.8124, abs=1e-4)
    assert float(ones[128, 128]) == pytest.approx(1.0, abs=1e-6)


def test_score_is_the_top_one_percent_mean_with_int_k():
    amap = torch.rand(3, 1, 256, 256)
    flat = amap.flatten(1).sort(dim=1, descending=True).values
    torch.testing.assert_close(top_ratio_score(amap, 0.01), flat[:, :655].mean(dim=1))  # int(655.36) = 655
    torch.testing.assert_close(top_ratio_score(amap, 0.0), flat[:, 0])


@pytest.mark.parametrize("total,it,lr", [
    (10000, 0, 0.0), (10000, 1, 2.020202e-5), (10000, 99, 2e-3), (10000, 100, 2e-3), (10000, 101, 1.99999995e-3),
    (10000, 1000, 1.96354368e-3), (10000, 5000, 1.11427937e-3), (10000, 9999, 2.00000045e-4), (10000, 12000, 2e-4),
    (5000, 2500, 1.12884642e-3), (5000, 4999, 2.00000185e-4),
])
def test_warm_cosine_lr_values(total, it, lr):
    assert warm_cosine_lr(it, 2e-3, 2e-4, total, 100) == pytest.approx(lr, rel=1e-7, abs=1e-12)


def test_hard_mining_p_and_k():
    assert [hard_mining_p(0), hard_mining_p(500), hard_mining_p(1000), hard_mining_p(5000)] == pytest.approx([0, 0.45, 0.9, 0.9])
    assert int(16 * 28 * 28 * (1 - 0.9)) == 1254


# ----------------------------------------------------------------------------- loss (§6.2)
def _toy():
    en = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [1.0, -1.0]]])[None]
    de = torch.tensor([[[1.0, 1.0], [0.5, 1.0]], [[0.0, 1.0], [1.0, 0.0]]])[None].requires_grad_(True)
    return en, de


def test_hard_mining_toy_loss_and_gradient():
    en, de = _toy()
    loss = hard_mining_cosine_loss([en], [de], p=0.5, factor=0.1)
    assert float(loss.detach()) == pytest.approx(0.1982163, abs=1e-6)
    loss.backward()
    expected = torch.tensor([[[-0.0025453, 0.1527207], [-0.0101814, -0.0254535]],
                             [[0.0, -0.0254535], [-0.0025453, 0.1781742]]])[None]
    torch.testing.assert_close(de.grad, expected, atol=2e-7, rtol=0)
    en, de = _toy()  # without mining (p = 0: k = numel, nothing scaled): the two easy points x10
    hard_mining_cosine_loss([en], [de], p=0.0).backward()
    assert de.grad[0, 0, 0, 0] == pytest.approx(-0.0254535, abs=1e-6) and de.grad[0, 0, 1, 0] == pytest.approx(-0.1018138, abs=1e-6)
    assert de.grad[0, 1, 0, 0] == 0 and de.grad[0, 1, 1, 0] == pytest.approx(-0.0254535, abs=1e-6)


def test_loss_is_a_global_cosine_and_the_threshold_is_over_the_gathered_batch():
    gen = torch.Generator().manual_seed(0)
    en = [torch.randn(4, 8, 3, 3, generator=gen) for _ in range(2)]
    de = [torch.randn(4, 8, 3, 3, generator=gen, requires_grad=True) for _ in range(2)]
    loss = hard_mining_cosine_loss(en, de, p=0.9)
    ref = sum((1 - F.cosine_similarity(e.flatten(1), d.flatten(1))).mean() for e, d in zip(en, de)) / 2
    assert float(loss.detach()) == pytest.approx(float(ref), abs=1e-7)  # the value does not depend on p
    # two "ranks" holding half of the batch each, gathering the distance maps = the whole batch at once
    loss.backward()
    full = [d.grad.clone() for d in de]
    halves = []
    for part in (slice(0, 2), slice(2, 4)):
        d_part = [d.detach()[part].clone().requires_grad_(True) for d in de]
        gathered = [1 - F.cosine_similarity(e, d.detach(), dim=1).unsqueeze(1) for e, d in zip(en, de)]  # both ranks
        calls = iter(gathered)
        (hard_mining_cosine_loss([e[part] for e in en], d_part, p=0.9, gather=lambda _d: next(calls)) / 2).backward()
        halves.append([d.grad for d in d_part])
    for g in range(2):
        torch.testing.assert_close(torch.cat([halves[0][g], halves[1][g]]), full[g], atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- linear attention (§5)
def test_linear_attention_equals_the_explicit_form_and_is_equivariant():
    torch.manual_seed(0)
    attn = LinearAttention(64, 2)
    x = torch.randn(2, 11, 64)
    out = attn(x)
    q, k, v = attn.qkv(x).reshape(2, 11, 3, 2, 32).permute(2, 0, 3, 1, 4)
    a = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-2, -1)
    ref = attn.proj(((a / a.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(2, 11, 64))
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    perm = torch.randperm(11)
    torch.testing.assert_close(attn(x[:, perm]), out[:, perm], atol=1e-6, rtol=1e-5)
    with torch.no_grad():  # v constant over tokens: the output before proj is that constant
        attn.qkv.weight[128:].zero_()
        attn.qkv.bias[128:] = torch.arange(64.0)
        attn.proj.weight.copy_(torch.eye(64))
        attn.proj.bias.zero_()
    torch.testing.assert_close(attn(x), torch.arange(64.0).expand(2, 11, 64), atol=1e-5, rtol=1e-6)


def test_bottleneck_applies_its_dropout_three_times_and_none_in_eval():
    b = Bottleneck(16, 64, 0.2)
    calls = []
    b.drop.register_forward_hook(lambda *a: calls.append(1))
    b(torch.randn(2, 5, 16))
    assert len(calls) == 3
    b.eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(b(x), b.fc2(b.act(b.fc1(x))))


# ----------------------------------------------------------------------------- counts and shapes (§15)
@pytest.mark.parametrize("dim,heads,bottleneck,block,total", [
    (384, 6, 1_181_568, 1_774_464, 15_377_280), (768, 12, 4_722_432, 7_087_872, 61_425_408),
    (1024, 16, 8_393_728, 12_596_224, 109_163_520), (128, 2, 131_712, 198_272, 1_717_888),
])
def test_trainable_parameter_counts(dim, heads, bottleneck, block, total):
    with torch.device("meta"):
        b, d = Bottleneck(dim, 4 * dim), DecoderBlock(dim, heads)
    assert (count_parameters(b), count_parameters(d), count_parameters(b) + 8 * count_parameters(d)) == (bottleneck, block, total)


def test_vit_b_encoder_counts_and_token_shapes():
    with torch.device("meta"):
        vit = timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0)
        assert count_parameters(vit) == 86_582_016
        m = DinomalyModel(encoder_weights="random")  # the default ViT-B at 392, on the meta device
    assert count_parameters(m.encoder) == 86_132_736 and m.encoder.vit.pos_embed.shape == (1, 784, 768)
    assert count_parameters(m.bottleneck) + count_parameters(m.decoder) == 61_425_408
    out = m.intermediates(torch.empty(2, 3, 392, 392, device="meta"))
    assert m.target_layers == list(range(2, 10)) and len(out["layers"]) == 8
    assert all(t.shape == (2, 789, 768) for t in [*out["layers"], out["fused"], out["bottleneck"], *out["decoder"]])
    assert [tuple(t.shape) for t in out["en_groups"] + out["de_groups"]] == [(2, 768, 28, 28)] * 4


# ----------------------------------------------------------------------------- tokens, grouping
def test_encoder_from_a_meta_file_gives_the_official_tokens(tmp_path):
    """Meta's layout converts through timm's filter; the tokens are the official prepare_tokens
    ([CLS + pos0, registers, patches + scale-factor-resampled positions]) through the blocks."""
    meta = meta_layout(random_timm_state())
    torch.save(meta, tmp_path / "dinov2_vits14_reg4_pretrain.pth")
    m = tiny_model(encoder_weights=str(tmp_path / "dinov2_vits14_reg4_pretrain.pth"), arch=None)
    assert m.arch == {**TINY_ARCH, "reg_tokens": 4, "patch_size": 14, "mlp_ratio": 4.0}
    img = torch.randn(2, 3, CROP, CROP)
    layers = m.intermediates(img)["layers"]
    # the official DinoVisionTransformer.prepare_tokens on Meta's tensors
    x = F.conv2d(img, meta["patch_embed.proj.weight"], meta["patch_embed.proj.bias"], stride=14).flatten(2).transpose(1, 2)
    x = torch.cat([meta["cls_token"].expand(2, -1, -1), x], dim=1)
    grid = meta["pos_embed"][:, 1:].reshape(1, 5, 5, 128).permute(0, 3, 1, 2)
    patch_pos = F.interpolate(grid, scale_factor=(3.1 / 5, 3.1 / 5), mode="bicubic", antialias=False)
    pos = torch.cat([meta["pos_embed"][:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, 9, 128)], dim=1)
    x = x + pos
    x = torch.cat([x[:, :1], meta["register_tokens"].expand(2, -1, -1), x[:, 1:]], dim=1)
    ref = []
    for i, blk in enumerate(m.encoder.vit.blocks[:10]):
        x = blk(x)
        if i >= 2:
            ref.append(x)
    for got, want in zip(layers, ref):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


@pytest.fixture(scope="module")
def model() -> DinomalyModel:
    return tiny_model().eval()


def test_decoder_outputs_are_reversed_before_grouping(model):
    m = model
    out = m.intermediates(torch.randn(1, 3, CROP, CROP))
    x, blocks = out["bottleneck"], []
    for blk in m.decoder:
        x = blk(x)
        blocks.append(x)
    shallow_de = torch.stack(blocks[4:8]).mean(0)[:, 5:]  # blocks 7..4 reconstruct layers 2..5
    torch.testing.assert_close(out["de_groups"][0], shallow_de.permute(0, 2, 1).reshape(1, 128, 3, 3))
    shallow_en = torch.stack(out["layers"][:4]).mean(0)[:, 5:]
    torch.testing.assert_close(out["en_groups"][0], shallow_en.permute(0, 2, 1).reshape(1, 128, 3, 3))
    torch.testing.assert_close(out["fused"], torch.stack(out["layers"]).mean(0))


def test_maps_follow_the_official_chain(model):
    m = model
    img = torch.randn(2, 3, CROP, CROP)
    r = m.maps(img)
    en, de = m(img)
    m28 = [(1 - F.cosine_similarity(e, d)).unsqueeze(1) for e, d in zip(en, de)]
    full = sum(F.interpolate(a, size=CROP, mode="bilinear", align_corners=True) for a in m28) / 2
    torch.testing.assert_close(r["map_full"], full)
    torch.testing.assert_close(r["map_small"], F.interpolate(full, size=32, mode="bilinear", align_corners=False))
    torch.testing.assert_close(r["map_smooth"], smooth(r["map_small"]))
    torch.testing.assert_close(r["score"], r["map_smooth"].flatten(1).topk(10).values.mean(1))  # int(1024 * 0.01)


# ----------------------------------------------------------------------------- optimiser (§7)
def test_stable_adamw_first_step_and_update_clipping():
    gen = torch.Generator().manual_seed(0)
    p0, g = torch.randn(50, generator=gen), torch.randn(50, generator=gen) * 1e-3
    p = torch.nn.Parameter(p0.clone())
    opt = StableAdamW([p], lr=2e-3, weight_decay=1e-4, eps=1e-10)
    p.grad = g.clone()
    opt.step()
    expected = p0 - 2e-3 * 1e-4 * p0 - 2e-3 * g / (g.abs() + 1e-10)
    torch.testing.assert_close(p.data, expected, atol=1e-7, rtol=1e-6)
    # step 2 with a 100x larger gradient: RMS(g / denom) > 1 divides the step (AdamW would not)
    q = torch.nn.Parameter(p.data.clone())
    ref = torch.optim.AdamW([q], lr=2e-3, weight_decay=1e-4, eps=1e-10, amsgrad=True)
    ref.state[q] = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
    ref.state[q]["step"] = torch.tensor(1.0)
    g2 = g * 100
    before = p.data.clone()
    p.grad, q.grad = g2.clone(), g2.clone()
    st = {k: v.clone() for k, v in opt.state[p].items() if torch.is_tensor(v)}
    opt.step()
    ref.step()
    m = 0.9 * st["exp_avg"] + 0.1 * g2
    v = torch.maximum(st["max_exp_avg_sq"], 0.999 * st["exp_avg_sq"] + 0.001 * g2**2)
    denom = v.sqrt() / math.sqrt(1 - 0.999**2) + 1e-10
    s = max(1.0, float((g2 / denom).pow(2).mean().sqrt()))
    assert s > 1.2  # ~sqrt(2): the clipping acts
    want = before * (1 - 2e-7) - 2e-3 / (1 - 0.9**2) / s * m / denom
    torch.testing.assert_close(p.data, want, atol=1e-7, rtol=1e-6)
    # with s = 1 it is torch's AdamW(amsgrad=True): the clipping is the only difference
    d_ours, d_adamw = p.data - before * (1 - 2e-7), q.data - before * (1 - 2e-7)
    torch.testing.assert_close(d_ours * s, d_adamw, atol=1e-7, rtol=1e-5)


# ----------------------------------------------------------------------------- official model.pth (§13)
def test_official_checkpoint_loads_safely_and_scores_as_its_source(tmp_path):
    """A ViTill.state_dict() in the official layout (encoder.* in Meta's layout at the native
    size, bottleneck.0.*, decoder.i.*): the architecture comes off its shapes (a width-128 file
    gives a width-128 model) and the scores equal those of the module it was written from."""
    timm_sd = random_timm_state(1)
    torch.save(timm_sd, tmp_path / "encoder_timm.pth")  # a timm-layout encoder file
    source = tiny_model(encoder_weights=str(tmp_path / "encoder_timm.pth"), arch=None).eval()
    with torch.no_grad():  # non-zero biases and norms: a layout error cannot hide
        for prm in [*source.bottleneck.parameters(), *source.decoder.parameters()]:
            prm.add_(torch.randn_like(prm) * 0.02)
    official = {f"encoder.{k}": v for k, v in meta_layout(timm_sd, seed=3).items()}
    official.update(official_state_dict(source))
    assert "bottleneck.0.fc1.bias" in official and "decoder.7.attn.qkv.weight" in official
    torch.save(official, tmp_path / "model.pth")
    loaded = DinomalyModel(encoder="vit_base_patch14_reg4_dinov2", encoder_weights="hub", crop=CROP, map_size=32,
                           official_checkpoint=str(tmp_path / "model.pth")).eval()  # hub never touched
    assert loaded.arch["embed_dim"] == 128 and loaded.arch["depth"] == 12 and len(loaded.decoder) == 8
    img = torch.randn(3, 3, CROP, CROP)
    a, b = source.maps(img), loaded.maps(img)
    torch.testing.assert_close(b["score"], a["score"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b["map_smooth"], a["map_smooth"], atol=1e-5, rtol=1e-5)


def test_bad_files_fail_clearly(tmp_path):
    torch.save({"encoder.cls_token": torch.zeros(1, 1, 8), "head.weight": torch.zeros(2)}, tmp_path / "bad.pth")
    with pytest.raises(WeightsError, match="not a ViTill state dict"):
        DinomalyModel(official_checkpoint=str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsError, match="does not exist"):
        build_encoder("vit_small_patch14_reg4_dinov2", str(tmp_path / "missing.pth"))
    torch.save({"a": torch.zeros(1), "f": torch.nn.Linear(1, 1)}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match="weights_only"):
        build_encoder("vit_small_patch14_reg4_dinov2", str(tmp_path / "pickled.pth"))


def test_offline_hub_fails_with_one_line_that_says_what_to_pass(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        build_encoder("vit_small_patch14_reg4_dinov2", "hub")
    msg = str(err.value)
    assert "\n" not in msg and "method.model.encoder_weights=" in msg and "dinov2_vits14_reg4_pretrain.pth" in msg
