"""iad_lightning: industrial image anomaly detection with PyTorch Lightning and Hydra.

``iad_lightning.load(path)`` returns a ``Predictor`` for new images (``iad_lightning.inference``).
"""

__version__ = "0.1.0"


def load(path, device: str = "auto"):
    """A ``Predictor`` from a training checkpoint or an exported ONNX file; see ``iad_lightning.inference``."""
    from iad_lightning.inference import load as _load

    return _load(path, device)
