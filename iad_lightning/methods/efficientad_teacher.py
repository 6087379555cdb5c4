"""EfficientAD teacher pretraining (spec §3, nelson1425/EfficientAD ``pretraining.py``).

A PDN with ``padding=True`` is distilled from a frozen timm backbone: the target is the PatchCore
patch feature (``models/patchcore.PatchEmbedding``: 3x3 unfold, per-layer adaptive average pooling
to 1024, the deeper layer resized to the first layer's grid, adaptive average pooling of the
concatenation to ``out_channels``) of layers 2+3 at twice the PDN input (512 px for 256), with
every channel normalised by its mean and std over ``norm_images`` training images. The PDN sees the
same image at 256 px. MSE loss, Adam; no scheduler (nelson). At the end of fit, rank zero writes
the PDN's plain state dict (nelson's ``teacher_*.pth`` layout) to ``output``; ``method=efficientad
method.teacher_weights=<that file>`` loads it.

Not an ``AnomalyModule``: it has no anomaly maps and no test step (its config sets ``test: false``).

Resizing follows ``resize_backend``. ``pil`` (default, nelson's order): Pillow's bilinear resize
of the 8-bit image to 512 px, and the 256 px PDN view a Pillow bilinear resize of that 8-bit view.
``tensor``: torchvision's antialiased bilinear on float tensors for both.

Deviations (also in the method config):
- both views come from one loaded 512 px view: the 256 px PDN view is resized from it (with
  ``pil``: from its 8 bits, after the grayscale draw), where nelson resizes the original PIL image
  to 256 directly (two Pillow resizes instead of one for the PDN view). This keeps the one
  ``RandomGrayscale(0.1)`` draw shared by both views with the one-view data pipeline.
- the channel mean and std come from one pass over the same ``norm_images`` images
  (var = E[x^2] - mu^2 in float64); nelson draws the images for the std pass afresh from its
  infinite augmented loader.
- the frozen backbone is not written to Lightning checkpoints (it is rebuilt from its config).
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchvision.transforms import v2

from iad_lightning.checkpoint import CONFIG_KEY
from iad_lightning.data.transforms import Preprocess
from iad_lightning.errors import ConfigError
from iad_lightning.models.backbones import FeatureExtractor
from iad_lightning.models.efficientad import PDN
from iad_lightning.models.patchcore import PatchEmbedding

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DistillationTarget(nn.Module):
    """Frozen backbone + PatchCore patch features as a (B, out_channels, h, w) map.

    Input: images normalised with ImageNet mean/std (the PDN's normalisation); they are converted
    to the backbone's own normalisation when it differs (e.g. Lite0: mean = std = 0.5).
    """

    def __init__(self, backbone: FeatureExtractor, out_channels: int = 384,
                 pretrain_embed_dimension: int = 1024, patch_size: int = 3) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding = PatchEmbedding(pretrain_embed_dimension, out_channels, patch_size)
        # x_bb = (x_in * std_in + mean_in - mean_bb) / std_bb = x_in * scale + shift
        self.convert = not all(math.isclose(a, b, abs_tol=1e-6) for a, b in
                               zip((*IMAGENET_MEAN, *IMAGENET_STD), (*backbone.mean, *backbone.std)))
        mean_in, std_in = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        mean_bb, std_bb = torch.tensor(backbone.mean, dtype=torch.float32), torch.tensor(backbone.std, dtype=torch.float32)
        self.register_buffer("scale", (std_in / std_bb).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_in - mean_bb) / std_bb).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        if self.convert:
            images = images * self.scale + self.shift
        embedding, grid = self.embedding(self.backbone(images))  # (B, h * w, C)
        return embedding.transpose(1, 2).reshape(images.shape[0], -1, *grid)


class EfficientADTeacher(L.LightningModule):
    """Distils ``PDN(model_size, out_channels, padding=True)``; defaults in
    ``conf/method/efficientad_teacher.yaml`` (spec §3)."""

    target_mean: Tensor
    target_std: Tensor
    norm_count: Tensor

    def __init__(
        self,
        backbone: dict[str, Any],
        model_size: str = "small",
        out_channels: int = 384,
        image_size: int = 256,
        num_steps: int = 60_000,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        norm_images: int = 10_000,
        grayscale_p: float = 0.1,
        pretrain_embed_dimension: int = 1024,
        patch_size: int = 3,
        output: str = "teacher_small.pth",
        resize_backend: str = "pil",
    ) -> None:
        super().__init__()
        if model_size not in ("small", "medium"):
            raise ConfigError(f"method.model_size='{model_size}' must be 'small' or 'medium'")
        if norm_images < 1:
            raise ConfigError(f"method.norm_images={norm_images} must be >= 1")
        if image_size % 4:
            raise ConfigError(f"method.image_size={image_size} must be a multiple of 4 (PDN stride)")
        self.save_hyperparameters()
        self.target = DistillationTarget(FeatureExtractor(**backbone), out_channels, pretrain_embed_dimension, patch_size)
        if self.target.backbone.reductions[0] != 8:  # 2S px / 8 = S / 4, the padded PDN's grid
            raise ConfigError(
                f"method.backbone.layers={list(backbone['layers'])}: the first layer has stride "
                f"{self.target.backbone.reductions[0]}; the distillation target needs stride 8 (e.g. layers [2, 3])"
            )
        self.pdn = PDN(model_size, out_channels, padding=True)
        self.register_buffer("target_mean", torch.zeros(1, out_channels, 1, 1))
        self.register_buffer("target_std", torch.ones(1, out_channels, 1, 1))
        self.register_buffer("norm_count", torch.tensor(0, dtype=torch.long))  # images behind the stats
        self.strict_loading = False  # checkpoints leave out the frozen backbone (see on_save_checkpoint)

    # -- data ---------------------------------------------------------------------------------
    @property
    def preprocess(self) -> Preprocess:
        """The target view, exactly 2S x 2S, ImageNet-normalised; the grayscale draw happens here
        once, before the PDN view is derived from the same tensor (``pdn_view``)."""
        s = 2 * self.hparams.image_size
        return Preprocess(resize=(s, s), crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          extra=(v2.RandomGrayscale(self.hparams.grayscale_p),),
                          resize_backend=self.hparams.resize_backend)

    def configure_data(self, datamodule: Any, world_size: int) -> None:
        """Nothing to adapt: data.batch_size (16 in the method config) is the per-device batch."""

    def pdn_view(self, images: Tensor) -> Tensor:
        """The 256 px PDN input resized from the 512 px target view: with ``resize_backend=pil`` by
        Pillow's bilinear on its 8-bit values (one image at a time), else torchvision's antialiased
        bilinear on the float tensor."""
        s = self.hparams.image_size
        if self.hparams.resize_backend != "pil":
            return F.interpolate(images, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        u8 = ((images * std + mean).clamp(0, 1) * 255).round().to(torch.uint8).cpu()
        resize = v2.Resize((s, s), interpolation=v2.InterpolationMode.BILINEAR, antialias=True)
        small = torch.stack([v2.functional.pil_to_tensor(resize(v2.functional.to_pil_image(x))) for x in u8])
        return (small.to(images.device, torch.float32) / 255 - mean) / std

    # -- target normalisation -----------------------------------------------------------------
    @torch.no_grad()
    def estimate_target_stats(self, batches: Any, max_images: int) -> int:
        """Channel mean and std of the raw target over the first ``max_images`` images of
        ``batches`` (every rank its own share; the sums are reduced over ranks). Returns the count."""
        c = self.hparams.out_channels
        sums = torch.zeros(3, c, dtype=torch.float64, device=self.device)  # [n_pixels, sum, sum of squares]
        seen = 0
        for batch in batches:
            images = batch["image"][: max_images - seen].to(self.device)
            t = self.target(images).double()  # (B, C, h, w)
            sums[0] += t[:, 0].numel()
            sums[1] += t.sum(dim=(0, 2, 3))
            sums[2] += t.square().sum(dim=(0, 2, 3))
            seen += images.shape[0]
            if seen >= max_images:
                break
        if self._trainer is not None:  # sum over ranks
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
            seen = int(self.trainer.strategy.reduce(torch.tensor(float(seen), device=self.device), reduce_op="sum"))
        if sums[0, 0] == 0:
            raise ConfigError("efficientad_teacher: no training images to estimate the target normalisation")
        mean = sums[1] / sums[0]  # mu_c over all images and positions (each image weighs the same)
        var = (sums[2] / sums[0] - mean.square()).clamp_min(0)  # E[(T - mu)^2]
        self.target_mean.copy_(mean.view(1, c, 1, 1).float())
        self.target_std.copy_(var.sqrt().clamp_min(1e-6).view(1, c, 1, 1).float())
        self.norm_count.fill_(seen)
        return seen

    def on_train_start(self) -> None:
        if int(self.norm_count) > 0:  # resumed from a checkpoint: keep its statistics
            return
        world = self.trainer.world_size
        share = -(-self.hparams.norm_images // world)  # capped by the dataset (one pass at most)
        # A loader of its own over the train loader's dataset and sampler (this rank's shard under
        # DDP): iterating the train loader itself would advance its persistent workers' iterator.
        train = self.trainer.train_dataloader
        loader = DataLoader(train.dataset, batch_size=train.batch_size, sampler=train.sampler,
                            num_workers=train.num_workers, pin_memory=train.pin_memory)
        n = self.estimate_target_stats(loader, share)
        self.print(f"efficientad_teacher: target normalisation from {n} images")

    def normalized_target(self, images: Tensor) -> Tensor:
        return (self.target(images) - self.target_mean) / self.target_std

    # -- training -----------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        images = batch["image"]
        target = self.normalized_target(images)
        prediction = self.pdn(self.pdn_view(images))
        loss = F.mse_loss(prediction, target)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.pdn.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:
            path = save_teacher(self.pdn, self.hparams.output)
            print(f"efficientad_teacher: wrote teacher weights to {path}")

    # -- checkpoints ----------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CONFIG_KEY] = getattr(self, "method_config", None)
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith("target.backbone.")]:
            del state[key]  # the frozen backbone is rebuilt from method.backbone


def save_teacher(pdn: nn.Module, path: str | Path) -> Path:
    """Write ``pdn``'s plain state dict (keys ``0.weight``, ``3.weight``, ...) atomically."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save({k: v.detach().to("cpu", torch.float32).clone() for k, v in pdn.state_dict().items()}, tmp)
    os.replace(tmp, path)
    return path

