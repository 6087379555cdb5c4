"""EfficientAD-S/M (Batzner et al., WACV 2024) as a LightningModule: training steps and fit-time statistics.

The networks and the deployable inference graph live in ``models/efficientad.py``. Here:
teacher loading, teacher channel statistics on the train split (before training), the three losses
(hard student-teacher loss + ImageNet penalty, AE loss, student-AE loss; spec §4), the LR drop and
the quantile normalisation fitted on the held-out validation split (never on test; spec §5).

Deviations from specs/efficientad.md (also noted where they happen):
- The AE colour augmentation is applied to the resized, un-normalised tensor in ``training_step``
  (nelson: on the PIL image before the resize).
- The validation split is the framework's seeded permutation per category (``data.seed=42``), not
  ``torch.utils.data.random_split`` with seed 42, so the held-out images differ from nelson's.
- Maps are evaluated at the preprocessed input size (framework-wide choice), not the original H x W.
- Statistics under DDP: each rank runs the teacher (statistics) and the three networks (quantiles)
  on its strided shard of the split only; the channel sums are all-reduced and the map pixels
  gathered, so every rank ends with the same values as one process. Training uses batch 1 per rank.
- The teacher channel std is computed in one float64 pass as sqrt(E[T^2] - mu^2) (nelson: two passes;
  the same value). Adam is torch's fused implementation (same update rule).
- Extra options, paper values by default: ``ae_map_weight`` (0.5: the two maps averaged),
  ``normalize_maps`` (true), ``image_size`` (256; below 256 the AE's last encoder conv is padded so
  the latent stays 1x1, see ``models/efficientad.AutoEncoder``).
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Iterator

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from iad_lightning.data.formats.images import find_images
from iad_lightning.data.io import load_image
from iad_lightning.data.transforms import Preprocess
from iad_lightning.distributed import gather_objects, gather_rows, is_distributed
from iad_lightning.errors import ConfigError
from iad_lightning.methods.base import AnomalyModule
from iad_lightning.models.efficientad import (
    EfficientADModel,
    exact_quantile,
    hard_feature_loss,
    load_teacher_weights,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

NO_PENALTY_WARNING = (
    "EfficientAD: method.penalty_dir is null, so training runs WITHOUT the ImageNet penalty loss; "
    "the published results used it (spec §4). Set method.penalty_dir=/path/to/imagenet/train "
    "(or Imagenette, a documented deviation)."
)


def missing_teacher_message(model_size: str, path: Any) -> str:
    what = "method.teacher_weights is null" if path is None else f"method.teacher_weights='{path}' does not exist"
    return (
        f"EfficientAD needs a pretrained PDN teacher ({what}). Either distil one: "
        f"`python train.py method=efficientad_teacher data=images data.root=/path/to/imagenet/train "
        f"method.model_size={model_size}` (offline: add `backbone=lite0`), or download "
        f"nelson1425/EfficientAD's models/teacher_{model_size}.pth (or anomalib's "
        f"pretrained_teacher_{model_size}.pth), then pass method.teacher_weights=PATH."
    )


class PenaltyImages(Dataset):
    """Natural images for the penalty loss: Resize(2S x 2S), RandomGrayscale(0.3), CenterCrop(S),
    ImageNet normalisation (spec §1: 512 / 256 at S = 256)."""

    def __init__(self, root: str | Path, image_size: int, grayscale_p: float = 0.3, resize_backend: str = "pil") -> None:
        self.files = find_images(root)
        resize = v2.Resize((2 * image_size, 2 * image_size), antialias=True)
        to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        # pil: Pillow resizes the 8-bit image first, as nelson's transforms.Resize on the PIL image
        self.transform = v2.Compose([
            *([resize, *to_float] if resize_backend == "pil" else [*to_float, resize]),
            v2.RandomGrayscale(p=grayscale_p),
            v2.CenterCrop(image_size),
            v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(load_image(self.files[i])).as_subclass(torch.Tensor)


def infinite(loader: DataLoader) -> Iterator[torch.Tensor]:
    """Endless iteration over a (reshuffled every pass) loader."""
    for _ in itertools.count():
        yield from loader


class EfficientAD(AnomalyModule):
    """EfficientAD-S / -M; paper defaults in ``conf/method/efficientad.yaml``."""

    def __init__(
        self,
        model_size: str = "small",
        out_channels: int = 384,
        image_size: int = 256,
        teacher_weights: str | None = None,
        penalty_dir: str | None = None,
        num_steps: int = 70_000,
        lr: float = 1e-4,
        weight_decay: float = 1e-5,
        lr_drop_fraction: float = 0.95,
        lr_gamma: float = 0.1,
        hard_quantile: float = 0.999,
        q_a: float = 0.9,
        q_b: float = 0.995,
        padding: bool = False,
        pad_maps: bool = True,
        normalize_maps: bool = True,
        ae_map_weight: float = 0.5,
        ae_augment: float = 0.2,
        penalty_grayscale: float = 0.3,
        penalty_workers: int = 0,
        stats_batch_size: int = 16,
        resize_backend: str = "pil",
        backbone: dict[str, Any] | None = None,  # unused: the global backbone group writes it
    ) -> None:
        super().__init__()
        if model_size not in ("small", "medium"):
            raise ConfigError(f"method.model_size='{model_size}' must be 'small' or 'medium'")
        if not 0.0 <= q_a < q_b <= 1.0:
            raise ConfigError(f"method.q_a={q_a} and method.q_b={q_b} must satisfy 0 <= q_a < q_b <= 1")
        self.save_hyperparameters(ignore=["backbone"])
        if not 0.0 <= ae_map_weight <= 1.0:
            raise ConfigError(f"method.ae_map_weight={ae_map_weight} must be in [0, 1] (the paper: 0.5)")
        self.model = EfficientADModel(model_size, out_channels, padding, pad_maps, image_size, ae_map_weight)
        self._penalty: Iterator[torch.Tensor] | None = None
        self._quantiles_fitted = False

    @property
    def preprocess(self) -> Preprocess:
        s = self.hparams.image_size  # exact S x S, aspect ignored (spec §1)
        return Preprocess(resize=(s, s), crop=None, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          resize_backend=self.hparams.resize_backend)

    def export_module(self) -> torch.nn.Module:
        return self.model

    # -- fit-time setup ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        path = self.hparams.teacher_weights
        if path is None or not Path(str(path)).expanduser().is_file():
            raise ConfigError(missing_teacher_message(self.hparams.model_size, path))
        state = load_teacher_weights(path, self.hparams.model_size, self.hparams.out_channels)
        self.model.teacher.load_state_dict(state)
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if getattr(dm, "batch_size", 1) != 1:  # spec §8.4: the hard loss assumes batch 1 (fit only)
            raise ConfigError(
                f"EfficientAD trains with batch size 1 (the hard-feature quantile assumes it); "
                f"data.batch_size={dm.batch_size} must be 1"
            )
        if self.hparams.normalize_maps and dm is not None and hasattr(dm, "index_records"):
            if not dm.index_records()["val"]:
                raise ConfigError(
                    "EfficientAD fits its map normalisation on held-out train good images, but the "
                    "validation split is empty: set data.val_fraction (the paper holds out 0.1), or "
                    "method.normalize_maps=false (not the paper's method)"
                )

    def configure_optimizers(self) -> dict[str, Any]:
        params = [*self.model.student.parameters(), *self.model.autoencoder.parameters()]
        # fused Adam (same update rule as nelson's torch.optim.Adam, ~4x faster on CPU)
        fused = self.device.type in ("cpu", "cuda")
        opt = torch.optim.Adam(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=fused)
        # StepLR stepped every iteration: floor(0.95 * 70,000) = 66,500 (1e-9 guards float error)
        step_size = max(1, math.floor(self.hparams.lr_drop_fraction * self.hparams.num_steps + 1e-9))
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=self.hparams.lr_gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    def _loader(self, split: str) -> DataLoader:
        """This rank's strided shard of ``split`` (all of it in one process) for the statistics."""
        dm = self.trainer.datamodule
        ds = dm.dataset(split)
        if is_distributed():
            ds = Subset(ds, range(torch.distributed.get_rank(), len(ds), torch.distributed.get_world_size()))
        return DataLoader(ds, batch_size=self.hparams.stats_batch_size, shuffle=False, num_workers=dm.num_workers)

    def _group_device(self) -> torch.device:
        """Where collectives run: the rank's GPU (nccl) or the CPU (gloo)."""
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def on_train_start(self) -> None:
        self.fit_teacher_statistics(self._loader("train"))
        if self.hparams.penalty_dir:
            ds = PenaltyImages(self.hparams.penalty_dir, self.hparams.image_size, self.hparams.penalty_grayscale,
                               self.hparams.resize_backend)
            loader = DataLoader(ds, batch_size=1, shuffle=True, num_workers=self.hparams.penalty_workers,
                                persistent_workers=self.hparams.penalty_workers > 0)
            self._penalty = infinite(loader)
            rank_zero_info(f"EfficientAD: penalty images from '{self.hparams.penalty_dir}' ({len(ds)} files)")
        else:
            self._penalty = None
            rank_zero_warn(NO_PENALTY_WARNING)

    @torch.no_grad()
    def fit_teacher_statistics(self, loader: DataLoader) -> None:
        """mu_c = mean over images of per-image spatial means; sigma_c^2 = mean over images of the
        per-image mean of (T - mu_c)^2 = E[T^2] - mu_c^2, accumulated in float64 in one pass
        (nelson uses two passes; same value). Per-image means make it batch-size independent.
        Under DDP ``loader`` is this rank's shard; the sums and counts are all-reduced."""
        c = self.hparams.out_channels
        sums = torch.zeros(2 * c + 1, dtype=torch.float64, device=self.device)  # [sum mean_c, sum E[T^2]_c, n]
        for batch in loader:
            t = self.model.teacher(batch["image"].to(self.device)).double()
            sums[:c] += t.mean(dim=(2, 3)).sum(0)
            sums[c : 2 * c] += (t * t).mean(dim=(2, 3)).sum(0)
            sums[-1] += t.shape[0]
        if is_distributed():
            total = sums.to(self._group_device())
            torch.distributed.all_reduce(total)
            sums = total.to(self.device)
        n = sums[-1]
        if n == 0:
            raise ConfigError("EfficientAD: no train images for the teacher statistics")
        mean = sums[:c] / n
        std = (sums[c : 2 * c] / n - mean * mean).clamp_min(0).sqrt()
        self.model.teacher_mean.copy_(mean.view(1, -1, 1, 1).float())
        self.model.teacher_std.copy_(std.view(1, -1, 1, 1).float())

    # -- training ----------------------------------------------------------------------------
    def _augment(self, images: torch.Tensor) -> torch.Tensor:
        """One of brightness / contrast / saturation with factor U(1-a, 1+a), per image, on the
        un-normalised [0, 1] tensor (deviation: nelson applies it to the PIL image before resize)."""
        a = self.hparams.ae_augment
        mean = images.new_tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = images.new_tensor(IMAGENET_STD).view(1, 3, 1, 1)
        raw = (images * std + mean).clamp(0, 1)
        ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation)
        choice = torch.randint(0, 3, (images.shape[0],)).tolist()
        factors = (1 - a + 2 * a * torch.rand(images.shape[0])).tolist()
        out = torch.stack([ops[c](img, f) for img, c, f in zip(raw, choice, factors)])
        return (out - mean) / std

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        images = batch["image"]
        model, c, b = self.model, self.hparams.out_channels, batch["image"].shape[0]
        aug = self._augment(images)  # the AE branch's input I'
        penalty = next(self._penalty).to(self.device) if self._penalty is not None else None
        # One student pass over [I, I', P] and one teacher pass over [I, I']: the same values as
        # nelson's separate calls (no batch-dependent layers), fewer kernel launches.
        s_all = model.student(torch.cat([images, aug] + ([penalty] if penalty is not None else [])))
        t_all = model.teacher_features(torch.cat([images, aug]))
        t, t_aug = t_all[:b], t_all[b:]
        s_st, s_ae = s_all[:b, :c], s_all[b : 2 * b, c:]  # S[:, :C] imitates T, S[:, C:] the AE
        loss_hard = hard_feature_loss((t - s_st) ** 2, self.hparams.hard_quantile)
        loss = loss_hard
        if penalty is not None:
            loss_pen = (s_all[2 * b :, :c] ** 2).mean()  # L_pen = mean(S_st(P)^2)
            loss = loss + loss_pen
            self.log("train/loss_penalty", loss_pen)
        ae = model.autoencoder(aug)
        loss_ae = ((t_aug - ae) ** 2).mean()  # L_AE
        loss_stae = ((ae - s_ae) ** 2).mean()  # L_STAE, gradients into A and S
        loss = loss + loss_ae + loss_stae
        self.log_dict({"train/loss": loss, "train/loss_hard": loss_hard, "train/loss_ae": loss_ae,
                       "train/loss_stae": loss_stae})
        return loss

    def on_train_epoch_end(self) -> None:
        # The last epoch's end runs before ModelCheckpoint saves, so the quantiles are checkpointed.
        tr = self.trainer
        done = (tr.max_steps is not None and 0 < tr.max_steps <= tr.global_step) or tr.should_stop or (
            tr.max_epochs is not None and tr.max_epochs > 0 and tr.current_epoch + 1 >= tr.max_epochs
        )
        if done:
            self._fit_quantiles()

    def on_train_end(self) -> None:
        self._fit_quantiles()  # no-op if the last epoch end already did it

    def _fit_quantiles(self) -> None:
        if self._quantiles_fitted or not self.hparams.normalize_maps:
            return
        self.fit_map_quantiles(self._loader("val"))
        self._quantiles_fitted = True

    @torch.no_grad()
    def fit_map_quantiles(self, loader: DataLoader) -> None:
        """q_a / q_b quantiles of every validation pixel of M_ST and M_AE (spec §5), exact
        (kthvalue, no 2**24 limit), on the un-padded maps before the 4-px padding (nelson's order).
        Under DDP ``loader`` is this rank's shard; the pixels of all ranks are gathered first."""
        was_training = self.model.training
        self.model.eval()
        maps_st, maps_ae = [torch.empty(0)], [torch.empty(0)]  # flattened pixels, on the CPU
        n_images = 0
        for batch in loader:
            m_st, m_ae = self.model.raw_maps(batch["image"].to(self.device))
            maps_st.append(m_st.float().flatten().cpu())
            maps_ae.append(m_ae.float().flatten().cpu())
            n_images += m_st.shape[0]
        self.model.train(was_training)
        st, ae = torch.cat(maps_st), torch.cat(maps_ae)
        if is_distributed():
            st, ae = gather_rows(st, self._group_device()), gather_rows(ae, self._group_device())
            n_images = sum(gather_objects(n_images))
        if n_images == 0:
            raise ConfigError("EfficientAD: the validation split is empty; set data.val_fraction")
        qa, qb = self.hparams.q_a, self.hparams.q_b
        m = self.model
        for buf, value in ((m.q_st_start, exact_quantile(st, qa)), (m.q_st_end, exact_quantile(st, qb)),
                           (m.q_ae_start, exact_quantile(ae, qa)), (m.q_ae_end, exact_quantile(ae, qb))):
            buf.copy_(value.to(buf.device))
        rank_zero_info(f"EfficientAD: map quantiles from {n_images} validation images: "
                       f"ST [{m.q_st_start.item():.4g}, {m.q_st_end.item():.4g}], "
                       f"AE [{m.q_ae_start.item():.4g}, {m.q_ae_end.item():.4g}]")

    # -- inference ---------------------------------------------------------------------------
    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        amap, score = self.model(images)
        return {"anomaly_map": amap, "pred_score": score}
