"""ADPretrain torch pieces: spec section 10 vectors, file loading, DINOv2 shapes on random weights."""

import math

import numpy as np
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


class _Pickled:
    def __reduce__(self):
        return (print, ("code ran",))


def test_released_checkpoint_layout_loads_and_backbone_is_checked(tmp_path):
    ref = MultiScaleProjector([24, 40, 112, 320], 16, num_ref_tokens=32)
    released = tmp_path / "checkpoints_pro_angle.pth"
    # as the authors' main.py writes it: sklearn / their AUPRO give numpy.float64 metrics
    torch.save({"projectors": ref.state_dict(), "img_auc": np.float64(0.9), "pix_auc": np.float64(0.91),
                "pix_pro": np.float64(0.8)}, released)
    with pytest.warns(UserWarning, match="names no backbone"):
        proj, meta = load_projector_file(released, backbone="lite0")
    assert meta["pix_auc"] == 0.91 and type(meta["pix_auc"]) is float
    evil = tmp_path / "evil.pth"  # anything beyond tensors, containers and numpy scalars is refused
    torch.save({"projectors": ref.state_dict(), "img_auc": _Pickled()}, evil)
    with pytest.raises(WeightsError, match="could not be loaded safely"):
        load_projector_file(evil)
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
    # every level on the grid of a patch-14 ViT: DINOv2-B's 256 tokens per level at 224
    assert [tuple(f.shape[-2:]) for f in bb(torch.randn(1, 3, 224, 224))] == [(16, 16)] * 4
    assert [tuple(f.shape[-2:]) for f in bb(torch.randn(1, 3, 56, 56))] == [(4, 4)] * 4
    assert bb.reductions == [14] * 4


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


def _lite0_extractor(n_ref=16):
    torch.manual_seed(0)
    proj = MultiScaleProjector([24, 40, 112, 320], 16, num_ref_tokens=n_ref)
    return ResidualProjectorExtractor(LevelBackbone("lite0", weights="lite0"), proj, levels=(0, 1, 2, 3))


def test_each_image_uses_its_own_class_bank_and_unlabelled_images_all_banks():
    ext = _lite0_extractor()
    refs = {"a": torch.randn(2, 3, 56, 56), "b": torch.randn(3, 3, 56, 56) + 1}
    images = torch.randn(4, 3, 56, 56)
    # interleaved categories: the banks are grouped by class whatever the order of the images
    ext.set_bank(torch.cat([refs["b"][:1], refs["a"], refs["b"][1:]]), categories=["b", "a", "a", "b", "b"])
    assert ext.bank_categories == ["b", "a"] and ext.bank_offsets.tolist() == [0, 48, 80]
    alone = {}
    for cat, r in refs.items():
        one = _lite0_extractor()
        one.set_bank(r)
        alone[cat] = one(images)
    cats = ["a", "b", "b", "a"]
    out = ext(images, cats)
    for i, cat in enumerate(cats):
        for f, g in zip(out, alone[cat]):
            torch.testing.assert_close(f[i], g[i])
    merged = _lite0_extractor()
    merged.set_bank(torch.cat([refs["b"][:1], refs["a"], refs["b"][1:]]))
    for f, g in zip(ext(images), merged(images)):  # no names: the banks of all classes together
        torch.testing.assert_close(f, g)
    with pytest.warns(UserWarning, match="no reference images of category 'c'"):
        unknown = ext(images, ["c"] * 4)
    for f, g in zip(unknown, merged(images)):
        torch.testing.assert_close(f, g)
    with ext.batch_categories(cats):  # the context the methods use (AnomalyModule.category_scope)
        for f, g in zip(ext(images), out):
            assert torch.equal(f, g)
    fresh = _lite0_extractor()
    fresh.load_state_dict(ext.state_dict())
    assert fresh.bank_categories == ["b", "a"] and torch.equal(fresh(images, cats)[2], out[2])
    legacy = {k: v for k, v in ext.state_dict().items() if k not in ("bank_offsets", "bank_names")}
    old = _lite0_extractor()
    old.load_state_dict(legacy)  # a checkpoint from before the per-class banks: one bank
    for f, g in zip(old(images, cats), merged(images)):
        torch.testing.assert_close(f, g)


def test_category_scope_reaches_the_extractor_inside_a_method():
    from iad_lightning.methods.base import AnomalyModule

    class _M(AnomalyModule):
        def __init__(self, ext):
            super().__init__()
            self.fe = ext

    ext = _lite0_extractor()
    ext.set_bank(torch.randn(2, 3, 56, 56), categories=["a", "b"])
    m, images = _M(ext), torch.randn(2, 3, 56, 56)
    with m.category_scope({"category": ["b", "a"]}):
        inside = ext(images)
    assert ext._categories is None  # restored after the block
    assert torch.equal(inside[0], ext(images, ["b", "a"])[0])
    assert not torch.equal(inside[0], ext(images)[0])


def test_attention_is_fused_and_equals_nn_multihead_attention_with_gradients():
    torch.manual_seed(0)
    layer = MultiLayerAttention(64, 16, num_ref_tokens=300)
    x = torch.randn(3, 64, 7, 9, requires_grad=True)
    out = layer(x)
    out.square().sum().backward()
    g_ours = [p.grad.clone() for p in layer.parameters()] + [x.grad.clone()]
    layer.zero_grad()
    x2 = x.detach().clone().requires_grad_(True)
    tokens = x2.flatten(2).transpose(1, 2)
    refs = layer.ref_proj(layer.x_ref).expand(3, -1, -1)
    att = layer.layers[0]
    x1 = tokens - att.cross_attn(tokens, refs, refs, need_weights=False)[0]
    ref = (att.mlp(x1) + x1).transpose(1, 2).reshape(3, 64, 7, 9)
    ref.square().sum().backward()
    g_ref = [p.grad.clone() for p in layer.parameters()] + [x2.grad.clone()]
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_param_dtype_bf16_casts_the_projector_as_the_authors_and_trains():
    import functools

    from iad_lightning.methods.adpretrain import ADPretrain
    from iad_lightning.models.adpretrain import ADPretrainModel

    lite0 = {"name": "lite0", "weights": "lite0"}
    part = functools.partial(ADPretrainModel, num_ref_tokens=8)
    assert all(p.dtype == torch.float32 for p in ADPretrain(lite0, part).model.projector.parameters())
    with pytest.raises(ConfigError, match="param_dtype='fp16'"):
        ADPretrain(lite0, part, param_dtype="fp16")
    method = ADPretrain(lite0, part, param_dtype="bf16")
    model = method.model
    assert all(p.dtype == torch.bfloat16 for p in model.projector.parameters())
    assert model.center_l1.dtype == torch.float32  # centres stay fp32
    torch.manual_seed(0)
    views = torch.randn(2, 3, 28, 28), torch.randn(2, 3, 28, 28)
    banks = [f.permute(0, 2, 3, 1).reshape(1, -1, f.shape[1]).expand(2, -1, -1)
             for f in model.backbone(torch.randn(1, 3, 28, 28))]
    mask = torch.zeros(2, 1, 28, 28)
    mask[0, :, :14, :14] = 1
    loss, _ = model.loss(*views, mask, banks)
    loss.backward()
    assert torch.isfinite(loss) and model.projector.l1_proj.x_ref.grad.dtype == torch.bfloat16
    opt = method.configure_optimizers()["optimizer"]
    opt.step()  # Adam on bf16 parameters, as the authors'
    # the authors' skip rule: a batch without an abnormal *label* is skipped, whatever its masks say
    skipped = method.skipped_batches
    assert method.training_step({"mask": torch.ones(2, 1, 28, 28), "label": torch.tensor([0, 0])}, 0) is None
    assert method.skipped_batches == skipped + 1
