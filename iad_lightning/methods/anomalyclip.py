"""AnomalyCLIP (Zhou et al., ICLR 2024) as a LightningModule: prompt learning on a frozen CLIP.

The maths live in ``models/anomalyclip.py``; here: the loss (global cross-entropy + lambda x
(focal + dice on both classes)), Adam on the prompt learner only, and the inference head
(image score = global abnormal probability; map = abnormal probability summed over the chosen
layers, Gaussian sigma 4, at input size). Spec: ``specs/anomalyclip.md``.

Protocol: prompts are trained on the labelled test split of an auxiliary dataset
(``data.fit_split=test``) and evaluated zero-shot on another one (``eval_data=...``, see
``run.py``). ``prompt_checkpoint`` loads the official ``epoch_15.pth`` in ``setup`` (so test.py
rebuilding from our checkpoint never needs the file); with ``trainer.max_epochs=0`` that is a
zero-shot run of the published prompts.

The checkpoint holds the frozen CLIP as well (ViT-L/14: ~1.7 GB in fp32) and the CLIP
architecture in its method config, so test.py rebuilds the model with no weights file.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from iad_lightning.checkpoint import CONFIG_KEY
from iad_lightning.data.transforms import Preprocess
from iad_lightning.errors import ConfigError
from iad_lightning.methods.base import AnomalyModule
from iad_lightning.models.anomalyclip import (
    OPENAI_MEAN,
    OPENAI_STD,
    AnomalyCLIPInference,
    AnomalyCLIPModel,
    anomaly_map,
    load_official_prompts,
    local_loss,
)

TRAINED_ON_KEY = "anomalyclip_trained_on"


class AnomalyCLIP(AnomalyModule):
    """Object-agnostic prompt learning; paper defaults in ``conf/method/anomalyclip.yaml``."""

    def __init__(
        self,
        model: AnomalyCLIPModel,
        lambda_local: float = 4.0,
        lr: float = 1e-3,
        betas: list[float] = (0.5, 0.999),
        sigma: float = 4.0,
        prompt_checkpoint: str | None = None,
        resize_backend: str = "pil",
        backbone: dict[str, Any] | None = None,  # unused: the global backbone group writes it (CNN methods)
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model", "backbone"])
        if not isinstance(model, AnomalyCLIPModel):
            raise ConfigError("method.model must instantiate iad_lightning.models.anomalyclip.AnomalyCLIPModel")
        self.model = model
        self.trained_on: dict[str, Any] | None = None  # set by run.train; persisted in checkpoints
        self._text: torch.Tensor | None = None  # eval-time text features, recomputed after training

    @property
    def preprocess(self) -> Preprocess:
        size = self.model.image_size
        if self.hparams.resize_backend == "pil":  # official utils.get_transform / dataset.py (spec §3)
            # Pillow bicubic on the 8-bit image to (S, S), aspect not kept, RGB after the resize; the
            # 0/255 mask resized bilinearly and binarised at > 0.5
            return Preprocess(resize=(size, size), crop=None, mean=OPENAI_MEAN, std=OPENAI_STD, resize_backend="pil",
                              interpolation="bicubic", rgb_after_resize=True, mask_interpolation="bilinear")
        # tensor: RGB first, antialiased bilinear on the float tensor, nearest mask (before issue 25)
        return Preprocess(resize=(size, size), crop=None, mean=OPENAI_MEAN, std=OPENAI_STD, resize_backend="tensor")

    # -- fit -----------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if stage == "fit" and self.model.clip_weights is None:
            raise ConfigError(
                "method.model.clip_weights is null: set it to openai, a CLIP weights file, or random"
            )
        dm = getattr(self._trainer, "datamodule", None)
        if stage == "fit" and getattr(dm, "fit_split", None) == "train" and self.trainer.max_epochs:
            self.print("AnomalyCLIP: WARNING data.fit_split=train serves only normal images (no anomalies, no "
                       "masks); the protocol trains on an auxiliary dataset's labelled test split: data.fit_split=test")
        path = self.hparams.prompt_checkpoint
        if path and not getattr(self, "_prompts_loaded", False):
            ignored = load_official_prompts(self.model.prompt_learner, path)
            self._prompts_loaded, self._text = True, None
            self.trained_on = {**(self.trained_on or {}), "prompt_checkpoint": str(path)}
            dead = sum(k.startswith("compound_prompt_projections") for k in ignored)
            self.print(f"AnomalyCLIP: prompts from {path} ({dead} dead compound_prompt_projections tensors "
                       f"and {len(ignored) - dead} derived buffers ignored)")

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        self._text = None
        text = self.model.text_features()
        logits, maps = self.model(batch["image"], text)
        loss_global = F.cross_entropy(logits, batch["label"].long())  # at temperature 0.07
        gt = (batch["mask"][:, 0] > 0.5).to(logits.dtype)
        loss_local = local_loss(maps, gt, self.hparams.lambda_local)
        loss = loss_global + loss_local
        b = batch["image"].shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, sync_dist=True, batch_size=b)
        self.log("train/loss_global", loss_global, on_step=False, on_epoch=True, sync_dist=True, batch_size=b)
        return loss

    def on_fit_end(self) -> None:
        self._text = None
        self.trained_on = self._trained_on_now()

    def _trained_on_now(self) -> dict[str, Any] | None:
        """``trained_on`` with the optimiser steps so far (no ``data`` entry after 0 steps)."""
        if self.trained_on is None:
            return None
        steps = int(self.global_step)
        keep = {k: v for k, v in self.trained_on.items() if k != "train_steps" and (steps or k != "data")}
        return {**keep, "train_steps": steps}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.prompt_learner.parameters(), lr=self.hparams.lr,
                                betas=tuple(self.hparams.betas))

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        cfg = checkpoint.get(CONFIG_KEY)
        if isinstance(cfg, dict) and isinstance(cfg.get("model"), dict):
            cfg["model"] = {**cfg["model"], "arch": self.model.arch}  # rebuild without the weights file
        checkpoint[TRAINED_ON_KEY] = self._trained_on_now()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)  # calibration details, the fitted preprocessing
        self.trained_on, self._text = checkpoint.get(TRAINED_ON_KEY), None

    def load_state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._text = None
        return super().load_state_dict(*args, **kwargs)

    # -- predict ---------------------------------------------------------------------------------
    def text_features(self) -> torch.Tensor:
        if self._text is None or self._text.device != self.device:
            with torch.no_grad():
                self._text = self.model.text_features()
        return self._text

    def predict_batch(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        logits, maps = self.model(images, self.text_features())
        return {"anomaly_map": anomaly_map(maps, self.hparams.sigma), "pred_score": logits.softmax(-1)[:, 1]}

    def export_module(self) -> torch.nn.Module:
        return AnomalyCLIPInference(self.model, self.hparams.sigma)
