"""Judging harness: matching by instruction (strict, AlpacaEval's intersection), identical answers, the on-disk cache,
the fake and local transformers judges in every template, Hub reference files offline, `experiment=judge` end to end
with AlpacaEval's output files, and the `instruct_winrate` table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.pipeline.judging.cache import JudgementCache
from experiments.pipeline.judging.clients import FakeJudge, build_judge
from experiments.pipeline.judging.pairwise import (PairingError, judge_outputs,
                                                   judged_orders, load_outputs, match_outputs)
from experiments.pipeline.judging.table import instruct_tables
from experiments.pipeline.judging.templates import JudgeTemplate
from experiments.pipeline.records import run_setup

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "conf" / "judge" / "template"
ALL_TEMPLATES = ("pair_v2", "pandalm", "autoj", "weighted_alpaca_eval_gpt4_turbo", "alpaca_eval_gpt4")


def template(name: str) -> JudgeTemplate:
    return JudgeTemplate.from_cfg(OmegaConf.load(TEMPLATES / f"{name}.yaml"))


def fake_cfg(rule: str = "longer", template_name: str = "pair_v2", **overrides):
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/judge/base.yaml"), OmegaConf.load(REPO / "conf/judge/fake.yaml"))
    cfg.pop("defaults")
    cfg.template = OmegaConf.load(TEMPLATES / f"{template_name}.yaml")
    cfg.model = rule
    return OmegaConf.merge(cfg, overrides)


def outputs(answers: dict[str, str], generator: str) -> list[dict]:
    return [{"instruction": i, "output": o, "generator": generator} for i, o in answers.items()]


def test_matching_by_instruction_strict_and_intersection(caplog):
    model = outputs({"b": "B1", "a": "A1"}, "m")
    reference = outputs({"a": "A0", "b": "B0"}, "r")
    pairs, unmatched = match_outputs(model, reference)
    assert [(p.instruction, p.output, p.reference_output) for p in pairs] == [("b", "B1", "B0"), ("a", "A1", "A0")]
    assert pairs[0].generator == "m" and pairs[0].reference_generator == "r"
    assert unmatched == {"missing_from_reference": [], "missing_from_model": []}
    partial = outputs({"a": "x", "only in model": "y"}, "m") + outputs({"a": "x"}, "m")  # a repeat, same output
    with pytest.raises(PairingError) as error:
        match_outputs(partial, reference, "strict")
    message = str(error.value)
    assert "1 instruction(s) missing from reference outputs:\n    - only in model" in message
    assert "1 instruction(s) missing from model outputs:\n    - b" in message
    pairs, unmatched = match_outputs(partial, reference, "intersection")  # AlpacaEval's inner join, with a warning
    assert [p.instruction for p in pairs] == ["a"] and "missing from model outputs:\n    - b" in caplog.text
    assert unmatched == {"missing_from_reference": [{"instruction": "only in model"}],
                         "missing_from_model": [{"instruction": "b"}]}
    with pytest.raises(PairingError, match="different outputs"):
        match_outputs(outputs({"a": "x"}, "m") + outputs({"a": "y"}, "m"), reference, "intersection")
    with pytest.raises(PairingError, match="none in common"):
        match_outputs(outputs({"z": "x"}, "m"), reference, "intersection")
    with pytest.raises(PairingError, match="mix generators"):
        match_outputs(outputs({"a": "1"}, "m") + outputs({"b": "2"}, "n"), reference)
    with pytest.raises(ValueError, match="pairwise.match"):
        match_outputs(model, reference, "left")


def test_load_outputs_json_and_jsonl(tmp_path):
    records = [{"instruction": "a", "output": "x", "generator": "g"}, {"instruction": "b", "output": "y"}]
    (tmp_path / "o.json").write_text(json.dumps(records))
    (tmp_path / "o.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert load_outputs(tmp_path / "o.json")[1]["generator"] == "o"
    assert load_outputs(tmp_path / "o.jsonl") == load_outputs(tmp_path / "o.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "a", "response": "x"}]))
    with pytest.raises(ValueError, match="record 0 needs string 'instruction' and 'output'"):
        load_outputs(tmp_path / "bad.json")
    with pytest.raises(FileNotFoundError):
        load_outputs(tmp_path / "missing.json")


def test_fake_judge_in_every_template_format():
    model = outputs({"q1": "long answer", "q2": "s", "q3": "same"}, "m")
    reference = outputs({"q1": "short", "q2": "longer", "q3": "same"}, "r")
    for name in ALL_TEMPLATES:
        judgements, metrics = judge_outputs(model, reference, judge_cfg=fake_cfg(template_name=name), cache_dir=None)
        assert [j["outcome"] for j in judgements] == ["win", "loss", "tie"], name
        assert metrics["template"] == template(name).name and metrics["unparseable"] == 0
        assert metrics["positions"] == template(name).positions and metrics["identical"] == 1


def test_hash_rule_is_position_dependent_and_random_swap_is_seeded():
    answers = {f"q{i}": f"answer {i}" for i in range(40)}
    model, reference = outputs(answers, "m"), outputs({k: v + "!" for k, v in answers.items()}, "r")
    _, metrics = judge_outputs(model, reference, judge_cfg=fake_cfg("hash"), cache_dir=None)
    assert metrics["inconsistent"] > 0 and metrics["wins"] + metrics["ties"] + metrics["losses"] == 40
    pairs, _ = match_outputs(model, reference)
    orders = [judged_orders(p, "random_swap", 0)[0] for p in pairs]
    assert orders == [judged_orders(p, "random_swap", 0)[0] for p in pairs]
    assert 10 < orders.count("reference_first") < 30  # about half swapped
    assert orders != [judged_orders(p, "random_swap", 1)[0] for p in pairs]
    with pytest.raises(ValueError, match="positions"):
        judged_orders(pairs[0], "one", 0)


def test_cache_skips_a_torn_line_and_identical_answers_are_ties_without_a_request(tmp_path):
    judge = build_judge(fake_cfg())
    calls = []

    class CountingJudge(FakeJudge):
        def run(self, requests, on_result, show_progress=False):
            calls.append(len(requests))
            super().run(requests, on_result, show_progress)

    counting = CountingJudge(fake_cfg(), judge.template)
    model, reference = outputs({"a": "x", "b": "same"}, "m"), outputs({"a": "xy", "b": "same"}, "r")
    judgements, _ = judge_outputs(model, reference, judge_cfg=fake_cfg(), cache_dir=tmp_path, judge=counting)
    assert calls == [2]  # "b" has identical answers: a tie, no request (AlpacaEval: preference 1.5)
    same = judgements[1]
    assert (same["outcome"], same["score"], same["identical"], same["verdicts"]) == ("tie", 0.5, True, [])
    (cache_file,) = (tmp_path / "judgements").iterdir()
    with open(cache_file, "a") as handle:
        handle.write('{"key": "trunc')  # a job killed mid-write
    cache = JudgementCache(tmp_path / "judgements", counting.identity)
    assert cache.path == cache_file and sum(1 for line in cache_file.read_text().splitlines()) == 3
    _, metrics = judge_outputs(model, reference, judge_cfg=fake_cfg(), cache_dir=tmp_path, judge=counting)
    assert calls == [2, 0] and metrics["requests"]["sent"] == 0 and metrics["requests"]["cached"] == 2
    more_model, more_reference = model + outputs({"c": "new"}, "m"), reference + outputs({"c": "newer"}, "r")
    judge_outputs(more_model, more_reference, judge_cfg=fake_cfg(), cache_dir=tmp_path, judge=counting)
    judge_outputs(more_model, more_reference, judge_cfg=fake_cfg(), cache_dir=tmp_path, judge=counting)
    assert calls == [2, 0, 2, 0], "an entry appended after a torn line must be readable"
    with pytest.raises(PairingError, match="empty"):
        judge_outputs([], reference, judge_cfg=fake_cfg(), cache_dir=None)


def test_a_hub_reference_file_offline_fails_at_once_with_one_line_unless_cached(compose_cfg, tmp_path, monkeypatch,
                                                                                data_dir):
    import huggingface_hub.constants

    from experiments.judge import run
    from experiments.pipeline.hub import OfflineError

    cfg = compose_cfg("experiment=judge", "judge=fake", f"pairwise.model_outputs={tmp_path / 'model.json'}",
                      f"paths.results_dir={tmp_path / 'results'}", f"paths.output_dir={tmp_path / 'out'}")
    url = cfg.pairwise.reference_outputs
    assert url == ("hf://datasets/tatsu-lab/alpaca_eval@2955709b93b0e08df511a752a3874b0a89b8910b/"
                   "alpaca_eval_gpt4_baseline.json")
    (tmp_path / "model.json").write_text(json.dumps(outputs({"q": "a"}, "m")))
    with pytest.raises(OfflineError) as error:
        run(cfg)
    message = str(error.value)
    assert message.startswith("Cannot fetch outputs file 'tatsu-lab/alpaca_eval") and "offline" in message
    assert "\n" not in message and not (tmp_path / "results").exists()

    # in the Hugging Face cache (here a stand-in file under the pinned commit), the same run reads it offline
    snapshot = tmp_path / "hub" / "datasets--tatsu-lab--alpaca_eval" / "snapshots" / url.split("@")[1].split("/")[0]
    snapshot.mkdir(parents=True)
    records = json.loads((data_dir / "alpaca" / "alpaca_gpt4_eval_20.json").read_text())
    (snapshot / "alpaca_eval_gpt4_baseline.json").write_text(json.dumps(records))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (tmp_path / "model.json").write_text(json.dumps([{**r, "output": "short", "generator": "m"} for r in records[:3]]))
    metrics = run(cfg)
    assert metrics["n_pairs"] == 3 and metrics["reference_generator"] == records[0]["generator"]
    assert len(metrics["unmatched"]["missing_from_model"]) == 17
    with pytest.raises(ValueError, match="pin the Hub file to a commit"):
        load_outputs("hf://datasets/tatsu-lab/alpaca_eval/alpaca_eval_gpt4_baseline.json")


def test_judge_configs_compose(compose_cfg):
    cfg = compose_cfg("experiment=judge", "judge/template=pandalm", "judge.base_url=http://localhost:8000/v1",
                      "judge.model=WeOpenML/PandaLM-7B-v1")
    assert cfg.judge.kind == "openai" and cfg.judge.template.name == "pandalm" and cfg.judge.name == cfg.judge.model
    assert cfg.recipe == "experiments.judge:run" and OmegaConf.is_missing(cfg.pairwise, "model_outputs")
    assert compose_cfg("experiment=judge", "judge=fake").judge.name == "fake-longer"
    local = compose_cfg("experiment=judge", "judge=hf_local", "judge.model=/models/autoj", "judge/template=autoj")
    assert local.judge.tokenizer == "/models/autoj" and local.judge.template.parser == "autoj"


@pytest.mark.slow
def test_hf_local_judge_generates_greedily_and_is_not_loaded_for_cached_work(tmp_path, gpt2_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(gpt2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         eos_token_id=gpt2_tokenizer.eos_token_id, pad_token_id=gpt2_tokenizer.pad_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "judge")
    gpt2_tokenizer.save_pretrained(tmp_path / "judge")
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/judge/base.yaml"),
                          OmegaConf.load(REPO / "conf/judge/hf_local.yaml"))
    cfg.pop("defaults")
    cfg.template = OmegaConf.load(TEMPLATES / "pandalm.yaml")
    cfg.model, cfg.tokenizer, cfg.max_tokens, cfg.batch_size = str(tmp_path / "judge"), None, 6, 3
    model, reference = outputs({"q1": "yes", "q2": "no", "q3": "maybe"}, "m"), outputs({"q1": "a", "q2": "b",
                                                                                       "q3": "c"}, "r")
    judge = build_judge(cfg)
    judgements, metrics = judge_outputs(model, reference, judge_cfg=cfg, cache_dir=tmp_path / "cache", judge=judge)
    assert metrics["requests"]["sent"] == 6 and metrics["n_pairs"] == 3
    assert metrics["wins"] + metrics["ties"] + metrics["losses"] + metrics["unparseable"] == 3
    assert metrics["unparseable"] == len(metrics["unparseable_pairs"])

    # the reply to one prompt equals plain greedy decoding of that prompt
    request_prompt = template("pandalm").render("q1", "", "yes", "a")[1]
    inputs = judge._tokenizer(request_prompt, return_tensors="pt")
    expected = judge._model.generate(**inputs, do_sample=False, max_new_tokens=6,
                                     pad_token_id=judge._tokenizer.pad_token_id)
    expected_reply = judge._tokenizer.decode(expected[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert judgements[0]["verdicts"][0]["reply"] == expected_reply

    # chat templates go through the tokenizer's chat template when it has one
    chat_cfg = OmegaConf.merge(cfg, {"template": OmegaConf.load(TEMPLATES / "pair_v2.yaml")})
    chat_judge = build_judge(chat_cfg)
    chat_judge._tokenizer = judge._tokenizer
    request = type("Request", (), {"system": "SYS", "prompt": "USER",
                                   "messages": lambda self: [{"role": "system", "content": "SYS"},
                                                             {"role": "user", "content": "USER"}]})()
    assert chat_judge._text(request) == ("SYS\n\nUSER", True)  # GPT-2 has no chat template
    judge._tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    assert chat_judge._text(request) == ("<system>SYS<user>USER<assistant>", False)

    fresh = build_judge(cfg)
    again, _ = judge_outputs(model, reference, judge_cfg=cfg, cache_dir=tmp_path / "cache", judge=fresh)
    assert fresh._model is None, "a fully cached run must not load the judge model"
    assert [j["verdicts"] for j in again] == [j["verdicts"] for j in judgements]


def test_experiment_judge_end_to_end_and_the_table(tmp_path, compose_cfg):
    from experiments.judge import run
    from experiments.tables import main as tables_main

    (tmp_path / "emo.json").write_text(json.dumps(outputs({"q1": "a long answer", "q2": "tiny", "q3": "md"}, "emo")))
    (tmp_path / "mle.json").write_text(json.dumps(outputs({"q1": "short", "q2": "tiny", "q3": "m"}, "mle")))
    (tmp_path / "ref.json").write_text(json.dumps(outputs({"q1": "reference", "q2": "reference", "q3": "ref"}, "gpt4")))
    common = [f"paths.results_dir={tmp_path / 'results'}", f"paths.cache_dir={tmp_path / 'cache'}",
              f"paths.output_dir={tmp_path / 'out'}", "experiment=judge", "judge=fake",
              f"pairwise.reference_outputs={tmp_path / 'ref.json'}"]
    emo = run(compose_cfg(*common, f"pairwise.model_outputs={tmp_path / 'emo.json'}", "pairwise.objective=EMO",
                          "pairwise.model=tiny"))
    mle = run(compose_cfg(*common, f"pairwise.model_outputs={tmp_path / 'mle.json'}", "pairwise.objective=MLE",
                          "pairwise.model=tiny"))
    assert (emo["wins"], emo["ties"], emo["losses"]) == (1, 0, 2)  # longer wins: "a long answer" > "reference"
    assert (mle["wins"], mle["ties"], mle["losses"]) == (0, 0, 3)
    run_dir = Path(tmp_path / "results" / "judge" / emo["run_id"])
    assert json.loads((run_dir / "metrics.json").read_text()) == emo
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["config"]["judge"]["kind"] == "fake" and manifest["data_fingerprint"]["model_outputs"]["rows"] == 3
    annotations = json.loads((run_dir / "annotations.json").read_text())  # AlpacaEval's format: output_1 the reference
    assert [(a["preference"], a["generator_1"], a["generator_2"]) for a in annotations] == [
        (2.0, "gpt4", "emo"), (1.0, "gpt4", "emo"), (1.0, "gpt4", "emo")]
    assert annotations[0]["output_2"] == "a long answer" and annotations[0]["raw_completion"] == ["[[A]]", "[[B]]"]
    assert (run_dir / "leaderboard.csv").read_text().splitlines() == [
        ",win_rate,standard_error,avg_length,n_wins,n_wins_base,n_draws,n_total,discrete_win_rate,"
        "length_controlled_winrate,lc_standard_error",
        f"tiny,{100 * emo['win_rate']},{100 * emo['win_rate_se']},6,1,2,0,3,{100 * emo['discrete_win_rate']},,"]
    assert emo["win_rate"] == emo["discrete_win_rate"] == pytest.approx(1 / 3)

    first_two = run(compose_cfg(*common, f"pairwise.model_outputs={tmp_path / 'emo.json'}",
                                "pairwise.max_instructions=2", "run_id=first_two"))
    assert first_two["n_pairs"] == 2 and first_two["requests"]["sent"] == 0  # cached by the first run
    (tmp_path / "extra.json").write_text(json.dumps(outputs({"q1": "a", "q9": "b"}, "x")))
    with pytest.raises(PairingError, match="missing from reference outputs"):
        run(compose_cfg(*common, f"pairwise.model_outputs={tmp_path / 'extra.json'}", "pairwise.match=strict"))
    partial = run(compose_cfg(*common, f"pairwise.model_outputs={tmp_path / 'extra.json'}",
                              f"paths.results_dir={tmp_path / 'other_results'}"))  # intersection, the default
    assert partial["n_pairs"] == 1 and partial["unmatched"] == {"missing_from_reference": [{"instruction": "q9"}],
                                                                "missing_from_model": [{"instruction": "q2"},
                                                                                       {"instruction": "q3"}]}

    assert tables_main(["--results-dir", str(tmp_path / "results"), "--experiment", "judge"]) == 0
    table = (tmp_path / "results" / "tables" / "instruct_winrate.md").read_text()
    # a subset is never mixed with full runs: what differs labels every row of the column
    assert "| tiny / EMO vs gpt4 (n_pairs=3, pairwise.max_instructions=null) | 33.3 ± 33.3 " in table
    assert "| tiny / MLE vs gpt4 (n_pairs=3, pairwise.max_instructions=null) | 0.0 ± 0.0 " in table
    assert "| emo vs gpt4 (n_pairs=2, pairwise.max_instructions=2)           | **50.0 ± 50.0** " in table
    csv_text = (tmp_path / "results" / "tables" / "instruct_winrate.csv").read_text()
    assert "fake-longer (pair-v2) lc_win_rate" in csv_text
    assert (tmp_path / "results" / "tables" / "instruct_winrate.tex").read_text().startswith(r"\begin{table}")


def test_table_rows_judges_and_latest_run():
    base = {"reference_generator": "gpt4", "template": "pair-v2", "positions": "both", "wins": 1, "ties": 0,
            "losses": 1, "unparseable": 0, "n_judged": 2, "win_rate_se": 0.1}
    runs = [{**base, "run_id": "1", "model": "llama7b", "objective": "MLE", "judge": "gpt-4", "win_rate": 0.40,
             "length_controlled": {"win_rate": 0.45}},
            {**base, "run_id": "2", "model": "llama7b", "objective": "MLE", "judge": "gpt-4", "win_rate": 0.42,
             "length_controlled": {"win_rate": 0.44}},
            {**base, "run_id": "3", "model": "llama7b", "objective": "EMO", "judge": "gpt-4", "win_rate": 0.55,
             "length_controlled": {"win_rate": 0.50}},
            {**base, "run_id": "4", "model": "llama7b", "objective": "EMO", "judge": "autoj-13b", "template": "autoj",
             "positions": "random_swap", "win_rate": 0.6, "length_controlled": {"win_rate": None}},
            {"run_id": "5", "mauve": 0.9}]
    values, cells, caption = instruct_tables(runs)["instruct_winrate"][:3]
    assert list(cells.index) == ["llama7b / EMO vs gpt4", "llama7b / MLE vs gpt4"]
    assert list(cells.columns) == ["autoj-13b (autoj) [random_swap]", "autoj-13b (autoj) [random_swap] LC",
                                   "gpt-4 (pair-v2)", "gpt-4 (pair-v2) LC"]
    assert cells.loc["llama7b / MLE vs gpt4", "gpt-4 (pair-v2)"] == "42.0 ± 10.0"  # the latest run
    assert cells.loc["llama7b / EMO vs gpt4", "gpt-4 (pair-v2)"] == "**55.0 ± 10.0**"
    assert cells.loc["llama7b / MLE vs gpt4", "autoj-13b (autoj) [random_swap]"] == "–"
    assert values.loc["llama7b / EMO vs gpt4", "gpt-4 (pair-v2) lc_win_rate"] == pytest.approx(50.0)
    assert instruct_tables([{"run_id": "1", "mauve": 0.5}]) == {}


def _judged_sft_run(compose_cfg, run_id, *overrides, win_rate, seed=0, lc=0.5):
    """A judged `sft_tiny` record as `load_runs` returns it: metrics plus the manifest's setup and seeds."""
    cfg = compose_cfg("experiment=sft_tiny", f"seed={seed}", *overrides)
    return {"run_id": run_id, "experiment": "sft_tiny", "model": "tiny_llama", "objective": cfg.objective.label,
            "reference_generator": "gpt4", "judge": cfg.judge.name, "template": cfg.judge.template.name,
            "positions": "both", "win_rate": win_rate, "win_rate_se": 0.1, "length_controlled": {"win_rate": lc},
            "n_pairs": 4, "wins": 2, "ties": 0, "losses": 2, "unparseable": 0, "n_judged": 4,
            "setup": run_setup(cfg), "seeds": {"training": seed, "generation": cfg.generation.base_seed}}


def test_table_keeps_setups_apart_and_pools_seeds(compose_cfg):
    greedy = _judged_sft_run(compose_cfg, "1", win_rate=0.40)
    sampled = _judged_sft_run(compose_cfg, "2", "decoding=top_p", win_rate=0.60)
    values, cells, _ = instruct_tables([greedy, sampled])["instruct_winrate"][:3]
    assert list(cells.index) == ["tiny_llama / mle vs gpt4 (decoding=greedy)",
                                 "tiny_llama / mle vs gpt4 (decoding=top_p)"]
    assert cells.iloc[0, 0] == "40.0 ± 10.0" and cells.iloc[1, 0] == "**60.0 ± 10.0**"

    repeats = [greedy, _judged_sft_run(compose_cfg, "3", win_rate=0.50, seed=1, lc=0.7)]
    values, cells, _ = instruct_tables(repeats)["instruct_winrate"][:3]
    assert list(cells.index) == ["tiny_llama / mle vs gpt4"]  # differing only in seed: one pooled row
    assert cells.iloc[0].tolist() == ["45.0 ± 7.1 (n=2)", "60.0 ± 14.1 (n=2)"]
    judge = cells.columns[0]
    assert values.loc["tiny_llama / mle vs gpt4", f"{judge} runs"] == 2
    assert values.loc["tiny_llama / mle vs gpt4", f"{judge} wins"] == 4

    rerun = {**greedy, "run_id": "4", "win_rate": 0.30}  # same setup, same seeds: replaces the earlier run
    _, cells, _ = instruct_tables([greedy, rerun])["instruct_winrate"][:3]
    assert cells.iloc[0, 0] == "30.0 ± 10.0"

    autoj = _judged_sft_run(compose_cfg, "5", "judge/template=autoj", win_rate=0.55)
    _, cells, _ = instruct_tables([greedy, autoj])["instruct_winrate"][:3]  # another template: its own judge columns
    assert cells.shape == (1, 4) and list(cells.index) == ["tiny_llama / mle vs gpt4"]
    hot = _judged_sft_run(compose_cfg, "6", "judge.temperature=0.7", win_rate=0.55)
    _, cells, _ = instruct_tables([greedy, hot])["instruct_winrate"][:3]
    assert list(cells.index) == ["tiny_llama / mle vs gpt4 (judge.temperature=0.7)",
                                 "tiny_llama / mle vs gpt4 (judge.temperature=null)"]  # null: the template's
    emo = _judged_sft_run(compose_cfg, "7", "objective=sft/emo", win_rate=0.55)
    _, cells, _ = instruct_tables([greedy, emo])["instruct_winrate"][:3]  # the row label already names the objective
    assert sorted(cells.index) == ["tiny_llama / mle vs gpt4", "tiny_llama / sft/emo vs gpt4"]


def test_judge_refuses_a_recorded_run_id_before_judging(tmp_path, compose_cfg):
    from experiments.judge import run

    (tmp_path / "model.json").write_text(json.dumps(outputs({"q1": "an answer"}, "emo")))
    (tmp_path / "ref.json").write_text(json.dumps(outputs({"q1": "reference"}, "gpt4")))
    recorded = tmp_path / "results" / "judge" / "done"
    recorded.mkdir(parents=True)
    with pytest.raises(FileExistsError, match="'done' of experiment 'judge' is already complete"):
        run(compose_cfg("experiment=judge", "judge=fake", "run_id=done", f"paths.results_dir={tmp_path / 'results'}",
                        f"paths.cache_dir={tmp_path / 'cache'}", f"paths.output_dir={tmp_path / 'out'}",
                        f"pairwise.model_outputs={tmp_path / 'model.json'}",
                        f"pairwise.reference_outputs={tmp_path / 'ref.json'}"))
    assert not (tmp_path / "cache").exists()  # nothing was judged
    assert list(recorded.iterdir()) == []


def test_an_sft_run_and_a_later_judge_of_its_outputs_share_a_row(compose_cfg):
    own = _judged_sft_run(compose_cfg, "1", win_rate=0.40)
    later = {**own, "run_id": "2", "experiment": "judge", "judge": "gpt-4", "win_rate": 0.30,
             "setup": {"pairwise.model_outputs": "results/sft_tiny/1/model_outputs.json", "judge.model": "gpt-4"},
             "seeds": {"random_swap": None}}
    _, cells, _ = instruct_tables([own, later])["instruct_winrate"][:3]
    assert list(cells.index) == ["tiny_llama / mle vs gpt4"] and cells.shape == (1, 4)  # one row, two judges
    same_judge = {**later, "judge": own["judge"]}
    _, cells, _ = instruct_tables([own, same_judge])["instruct_winrate"][:3]
    assert list(cells.index) == ["tiny_llama / mle vs gpt4 [judge]", "tiny_llama / mle vs gpt4 [sft_tiny]"]
