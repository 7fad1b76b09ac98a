"""Hydra entry point for every experiment track.

    python run.py experiment=lm_gpt2 objective=emo data=wikitext2
    python run.py -m experiment=lm_gpt2 objective=mle,mixce,tailr,emo data=ptb
    python run.py experiment=lm_tiny --cfg job      # print the composed config
    python run.py experiment=icl_eval model=llama7b preflight=true   # check every Hub resource it needs, then exit
    torchrun --nproc_per_node 4 run.py experiment=sft_alpaca model=llama7b          # DDP/FSDP on one node
    python run.py -m hydra/launcher=slurm experiment=cft_lora objective=mle,cft/emo2   # SLURM via submitit

The composed config names its recipe (`recipe: module:function`); run.py imports and calls it.
"""

import importlib
import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

import experiments.pipeline.distributed  # noqa: F401  registers ${launch_name:} (conf/config.yaml: run/sweep dirs)

# `${coalesce:a,b}`: the first argument that is not null (conf/config.yaml: run dir = run_id, else the launch name).
OmegaConf.register_new_resolver("coalesce", lambda *values: next((v for v in values if v is not None), None),
                                replace=True)


def export_slurm_distributed_env() -> None:
    """In a multi-task SLURM job started by the submitit launcher, export torch.distributed's `env://` variables
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) so the Trainer runs DDP/FSDP across the tasks."""
    if os.environ.get("SUBMITIT_EXECUTOR") != "slurm" or "RANK" in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig):
    """Run the configured recipe and return its metrics (the value Hydra's sweepers see); with `preflight=true`, only
    check the remote resources it needs, print the table and exit (non-zero if any row is not ok)."""
    if cfg.preflight:
        from experiments.pipeline.preflight import report

        sys.exit(report(cfg))
    export_slurm_distributed_env()
    module_name, _, function_name = cfg.recipe.partition(":")
    recipe = getattr(importlib.import_module(module_name), function_name)
    return recipe(cfg)


if __name__ == "__main__":
    # Before Hydra writes the overrides and the composed config to .hydra/*.yaml: no credential on the command line.
    from experiments.pipeline.credentials import refuse_credential_overrides

    refuse_credential_overrides(sys.argv[1:])
    main()
