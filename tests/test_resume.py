"""A killed run resumes: `ObjectiveTrainer` continues from the newest checkpoint in its output dir and ends where an
uninterrupted run ends, with the same weights."""

import pytest
import torch
import transformers
from datasets import Dataset

from experiments.pipeline.models import load_causal_lm
from experiments.pipeline.training import build_trainer, resume_checkpoint


class Killed(RuntimeError):
    """Stands in for the process being killed."""


class StepRecorder(transformers.TrainerCallback):
    """Records the optimizer steps this process runs; raises `Killed` after step `kill_at`."""

    def __init__(self, kill_at: int | None = None):
        self.kill_at = kill_at
        self.steps = []

    def on_step_end(self, args, state, control, **kwargs):
        self.steps.append(state.global_step)
        if state.global_step == self.kill_at:
            raise Killed(f"killed at step {state.global_step}")


def blocks(vocab_size: int, count: int = 24, length: int = 16) -> Dataset:
    ids = torch.randint(0, vocab_size, (count, length), generator=torch.Generator().manual_seed(0)).tolist()
    return Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * length] * count, "labels": ids})


def train(cfg, tokenizer, output_dir, kill_at=None):
    transformers.set_seed(cfg.seed)
    model = load_causal_lm(cfg.model, tokenizer)
    data = blocks(len(tokenizer))
    trainer = build_trainer(cfg, model, output_dir=output_dir, run_name="resume", report_to=[], train_dataset=data,
                            eval_dataset=data.select(range(4)))
    recorder = StepRecorder(kill_at)
    trainer.add_callback(recorder)
    output = trainer.train(resume_from_checkpoint=resume_checkpoint(output_dir))
    return output, trainer.model, recorder.steps


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_end(compose_cfg, gpt2_tokenizer, tmp_path, one_thread):
    cfg = compose_cfg("experiment=lm_tiny", "objective=emo", "trainer.max_steps=4", "trainer.save_steps=2",
                      "trainer.eval_steps=2", "trainer.learning_rate=1e-3")
    full, reference, steps = train(cfg, gpt2_tokenizer, tmp_path / "full")
    assert steps == [1, 2, 3, 4]

    assert resume_checkpoint(tmp_path / "killed") is None
    with pytest.raises(Killed):
        train(cfg, gpt2_tokenizer, tmp_path / "killed", kill_at=3)
    assert resume_checkpoint(tmp_path / "killed").endswith("checkpoint-2")
    resumed, model, steps = train(cfg, gpt2_tokenizer, tmp_path / "killed")

    assert steps == [3, 4] and resumed.global_step == full.global_step == 4  # only the steps after checkpoint-2
    for (name, expected), actual in zip(reference.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, msg=name)
