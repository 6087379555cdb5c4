"""Predict on new images with a trained model: python predict.py ckpt_path=... input=PATH [overrides]."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    from iad_lightning.errors import IADError
    from iad_lightning.predict import predict

    try:
        predict(cfg)
    except IADError as err:  # a missing key, a bad path or checkpoint: one line, no traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
