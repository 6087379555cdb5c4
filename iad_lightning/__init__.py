"""iad_lightning: industrial image anomaly detection with PyTorch Lightning and Hydra."""

__version__ = "0.1.0"
