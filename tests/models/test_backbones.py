"""Backbone weights resolution: offline Lite0 weights are real, bad weights fail clearly."""

import pytest
import torch

from iad_lightning.errors import WeightsError
from iad_lightning.models.backbones import FeatureExtractor, create_timm_model, lite0_weights_path


@pytest.fixture(scope="module")
def lite0():
    return create_timm_model("tf_efficientnet_lite0", "lite0").eval()


def _photo(array) -> torch.Tensor:
    x = torch.from_numpy(array).permute(2, 0, 1).float()[None] / 255
    x = torch.nn.functional.interpolate(x, size=(224, 224), mode="bilinear", antialias=True)
    return (x - 0.5) / 0.5


def test_lite0_weights_are_pretrained_imagenet(lite0):
    """The package's weights classify scikit-image's bundled photos correctly (no hub needed)."""
    data = pytest.importorskip("skimage.data")
    with torch.no_grad():
        cat = lite0(_photo(data.chelsea())).softmax(-1)[0]
        cup = lite0(_photo(data.coffee())).softmax(-1)[0]
    assert int(cat.argmax()) in range(281, 286)  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert float(cat[281:286].sum()) > 0.8
    assert int(cup.argmax()) in (967, 968)  # espresso / cup


def test_feature_extractor_lite0_shapes_and_frozen():
    fe = FeatureExtractor("tf_efficientnet_lite0", [2, 3], weights="lite0")
    assert fe.channels == [40, 112] and fe.reductions == [8, 16]
    assert fe.mean == (0.5, 0.5, 0.5)
    fe.train()
    assert not fe.training and not any(p.requires_grad for p in fe.parameters())
    feats = fe(torch.randn(2, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(2, 40, 28, 28), (2, 112, 14, 14)]


def test_layer_names_and_order():
    fe = FeatureExtractor("resnet18", ["layer3", "layer2"], weights="none")
    assert fe.indices == [3, 2]
    feats = fe(torch.randn(1, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [256, 128]
    with pytest.raises(WeightsError, match="no feature layer 'layer9'"):
        FeatureExtractor("resnet18", ["layer9"], weights="none")


def test_local_weights_file_roundtrip(tmp_path):
    ref = create_timm_model("resnet18", "none")
    path = tmp_path / "r18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in ref.state_dict().items()}}, path)
    loaded = create_timm_model("resnet18", str(path))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k])


def test_bad_weights_give_clear_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        create_timm_model("resnet18", str(tmp_path / "missing.pth"))
    wrong = tmp_path / "wrong.pth"
    torch.save(create_timm_model("resnet34", "none").state_dict(), wrong)
    with pytest.raises(WeightsError, match="do not fit"):
        create_timm_model("resnet18", str(wrong))
    with pytest.raises(WeightsError, match="tf_efficientnet_lite0"):
        create_timm_model("resnet18", "lite0")
    assert lite0_weights_path().is_file()


def test_hub_offline_error_says_how_to_use_local_file(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        create_timm_model("resnet18.a1_in1k", "hub")
    assert "method.backbone.weights=/path/to" in str(err.value) and "backbone=lite0" in str(err.value)


def _unfolded_features(fe: FeatureExtractor, x: torch.Tensor) -> list[torch.Tensor]:
    wanted = sorted(set(fe.indices))
    with torch.no_grad():
        feats = fe.model.forward_intermediates(x, indices=wanted, intermediates_only=True, stop_early=True)
    by_index = dict(zip(wanted, feats))
    return [by_index[i] for i in fe.indices]


@pytest.mark.parametrize("name, layers, weights", [
    ("tf_efficientnet_lite0", [2, 3], "lite0"), ("resnet18", [2, 3], "none"), ("efficientnet_b0", [1, 2, 3], "none"),  # B4 (UniAD) has the same blocks
])
def test_batch_norms_folded_into_convs_give_the_same_features_and_keep_the_state_dict(name, layers, weights):
    """FeatureExtractor runs a copy with every BN folded into its conv: the same features as the
    timm model (random BN statistics where the weights are random), state-dict keys unchanged, and
    a state-dict load or a dtype move refolds from the new weights."""
    fe = FeatureExtractor(name, layers, weights=weights)
    gen = torch.Generator().manual_seed(0)
    if weights == "none":  # non-trivial statistics, else folding is close to the identity
        for m in fe.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.data.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.data.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    keys = list(fe.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=gen)
    for got, ref in zip(fe(x), _unfolded_features(fe, x)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    assert list(fe.state_dict()) == keys and not any(isinstance(m, torch.nn.BatchNorm2d) for m in fe.fused().modules())
    state = {k: v * 1.5 if k.endswith("running_var") else v for k, v in fe.state_dict().items()}
    fe.load_state_dict(state)  # new statistics: the folded copy is rebuilt from them
    for got, ref in zip(fe(x), _unfolded_features(fe, x)):
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    if name == "resnet18":
        fe.double()
        assert all(f.dtype == torch.float64 for f in fe(x.double()))
