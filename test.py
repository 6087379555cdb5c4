"""Evaluate a training checkpoint on a dataset: python test.py ckpt_path=... [overrides]."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="test")
def main(cfg: DictConfig) -> None:
    from iad_lightning.run import test

    test(cfg)


if __name__ == "__main__":
    main()
