"""ADPretrain pretraining (Yao et al., NeurIPS 2025) as a LightningModule; ``specs/adpretrain.md``.

    python train.py method=adpretrain data=realiad data.root=/datasets/Real-IAD      (authors' setting)
    python train.py method=adpretrain backbone=lite0 data=mvtec data.root=... data.fit_split=test

The train loader serves labelled images with masks (``data.fit_split``: ``all`` for Real-IAD, the
authors' choice, ``test`` for MVTec-layout sets). Per batch: ``num_shot`` is drawn from
``num_shots`` ({1, 4, 8}); every image gets ``num_shot`` normal reference images of its category
(and, on Real-IAD, its camera view C1..C5) drawn with replacement from the datamodule's *train
good* images; two colour-augmented views (MoCo transform, no geometry, one shared mask) go through
the frozen backbone, residuals against the bank, the projector and the summed angle + norm loss.
A batch without an abnormal image (label) is skipped, as in the authors' code. Adam lr 1e-4 wd 5e-4,
x0.1 at epochs 7 and 9. Centres: fp32 residuals of un-augmented normal images against 4-shot banks
drawn with replacement (an image may be drawn into its own bank, as the authors' code allows).

The run writes ``projector.pt`` (weights, backbone name, levels, image size, centres; loadable with
``weights_only``) for ``method.projector=PATH`` of PatchCore / PaDiM / FeatureNorm.

Images: the authors' Pillow bicubic Resize(224) + CenterCrop(224) (``resize_backend=pil``).
``param_dtype=bf16`` casts the projector to bf16 before Adam as the authors do; the default keeps
fp32 weights under bf16 autocast.

Deviations (documented, spec section 6): the last partial batch is kept (the authors drop it); the views are
normalised with the backbone's own statistics (the authors' MoCoTransform always uses CLIP's, a quirk
reproduced by ``clip_normalised_views=true``); MVTec test-set model selection (``selection``) is off.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torchvision.transforms import v2

from iad_lightning.data.dataset import AnomalyDataset
from iad_lightning.data.formats.realiad import camera_view
from iad_lightning.data.transforms import Preprocess
from iad_lightning.errors import ConfigError, DatasetError
from iad_lightning.methods.base import AnomalyModule
from iad_lightning.models.adpretrain import (
    CLIP_MEAN,
    CLIP_STD,
    ADPretrainModel,
    LevelBackbone,
    bank_tokens,
    projector_file,
)


def moco_transform(blur_kernel: int = 13) -> v2.Compose:
    """Authors' MoCoTransform on [0, 1] images: ColorJitter(0.4, 0.4, 0.4, 0.1) p 0.8, grayscale
    p 0.2, Gaussian blur sigma in [0.1, 2] p 0.5 (kernel 13 px covers 3 sigma at sigma 2; MoCo
    blurs with PIL's radius-sigma filter). No geometric augmentation: both views share the mask."""
    return v2.Compose([
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=(0.1, 2.0))], p=0.5),
    ])


class ADPretrain(AnomalyModule):
    """Pretrains the per-level Feature Projectors; defaults in ``conf/method/adpretrain.yaml``.

    backbone: ``LevelBackbone`` arguments (``name`` dinov2-base | dinov2-large | clip-base |
        clip-large | tf_efficientnet_lite0, ``weights``); ``backbone=lite0`` is the offline stand-in.
    model: a partial ``ADPretrainModel`` (``_target_`` + ``_partial_``) taking the built backbone.
    same_view: bank from the same Real-IAD camera view (``auto``: when the data format is realiad).
    cache_references: keep the frozen backbone's features of reference images (they are never
        augmented, so identical each time) instead of re-encoding them; memory grows with the pool.
    selection: off by default. ``{root, format, category, metric, shots}`` evaluates FeatureNorm on
        that dataset's *test split* after every epoch and writes the best projector to
        ``projector_best.pt``: the authors' MVTec-test model selection, for parity only (test-set
        selection is not an honest protocol).
    """

    def __init__(
        self,
        backbone: dict[str, Any],
        model: Callable[..., ADPretrainModel],
        image_size: int = 224,
        num_shots: list[int] = (1, 4, 8),
        center_shots: int = 4,
        center_max_images: int | None = None,
        same_view: str | bool = "auto",
        lr: float = 1e-4,
        weight_decay: float = 5e-4,
        milestones: list[int] = (7, 9),
        gamma: float = 0.1,
        bf16: str | bool = "auto",
        param_dtype: str = "fp32",
        resize_backend: str = "pil",
        clip_normalised_views: bool = False,
        cache_references: bool = False,
        projector_path: str | None = None,
        selection: dict[str, Any] | None = None,
        seed: int = 42,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])  # a partial (not safe to pickle); its config is in method_config
        self.model = model(backbone=LevelBackbone(**backbone))
        if param_dtype not in ("fp32", "bf16"):
            raise ConfigError(f"method.param_dtype='{param_dtype}' must be fp32 or bf16")
        if param_dtype == "bf16":  # the authors cast the projector itself to bf16 before Adam
            self.model.projector.to(torch.bfloat16)
        self.augment = moco_transform()
        self._rng = np.random.default_rng(seed)
        self._pools: dict[tuple, list[int]] = {}
        self._ref_dataset: AnomalyDataset | None = None
        self._ref_cache: dict[int, list[torch.Tensor]] = {}
        self.skipped_batches = 0
        self.images_seen = 0
        self._best: float | None = None

    @property
    def preprocess(self) -> Preprocess:
        s, bb = self.hparams.image_size, self.model.backbone
        # authors: Resize(224, bicubic) on the PIL image + CenterCrop(224); tensor: the float-tensor resize
        return Preprocess(resize=s, crop=s, mean=bb.mean, std=bb.std, resize_backend=self.hparams.resize_backend,
                          interpolation="bicubic")

    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        raise ConfigError("method=adpretrain only pretrains a projector (test=false); evaluate it with "
                          "method=featurenorm|patchcore|padim method.projector=<run>/projector.pt")

    # -- reference banks ------------------------------------------------------------------------
    def _view_key(self, rec_path: str) -> str | None:
        return camera_view(rec_path) if self._same_view else None

    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        dm = self.trainer.datamodule
        self._same_view = (dm.format == "realiad") if self.hparams.same_view == "auto" else bool(self.hparams.same_view)
        refs = dm.index_records()["train"]
        if not refs:
            raise DatasetError(f"ADPretrain needs train good images of '{dm.root}' for the reference banks")
        self._ref_dataset = AnomalyDataset(refs, self.preprocess)
        pools: dict[tuple, list[int]] = defaultdict(list)
        for i, rec in enumerate(refs):
            pools[(rec.category, self._view_key(rec.image))].append(i)
        self._pools = dict(pools)
        self._ref_cache.clear()

    def _pool(self, category: str, path: str) -> list[int]:
        key = (category, self._view_key(path))
        if key not in self._pools:
            raise DatasetError(f"no train good image of category '{category}'"
                               f"{f' view {key[1]}' if key[1] else ''} for the reference bank")
        return self._pools[key]

    def _reference_features(self, indices: list[int]) -> list[torch.Tensor]:
        """Backbone levels (n, C, h, w) of reference images (train index), cached when asked."""
        missing = [i for i in dict.fromkeys(indices) if i not in self._ref_cache]
        if missing:
            images = torch.stack([self._ref_dataset[i]["image"] for i in missing]).to(self.device)
            fresh = []
            for s in range(0, len(missing), 32):
                with self._autocast():
                    fresh.append([f.float() for f in self.model.backbone(images[s:s + 32])])
            feats = [torch.cat([f[k] for f in fresh]) for k in range(4)]
            got = {i: [f[j] for f in feats] for j, i in enumerate(missing)}
        else:
            got = {}
        out = [torch.stack([(self._ref_cache.get(i) or got[i])[k] for i in indices]) for k in range(4)]
        if self.hparams.cache_references:
            self._ref_cache.update(got)
        return out

    def _banks(self, categories: list[str], paths: list[str], shots: int) -> list:
        """Per-image banks (B, shots * h * w, C) per level, drawn with replacement (spec section 3);
        as in the authors' code an image may be drawn into its own bank (Real-IAD: fit = all images)."""
        draws = []
        for cat, path in zip(categories, paths):
            draws.append(self._rng.choice(self._pool(cat, path), size=shots, replace=True).tolist())
        feats = self._reference_features([i for d in draws for i in d])
        b = len(categories)
        return [bank_tokens([f])[0].view(b, -1, f.shape[1]) for f in feats]

    # -- centres ------------------------------------------------------------------------------
    @torch.no_grad()
    def _compute_centers(self) -> None:
        """c_l = mean residual of un-augmented normal images (4-shot banks, no projector; spec 5)."""
        dm = self.trainer.datamodule
        normal = [r for r in dm.fit_records() if r.label == 0 and not r.masks]
        if not normal:
            normal = list(self._ref_dataset.records)
        if self.hparams.center_max_images and len(normal) > self.hparams.center_max_images:
            pick = np.random.default_rng(self.hparams.seed).choice(len(normal), self.hparams.center_max_images,
                                                                   replace=False)
            normal = [normal[i] for i in sorted(pick)]
        data = AnomalyDataset(normal, self.preprocess)
        sums = [torch.zeros(c, dtype=torch.float64, device=self.device) for c in self.model.backbone.channels]
        count = [0] * 4
        for s in range(0, len(data), 16):
            items = [data[i] for i in range(s, min(s + 16, len(data)))]
            images = torch.stack([it["image"] for it in items]).to(self.device)
            paths = [it["path"] for it in items]
            banks = self._banks([it["category"] for it in items], paths, self.hparams.center_shots)
            res = self.model.residuals(images, banks)  # fp32, as the authors' get_center_features.py
            for k, r in enumerate(res):
                sums[k] += r.double().sum(dim=(0, 2, 3))
                count[k] += r.shape[0] * r.shape[2] * r.shape[3]
        self.model.set_centers([sm / max(1, n) for sm, n in zip(sums, count)])
        self.print(f"ADPretrain: centres from {len(data)} normal images")

    def on_fit_start(self) -> None:
        super().on_fit_start()  # records the fit's preprocessing
        self._compute_centers()
        self.skipped_batches = self.images_seen = 0

    # -- training -----------------------------------------------------------------------------
    def _use_bf16(self) -> bool:
        mode = self.hparams.bf16
        if mode == "auto":
            return self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        return bool(mode)

    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self._use_bf16())

    def _views(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bb = self.model.backbone
        mean = torch.tensor(bb.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(bb.std, device=images.device).view(1, 3, 1, 1)
        raw = (images * std + mean).clamp(0, 1)
        if self.hparams.clip_normalised_views:  # authors' quirk: views always CLIP-normalised
            mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
            std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
        views = []
        for _ in range(2):
            aug = torch.stack([self.augment(img) for img in raw])  # random per image
            views.append((aug - mean) / std)
        return views[0], views[1]

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        mask = batch["mask"]
        if not bool(torch.as_tensor(batch["label"]).any()):  # authors: a batch without an abnormal label is skipped
            self.skipped_batches += 1
            return None
        shots = int(self._rng.choice(list(self.hparams.num_shots)))  # once per batch
        banks = self._banks(list(batch["category"]), list(batch["path"]), shots)
        view1, view2 = self._views(batch["image"])
        with self._autocast():
            loss, parts = self.model.loss(view1, view2, mask, banks)
        b = view1.shape[0]
        self.images_seen += b
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=b)
        self.log("train/angle", parts["angle"], on_step=False, on_epoch=True, batch_size=b)
        self.log("train/norm", parts["norm"], on_step=False, on_epoch=True, batch_size=b)
        self.log("train/shots", float(shots), on_step=False, on_epoch=True, batch_size=b)
        return loss

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        opt = torch.optim.Adam(self.model.projector.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(hp.milestones), gamma=hp.gamma)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch", "frequency": 1}}

    # -- output -------------------------------------------------------------------------------
    def projector_output(self) -> Path:
        if self.hparams.projector_path:
            return Path(self.hparams.projector_path).expanduser()
        return Path(self.trainer.default_root_dir) / "projector.pt"

    def _save(self, path: Path, extra: dict[str, Any] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(projector_file(self.model.projector, self.model.backbone, self.hparams.image_size,
                                  self.model.centers, extra), path)

    def on_train_epoch_end(self) -> None:
        if self.hparams.selection and self.trainer.is_global_zero:
            self._select()

    def on_train_end(self) -> None:
        if self.trainer.is_global_zero:  # model selection: the last epoch (default)
            path = self.projector_output()
            self._save(path, {"epochs": self.current_epoch})  # after training: the epochs completed
            self.print(f"ADPretrain: projector written to {path} ({self.skipped_batches} batches without "
                       "an abnormal image skipped)")

    # -- optional test-set selection (authors' protocol, off by default) ------------------------
    @torch.no_grad()
    def _select(self) -> None:
        from iad_lightning.data.datamodule import AnomalyDataModule
        from iad_lightning.methods.featurenorm import evaluate_featurenorm

        sel = dict(self.hparams.selection)
        metric = sel.pop("metric", "pixel_aupro")
        shots = int(sel.pop("shots", 8))
        dm = AnomalyDataModule(**{"format": "mvtec", "category": "all", "batch_size": 16, **sel})
        dm.preprocess = self.preprocess
        projector = copy.deepcopy(self.model.projector).eval()
        value = evaluate_featurenorm(self.model.backbone, projector, dm, shots, self.hparams.seed, self.device)[metric]
        self.print(f"ADPretrain selection (test split of {sel.get('root')}, NOT held out): {metric} = {value}")
        if value is not None and (self._best is None or value > self._best) and not math.isnan(value):
            self._best = value
            self._save(self.projector_output().with_name("projector_best.pt"),
                       {"epochs": self.current_epoch + 1, "selection": {metric: value}})
