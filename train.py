"""Train (fit) a method on a dataset, then test it: python train.py [overrides]."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    from iad_lightning.run import train

    train(cfg)


if __name__ == "__main__":
    main()
