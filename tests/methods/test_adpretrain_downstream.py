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


def _write_images(folder, n, seed, size=(40, 30)):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


def test_reference_set_in_the_8shot_layout_and_resize_backend_of_the_banks(tmp_path, projector_path):
    from pathlib import Path

    from iad_lightning.data.records import Record
    from iad_lightning.data.transforms import Preprocess
    from iad_lightning.errors import DatasetError
    from iad_lightning.methods._projector import build_extractor, reference_set_records, set_reference_bank

    shots = tmp_path / "8shot" / "mvtec"  # the authors' 8shot.zip: <dataset>/<class>/train/good
    _write_images(shots / "bottle" / "train" / "good", 9, 0)
    _write_images(shots / "screw" / "train" / "good", 8, 1)
    recs = reference_set_records(shots, ["bottle", "screw"], 8)
    assert [Path(r.image).name for r in recs if r.category == "bottle"] == [f"{i:03d}.png" for i in range(8)]
    with pytest.raises(DatasetError, match="category 'cable'"):
        reference_set_records(shots, ["cable"], 8)
    train = [Record(image=r.image, label=0, category=r.category, split="train") for r in recs]  # names the classes
    lite0 = {"name": "tf_efficientnet_lite0", "weights": "lite0"}
    ext, size = build_extractor(lite0, str(projector_path), (0, 1, 2, 3))
    n = set_reference_bank(ext, train, 4, 0, 28, torch.device("cpu"), reference_set=str(shots))  # the records
    assert len(n) == 8 and ext.bank_categories == ["bottle", "screw"]  # the first 4 by name per class (num_ref_shot)
    assert ext.bank_l1.shape == (8 * 2 * 2, 24)
    # the bank images follow the plug-in method's resize backend and filter
    banks = {}
    for backend in ("pil", "tensor"):
        like = Preprocess(resize=28, crop=28, resize_backend=backend)
        set_reference_bank(ext, train, 4, 0, 28, torch.device("cpu"), like, reference_set=str(shots))
        banks[backend] = ext.bank_l1.clone()
    assert not torch.equal(banks["pil"], banks["tensor"])
    from iad_lightning.data.dataset import AnomalyDataset

    pre = Preprocess(resize=28, crop=28, mean=ext.mean, std=ext.std, resize_backend="pil")
    images = torch.stack([AnomalyDataset(recs[:4] + recs[8:12], pre)[i]["image"] for i in range(8)])
    expected = ext.backbone(images)[0]
    torch.testing.assert_close(banks["pil"], expected.permute(0, 2, 3, 1).reshape(-1, 24))
