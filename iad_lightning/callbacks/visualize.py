"""Anomaly-map overlays: PNG files in the run folder and an image grid for image loggers."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from PIL import Image
from scipy import ndimage

from iad_lightning.colors import jet  # noqa: F401  (also re-exported here)

def overlay(image: np.ndarray, amap: np.ndarray, mask: np.ndarray | None, lo: float, hi: float) -> np.ndarray:
    """Blend a jet-coloured map (scaled to [lo, hi]) over an RGB uint8 image; outline the mask in green."""
    heat = jet((amap - lo) / max(hi - lo, 1e-12))
    out = 0.5 * image.astype(np.float32) / 255.0 + 0.5 * heat
    if mask is not None and mask.any():
        edge = mask & ~ndimage.binary_erosion(mask, iterations=1)
        out[edge] = (0.0, 1.0, 0.0)
    return (np.clip(out, 0, 1) * 255).astype(np.uint8)


class AnomalyMapVisualizer(L.Callback):
    """Keeps up to ``n_images`` test images per category (half anomalous, half good), writes ``<run>/images/<category>/<stem>.png`` (image | overlay side by side) and logs
    one grid per category to every logger that takes images (TensorBoard, W&B, MLflow).

    The colour scale of a category spans the min and max of the kept maps: it is for display only
    and never feeds an evaluation number.
    """

    def __init__(self, n_images: int = 8, dirname: str = "images", log_to_loggers: bool = True) -> None:
        self.n_images, self.dirname, self.log_to_loggers = n_images, dirname, log_to_loggers
        self._kept: dict[str, list[dict[str, Any]]] = defaultdict(list)

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._kept = defaultdict(list)

    def _wants(self, category: str, label: int) -> bool:
        same = sum(1 for k in self._kept[category] if k["label"] == label)
        return same < (self.n_images - self.n_images // 2 if label else self.n_images // 2)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if not trainer.is_global_zero or self.n_images <= 0:
            return
        mean = np.asarray(pl_module.input_preprocess.mean)[:, None, None]
        std = np.asarray(pl_module.input_preprocess.std)[:, None, None]
        for i in range(len(batch["label"])):
            cat, label = batch["category"][i], int(batch["label"][i])
            if not self._wants(cat, label):
                continue
            img = batch["image"][i].detach().float().cpu().numpy() * std + mean
            self._kept[cat].append(
                {
                    "image": (np.clip(img.transpose(1, 2, 0), 0, 1) * 255).astype(np.uint8),
                    "map": outputs["anomaly_map"][i, 0].detach().float().cpu().numpy(),
                    "mask": batch["mask"][i, 0].cpu().numpy() > 0.5,
                    "label": label,
                    "path": batch["path"][i],
                    "score": float(outputs["pred_score"][i]),
                }
            )

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        root = Path(trainer.default_root_dir) / self.dirname
        for cat, kept in self._kept.items():
            if not kept:
                continue
            lo = min(float(k["map"].min()) for k in kept)
            hi = max(float(k["map"].max()) for k in kept)
            tiles = []
            for k in sorted(kept, key=lambda k: -k["label"]):
                tile = np.concatenate([k["image"], overlay(k["image"], k["map"], k["mask"], lo, hi)], axis=1)
                tiles.append(tile)
                stem = "_".join(Path(k["path"]).parts[-2:]).rsplit(".", 1)[0]
                (root / cat).mkdir(parents=True, exist_ok=True)
                Image.fromarray(tile).save(root / cat / f"{stem}.png")
            grid = np.concatenate(tiles, axis=0) if len({t.shape for t in tiles}) == 1 else tiles[0]
            Image.fromarray(grid).save(root / f"{cat}_grid.png")
            if self.log_to_loggers:
                for logger in trainer.loggers:
                    log_image(logger, f"anomaly_maps/{cat}", grid, trainer.global_step)


def log_image(logger: Any, key: str, image: np.ndarray, step: int) -> None:
    """Send an RGB uint8 (H, W, 3) image to a logger that takes images; others are skipped."""
    from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger

    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_image(key, image, step, dataformats="HWC")
    elif isinstance(logger, WandbLogger):
        logger.log_image(key=key, images=[image], step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_image(logger.run_id, image, f"{key}.png")
