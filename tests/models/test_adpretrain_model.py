"""ADPretrain torch pieces: spec section 10 vectors, file loading, DINOv2 shapes on random weights."""

import math

import pytest
import torch

from iad_lightning.errors import ConfigError, WeightsError
from iad_lightning.models.adpretrain import (
    LevelBackbone,
    MultiLayerAttention,
    MultiScaleProjector,
    ResidualProjectorExtractor,
    SqueezeExcite,
    angle_loss,
    dinov2_interpolate_pos_embed,
    load_projector_file,
    match_residual,
    norm_loss,
    patchify_mask,
    projector_file,
    pseudo_huber_norm,
)
from iad_lightning.models.patchcore import PatchEmbedding


def test_projector_shapes_param_count_and_bf16():
    proj = MultiLayerAttention(768)
    assert sum(p.numel() for p in proj.parameters()) == 10_431_168
    assert proj.x_ref.shape == (1, 2048, 768) and proj.ref_proj.project.weight.shape == (768, 768, 1)
    x = torch.randn(2, 768, 16, 16)
    assert proj(x).shape == (2, 768, 16, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(proj(x)).all()
    assert [SqueezeExcite(4 * c).fc1.out_features for c in (768, 1024, 1280)] == [192, 256, 320]
    assert not any("norm" in k.lower() for k in proj.state_dict())  # no LayerNorm anywhere
    layer, tokens = proj.layers[0], x.flatten(2).transpose(1, 2)
    refs = proj.ref_proj(proj.x_ref)
    reference = layer.cross_attn(tokens, refs.expand(2, -1, -1), refs.expand(2, -1, -1), need_weights=False)[0]
    torch.testing.assert_close(layer.attend(tokens, refs), reference, rtol=1e-4, atol=1e-5)


def test_residual_is_zero_for_self_and_minus_f_for_2f():
    f = torch.randn(1, 5, 8)
    other = torch.randn(20, 8)
    assert torch.equal(match_residual(f, torch.cat([other, f[0]])), torch.zeros_like(f))
    torch.testing.assert_close(match_residual(f, 2 * f[0]), -f)  # cosine picks 2f_i, raw residual -f_i
    per_image = match_residual(f.expand(3, -1, -1), torch.stack([f[0], 2 * f[0], f[0]]))
    torch.testing.assert_close(per_image[1], -f[0])
    assert torch.equal(per_image[0], torch.zeros_like(f[0]))


def test_patchify_threshold_32_33():
    mask = torch.zeros(2, 1, 28, 28)
    patch33, patch32 = torch.zeros(196), torch.zeros(196)
    patch33[:33], patch32[:32] = 1, 1
    mask[0, 0, :14, :14] = patch33[torch.randperm(196)].view(14, 14)
    mask[1, 0, :14, :14] = patch32.view(14, 14)
    labels = patchify_mask(mask, (2, 2))
    assert labels[0].tolist() == [True, False, False, False]
    assert labels[1].tolist() == [False] * 4


def test_angle_loss_separated_lower_and_no_negatives():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(64) < 16
    e = torch.randn(64, 16, generator=g) * 0.1
    e[labels] += 3.0  # abnormal cluster far from the normal one
    sep = angle_loss(e, e.clone(), labels)
    shuffled = angle_loss(e, e.clone(), labels[torch.randperm(64, generator=g)])
    assert sep < shuffled
    assert angle_loss(e, e, torch.zeros(64, dtype=torch.bool)) == float("-inf")
    # chunked + checkpointed equals one block, gradients flow
    e.requires_grad_(True)
    a = angle_loss(e, e * 1.1, labels, center=torch.ones(16), chunk_elems=128 * 7)
    b = angle_loss(e, e * 1.1, labels, center=torch.ones(16), chunk_elems=1 << 20)
    torch.testing.assert_close(a, b)
    a.backward()
    assert torch.isfinite(e.grad).all() and e.grad.abs().sum() > 0


def _with_norm(a: float, dim: int = 4) -> torch.Tensor:
    """A vector whose pseudo-Huber norm sqrt(||e|| + 1) - 1 is ``a``."""
    v = torch.zeros(dim, dtype=torch.float64)
    v[0] = (a + 1) ** 2 - 1
    return v


def test_norm_loss_band_and_far_abnormal():
    inside = torch.stack([_with_norm(0.3985)] * 6)
    assert math.isclose(float(pseudo_huber_norm(inside)[0]), 0.3985, rel_tol=1e-6)
    none = torch.zeros(6, dtype=torch.bool)
    assert float(norm_loss(inside, none)) == 0.0  # no abnormal: r_max = 0.4, band [0.396, 0.4]
    far = torch.cat([inside, torch.stack([_with_norm(2.0)])])  # r_max = min(0.9 * 2, 0.4) = 0.4
    assert float(norm_loss(far, torch.tensor([False] * 6 + [True]))) == 0.0  # 2.0 >= 0.4 + 0.75
    near = torch.cat([inside, torch.stack([_with_norm(0.6)])])  # below 1.15: pushed out
    assert float(norm_loss(near, torch.tensor([False] * 6 + [True]))) > 0.0
    outside = torch.stack([_with_norm(0.2)] * 3)  # normal below r_min: pulled to the shell
    assert float(norm_loss(outside, torch.zeros(3, dtype=torch.bool))) > 0.0


def test_released_checkpoint_layout_loads_and_backbone_is_checked(tmp_path):
    ref = MultiScaleProjector([24, 40, 112, 320], 16, num_ref_tokens=32)
    released = tmp_path / "checkpoints_pro_angle.pth"
    torch.save({"projectors": ref.state_dict(), "img_auc": 0.9, "pix_auc": 0.9, "pix_pro": 0.8}, released)
    with pytest.warns(UserWarning, match="names no backbone"):
        proj, meta = load_projector_file(released, backbone="lite0")
    assert proj.channels == [24, 40, 112, 320] and proj.num_heads == [12, 10, 16, 16]
    for k, v in ref.state_dict().items():
        assert torch.equal(proj.state_dict()[k], v)
    ours = tmp_path / "projector.pt"

    class _Bb:  # what projector_file reads from a backbone
        name, levels = "tf_efficientnet_lite0", [1, 2, 3, 4]

    torch.save(projector_file(ref, _Bb(), 64, [torch.zeros(c) for c in ref.channels]), ours)
    _, meta = load_projector_file(ours, backbone="lite0")
    assert meta["backbone"] == "tf_efficientnet_lite0" and meta["image_size"] == 64
    with pytest.raises(ConfigError, match="method.backbone.name=tf_efficientnet_lite0"):
        load_projector_file(ours, backbone="dinov2-base")
    with pytest.raises(WeightsError, match="does not exist"):
        load_projector_file(tmp_path / "missing.pt")


def test_dinov2_pos_embed_rule():
    table = torch.randn(1, 1 + 37 * 37, 8)
    out = dinov2_interpolate_pos_embed(table, (16, 16))
    assert out.shape == (1, 257, 8) and torch.equal(out[:, 0], table[:, 0])
    assert dinov2_interpolate_pos_embed(table, (37, 37)) is table
    from timm.layers import resample_abs_pos_embed

    timm_way = resample_abs_pos_embed(table, new_size=(16, 16), old_size=(37, 37), num_prefix_tokens=1)
    assert 0 < float((timm_way - out).abs().max())  # antialias + size, not DINOv2's offset rule


@pytest.fixture(scope="module")
def dinov2():
    return LevelBackbone("dinov2-base", weights="none")


def test_dinov2_base_levels_and_patchcore_embedding(dinov2):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    feats = dinov2(x)
    assert [tuple(f.shape) for f in feats] == [(1, 768, 16, 16)] * 4
    assert dinov2.mean == (0.485, 0.456, 0.406)
    proj = MultiScaleProjector([768] * 4, num_ref_tokens=64)
    extractor = ResidualProjectorExtractor(dinov2, proj, levels=(1, 2, 3))
    extractor.set_bank(torch.randn(1, 3, 224, 224))
    assert extractor.bank_l2.shape == (256, 768)
    out = extractor(x)
    assert [tuple(f.shape) for f in out] == [(1, 768, 16, 16)] * 3
    embedding, grid = PatchEmbedding(1024, 1024)(out)
    assert embedding.reshape(-1, 1024).shape == (256, 1024) and grid == (16, 16)
    # the bank reloads at its size into a fresh extractor
    fresh = ResidualProjectorExtractor(dinov2, proj, levels=(1, 2, 3))
    fresh.load_state_dict(extractor.state_dict())
    assert torch.equal(fresh.bank_l4, extractor.bank_l4)


def test_lite0_stand_in_levels():
    bb = LevelBackbone("lite0", weights="lite0", layers=[2, 3])  # a method's extra keys are ignored
    assert bb.channels == [24, 40, 112, 320]
    assert [tuple(f.shape[-2:]) for f in bb(torch.randn(1, 3, 64, 64))] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_pretraining_loss_sets_missing_negatives_to_zero_and_trains_only_the_projector():
    from iad_lightning.models.adpretrain import ADPretrainModel

    torch.manual_seed(0)
    model = ADPretrainModel(LevelBackbone("lite0", weights="lite0"), num_ref_tokens=8)
    views = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    banks = [b.expand(2, -1, -1) for b in
             [f.permute(0, 2, 3, 1).reshape(1, -1, f.shape[1]) for f in model.backbone(torch.randn(1, 3, 32, 32))]]
    normal = torch.zeros(2, 1, 32, 32)
    loss, parts = model.loss(*views, normal, banks)
    assert parts["angle"] == 0.0 and torch.isfinite(loss)  # no abnormal patch: angle terms -inf -> 0
    mask = normal.clone()
    mask[0, :, :16, :16] = 1
    loss, parts = model.loss(*views, mask, banks)
    loss.backward()
    assert parts["angle"] != 0.0 and torch.isfinite(loss)
    assert all(p.grad is not None for p in model.projector.parameters())
    assert not any(p.requires_grad for p in model.backbone.parameters())
