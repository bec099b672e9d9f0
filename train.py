"""Train a network: a baseline (operator=c2d|c3d|p3d|...) or a found architecture (operator=cakes arch=<name>).

python train.py experiment=demo_c3d
python train.py experiment=ssv1_cakes arch=ssv1_cakes123d_p backbone.pretrained=/path/resnet50.pth
"""

import hydra
from omegaconf import DictConfig

from cakes.config import register_resolvers
from cakes.run import run

register_resolvers()  # before Hydra composes: the configs use ${operator_mode:...} and ${arch_data:...}


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
