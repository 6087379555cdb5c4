"""EfficientAD networks against the spec's test vectors (specs/efficientad.md §9) and pitfalls (§8)."""

import pytest
import torch
import torch.nn.functional as F

from iad_lightning.errors import WeightsError
from iad_lightning.models.efficientad import (
    PDN,
    AutoEncoder,
    EfficientADModel,
    exact_quantile,
    hard_feature_loss,
    load_teacher_weights,
    normalize_map,
)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    "size, out, expected",
    [("small", 384, 2_694_144), ("small", 768, 4_267_392), ("medium", 384, 8_026_624), ("medium", 768, 11_615_488)],
)
def test_pdn_parameter_counts(size, out, expected):
    assert n_params(PDN(size, out)) == expected


def test_autoencoder_parameter_count():
    assert n_params(AutoEncoder(384)) == 1_096_320


@torch.no_grad()
@pytest.mark.parametrize("size", ["small", "medium"])
def test_pdn_output_sizes_unpadded_56_padded_64(size):
    x = torch.randn(1, 3, 256, 256)
    assert PDN(size, 384).eval()(x).shape == (1, 384, 56, 56)
    assert PDN(size, 384, padding=True).eval()(x).shape == (1, 384, 64, 64)


@torch.no_grad()
def test_model_shapes_student_768_and_maps_at_input_size():
    model = EfficientADModel("small", image_size=128).eval()  # 256 px sizes: the PDN / AE tests
    x = torch.randn(1, 3, 128, 128)
    assert model.student(x).shape == (1, 768, 24, 24)
    map_st, map_ae = model.raw_maps(x)
    assert map_st.shape == map_ae.shape == (1, 1, 24, 24)
    amap, score = model(x)
    assert amap.shape == (1, 1, 128, 128) and score.shape == (1,)
    torch.testing.assert_close(score, amap.flatten(1).amax(1))  # image score = max of the final map


@torch.no_grad()
def test_autoencoder_latent_and_decoder_sizes():
    ae = AutoEncoder(384).eval()
    x = torch.randn(2, 3, 256, 256)
    assert ae.encode(x).shape == (2, 64, 1, 1)
    sizes = []
    hooks = [block[0].register_forward_hook(lambda m, i, o: sizes.append(o.shape[-1])) for block in ae.decoder]
    out = ae(x)
    for h in hooks:
        h.remove()
    assert sizes == [4, 9, 16, 33, 64, 128]
    assert out.shape == (2, 384, 56, 56)
    assert AutoEncoder(384, padding=True).eval()(x).shape == (2, 384, 64, 64)


@torch.no_grad()
def test_small_image_size_matches_pdn_grid():
    """Deviation for tests: 128 px keeps the AE 1x1 latent (padded k8 conv) and AE map = PDN map."""
    model = EfficientADModel(image_size=128).eval()
    x = torch.randn(1, 3, 128, 128)
    assert model.autoencoder.encode(x).shape == (1, 64, 1, 1)
    assert model.autoencoder(x).shape[-2:] == model.teacher(x).shape[-2:] == (24, 24)


def test_hard_loss_keeps_1205_elements_and_uses_the_mean():
    torch.manual_seed(0)
    d = torch.randperm(384 * 56 * 56).float().view(1, 384, 56, 56) / 1000.0  # all distinct
    d_hard = torch.quantile(d.flatten(), 0.999)
    assert int((d >= d_hard).sum()) == 1205
    torch.testing.assert_close(exact_quantile(d, 0.999), d_hard)
    top = d.flatten().sort().values[-1205:]
    torch.testing.assert_close(hard_feature_loss(d, 0.999), top.mean())  # >= keeps the threshold; mean


def test_exact_quantile_equals_torch_and_has_no_size_limit():
    x = torch.randn(10_001, dtype=torch.float64)
    for q in (0.0, 0.1, 0.9, 0.995, 1.0):
        torch.testing.assert_close(exact_quantile(x, q), torch.quantile(x, q))
    n = 2**24 + 11  # torch.quantile refuses more than 2**24 elements
    big = torch.arange(n, dtype=torch.float64).flip(0)
    assert exact_quantile(big, 0.9).item() == pytest.approx(0.9 * (n - 1))


def test_quantile_normalisation_maps_qa_to_0_and_qb_to_01():
    qa, qb = torch.tensor(2.0), torch.tensor(7.0)
    assert normalize_map(qa, qa, qb).item() == pytest.approx(0.0)
    assert normalize_map(qb, qa, qb).item() == pytest.approx(0.1)
    model = EfficientADModel(pad_maps=False)
    model.q_st_start.fill_(1.0), model.q_st_end.fill_(3.0)
    model.q_ae_start.fill_(0.5), model.q_ae_end.fill_(0.7)
    combined = model.combine(torch.full((1, 1, 56, 56), 3.0), torch.full((1, 1, 56, 56), 0.7), (56, 56))
    torch.testing.assert_close(combined, torch.full((1, 1, 56, 56), 0.1))


def test_maps_normalised_before_the_4px_padding():
    """§8.1/§8.2: unpadded maps are padded by 4 (56 -> 64) after normalisation (pad value = q_a level)."""
    model = EfficientADModel()
    model.q_st_start.fill_(1.0), model.q_st_end.fill_(3.0)
    model.q_ae_start.fill_(1.0), model.q_ae_end.fill_(3.0)
    m = torch.full((1, 1, 56, 56), 3.0)
    out = model.combine(m, m, (256, 256))
    expected = F.interpolate(F.pad(torch.full((1, 1, 56, 56), 0.1), (4, 4, 4, 4)), size=(256, 256), mode="bilinear")
    torch.testing.assert_close(out, expected)
    assert out[0, 0, 0, 0].item() == 0.0 and out[0, 0, 128, 128].item() == pytest.approx(0.1)
    assert EfficientADModel(pad_maps=False).combine(m, m, (256, 256))[0, 0, 0, 0].item() != 0.0


@torch.no_grad()
def test_receptive_field_one_pixel_changes_at_most_9x9_outputs():
    torch.manual_seed(0)
    pdn = PDN("small", 384).double().eval()
    x = torch.randn(1, 3, 128, 128, dtype=torch.float64)
    y = x.clone()
    y[0, :, 64, 64] += 5.0
    changed = (pdn(x) - pdn(y)).abs().amax(dim=1)[0] > 0
    rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
    assert changed.any()
    assert rows.max() - rows.min() + 1 <= 9 and cols.max() - cols.min() + 1 <= 9


def test_teacher_stays_in_eval_mode_and_frozen():
    model = EfficientADModel().train()
    assert not model.teacher.training and model.student.training and model.autoencoder.training
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_student_halves_st_map_uses_first_384_ae_map_the_rest():
    """§8.9: M_ST compares T with S[:, :384], M_AE compares A with S[:, 384:]."""
    torch.manual_seed(0)
    model = EfficientADModel(image_size=128).eval()
    t_state, s_state = model.teacher.state_dict(), model.student.state_dict()
    for k in t_state:  # the student's first 384 channels become an exact copy of the teacher
        s_state[k][: t_state[k].shape[0]] = t_state[k]
    s_state["8.weight"][384:] = 0
    s_state["8.bias"][384:] = 0
    model.student.load_state_dict(s_state)
    model.autoencoder.head[2].weight.data.zero_()
    model.autoencoder.head[2].bias.data.zero_()
    map_st, map_ae = model.raw_maps(torch.randn(1, 3, 128, 128))
    assert map_st.abs().max() < 1e-8 and map_ae.abs().max() == 0


# ------------------------------------------------------------------------------ teacher weights
def _pdn_state(size: str) -> dict:
    torch.manual_seed(1)
    return PDN(size, 384, padding=True).state_dict()


@pytest.mark.parametrize("size", ["small", "medium"])
def test_load_teacher_nelson_and_ours_sequential_layout(tmp_path, size):
    state = _pdn_state(size)
    path = tmp_path / f"teacher_{size}.pth"
    torch.save(state, path)
    loaded = load_teacher_weights(path, size)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    PDN(size, 384).load_state_dict(loaded)  # loads into the unpadded PDN as well


def test_load_teacher_whole_pickled_nelson_module(tmp_path, size="small"):
    # nelson's torch.save(teacher): a plain nn.Sequential of Conv2d / ReLU / AvgPool2d, read through
    # the safe unpickler with only those torch.nn classes allowed.
    state = _pdn_state(size)
    nelson = torch.nn.Sequential(*PDN(size, 384, padding=True))
    nelson.load_state_dict(state)
    path = tmp_path / "teacher_final.pth"
    torch.save(nelson, path)
    loaded = load_teacher_weights(path, size)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize("size, n_convs", [("small", 4), ("medium", 6)])
def test_load_teacher_anomalib_layout(tmp_path, size, n_convs):
    state = _pdn_state(size)
    conv_keys = sorted({k.split(".")[0] for k in state}, key=int)
    assert len(conv_keys) == n_convs
    anomalib = {f"conv{i + 1}.{w}": state[f"{k}.{w}"] for i, k in enumerate(conv_keys) for w in ("weight", "bias")}
    path = tmp_path / f"pretrained_teacher_{size}.pth"
    torch.save(anomalib, path)
    loaded = load_teacher_weights(path, size)
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_load_teacher_errors_name_the_file(tmp_path):
    small = tmp_path / "teacher_small.pth"
    torch.save(_pdn_state("small"), small)
    with pytest.raises(WeightsError, match="teacher_small.pth.*PDN-M"):
        load_teacher_weights(small, "medium")  # wrong model size
    odd = tmp_path / "odd.pth"
    torch.save({"layer.weight": torch.zeros(3)}, odd)
    with pytest.raises(WeightsError, match="odd.pth"):
        load_teacher_weights(odd, "small")
    pickled = tmp_path / "module.pth"
    torch.save(PDN("small"), pickled)  # a pickled module of a class not on the allow-list: refused
    with pytest.raises(WeightsError, match="module.pth.*weights_only.*iad_lightning.models.efficientad.PDN"):
        load_teacher_weights(pickled, "small")
    with pytest.raises(WeightsError, match="missing.pth"):
        load_teacher_weights(tmp_path / "missing.pth", "small")


def test_forward_is_traceable_pure_torch():
    model = EfficientADModel(image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    traced = torch.jit.trace(model, x, check_trace=False)
    for a, b in zip(traced(x), model(x)):
        torch.testing.assert_close(a, b)


def test_ae_map_weight_default_is_the_paper_average():
    st, ae = torch.full((1, 1, 8, 8), 0.1), torch.full((1, 1, 8, 8), 0.3)  # identity normalisation
    assert EfficientADModel().ae_map_weight == 0.5
    torch.testing.assert_close(EfficientADModel(pad_maps=False).combine(st, ae, (8, 8)), torch.full((1, 1, 8, 8), 0.2))
    torch.testing.assert_close(EfficientADModel(pad_maps=False, ae_map_weight=0.0).combine(st, ae, (8, 8)), st)
