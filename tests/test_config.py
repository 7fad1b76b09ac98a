"""Every config group option and experiment composes and resolves; bad overrides fail with Hydra's message."""

import re
import subprocess
import sys
from itertools import product
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

import emo

CONF = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "data", "prompts", "objective", "trainer", "tracker", "decoding", "generation", "metrics", "paths")
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
RESOLVE_OVERRIDES = ("paths.output_dir=/tmp/emo-out", "data.data_files.train=/tmp/train.txt")


def options(group: str) -> list[str]:
    """Selectable options of a config group, including presets in sub-folders (`cft/emo2`); `base` is excluded."""
    root = CONF / group
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml") if p.stem != "base")


def resolved(cfg, throw_on_missing: bool = True) -> dict:
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=throw_on_missing)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_resolves(compose_cfg, group, option):
    overrides = [f"{group}={option}", RESOLVE_OVERRIDES[0]]
    if group == "data" and option == "local":
        overrides.append(RESOLVE_OVERRIDES[1])
    cfg = resolved(compose_cfg(*overrides))
    assert cfg[group] is not None


@pytest.mark.parametrize("experiment,objective", list(product(EXPERIMENTS, options("objective"))))
def test_every_experiment_objective_pair_composes(compose_cfg, experiment, objective):
    # an experiment may leave inputs to the user (`???`, e.g. the outputs a judge compares); all else must resolve
    cfg = resolved(compose_cfg(f"experiment={experiment}", f"objective={objective}", RESOLVE_OVERRIDES[0]),
                   throw_on_missing=False)
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
    assert cfg.metrics.featurizer == "openai-community/gpt2-large" and cfg.metrics.max_text_length == 256


@pytest.mark.parametrize("data,lengths", [("wikitext2", (20, 80)), ("wikitext103", (20, 80)), ("webtext", (20, 80)),
                                          ("ptb", (5, 25)), ("ag_news", (10, 30)), ("writingprompts", (35, 80))])
def test_paper_prompt_lengths(compose_cfg, data, lengths):
    prompts = compose_cfg(f"data={data}").prompts
    assert (prompts.prefix_words, prompts.continuation_words) == lengths
    assert (prompts.min_chars, prompts.min_extra_words, list(prompts.exclude)) == (100, 10, ["=="])


def test_prompts_follow_the_corpus_and_can_be_chosen(compose_cfg, tmp_path):
    assert compose_cfg("data=oracle").prompts.min_chars == 0
    assert compose_cfg("data=wikitext2_local").prompts == compose_cfg("data=wikitext2").prompts
    assert compose_cfg("data=ptb", "prompts=wikitext2").prompts.prefix_words == 20
    assert compose_cfg("experiment=lm_tiny").prompts.max_prompts == 8
    (tmp_path / "experiment").mkdir()  # an experiment of another track, without a corpus: composes without prompts
    (tmp_path / "experiment" / "no_corpus.yaml").write_text(
        "# @package _global_\ndefaults:\n  - override /data: null\n")
    no_corpus = compose_cfg(f"hydra.searchpath=[file://{tmp_path}]", "experiment=no_corpus")
    assert "data" not in no_corpus and "prompts" not in no_corpus


def test_data_configs_hold_only_what_differs():
    for path in (CONF / "data").glob("*.yaml"):
        if path.stem != "base":
            node = OmegaConf.load(path)
            assert list(node.defaults) == ["base", "_self_"] and "prompts" not in node, path.name


def test_config_groups_with_variants_have_a_base():
    assert [g for g in GROUPS if len(options(g)) > 1 and not (CONF / g / "base.yaml").is_file()] == []


def test_run_id_gives_a_stable_run_dir(compose_cfg):
    import run  # noqa: F401  (registers the `coalesce` and `launch_name` resolvers run.py's Hydra config uses)

    named = compose_cfg("run_id=my-run", "paths.log_dir=/logs", return_hydra_config=True)
    assert OmegaConf.select(named, "hydra.run.dir") == "/logs/default/runs/my-run"
    stamped = OmegaConf.select(compose_cfg("paths.log_dir=/logs", return_hydra_config=True), "hydra.run.dir")
    assert re.fullmatch(r"/logs/default/runs/20\d{6}T\d{6}Z_[0-9a-f]{6}", stamped)  # distributed.launch_name


@pytest.mark.parametrize("trainer", options("trainer"))
def test_trainer_configs_build_training_arguments(compose_cfg, tmp_path, trainer):
    """Every trainer config composes into valid TrainingArguments; on CPU, GPU-only requests (bf16/fp16, FSDP,
    TF32) are refused with our message, and the rest of the config must still be valid."""
    import torch

    from experiments.pipeline.training import training_arguments

    def build(*overrides):
        node = compose_cfg(f"trainer={trainer}", *overrides).trainer
        return node, training_arguments(node, output_dir=tmp_path, report_to=[], seed=1, run_name="x")

    node = compose_cfg(f"trainer={trainer}").trainer
    cpu_overrides = []
    if not torch.cuda.is_available():
        if node.fsdp:
            with pytest.raises(ValueError, match="needs CUDA GPUs .*set trainer.fsdp=false"):
                build()
            cpu_overrides.append("trainer.fsdp=false")
        if node.mixed_precision in ("bf16", "fp16"):
            with pytest.raises(ValueError, match="needs a CUDA GPU; use auto or no on CPU"):
                build(*cpu_overrides)
            cpu_overrides.append("trainer.mixed_precision=no")
        if node.tf32:
            cpu_overrides.append("trainer.tf32=null")
    node, args = build(*cpu_overrides)
    assert args.warmup_steps == node.warmup_steps and "wandb" not in (args.report_to or [])
    if node.load_best_model_at_end:
        assert args.metric_for_best_model == "eval_loss" and args.greater_is_better is False


def test_trainer_keys_that_transformers_lacks_are_named(compose_cfg, tmp_path):
    from experiments.pipeline.training import training_arguments

    node = compose_cfg("trainer=tiny", "+trainer.warmup_ratio=0.1").trainer
    with pytest.raises(ValueError, match=r"\['warmup_ratio'\].*use warmup_steps: 0.03"):
        training_arguments(node, output_dir=tmp_path, report_to=[], seed=1, run_name="x")
    fraction = compose_cfg("trainer=tiny", "trainer.warmup_steps=0.25").trainer
    assert training_arguments(fraction, output_dir=tmp_path, report_to=[], seed=1, run_name="x").warmup_steps == 0.25


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


@pytest.mark.parametrize("objective,impl,refused", [("mle", "materialized", False), ("sft/emo", "materialized", False),
                                                    ("sft/emo", "fused", True), ("adaptive_emo", "materialized", True)])
def test_fsdp_refuses_objectives_that_read_the_sharded_head(compose_cfg, objective, impl, refused):
    from transformers import GPT2Config, GPT2LMHeadModel

    from experiments.pipeline.training import objective_loss

    node = compose_cfg(f"objective={objective}", f"objective.impl={impl}").objective
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_layer=1, n_embd=8, n_head=2, bos_token_id=0, eos_token_id=0))
    build = lambda: objective_loss(node, model, cost_source=None, device="cpu", fsdp=True)  # noqa: E731
    if refused:
        with pytest.raises(ValueError, match="FSDP keeps it sharded"):
            build()
    else:
        assert build().objective == node.name
