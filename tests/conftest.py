"""Test-wide settings: offline hubs, quiet loggers, and the shared real-data location."""

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for model hubs in tests
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
