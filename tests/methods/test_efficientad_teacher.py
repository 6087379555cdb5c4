"""EfficientAD teacher distillation (method=efficientad_teacher, spec §3)."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torchvision.transforms import v2

from iad_lightning.data.datamodule import AnomalyDataModule
from iad_lightning.errors import ConfigError
from iad_lightning.methods.efficientad_teacher import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DistillationTarget,
    EfficientADTeacher,
)
from iad_lightning.models.backbones import FeatureExtractor
from iad_lightning.models.efficientad import PDN, load_teacher_weights
from iad_lightning.models.patchcore import PatchEmbedding

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
from bench.natural_images import write_natural_images

LITE0 = {"name": "tf_efficientnet_lite0", "layers": [2, 3], "weights": "lite0"}


@pytest.fixture(scope="module")
def natural(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("natural")
    write_natural_images(root, n=16, size=64, seed=0)
    return root


def test_target_is_384_x_64_x_64_at_512_px():
    # WR101 (the paper's extractor) on the meta device: its real geometry without computing anything
    with torch.device("meta"):
        target = DistillationTarget(FeatureExtractor("wide_resnet101_2.tv_in1k", [2, 3], weights="none"))
        out = target(torch.empty(2, 3, 512, 512))
        pdn_out = PDN("small", 384, padding=True)(torch.empty(2, 3, 256, 256))
    assert tuple(out.shape) == (2, 384, 64, 64) == tuple(pdn_out.shape)
    assert target.backbone.channels == [512, 1024] and target.backbone.reductions == [8, 16]
    # Lite0 indices 2, 3 (40 ch stride 8, 112 ch stride 16): the same geometry (on the CPU: its
    # 360 -> 1024 pooling reads the window sizes)
    lite0 = DistillationTarget(FeatureExtractor(**LITE0))
    assert lite0.backbone.channels == [40, 112] and lite0.backbone.reductions == [8, 16]
    assert tuple(lite0(torch.zeros(1, 3, 512, 512)).shape) == (1, 384, 64, 64)


def test_target_is_the_patchcore_recipe_in_the_backbones_normalisation():
    fe = FeatureExtractor(**LITE0)
    assert fe.mean == (0.5, 0.5, 0.5) and fe.std == (0.5, 0.5, 0.5)
    target = DistillationTarget(fe, out_channels=384)
    assert target.convert
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # ImageNet-normalised
    raw = x * torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    emb, grid = PatchEmbedding(1024, 384, 3)(fe((raw - 0.5) / 0.5))
    expected = emb.transpose(1, 2).reshape(2, 384, *grid)
    torch.testing.assert_close(target(x), expected, rtol=1e-4, atol=1e-4)  # float rounding of the affine
    assert tuple(expected.shape) == (2, 384, 8, 8)


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="stride 8"):
        EfficientADTeacher({**LITE0, "weights": "none", "layers": [3, 4]}, image_size=32)
    with pytest.raises(ConfigError, match="method.model_size='large'"):
        EfficientADTeacher({**LITE0, "weights": "none"}, model_size="large")


def _loader(root: Path, module: EfficientADTeacher, batch_size: int, shuffle: bool = False, limit: int | None = None):
    dm = AnomalyDataModule(format="images", root=str(root), batch_size=batch_size, shuffle=shuffle,
                           options={"limit": limit} if limit else None)
    dm.preprocess = module.preprocess
    return dm, dm.train_dataloader()


def test_target_normalisation_gives_zero_mean_unit_std(natural):
    torch.manual_seed(0)
    grey = EfficientADTeacher({**LITE0, "weights": "none"}, image_size=32).preprocess.extra[0]
    assert isinstance(grey, v2.RandomGrayscale) and grey.p == 0.1  # the spec's shared draw
    module = EfficientADTeacher(LITE0, image_size=32, norm_images=10, grayscale_p=0.0)  # deterministic views
    pre = module.preprocess
    assert pre.resize == (64, 64) and pre.crop is None and pre.output_size == (64, 64)
    _, loader = _loader(natural, module, batch_size=4)
    assert module.estimate_target_stats(loader, 10) == 10  # 4 + 4 + 2 of the third batch
    assert module.estimate_target_stats(loader, 10_000) == 16  # capped by the dataset size: one pass
    images = torch.cat([b["image"] for b in loader])
    t = module.normalized_target(images)  # the same 16 images
    mean, std = t.mean(dim=(0, 2, 3)), t.std(dim=(0, 2, 3), correction=0)
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4
    raw_std = module.target(images).std(dim=(0, 2, 3))
    assert raw_std.min() < 0.5 * raw_std.max()  # the raw channels really needed normalising


def test_train_py_distils_and_writes_a_nelson_layout_teacher(natural, tmp_path):
    """method=efficientad_teacher data=images backbone=lite0 through train.py: one fixed batch of 4
    images without the grayscale draw, so that the loss of that batch must fall."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "train.py"), "method=efficientad_teacher", "data=images",
           f"data.root={natural}", "data.options.limit=4", "backbone=lite0", "method.image_size=32",
           "method.num_steps=16", "method.lr=1e-3", "method.grayscale_p=0.0", "data.batch_size=4",
           "data.num_workers=1", "trainer.accelerator=cpu", "trainer.log_every_n_steps=1", f"hydra.run.dir={out}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    teacher = out / "teacher_small.pth"
    assert f"wrote teacher weights to {teacher}" in proc.stdout
    assert "target normalisation from 4 images" in proc.stdout  # norm_images 10,000 capped by the data
    assert not (out / "results.json").exists()  # test: false
    with open(out / "csv" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    losses = [float(r["train/loss"]) for r in rows]
    # one batch per epoch: the statistics pass did not eat epoch 0's batch from the persistent workers
    assert [int(r["epoch"]) for r in rows] == list(range(16))
    assert losses[-1] < 0.7 * losses[0] and sum(losses[-4:]) < 0.8 * sum(losses[:4]), losses
    # a plain state dict with nelson's keys that loads safely into a fresh (unpadded) PDN and into
    # method=efficientad's loader; it is the trained PDN of the checkpoint
    state = torch.load(teacher, map_location="cpu", weights_only=True)
    assert list(state) == list(PDN("small", 384).state_dict())
    PDN("small", 384, padding=False).load_state_dict(state, strict=True)
    assert set(load_teacher_weights(teacher, "small")) == set(state)
    assert not list(out.glob(".*tmp*"))  # the atomic write left no temporary file
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 16
    for key, value in state.items():
        assert torch.equal(ckpt["state_dict"][f"pdn.{key}"], value)
    assert not any(k.startswith("target.backbone.") for k in ckpt["state_dict"])  # frozen backbone left out
    assert int(ckpt["state_dict"]["norm_count"]) == 4
    assert ckpt["iad_method_config"]["backbone"]["name"] == "tf_efficientnet_lite0"


def test_config_has_the_spec_defaults_and_lite0_keeps_the_layers():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["method=efficientad_teacher", "data=images", "data.root=/x"])
        lite0 = compose("train", overrides=["method=efficientad_teacher", "data=images", "data.root=/x",
                                            "backbone=lite0"])
    m = cfg.method
    assert (m.backbone.name, list(m.backbone.layers), m.backbone.weights) == ("wide_resnet101_2.tv_in1k", [2, 3], "hub")
    assert (m.model_size, m.out_channels, m.image_size, m.num_steps) == ("small", 384, 256, 60000)
    assert (m.lr, m.weight_decay, m.norm_images, m.grayscale_p) == (1e-4, 1e-5, 10000, 0.1)
    assert (cfg.trainer.max_steps, cfg.trainer.max_epochs, cfg.data.batch_size, cfg.test) == (60000, -1, 16, False)
    b = lite0.method.backbone
    assert (b.name, list(b.layers), b.weights) == ("tf_efficientnet_lite0", [2, 3], "lite0")


def test_natural_images_are_seeded_rgb_crops(natural, tmp_path):
    from PIL import Image

    files = sorted(natural.glob("*.png"))
    assert len(files) == 16 and all(Image.open(f).size == (64, 64) and Image.open(f).mode == "RGB" for f in files)
    again = write_natural_images(tmp_path / "again", n=3, size=64, seed=0)
    assert [p.read_bytes() for p in again] == [f.read_bytes() for f in files[:3]]  # same seed, same crops
    assert len({f.read_bytes() for f in files}) == 16  # all different


def test_views_follow_resize_backend():
    import numpy as np
    from PIL import Image

    from iad_lightning.data.transforms import PairTransform

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8))
    pil = EfficientADTeacher({**LITE0, "weights": "none"}, image_size=16, grayscale_p=0.0)
    tensor = EfficientADTeacher({**LITE0, "weights": "none"}, image_size=16, grayscale_p=0.0, resize_backend="tensor")
    assert pil.preprocess.resize_backend == "pil" and tensor.preprocess.resize_backend == "tensor"
    big, _ = PairTransform(pil.preprocess)(img, np.zeros((50, 70), bool))
    # pil: the PDN view is Pillow's bilinear resize of the 8-bit 32 px view, as nelson's PIL pipeline resizes
    ref_pil = img.resize((32, 32), Image.BILINEAR).resize((16, 16), Image.BILINEAR)
    expected = v2.functional.normalize(v2.functional.pil_to_tensor(ref_pil).float() / 255, IMAGENET_MEAN, IMAGENET_STD)
    torch.testing.assert_close(pil.pdn_view(big[None])[0], expected, atol=1e-6, rtol=0)
    # tensor: torchvision's antialiased bilinear on the float view
    t = tensor.pdn_view(big[None])
    torch.testing.assert_close(t, torch.nn.functional.interpolate(big[None], size=(16, 16), mode="bilinear",
                                                                 antialias=True))
    assert (t - pil.pdn_view(big[None])).abs().max() > 0
