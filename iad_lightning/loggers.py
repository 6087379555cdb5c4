"""Logger factories whose behaviour depends on the environment."""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch.loggers import WandbLogger


def wandb_logger(offline: bool | None = None, **kwargs: Any) -> WandbLogger:
    """A W&B logger that runs offline (files under save_dir, sync later) when no API key is set."""
    if offline is None:
        offline = not (os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") == "online")
    return WandbLogger(offline=offline, **kwargs)
