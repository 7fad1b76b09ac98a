"""Divergence guard: a learning rate that diverges stops the run at the first non-finite step, naming it, with
nothing in results/ (`on_nonfinite: stop`, the default), or skips every non-finite update and counts the skips in
metrics.json (`on_nonfinite: skip`); a skipped update leaves the weights alone and the count survives a resume."""

import json
import warnings

import pytest
import torch

from helpers import padded_dataset, tiny_gpt2


def guarded_trainer(tmp_path, steps: int, **arguments):
    """An `ObjectiveTrainer` (MLE, SGD at lr 1e30: the second step's loss is NaN) over a seeded tiny GPT-2."""
    from emo.training import ObjectiveLoss, ObjectiveTrainer, ObjectiveTrainingArguments

    torch.manual_seed(0)
    args = ObjectiveTrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
                                      learning_rate=1e30, optim="sgd", lr_scheduler_type="constant", report_to=[],
                                      logging_steps=1, use_cpu=True, seed=0, disable_tqdm=True,
                                      **{"save_strategy": "no", **arguments})
    return ObjectiveTrainer(model=tiny_gpt2(), args=args, train_dataset=padded_dataset(),
                            objective_loss=ObjectiveLoss("mle"))


def weights(trainer) -> dict:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


def test_skipped_updates_leave_the_weights_alone_and_are_counted_across_a_resume(tmp_path):
    first = guarded_trainer(tmp_path / "one", steps=1)
    first.train()
    after_first_step = weights(first)

    skipping = guarded_trainer(tmp_path / "skip", steps=3, on_nonfinite="skip", save_strategy="steps", save_steps=1)
    skipping.train()
    assert skipping.divergence_guard.skipped_steps == 2 and skipping.state.global_step == 3
    for name, value in weights(skipping).items():
        assert torch.equal(value, after_first_step[name]), name
    assert all(torch.isfinite(torch.tensor(entry["loss"])) for entry in skipping.state.log_history if "loss" in entry)

    resumed = guarded_trainer(tmp_path / "resumed", steps=3, on_nonfinite="skip")
    resumed.train(resume_from_checkpoint=str(tmp_path / "skip" / "checkpoint-2"))
    assert resumed.divergence_guard.skipped_steps == 2  # 1 from the checkpoint + step 3


def test_the_guard_stops_before_the_weights_change(tmp_path):
    first = guarded_trainer(tmp_path / "one", steps=1)
    first.train()
    after_first_step = weights(first)
    stopping = guarded_trainer(tmp_path / "stop", steps=3)
    with pytest.raises(FloatingPointError, match=r"training diverged at step 2: the loss and the gradient norm \(nan\) "
                                                 r"are not finite\. The weights are those before step 2"):
        stopping.train()
    for name, value in weights(stopping).items():
        assert torch.equal(value, after_first_step[name]), name


def test_unknown_action_is_named():
    from emo.training import ObjectiveTrainingArguments

    with pytest.raises(ValueError, match=r"on_nonfinite must be one of \('stop', 'skip'\), got 'ignore'"):
        ObjectiveTrainingArguments(output_dir="unused", on_nonfinite="ignore", report_to=[])


@pytest.mark.slow
def test_diverging_run_stops_naming_the_step_and_writes_no_results(compose_cfg, tmp_path):
    from experiments.sft import run

    results = tmp_path / "results"
    cfg = compose_cfg("experiment=sft_tiny", "trainer.learning_rate=1e30", f"paths.results_dir={results}",
                      f"paths.output_dir={tmp_path / 'out'}", f"paths.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(FloatingPointError, match=r"training diverged at step 2: .* not finite.*"
                                                 r"trainer\.on_nonfinite=skip"):
        run(cfg)
    assert not (results / "sft_tiny").exists() or not any((results / "sft_tiny").iterdir())


@pytest.mark.slow
def test_diverging_run_with_skip_counts_the_skipped_steps(compose_cfg, tmp_path):
    from experiments.sft import run

    results = tmp_path / "results"
    metrics = run(compose_cfg("experiment=sft_tiny", "trainer.learning_rate=1e30", "trainer.on_nonfinite=skip",
                              f"paths.results_dir={results}", f"paths.output_dir={tmp_path / 'out'}",
                              f"paths.cache_dir={tmp_path / 'cache'}"))
    (run_dir,) = (results / "sft_tiny").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["train"] == metrics["train"]
    assert metrics["train"]["global_step"] == 4 and metrics["train"]["skipped_nonfinite_steps"] == 3
    assert torch.isfinite(torch.tensor(metrics["train"]["train_loss"]))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_guard_adds_no_host_sync_per_step_on_cuda():
    """Host syncs during 6 optimizer steps (2 micro-batches each): ObjectiveTrainer with its guard, against the plain
    Trainer (its default `logging_nan_inf_filter` syncs on every micro-batch's loss) with the same loss."""
    from transformers import Trainer, TrainingArguments

    from emo.training import ObjectiveLoss, ObjectiveTrainer, ObjectiveTrainingArguments

    def syncs(trainer_class, arguments_class, loss_argument) -> int:
        torch.manual_seed(0)
        args = arguments_class(output_dir="unused", max_steps=6, per_device_train_batch_size=2,
                               gradient_accumulation_steps=2, logging_steps=100, report_to=[], save_strategy="no",
                               disable_tqdm=True, seed=0)
        model = tiny_gpt2()
        trainer = trainer_class(model=model, args=args, train_dataset=padded_dataset(num_rows=24),
                                **{loss_argument: ObjectiveLoss("mle", model=model)})
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                trainer.train()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchronizing" in str(w.message) for w in caught)

    plain = syncs(Trainer, TrainingArguments, "compute_loss_func")
    guarded = syncs(ObjectiveTrainer, ObjectiveTrainingArguments, "objective_loss")
    print(f"\nhost syncs in 6 steps x 2 micro-batches: Trainer {plain}, ObjectiveTrainer with the guard {guarded}")
    assert guarded <= plain
