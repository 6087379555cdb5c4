"""PaDiM maths against the reference algorithm, and the FeatureNorm / PaDiM export graphs."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from iad_lightning.models.adpretrain import MultiScaleProjector, projector_file
from iad_lightning.models.padim import PaDiMModel, embedding_concat, random_channel_subset


def _reference_embedding_concat(x, y):
    """The PaDiM reference code's unfold / fold concatenation."""
    b, c1, h1, w1 = x.shape
    _, c2, h2, w2 = y.shape
    s = h1 // h2
    x = F.unfold(x, kernel_size=s, dilation=1, stride=s).view(b, c1, -1, h2, w2)
    z = torch.zeros(b, c1 + c2, x.size(2), h2, w2)
    for i in range(x.size(2)):
        z[:, :, i] = torch.cat((x[:, :, i], y), 1)
    z = z.view(b, -1, h2 * w2)
    return F.fold(z, kernel_size=s, output_size=(h1, w1), stride=s)


def test_embedding_concat_matches_reference():
    x, y = torch.randn(2, 3, 8, 8), torch.randn(2, 5, 4, 4)
    torch.testing.assert_close(embedding_concat([x, y]), _reference_embedding_concat(x, y))
    idx = random_channel_subset(448, 100)
    assert idx.numel() == 100 and idx.unique().numel() == 100 and int(idx.max()) < 448


def test_gaussians_and_mahalanobis_match_numpy():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(12, 4, 3, 3, generator=g)
    model = PaDiMModel(1, eps=0.01, blur_sigma=0).fit([train])
    test = torch.randn(2, 4, 3, 3, generator=g)
    dist = model.mahalanobis(test, 0)
    x = train.reshape(12, 4, 9).numpy().astype(np.float64)
    for p in (0, 4, 8):
        mean = x[:, :, p].mean(0)
        cov = np.cov(x[:, :, p], rowvar=False) + 0.01 * np.eye(4)
        delta = test.reshape(2, 4, 9)[:, :, p].numpy() - mean
        ref = np.sqrt(np.einsum("bd,de,be->b", delta, np.linalg.inv(cov), delta))
        np.testing.assert_allclose(dist.reshape(2, 9)[:, p].numpy(), ref, rtol=1e-4)
    amap, score = model.predict([test], (12, 12))
    assert amap.shape == (2, 1, 12, 12) and torch.equal(score, amap.flatten(1).amax(1))
    fresh = PaDiMModel(1)
    fresh.load_state_dict(model.state_dict())  # data-dependent buffer sizes reload
    torch.testing.assert_close(fresh.mahalanobis(test, 0), dist)


@pytest.fixture(scope="module")
def projector_path(tmp_path_factory):
    proj = MultiScaleProjector([24, 40, 112, 320], 16, num_ref_tokens=16)

    class _Bb:
        name, levels = "tf_efficientnet_lite0", [1, 2, 3, 4]

    path = tmp_path_factory.mktemp("proj") / "projector.pt"
    torch.save(projector_file(proj, _Bb(), 64, None), path)
    return path


def test_featurenorm_and_padim_export_graphs(projector_path):
    from iad_lightning.methods.featurenorm import FeatureNorm
    from iad_lightning.methods.padim import PaDiM

    lite0 = {"name": "tf_efficientnet_lite0", "weights": "lite0", "layers": [1, 2, 3]}
    refs = torch.randn(2, 3, 32, 32)
    images = torch.randn(2, 3, 32, 32)
    fn = FeatureNorm(lite0, projector=str(projector_path), image_size=32).eval()
    fn.feature_extractor.set_bank(refs)
    amap, score = fn.export_module()(images)  # tracing it costs ~50 s here; the export path has its own tests
    torch.testing.assert_close(amap, fn.predict_batch(images)["anomaly_map"])
    assert score.shape == (2,)
    for projector in (None, str(projector_path)):
        with pytest.warns(UserWarning, match="all 176 are used") if projector is None else _nothing():
            pd = PaDiM(lite0, projector=projector, resize=32, crop=32).eval()
        if projector is not None:
            pd.features.extractor.set_bank(refs)
        pd.model.fit(pd.features(torch.randn(3, 3, 32, 32)))
        assert pd.model.groups == (1 if projector is None else 4)
        out = pd.predict_batch(images)
        exported = pd.export_module()(images)
        torch.testing.assert_close(exported[0], out["anomaly_map"])
        assert out["anomaly_map"].shape == (2, 1, 32, 32) and torch.isfinite(out["pred_score"]).all()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
