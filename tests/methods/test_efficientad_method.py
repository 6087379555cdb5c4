"""EfficientAD LightningModule: schedule, fit-time statistics, losses, errors, config (spec §4, §5, §8)."""

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from torchvision import transforms as T

from iad_lightning.checkpoint import _offline_backbones
from iad_lightning.errors import ConfigError
from iad_lightning.methods.efficientad import IMAGENET_MEAN, IMAGENET_STD, EfficientAD, PenaltyImages
from iad_lightning.models.efficientad import PDN, exact_quantile, normalize_map

CONF = str(Path(__file__).resolve().parents[2] / "conf")


def _compose(overrides):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose("train", overrides=overrides)


def _batches(images: torch.Tensor, batch_size: int):
    return [{"image": images[i : i + batch_size]} for i in range(0, len(images), batch_size)]


def test_config_paper_defaults_and_run_settings():
    cfg = _compose(["method=efficientad", "data=mvtec"])
    m = cfg.method
    assert (m.model_size, m.out_channels, m.image_size, m.num_steps) == ("small", 384, 256, 70_000)
    assert (m.lr, m.weight_decay, m.lr_drop_fraction, m.hard_quantile, m.q_a, m.q_b) == (1e-4, 1e-5, 0.95, 0.999, 0.9, 0.995)
    assert (m.padding, m.pad_maps, m.teacher_weights, m.penalty_dir) == (False, True, None, None)
    assert cfg.trainer.max_steps == 70_000 and cfg.trainer.max_epochs == -1  # steps, not epochs (§8.5)
    assert cfg.data.batch_size == 1 and cfg.data.val_fraction == 0.1  # §8.4, §8.7
    exp = _compose(["experiment=efficientad_mvtec"])
    assert exp.method._target_.endswith("EfficientAD") and exp.data.format == "mvtec" and exp.data.batch_size == 1
    medium = _compose(["method=efficientad", "method.model_size=medium", "method.num_steps=10"])
    assert medium.trainer.max_steps == 10
    module = instantiate(medium.method)
    assert sum(p.numel() for p in module.model.teacher.parameters()) == 8_026_624
    assert sum(p.numel() for p in module.model.student.parameters()) == 11_615_488


def test_reload_config_drops_fit_only_files():
    cfg = {"_target_": "x", "teacher_weights": "/a/t.pth", "penalty_dir": "/imagenet", "backbone": {"weights": "lite0"}}
    out = _offline_backbones(cfg)
    assert out["teacher_weights"] is None and out["penalty_dir"] is None and out["backbone"]["weights"] == "none"


def test_lr_drops_at_95_percent_of_steps():
    module = EfficientAD(image_size=64)
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "step"  # stepped every iteration
    assert opt.defaults["weight_decay"] == 1e-5
    lrs = np.empty(70_000)
    for i in range(70_000):  # 0-based iteration i uses lrs[i]; the scheduler steps after the optimiser
        lrs[i] = opt.param_groups[0]["lr"]
        sched.step()
    assert np.allclose(lrs[:66_500], 1e-4) and np.allclose(lrs[66_500:], 1e-5)


def test_teacher_statistics_normalise_train_outputs_and_ignore_batch_size():
    torch.manual_seed(0)
    module = EfficientAD(image_size=64)
    images = torch.randn(6, 3, 64, 64) * torch.rand(6, 1, 1, 1) + torch.randn(6, 1, 1, 1)
    module.fit_teacher_statistics(_batches(images, 1))
    mean_1, std_1 = module.model.teacher_mean.clone(), module.model.teacher_std.clone()
    module.fit_teacher_statistics(_batches(images, 4))
    torch.testing.assert_close(module.model.teacher_mean, mean_1, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module.model.teacher_std, std_1, rtol=1e-5, atol=1e-6)
    t_hat = module.model.teacher_features(images).double()  # (6, 384, 8, 8)
    means = t_hat.mean(dim=(2, 3)).mean(0)
    stds = (t_hat**2).mean(dim=(0, 2, 3)).sqrt()  # spec: sqrt(mean over images of per-image mean)
    assert means.abs().max() < 1e-4 and (stds - 1).abs().max() < 1e-4


def test_map_quantiles_fitted_on_validation_maps():
    torch.manual_seed(0)
    module = EfficientAD(image_size=64)
    val = torch.randn(5, 3, 64, 64)
    module.fit_map_quantiles(_batches(val, 2))
    m = module.model
    with torch.no_grad():
        st, ae = m.eval().raw_maps(val)
    torch.testing.assert_close(m.q_st_start, exact_quantile(st, 0.9))
    torch.testing.assert_close(m.q_st_end, exact_quantile(st, 0.995))
    torch.testing.assert_close(m.q_ae_start, exact_quantile(ae, 0.9))
    torch.testing.assert_close(m.q_ae_end, exact_quantile(ae, 0.995))
    norm = normalize_map(st, m.q_st_start, m.q_st_end)  # 90% of validation pixels at or below 0
    assert abs(float((norm <= 0).float().mean()) - 0.9) < 0.01 and float((norm <= 0.1 + 1e-6).float().mean()) >= 0.99


def test_training_step_losses_and_gradients():
    torch.manual_seed(0)
    module = EfficientAD(image_size=64)
    module._penalty = iter([torch.randn(1, 3, 64, 64)])
    logged = {}
    module.log = lambda k, v, **kw: logged.__setitem__(k, float(v))
    module.log_dict = lambda d, **kw: logged.update({k: float(v) for k, v in d.items()})
    loss = module.training_step({"image": torch.randn(1, 3, 64, 64)}, 0)
    loss.backward()
    parts = ("train/loss_hard", "train/loss_penalty", "train/loss_ae", "train/loss_stae")
    assert loss.item() == pytest.approx(sum(logged[k] for k in parts), rel=1e-5)  # equal weights
    assert all(p.grad is None for p in module.model.teacher.parameters())
    assert module.model.student[0].weight.grad.abs().sum() > 0
    assert module.model.autoencoder.encoder[0].weight.grad.abs().sum() > 0


def test_augmentation_roundtrip_keeps_normalisation():
    module = EfficientAD(image_size=64, ae_augment=0.0)  # factor 1: identity up to rounding
    raw = torch.rand(2, 3, 64, 64)
    images = (raw - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(module._augment(images), images, atol=1e-5, rtol=1e-5)
    module.hparams.ae_augment = 0.2
    assert not torch.allclose(module._augment(images), images)


def _with_datamodule(module, n_val: int, batch_size: int = 1):
    dm = SimpleNamespace(index_records=lambda: {"val": [0] * n_val}, batch_size=batch_size)
    module._trainer = SimpleNamespace(datamodule=dm)
    return module


def test_missing_teacher_and_empty_validation_errors(tmp_path):
    module = _with_datamodule(EfficientAD(image_size=64), 2)
    with pytest.raises(ConfigError) as err:
        module.setup("fit")
    msg = str(err.value)
    assert "method.teacher_weights" in msg and "method=efficientad_teacher" in msg and "teacher_small.pth" in msg
    module.setup("test")  # a module rebuilt for test.py needs no teacher file
    module.hparams.teacher_weights = str(tmp_path / "nope.pth")
    with pytest.raises(ConfigError, match="nope.pth"):
        module.setup("fit")
    path = tmp_path / "teacher_small.pth"
    state = PDN("small", 384, padding=True).state_dict()
    torch.save(state, path)
    module.hparams.teacher_weights = str(path)
    module.setup("fit")
    assert torch.equal(module.model.teacher[0].weight, state["0.weight"])
    with pytest.raises(ConfigError, match="data.val_fraction"):
        _with_datamodule(module, 0).setup("fit")
    with pytest.raises(ConfigError, match="data.batch_size=8"):  # §8.4: batch 1 for training
        _with_datamodule(module, 2, batch_size=8).setup("fit")
    module.hparams.normalize_maps = False
    _with_datamodule(module, 0).setup("fit")  # documented opt-out


def test_penalty_images_size_and_grayscale(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    ds = PenaltyImages(tmp_path, image_size=32, grayscale_p=1.0)
    x = ds[0]
    assert len(ds) == 2 and x.shape == (3, 32, 32)
    raw = x * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    torch.testing.assert_close(raw[0], raw[1], atol=1e-5, rtol=0)  # grey: equal channels


def test_penalty_images_resize_the_8bit_image_as_nelson(tmp_path):
    # nelson: Resize((2S, 2S)) on the PIL image, RandomGrayscale, CenterCrop(S), ToTensor, Normalize
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(tmp_path / "0.png")
    official = T.Compose([T.Resize((64, 64)), T.CenterCrop(32), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    expected = official(Image.open(tmp_path / "0.png").convert("RGB"))
    torch.testing.assert_close(PenaltyImages(tmp_path, 32, grayscale_p=0.0)[0], expected, atol=1e-6, rtol=0)
    tensor_path = PenaltyImages(tmp_path, 32, grayscale_p=0.0, resize_backend="tensor")[0]
    assert (tensor_path - expected).abs().max() > 1e-4  # the float-tensor resize is not the official one


def test_preprocess_normalises_once_at_exact_size():
    """§1 / §8.3: resize to exactly S x S (aspect ignored), ImageNet normalisation in the transform
    only; the PDN itself has no normalisation layer (nelson's layout, unlike anomalib's)."""
    module = EfficientAD(image_size=256)
    pre = module.preprocess
    assert pre.resize == (256, 256) and pre.crop is None
    assert pre.resize_backend == "pil"  # nelson: transforms.Resize on the PIL image
    assert pre.mean == IMAGENET_MEAN and pre.std == IMAGENET_STD
    assert all(isinstance(layer, (torch.nn.Conv2d, torch.nn.ReLU, torch.nn.AvgPool2d)) for layer in module.model.teacher)
    assert module.export_module() is module.model


DDP_WORKER = '''
import sys
from types import SimpleNamespace
import torch
import torch.distributed as dist
from iad_lightning.methods.efficientad import EfficientAD

class Images(torch.utils.data.Dataset):
    def __init__(self, x):
        self.x = x
    def __len__(self):
        return len(self.x)
    def __getitem__(self, i):
        return {"image": self.x[i]}

def data():
    g = torch.Generator().manual_seed(1)
    train = torch.randn(5, 3, 64, 64, generator=g) * torch.rand(5, 1, 1, 1, generator=g)
    return {"train": Images(train), "val": Images(torch.randn(1, 3, 64, 64, generator=g))}

torch.manual_seed(0)
module = EfficientAD(image_size=64, stats_batch_size=2)
splits = data()
module._trainer = SimpleNamespace(datamodule=SimpleNamespace(dataset=splits.__getitem__, num_workers=0))
distributed = len(sys.argv) > 2
if distributed:
    dist.init_process_group("gloo")
module.fit_teacher_statistics(module._loader("train"))  # shards of 3 and 2 images
module.fit_map_quantiles(module._loader("val"))  # one image: rank 1's shard is empty
rank = dist.get_rank() if distributed else 0
stats = {k: v for k, v in module.model.state_dict().items() if k.startswith(("teacher_", "q_"))}
stats["shard"] = torch.tensor(len(module._loader("train").dataset))
torch.save(stats,
           f"{sys.argv[1]}/stats_{'ddp' if distributed else 'single'}_{rank}.pt")
if distributed:
    dist.destroy_process_group()
'''


def test_statistics_under_ddp_are_sharded_and_equal_one_process(tmp_path):
    """2 gloo processes: each rank reads its shard; reduced/gathered statistics = one process."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(CONF).parent), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, str(worker), str(tmp_path)], check=True, timeout=120, env=env)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(worker), str(tmp_path), "ddp"], check=False, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = torch.load(tmp_path / "stats_single_0.pt", weights_only=True)
    for rank in (0, 1):
        ddp = torch.load(tmp_path / f"stats_ddp_{rank}.pt", weights_only=True)
        assert ddp.keys() == single.keys() and len(single) == 7
        assert int(ddp["shard"]) == (3, 2)[rank] and int(single["shard"]) == 5  # images 0,2,4 and 1,3
        for key in single.keys() - {"shard"}:
            torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6, msg=key)
    assert float(single["q_st_end"]) > float(single["q_st_start"])  # fitted, not the defaults
