"""Every config group option and experiment composes and resolves; bad overrides fail with Hydra's message."""

import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import emo

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "data", "objective", "trainer", "tracker", "decoding", "generation", "metrics", "paths")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
RESOLVE_OVERRIDES = ("paths.output_dir=/tmp/emo-out", "data.data_files.train=/tmp/train.txt")


def options(group: str) -> list[str]:
    """Selectable options of a config group, including presets in sub-folders (`cft/emo2`); `base` is excluded."""
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if p.stem != "base")


def resolved(cfg) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_resolves(compose_cfg, group, option):
    overrides = [f"{group}={option}", RESOLVE_OVERRIDES[0]]
    if group == "data" and option == "local":
        overrides.append(RESOLVE_OVERRIDES[1])
    cfg = resolved(compose_cfg(*overrides))
    assert cfg[group] is not None


@pytest.mark.parametrize("experiment,objective", list(product(EXPERIMENTS, options("objective"))))
def test_every_experiment_objective_pair_composes(compose_cfg, experiment, objective):
    cfg = resolved(compose_cfg(f"experiment={experiment}", f"objective={objective}", RESOLVE_OVERRIDES[0]))
    assert cfg["experiment_name"] == experiment
    assert cfg["objective"]["name"] in emo.OBJECTIVES and cfg["objective"]["label"]


def test_objective_configs_match_the_library(compose_cfg):
    names = set()
    for option in options("objective"):
        node = compose_cfg(f"objective={option}").objective
        assert node.impl == "materialized"
        emo.get_objective(node.name).resolve_hparams(OmegaConf.to_container(node.hparams))
        names.add(node.name)
    assert names == set(emo.OBJECTIVES)


def test_paper_settings_in_lm_gpt2(compose_cfg):
    cfg = compose_cfg("experiment=lm_gpt2", RESOLVE_OVERRIDES[0])
    assert cfg.trainer.learning_rate == 5e-5 and cfg.trainer.per_device_train_batch_size == 32
    assert cfg.trainer.metric_for_best_model == "eval_loss" and cfg.trainer.load_best_model_at_end
    assert cfg.data.block_size == 256 and cfg.generation.num_seeds == 5
    assert (cfg.decoding.top_k, cfg.decoding.top_p) == (0, 1.0)
    assert cfg.metrics.featurizer == "gpt2-large" and cfg.metrics.max_text_length == 256


@pytest.mark.parametrize("data,lengths", [("wikitext2", (20, 80)), ("wikitext103", (20, 80)), ("webtext", (20, 80)),
                                          ("ptb", (5, 25)), ("ag_news", (10, 30)), ("writingprompts", (35, 80))])
def test_paper_prompt_lengths(compose_cfg, data, lengths):
    prompts = compose_cfg(f"data={data}").data.prompts
    assert (prompts.prefix_words, prompts.continuation_words) == lengths


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs_build_training_arguments(compose_cfg, tmp_path, trainer):
    from experiments.pipeline.training import training_arguments

    cfg = compose_cfg(f"trainer={trainer}")
    args = training_arguments(cfg.trainer, output_dir=tmp_path, report_to=[], seed=1, run_name="x")
    assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False
    assert "wandb" not in (args.report_to or [])


@pytest.mark.parametrize("override", ["objective=nope", "data=nope", "trainer.not_a_key=1", "experiment=nope"])
def test_bad_override_fails_with_hydra_error(compose_cfg, override):
    with pytest.raises(ConfigCompositionException):
        compose_cfg(override)


def test_run_py_help_and_cfg_job():
    root = CONF.parent
    help_out = subprocess.run([sys.executable, "run.py", "--help"], cwd=root, capture_output=True, text=True,
                              timeout=120)
    assert help_out.returncode == 0 and "experiment:" in help_out.stdout and "lm_gpt2" in help_out.stdout
    job = subprocess.run([sys.executable, "run.py", "experiment=lm_gpt2", "objective=emo", "data=ptb", "--cfg", "job"],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert job.returncode == 0, job.stderr
    cfg = OmegaConf.create(job.stdout)
    assert cfg.objective.name == "emo" and cfg.data.name == "ptb" and cfg.experiment_name == "lm_gpt2"
    bad = subprocess.run([sys.executable, "run.py", "objective=nope", "--cfg", "job"], cwd=root, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "objective" in bad.stderr
