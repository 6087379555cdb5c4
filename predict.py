"""Predict on new images with a trained model: python predict.py ckpt_path=... input=PATH [overrides]."""

import sys

import hydra
from omegaconf import DictConfig

USAGE = "pass ckpt_path=<run>/checkpoints/last.ckpt (or an exported .onnx) and input=<an image, a folder or a glob>"


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    if not cfg.get("ckpt_path") or not cfg.get("input"):  # before the heavy imports
        print(f"error: {USAGE}", file=sys.stderr)
        sys.exit(2)
    from iad_lightning.errors import IADError
    from iad_lightning.predict import predict

    try:
        predict(cfg)
    except IADError as err:  # a bad path, checkpoint or option: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
