"""UniAD LightningModule: batch split, feature cache, optimiser and schedule, config, checkpoints."""

import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from iad_lightning.errors import ConfigError
from iad_lightning.methods.uniad import UniAD

CONF = str(Path(__file__).resolve().parents[2] / "conf")
LITE0 = {"name": "tf_efficientnet_lite0", "layers": [0, 1, 2, 3], "weights": "none"}
SMALL = {"image_size": 128, "hidden_dim": 32, "nhead": 4, "num_encoder_layers": 1, "num_decoder_layers": 1,
         "dim_feedforward": 64}


@pytest.fixture(scope="module")
def module():
    torch.manual_seed(0)
    return UniAD(backbone=LITE0, **SMALL)


def test_geometry_from_the_backbone(module):
    assert module.feature_extractor.channels == [16, 24, 40, 112]
    assert module.model.in_channels == 192 and module.feature_size == (8, 8)
    pre = module.preprocess
    assert pre.resize == (128, 128) and pre.crop is None
    assert pre.resize_backend == "pil"  # official TestBaseTransform: Resize on the PIL image
    out = module.eval().predict_batch(torch.randn(2, 3, 128, 128))
    assert out["anomaly_map"].shape == (2, 1, 128, 128) and out["pred_score"].shape == (2,)
    with pytest.raises(ConfigError, match="image_size"):
        UniAD(backbone=LITE0, image_size=120)


def test_effective_batch_split_over_devices(module):
    for world, per_device in [(1, 64), (2, 32), (8, 8)]:
        dm = SimpleNamespace(batch_size=None)
        module.configure_data(dm, world)
        assert dm.batch_size == per_device
    dm = SimpleNamespace(batch_size=8)  # an explicit data.batch_size is the per-device batch
    module.configure_data(dm, 4)
    assert dm.batch_size == 8
    with pytest.raises(ConfigError, match="effective_batch_size=64"):
        module.configure_data(SimpleNamespace(batch_size=None), 3)


def test_feature_cache_skips_the_backbone_and_stays_out_of_the_state_dict(module, monkeypatch):
    module.train()
    module.on_fit_start()
    images = torch.randn(4, 3, 128, 128)
    batch = {"image": images, "index": torch.tensor([5, 1, 7, 2])}
    calls = []
    original = module.feature_extractor.forward
    monkeypatch.setattr(module.feature_extractor, "forward", lambda x: calls.append(x.shape[0]) or original(x))
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    first = module._train_features(batch)
    assert calls == [4] and first.shape == (4, 192, 8, 8)
    again = module._train_features({"image": images[[2, 0]] * 0, "index": torch.tensor([7, 5])})
    assert calls == [4]  # all cached: no backbone pass (the pixels are not even looked at)
    assert torch.equal(again, first[[2, 0]])
    mixed = module._train_features({"image": torch.cat([images[:1], images[:1]]), "index": torch.tensor([5, 9])})
    assert calls == [4, 1]  # only the new image goes through the backbone
    assert (module.cache_hits, module.cache_misses) == (3, 5)
    torch.testing.assert_close(mixed[1], module.aligned_features(images[:1])[0])  # (one more backbone call)
    loss = module.training_step(batch, 0)
    assert loss.ndim == 0 and loss.requires_grad
    keys = module.state_dict().keys()
    assert not any("cache" in k or k.endswith(".mask") for k in keys)
    assert any(k.startswith("feature_extractor.") for k in keys)  # frozen backbone saved for test.py
    module.on_fit_start()
    assert not module._cache
    module.hparams.cache_features = False
    module._train_features(batch)
    assert calls == [4, 1, 1, 4] and not module._cache
    module.hparams.cache_features = True


def test_optimiser_and_schedule_per_spec(module):
    cfg = module.configure_optimizers()
    opt, sched = cfg["optimizer"], cfg["lr_scheduler"]
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"]) == (1e-4, 1e-4, (0.9, 0.999))
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in module.model.parameters()}  # the backbone is not optimised
    assert not any(p.requires_grad for p in module.feature_extractor.parameters())
    assert sched["interval"] == "epoch" and sched["frequency"] == 1


def _lrs(opt, step, epochs):
    """LR in force during each 0-based epoch when ``step(epoch)`` runs after the epoch."""
    out = []
    with warnings.catch_warnings():  # no optimiser step in between (only the LR matters here);
        warnings.simplefilter("ignore", UserWarning)  # step(epoch) is deprecated, still the official call
        for epoch in range(epochs):
            out.append(opt.param_groups[0]["lr"])
            step(epoch)
    return out


def test_lr_schedule_is_the_official_step_epoch_loop(module):
    # tools/train_val.py: for epoch in range(max_epoch): train_one_epoch(...); lr_scheduler.step(epoch)
    # with StepLR(step_size=800, gamma=0.1). Lightning steps ours once after each epoch.
    ours = module.configure_optimizers()
    sched = ours["lr_scheduler"]["scheduler"]
    got = _lrs(ours["optimizer"], lambda epoch: sched.step(), 1000)
    official_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    official = torch.optim.lr_scheduler.StepLR(official_opt, step_size=800, gamma=0.1)
    expected = _lrs(official_opt, official.step, 1000)
    assert got == pytest.approx(expected, rel=1e-12, abs=0)
    assert got[800] == pytest.approx(1e-4) and got[801] == pytest.approx(1e-5)  # not at 800
    assert got.index(got[-1]) == 801


def test_paper_config_composes():
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("train", overrides=["method=uniad", "data=mvtec"])
        lite = compose("train", overrides=["method=uniad", "data=synthetic"])
        exp = compose("train", overrides=["experiment=uniad_mvtec", "data.batch_size=8"])
        per_cat = compose("train", overrides=["method=uniad", "data=mvtec", "data.category=screw"])
    m = cfg.method
    assert m._target_ == "iad_lightning.methods.uniad.UniAD"
    assert dict(m.backbone) == {"name": "tf_efficientnet_b4", "layers": [0, 1, 2, 3], "weights": "hub",
                                "mean": None, "std": None}
    assert (m.image_size, m.hidden_dim, m.nhead, m.num_encoder_layers, m.num_decoder_layers) == (224, 256, 8, 4, 4)
    assert (m.dim_feedforward, m.dropout, m.activation, list(m.neighbor_size)) == (1024, 0.1, "relu", [7, 7])
    assert (m.jitter_scale, m.jitter_prob, m.lr, m.weight_decay, m.lr_step_epochs, m.lr_gamma) == (
        20.0, 1.0, 1e-4, 1e-4, 800, 0.1)
    assert (m.effective_batch_size, m.score_kernel, m.cache_features, m.official_checkpoint) == (64, 16, True, None)
    t = cfg.trainer
    assert (t.max_epochs, t.gradient_clip_val, t.gradient_clip_algorithm, t.limit_val_batches) == (1000, 0.1, "norm", 0)
    assert cfg.data.batch_size is None and cfg.data.category == "all" and cfg.data.val_fraction == 0.0
    assert lite.method.backbone.name == "tf_efficientnet_lite0" and list(lite.method.backbone.layers) == [0, 1, 2, 3]
    assert exp.data.format == "mvtec" and exp.data.batch_size == 8 and exp.data.category == "all"
    assert per_cat.data.category == "screw"


def test_official_checkpoint_is_loaded_at_fit_setup_only(tmp_path):
    missing = tmp_path / "nowhere.pth.tar"
    model = UniAD(backbone=LITE0, official_checkpoint=str(missing), **SMALL)  # building never reads it
    model.setup("test")  # test.py from our own checkpoint does not need the file
    from iad_lightning.errors import WeightsError

    with pytest.raises(WeightsError, match="nowhere"):
        model.setup("fit")


def test_export_module_matches_predict_batch(module):
    module.eval()
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        ref = module.predict_batch(images)
        graph = module.export_module().eval()
        amap, score = graph(images)
        traced = torch.jit.trace(graph, (images,), check_trace=False)
        t_map, t_score = traced(images)
    assert torch.equal(amap, ref["anomaly_map"]) and torch.equal(score, ref["pred_score"])
    torch.testing.assert_close(t_map, amap)
    torch.testing.assert_close(t_score, score)
