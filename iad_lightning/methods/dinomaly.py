"""Dinomaly (Guo et al., CVPR 2025) as a LightningModule: one model for all categories.

The maths live in ``models/dinomaly.py``; here: the recipe (iterations, dropout and eps per
dataset and setting), the hard-mined loss with p ramped per iteration, StableAdamW with the
warm-up cosine LR stepped per ITERATION, the effective batch split over devices, and the
official map and score. Spec: ``specs/dinomaly.md``.

Recipe (``recipe`` below, spec §10), resolved from the datamodule when the matching key is null:
unified (``data.category=all`` or a list): 10,000 iterations (Real-IAD 50,000, bottleneck
dropout 0.4), eps 1e-10; one category (the official ``*_sep`` scripts): 5,000 iterations, eps
1e-8 (Real-IAD 1e-10). ``trainer.max_steps`` left at -1 takes the recipe's iterations; an
explicit ``trainer.max_steps`` wins and also sets the schedule length; 0 evaluates without
training (with ``method.official_checkpoint``: the published model as it is).

``official_checkpoint`` is read by the MODEL (``method.model.official_checkpoint:
${method.official_checkpoint}`` in the config), which takes its architecture off the file; the
method records it. From Python, pass it to ``DinomalyModel`` directly.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from iad_lightning.checkpoint import CONFIG_KEY
from iad_lightning.data.transforms import Preprocess
from iad_lightning.errors import ConfigError
from iad_lightning.methods.base import AnomalyModule, split_effective_batch
from iad_lightning.models.dinomaly import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    DinomalyInference,
    DinomalyModel,
    StableAdamW,
    hard_mining_cosine_loss,
    hard_mining_p,
    warm_cosine_lr,
)


def recipe(data_format: str, category: Any) -> dict[str, Any]:
    """The official script's constants for a dataset format and ``data.category`` (spec §10)."""
    if category is None or isinstance(category, str):
        unified = category in (None, "all")
    else:  # a list (an omegaconf ListConfig from the command line)
        unified = len(category) != 1
    realiad = data_format == "realiad"
    if unified:
        return {"setting": "unified", "iterations": 50000 if realiad else 10000,
                "bottleneck_dropout": 0.4 if realiad else 0.2, "eps": 1e-10}
    return {"setting": "per-class", "iterations": 5000, "bottleneck_dropout": 0.2, "eps": 1e-10 if realiad else 1e-8}


class Dinomaly(AnomalyModule):
    """Reconstruction of frozen DINOv2-reg features; official defaults in ``conf/method/dinomaly.yaml``."""

    def __init__(
        self,
        model: DinomalyModel,
        image_size: int = 448,
        resize_backend: str = "pil",
        effective_batch_size: int = 16,
        lr: float = 2e-3,
        final_lr: float = 2e-4,
        warmup_iters: int = 100,
        weight_decay: float = 1e-4,
        betas: list[float] = (0.9, 0.999),
        eps: float | None = None,
        bottleneck_dropout: float | None = None,
        total_iters: int | None = None,
        p_final: float = 0.9,
        p_ramp: int = 1000,
        hm_factor: float = 0.1,
        eval_protocol: str = "ours",
        official_checkpoint: str | None = None,
        backbone: dict[str, Any] | None = None,  # unused: the global backbone group writes it (CNN methods)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "backbone"])
        if not isinstance(model, DinomalyModel):
            raise ConfigError("method.model must instantiate iad_lightning.models.dinomaly.DinomalyModel")
        if image_size < model.crop:
            raise ConfigError(f"method.image_size={image_size} is below method.model.crop={model.crop}")
        if eval_protocol not in ("ours", "official"):
            raise ConfigError(f"method.eval_protocol='{eval_protocol}' must be ours or official")
        self.model = model
        self.recipe: dict[str, Any] = recipe("", "all")  # until configure_data sees the data

    @property
    def preprocess(self) -> Preprocess:
        s = self.hparams.image_size  # exact square resize (no aspect kept), then the centre crop (spec §2)
        grey = self.hparams.eval_protocol == "official"  # masks resized bilinearly, as the official transform
        return Preprocess(resize=(s, s), crop=self.model.crop, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                          resize_backend=self.hparams.resize_backend, mask_interpolation="bilinear_grey" if grey else "nearest")

    def configure_data(self, datamodule: Any, world_size: int) -> None:
        """Per-device batch = effective batch / world size unless ``data.batch_size`` is set; the
        recipe of the data (iterations, dropout, eps) unless the method sets them."""
        split_effective_batch(datamodule, self.hparams.effective_batch_size, world_size)
        self.recipe = recipe(getattr(datamodule, "format", ""), getattr(datamodule, "category", "all"))
        hp = self.hparams
        for key in ("eps", "bottleneck_dropout"):
            if hp[key] is not None:
                self.recipe[key] = float(hp[key])
        self.model.bottleneck[0].drop.p = self.recipe["bottleneck_dropout"]

    # -- fit -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit":
            return
        loop = self.trainer.fit_loop
        if loop.max_steps == -1:  # the recipe's length; max_epochs -1 in the method config
            loop.max_steps = int(self.hparams.total_iters or self.recipe["iterations"])
        self.print(f"Dinomaly: {self.recipe['setting']} recipe, {self.trainer.max_steps} iterations, schedule over "
                   f"{self.total_iters()}, dropout {self.recipe['bottleneck_dropout']}, eps {self.recipe['eps']:g}"
                   + (f", weights from {self.hparams.official_checkpoint}" if self.hparams.official_checkpoint else ""))

    def total_iters(self) -> int:
        """The LR schedule's length: ``total_iters``, else ``trainer.max_steps``, else the recipe."""
        steps = self.trainer.max_steps if self._trainer is not None else -1
        return int(self.hparams.total_iters or (steps if steps > 0 else self.recipe["iterations"]))

    def _gather(self, d: torch.Tensor) -> torch.Tensor:
        return self.all_gather(d).reshape(-1)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        p = hard_mining_p(self.global_step, hp.p_final, hp.p_ramp)  # global_step = the official 0-based it
        en, de = self.model(batch["image"])
        gather = self._gather if self.trainer.world_size > 1 else None  # threshold over the global batch
        loss = hard_mining_cosine_loss(en, de, p, hp.hm_factor, gather)
        b = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True, batch_size=b)
        self.log("train/p", p, on_step=True, on_epoch=False, batch_size=b)
        return loss

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        opt = StableAdamW(self.model.trainable_parameters(), lr=hp.lr, betas=tuple(hp.betas), eps=self.recipe["eps"],
                          weight_decay=hp.weight_decay, amsgrad=True)
        factor = partial(_lr_factor, base=hp.lr, final=hp.final_lr, total=self.total_iters(), warmup=hp.warmup_iters)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        cfg = checkpoint.get(CONFIG_KEY)
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):  # rebuild without any weights file
            cfg["model"] = {**cfg["model"], "arch": dict(self.model.arch), "decoder_depth": len(self.model.decoder),
                            "target_layers": list(self.model.target_layers)}

    # -- predict ---------------------------------------------------------------------------------
    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model.maps(images)
        # the smoothed map_size map (the official pixel map) and the top-1 % score on it (spec §8);
        # the base class upsamples the map to the input size for the metrics
        return {"anomaly_map": out["map_smooth"], "pred_score": out["score"]}

    def evaluation_targets(self, out: dict[str, torch.Tensor], batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """``eval_protocol=official`` (spec §9): pixel metrics on the smoothed ``map_size`` map and
        the bilinear (grey-edged) mask resized nearest to it and binarised by ``> 0`` (``gt.bool()``);
        ``ours``: the map at the input size and the nearest-resized binary mask."""
        if self.hparams.eval_protocol != "official":
            return super().evaluation_targets(out, batch)
        small = out["anomaly_map_native"]
        gt = F.interpolate(batch["mask"].float(), size=small.shape[-2:], mode="nearest") > 0
        return small[:, 0], gt[:, 0]

    def export_module(self) -> torch.nn.Module:
        return DinomalyInference(self.model)


def _lr_factor(it: int, base: float, final: float, total: int, warmup: int) -> float:
    return warm_cosine_lr(it, base, final, total, warmup) / base
