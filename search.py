"""Search: train a CAKES supernet, export the found architecture, print the retrain command.

python search.py                                  # demo search on built-in synthetic data
python search.py experiment=ssv1_search_cost search.op_set=c12d
python search.py -m search.lasso=1e-5,1e-4,1e-3   # a lasso sweep: one arch yaml per value
"""

import hydra
from omegaconf import DictConfig

from cakes.config import register_resolvers
from cakes.run import run

register_resolvers()  # before Hydra composes: the configs use ${operator_mode:...} and ${arch_data:...}


@hydra.main(version_base="1.3", config_path="conf", config_name="search")
def main(cfg: DictConfig) -> None:
    run(cfg)


if __name__ == "__main__":
    main()
