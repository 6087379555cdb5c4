"""Evaluate a training checkpoint on a dataset: python test.py ckpt_path=... [overrides]."""

import sys

import hydra
from omegaconf import DictConfig, OmegaConf

MISSING_CKPT = ("error: test.py needs a checkpoint: python test.py ckpt_path=outputs/train/runs/<run>/checkpoints/"
                "last.ckpt [data=... data.root=...]")


@hydra.main(version_base="1.3", config_path="conf", config_name="test")
def main(cfg: DictConfig) -> None:
    if OmegaConf.is_missing(cfg, "ckpt_path") or not cfg.ckpt_path:
        print(MISSING_CKPT, file=sys.stderr)
        sys.exit(2)
    from iad_lightning.run import test

    test(cfg)


if __name__ == "__main__":
    main()
