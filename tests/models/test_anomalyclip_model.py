"""AnomalyCLIP torch model: spec §9 vectors on random weights (ViT-L on the meta device, a tiny
CLIP in the OpenAI key layout for numerics), weights loading, official prompt loading."""

import pickle
import sys
from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F

from iad_lightning.errors import ConfigError, WeightsError
from iad_lightning.models.anomalyclip import (
    AnomalyCLIPModel,
    anomaly_map,
    arch_from_state_dict,
    dice_loss,
    focal_loss,
    load_official_prompts,
    local_loss,
    official_prompt_state,
    read_state_dict,
    tokenize_prompts,
    vv_attention,
)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_clip import TINY_ARCH, tiny_state_dict, write_tiny_clip, write_tiny_torchscript  # noqa: E402


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    return write_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny.pt")


@pytest.fixture(scope="module")
def tiny(tiny_file) -> AnomalyCLIPModel:
    # 64 px on a 32 px-native CLIP: the 4 x 4 positional grid is resized to 8 x 8
    return AnomalyCLIPModel(clip_weights=str(tiny_file), image_size=64, features_list=[4])


@pytest.fixture(scope="module")
def native(tiny_file) -> AnomalyCLIPModel:
    # the native 32 px (no positional resize), DPAM from block 2, three local layers
    return AnomalyCLIPModel(clip_weights=str(tiny_file), image_size=32, features_list=[2, 3, 4], dpam_start=2)


def test_vit_l_518_shapes_and_trainable_parameters_on_meta():
    with torch.device("meta"):
        m = AnomalyCLIPModel("ViT-L-14-336-quickgelu", clip_weights="random", image_size=518)
    assert m.depth == 24 and m.dpam_start == 6 and m.grid == 37  # DPAM in blocks 6..24 (last 19)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 43_008
    pl = m.prompt_learner
    assert pl.ctx_normal.shape == pl.ctx_abnormal.shape == (12, 768)
    assert [tuple(p.shape) for p in pl.compound] == [(4, 768)] * 8
    assert isinstance(m.clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU)
    x = torch.empty(2, 3, 518, 518, device="meta")
    assert m.clip.visual.conv1(x).shape == (2, 1024, 37, 37)
    assert m.embed(x).shape == (2, 1370, 1024)
    assert m.positional_embedding().shape == (1370, 1024)
    glob, local, x_ori = m.encode_image(x)
    assert glob.shape == (2, 768) and [f.shape for f in local] == [(2, 1369, 768)] and x_ori.shape == (2, 1370, 1024)
    assert pl(m.clip.token_embedding).shape == (2, 77, 768)
    text = m.text_features()
    assert text.shape == (2, 768)
    logits, maps = m(x, text)
    assert logits.shape == (2, 2) and [s.shape for s in maps] == [(2, 2, 518, 518)]


def test_vit_b_proportional_dpam_start():
    with torch.device("meta"):
        m = AnomalyCLIPModel("ViT-B-16-quickgelu", clip_weights="random", image_size=224, features_list=[12])
    assert (m.depth, m.dpam_start, m.grid) == (12, 3, 14)  # blocks 3..12
    assert sum(p.numel() for p in m.parameters() if p.requires_grad) == (24 + 32) * 512
    with pytest.raises(ConfigError, match="multiple of the patch size 16"):
        with torch.device("meta"):
            AnomalyCLIPModel("ViT-B-16-quickgelu", clip_weights="random", image_size=518)


def test_tokenised_prompts_and_eot_indices():
    tok = tokenize_prompts(12)
    assert tok.shape == (2, 77)
    assert tok[0, :16].tolist() == [49406] + [343] * 12 + [14115, 269, 49407]
    assert tok[1, :17].tolist() == [49406] + [343] * 12 + [13568, 14115, 269, 49407]
    assert tok.argmax(-1).tolist() == [15, 16] and tok[0, 16:].eq(0).all() and tok[1, 17:].eq(0).all()


def test_text_features_unit_norm_and_compound_prompts_reach_layers_1_to_8(tiny):
    text = tiny.text_features()
    assert text.shape == (2, 32) and torch.allclose(text.norm(dim=-1), torch.ones(2))
    pl = tiny.prompt_learner
    grads = torch.autograd.grad(text.sum(), [pl.ctx_normal, pl.ctx_abnormal, *pl.compound])
    assert all(g.abs().sum() > 0 for g in grads)
    # without injection the text tower is open_clip's encode_text on the prompt embeddings
    clip = tiny.clip
    x = pl(clip.token_embedding) + clip.positional_embedding
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))
    plain = F.normalize(x[torch.arange(2), pl.tokens.argmax(-1)] @ clip.text_projection, dim=-1)
    assert not torch.allclose(plain, text, atol=1e-4)


def test_vv_attention_equals_hand_written_per_head_path(tiny):
    block = tiny.clip.visual.transformer.resblocks[1]
    x = torch.randn(2, 5, 128)
    c, heads = 128, block.attn.num_heads
    assert heads == 2
    h = F.layer_norm(x, (c,), block.ln_1.weight, block.ln_1.bias, block.ln_1.eps)
    v = h @ block.attn.in_proj_weight[2 * c:].t() + block.attn.in_proj_bias[2 * c:]
    outs = []
    for i in range(heads):
        vi = v[..., i * 64:(i + 1) * 64]
        logits = vi @ vi.transpose(1, 2) * 64**-0.5
        assert torch.allclose(logits, logits.transpose(1, 2))  # symmetric before the softmax
        attn = logits.softmax(-1)
        assert torch.allclose(attn.sum(-1), torch.ones(2, 5))
        outs.append(attn @ vi)
    expected = torch.cat(outs, -1) @ block.attn.out_proj.weight.t() + block.attn.out_proj.bias
    torch.testing.assert_close(vv_attention(block, x), expected, rtol=1e-5, atol=1e-6)


def test_x_ori_is_open_clips_forward_with_and_without_dpam(native):
    m = native
    images = torch.randn(2, 3, 32, 32)
    v = m.clip.visual
    with torch.no_grad():
        reference = v.transformer(v._embeds(images))  # open_clip's own residual stream
        g_on, local_on, ori_on = m.encode_image(images, dpam=True)
        g_off, local_off, ori_off = m.encode_image(images, dpam=False)
        image_features = m.clip.encode_image(images)
    assert torch.equal(ori_on, ori_off) and local_off == []
    torch.testing.assert_close(ori_on, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_on, reference[:, 0] @ v.proj)  # global CLS without ln_post (official)
    torch.testing.assert_close(v.ln_post(ori_on[:, 0]) @ v.proj, image_features, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(g_on, image_features, atol=1e-3)


def test_dpam_closed_form_and_multi_layer_maps_differ(native, tiny_file):
    m = native
    images = torch.randn(1, 3, 32, 32)
    v = m.clip.visual
    with torch.no_grad():
        _, local, _ = m.encode_image(images)
        x = m.embed(images)
        x = v.transformer.resblocks[0](x)
        x5, x_vv, expected = x, None, []
        for block in v.transformer.resblocks[1:]:  # x_vv(L) = x_1 + sum_l VV_l(ln_1(x_ori(l-1)))
            x_vv = (x5 if x_vv is None else x_vv) + vv_attention(block, x)
            x = block(x)
            expected.append((v.ln_post(x_vv) @ v.proj)[:, 1:])
        for got, want in zip(local, expected):
            torch.testing.assert_close(got, want)
        text = m.text_features()
        _, maps = m(images, text)
    assert len(maps) == 3
    for a in range(3):
        for b in range(a + 1, 3):
            assert (maps[a] - maps[b]).abs().max() > 1e-3  # no aliasing: a different map per layer
    for s in maps:
        assert s.shape == (1, 2, 32, 32) and torch.allclose(s.sum(1), torch.ones(1, 32, 32))
    amap = anomaly_map(maps, sigma=4.0)
    assert amap.shape == (1, 1, 32, 32)
    with pytest.raises(ConfigError, match="features_list"):
        AnomalyCLIPModel(clip_weights=str(tiny_file), image_size=32, features_list=[1], dpam_start=2)


def test_similarity_probabilities_and_map_range(tiny):
    images = torch.randn(3, 3, 64, 64)
    with torch.no_grad():
        logits, maps = tiny(images, tiny.text_features())
    assert logits.shape == (3, 2) and maps[0].shape == (3, 2, 64, 64)
    amap = anomaly_map(maps)
    assert amap.shape == (3, 1, 64, 64) and amap.min() >= 0 and amap.max() <= 1


def test_positional_embedding_resize_is_bilinear_without_antialias(tiny):
    pos = tiny.clip.visual.positional_embedding
    grid = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    want = F.interpolate(grid, size=(8, 8), mode="bilinear", align_corners=False)
    got = tiny.positional_embedding()
    assert torch.equal(got[0], pos[0])
    torch.testing.assert_close(got[1:], want.permute(0, 2, 3, 1).reshape(64, -1))
    bicubic = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    assert not torch.allclose(got[1:], bicubic.permute(0, 2, 3, 1).reshape(64, -1))


def test_losses_vectors():
    gt = (torch.rand(2, 16, 16) > 0.5).float()
    perfect = torch.stack([1 - gt, gt], 1)
    assert focal_loss(perfect, gt).abs() < 1e-6
    ones, zeros = torch.ones(2, 16, 16), torch.zeros(2, 16, 16)
    assert dice_loss(ones, ones) == 0 and dice_loss(zeros, zeros) == 0
    p = torch.rand(2, 16, 16)
    probs = torch.stack([1 - p, p], 1)
    pt = torch.where(gt > 0, p * (1 - 1e-5) + (1 - p) * 1e-5, (1 - p) * (1 - 1e-5) + p * 1e-5) + 1e-5
    torch.testing.assert_close(focal_loss(probs, gt), (-(1 - pt) ** 2 * pt.log()).mean())
    # [24] with lambda 4 == the official 4 aliased copies of layer 24 with lambda 1
    torch.testing.assert_close(local_loss([probs], gt, 4.0), local_loss([probs] * 4, gt, 1.0))
    expected = focal_loss(probs, gt) + dice_loss(p, gt) + dice_loss(1 - p, 1 - gt)
    torch.testing.assert_close(local_loss([probs], gt, 1.0), expected)


def test_openai_layout_file_torchscript_and_arch_from_shapes(tmp_path, tiny_file, tiny):
    sd = tiny_state_dict()
    assert arch_from_state_dict(read_state_dict(tiny_file)) == TINY_ARCH
    ts = write_tiny_torchscript(tmp_path / "tiny_ts.pt")
    m = AnomalyCLIPModel(clip_weights=str(ts), image_size=64, features_list=[4])
    assert m.arch == TINY_ARCH
    for key, value in m.clip.state_dict().items():
        if key != "attn_mask":
            assert torch.equal(value, sd[key].float()), key
    wrapped = tmp_path / "open_clip_ckpt.pt"  # an open_clip training checkpoint: wrapped, module. prefix
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v.float() for k, v in sd.items()}}, wrapped)
    assert torch.equal(read_state_dict(wrapped)["visual.proj"], sd["visual.proj"].float())


def test_unsafe_missing_and_offline_weights_fail_clearly(tmp_path):
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"visual.proj": object()}))
    with pytest.raises(WeightsError, match="weights_only"):
        read_state_dict(evil)
    with pytest.raises(WeightsError, match="does not exist"):
        read_state_dict(tmp_path / "nowhere.pt")
    with pytest.raises(WeightsError, match="method.model.clip_weights="):  # HF_HUB_OFFLINE=1 (conftest)
        AnomalyCLIPModel("ViT-B-16-quickgelu", clip_weights="openai", image_size=224, features_list=[12])


def test_official_prompt_checkpoint_maps_keys_and_ignores_dead_projections(tmp_path, tiny, native):
    src, dst = tiny, native  # same CLIP, independently initialised prompts
    saved = {k: v.clone() for k, v in dst.prompt_learner.state_dict().items()}
    official = official_prompt_state(src.prompt_learner)
    official["token_prefix_pos"] = torch.randn(1, 1, 1, 64)  # derived buffers: recomputed by us
    path = tmp_path / "epoch_15.pth"
    torch.save({"prompt_learner": official, "epoch": 15}, path)
    assert not torch.allclose(src.text_features(), dst.text_features())
    ignored = load_official_prompts(dst.prompt_learner, path)
    assert sum(k.startswith("compound_prompt_projections.") for k in ignored) == 16
    torch.testing.assert_close(dst.text_features(), src.text_features())
    wide = {k: (v.reshape(*v.shape[:-1], 64)[..., :1].expand(*v.shape[:-1], 768).clone()
                if k.startswith(("ctx", "compound_prompts_text")) else v) for k, v in official.items()}
    torch.save({"prompt_learner": wide}, path)
    with pytest.raises(WeightsError, match="ViT-L/14 prompts are 768 wide"):
        load_official_prompts(dst.prompt_learner, path)
    torch.save({"state_dict": {}}, path)
    with pytest.raises(WeightsError, match="no top-level 'prompt_learner'"):
        load_official_prompts(dst.prompt_learner, path)
    dst.prompt_learner.load_state_dict(saved)


def test_fp16_prompts_round_the_compound_prompts_as_numpy_float16(tiny):
    import numpy as np

    pl = tiny.prompt_learner
    saved = [p.detach().clone() for p in pl.compound]
    try:
        assert tiny.fp16_prompts  # the default: the official .half() of the compound prompts
        rounded = tiny.text_features()
        with torch.no_grad():  # prompts already on the fp16 grid (IEEE round-to-nearest-even, as numpy):
            for p in pl.compound:  # rounding is then a no-op, on any device
                p.copy_(torch.from_numpy(p.numpy().astype(np.float16).astype(np.float32)))
        tiny.fp16_prompts = False
        exact = tiny.text_features()
        torch.testing.assert_close(rounded, exact, atol=0, rtol=0)
        with torch.no_grad():
            for p, s in zip(pl.compound, saved):
                p.copy_(s)
        assert not torch.equal(tiny.text_features(), rounded)  # full precision differs from the rounded prompts
        tiny.fp16_prompts = True
        torch.testing.assert_close(tiny.text_features(), rounded, atol=0, rtol=0)
        grads = torch.autograd.grad(tiny.text_features().sum(), list(pl.compound))  # still trainable
        assert all(g.abs().sum() > 0 for g in grads)
    finally:
        tiny.fp16_prompts = True
        with torch.no_grad():
            for p, s in zip(pl.compound, saved):
                p.copy_(s)


def test_fused_block_forward_equals_open_clips_block_and_the_vv_path(native):
    """block_forward shares ln_1 and the qkv projection between the original stream and the DPAM
    V-V path: the same values as open_clip's own block forward and vv_attention, also on an input
    that is not CLIP's (large norms), and for a block that cannot be fused (the fallback)."""
    from iad_lightning.models.anomalyclip import _fusable, block_forward

    block = native.clip.visual.transformer.resblocks[2]
    assert _fusable(block)
    x = torch.randn(3, 17, 128) * torch.tensor([0.1, 1.0, 30.0]).view(3, 1, 1)
    with torch.no_grad():
        out, vv = block_forward(block, x, with_vv=True)
        plain, none = block_forward(block, x, with_vv=False)
        torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(vv, vv_attention(block, x), rtol=1e-5, atol=1e-5)
        assert none is None and torch.equal(plain, out)  # the original stream does not depend on DPAM

        class Wrapped(torch.nn.Module):  # not an open_clip block: open_clip's forward + vv_attention
            def __init__(self, inner):
                super().__init__()
                self.inner, self.ln_1, self.attn, self.ls_1 = inner, inner.ln_1, inner.attn, inner.ls_1

            def forward(self, x):
                return self.inner(x)

        other = Wrapped(block)
        assert not _fusable(other)
        out2, vv2 = block_forward(other, x, with_vv=True)
    torch.testing.assert_close(out2, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(vv2, vv, rtol=1e-5, atol=1e-5)
