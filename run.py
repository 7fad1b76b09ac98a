"""Hydra entry point for every experiment track.

    python run.py experiment=lm_gpt2 objective=emo data=wikitext2
    python run.py -m experiment=lm_gpt2 objective=mle,mixce,tailr,emo data=ptb
    python run.py experiment=lm_tiny --cfg job      # print the composed config

The composed config names its recipe (`recipe: module:function`); run.py imports and calls it.
"""

import importlib

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    """Run the configured recipe and return its metrics (the value Hydra's sweepers see)."""
    module_name, _, function_name = cfg.recipe.partition(":")
    recipe = getattr(importlib.import_module(module_name), function_name)
    return recipe(cfg)


if __name__ == "__main__":
    main()
