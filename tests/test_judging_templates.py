"""The judge templates against the upstream texts at the commits they are pinned to, and their verdict parsers.

FastChat's and AlpacaEval's prompt files are in `data/judge_prompts/` (checked here by git blob id, so they are the
upstream files); PandaLM's and Auto-J's prompts live in Python source and are quoted below from the pinned commits."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from experiments.pipeline.judging.templates import (JudgeReply, JudgeTemplate, logprob_preference,
                                                    parse_alpaca_eval_ranking, parse_autoj, parse_pair_v2,
                                                    parse_pandalm)

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = REPO / "conf" / "judge" / "template"
UPSTREAM = REPO / "data" / "judge_prompts"
FASTCHAT = "0e6d3e4beaab66f4d3f93db72541a4abab8af28d"
ALPACA_EVAL = "cd543a149df89434d8a54582c0151c0b945c3d20"
PANDALM = "3871806e72b4832f815ecafd24d3503c73403f48"
AUTOJ = "2ae17a3965d933232e9cd50302aa0f176249c83b"
UPSTREAM_FILES = {  # file -> git blob id at the pinned commit (data/judge_prompts/SOURCES.md)
    "fastchat_judge_prompts.jsonl": "4ec7524cbcdf308766fddc52df31e203316ad75f",
    "alpaca_eval_clf.txt": "600a4f34152334a279dc836891acc68b6d1fbfd0",
    "weighted_alpaca_eval_gpt4_turbo.yaml": "7b3bfb7c143ab785b33a75eec30d185a006e6357",
    "alpaca_eval.txt": "00ae4a9e0c1b08b523343d3b651f12cc3b67afab",
    "alpaca_eval_gpt4.yaml": "b530515fb79a38a02963cf3ff14c05b9995653c2",
}
PINS = {"pair_v2": ("lm-sys/FastChat", FASTCHAT), "weighted_alpaca_eval_gpt4_turbo": ("tatsu-lab/alpaca_eval",
                                                                                    ALPACA_EVAL),
        "alpaca_eval_gpt4": ("tatsu-lab/alpaca_eval", ALPACA_EVAL), "pandalm": ("WeOpenML/PandaLM", PANDALM),
        "autoj": ("GAIR-NLP/auto-j", AUTOJ)}

# WeOpenML/PandaLM@3871806e pandalm/utils/pandalm_inference.py, build_pandalm_prompt (instruction "Q?", input "ctx",
# responses "first" / "second").
PANDALM_NO_INPUT = ("Below are two responses for a given task. The task is defined by the Instruction. Evaluate the "
                    "responses and generate a reference answer for the task.\n\n### Instruction:\nQ?\n\n"
                    "### Response 1:\nfirst\n\n### Response 2:\nsecond\n\n### Evaluation:\n")
PANDALM_INPUT = ("Below are two responses for a given task. The task is defined by the Instruction with an Input that "
                 "provides further context. Evaluate the responses and generate a reference answer for the task.\n\n"
                 "### Instruction:\nQ?\n\n### Input:\nctx\n\n### Response 1:\nfirst\n\n### Response 2:\nsecond\n\n"
                 "### Evaluation:\n")
# GAIR-NLP/auto-j@2ae17a39 codes/usage/constants_prompt.py, build_autoj_input("Q?", "first", "second", "pairwise_tie").
AUTOJ_PROMPT = ("[INST] You are assessing two submitted responses on a given user's query and judging which response "
                "is better or they are tied. Here is the data:\n\n[BEGIN DATA]\n***\n[Query]: Q?\n***\n[Response 1]: "
                "first\n***\n[Response 2]: second\n***\n[END DATA]\n\nHere are the instructions to assess and compare "
                "the two responses:\n\n1. Pinpoint the key factors to distinguish these two responses.\n2. Conclude "
                "your comparison by providing a final decision on which response is better, or they are tied. Begin "
                "your final decision statement with \"So, the final decision is Response 1 / Response 2 / Tie\". "
                "Ensure that your decision aligns coherently with the comprehensive evaluation and comparison you've "
                "provided. [/INST]")


def template(name: str) -> JudgeTemplate:
    return JudgeTemplate.from_cfg(OmegaConf.load(TEMPLATES / f"{name}.yaml"))


def git_blob_id(path: Path) -> str:
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def alpaca_eval_messages(prompt_file: str, instruction: str, output_1: str, output_2: str) -> list[dict]:
    """What AlpacaEval sends: `make_prompts` (each `{key}` replaced once, in order) then `prompt_to_chatml`."""
    prompt = (UPSTREAM / prompt_file).read_text()
    for key, value in (("instruction", instruction), ("output_1", output_1), ("output_2", output_2)):
        prompt = prompt.replace("{" + key + "}", value, 1)
    messages = []
    for block in prompt.strip().split("<|im_start|>")[1:]:
        role, rest = block.split("\n", 1)
        messages.append({"role": role.strip(), "content": rest.split("<|im_end|>", 1)[0].strip()})
    return messages


def rendered_messages(name: str, *args) -> list[dict]:
    system, prompt = template(name).render(*args)
    return [{"role": "system", "content": system}, {"role": "user", "content": prompt}]


def test_upstream_files_are_the_pinned_ones_and_templates_name_their_commits():
    for name, blob in UPSTREAM_FILES.items():
        assert git_blob_id(UPSTREAM / name) == blob, f"{name} is not the upstream file"
    sources = (UPSTREAM / "SOURCES.md").read_text()
    for name, (repo, commit) in PINS.items():
        source = template(name).source
        assert (source["repo"], source["commit"]) == (repo, commit) and re.fullmatch(r"[0-9a-f]{40}", commit)
        assert repo in sources or name in ("pandalm", "autoj")


def test_pair_v2_is_fastchats_current_prompt():
    entries = {e["name"]: e for e in map(json.loads, (UPSTREAM / "fastchat_judge_prompts.jsonl").read_text().splitlines())}
    upstream = entries["pair-v2"]
    assert "Avoid any position biases" in upstream["system_prompt"]
    user = upstream["prompt_template"].format(question="Q? {x}", answer_a="first {answer_b}", answer_b="second")
    assert template("pair_v2").render("Q? {x}", "", "first {answer_b}", "second") == (upstream["system_prompt"], user)
    system, prompt = template("pair_v2").render("Q?", "ctx", "a", "b")  # no input slot: the input joins the question
    assert prompt.startswith("[User Question]\nQ?\n\nctx\n\n")


def test_pandalm_and_autoj_prompts():
    assert template("pandalm").render("Q?", "", "first", "second") == (None, PANDALM_NO_INPUT)
    assert template("pandalm").render("Q?", "ctx", " first</s> ", "<unk>second") == (None, PANDALM_INPUT)
    assert template("autoj").render("Q?", "", "first", "second") == (None, AUTOJ_PROMPT)


@pytest.mark.parametrize("name, prompt_file, config_file", [
    ("weighted_alpaca_eval_gpt4_turbo", "alpaca_eval_clf.txt", "weighted_alpaca_eval_gpt4_turbo.yaml"),
    ("alpaca_eval_gpt4", "alpaca_eval.txt", "alpaca_eval_gpt4.yaml")])
def test_alpaca_eval_judges_send_what_alpaca_eval_sends(name, prompt_file, config_file):
    instruction, output_1, output_2 = 'Write "hi" {twice}', "hi hi", 'print("hi\\n" * 2)'
    assert rendered_messages(name, instruction, "", output_1, output_2) == alpaca_eval_messages(
        prompt_file, instruction, output_1, output_2)
    (upstream,) = yaml.safe_load((UPSTREAM / config_file).read_text()).values()
    ours = template(name)
    kwargs = dict(upstream["completions_kwargs"])
    assert ours.max_tokens == kwargs.pop("max_tokens") and ours.temperature == kwargs.pop("temperature")
    kwargs.pop("model_name")  # the judge model is judge.model
    assert ours.request_kwargs == kwargs and ours.positions == "random_swap"
    if ours.reads_logprobs:
        parser = upstream["completion_parser_kwargs"]
        assert upstream["fn_completion_parser"] == "logprob_parser" and parser["is_binarize"] is False
        assert (ours.verdict_tokens["A"], sorted(ours.verdict_tokens.values())) == (
            parser["numerator_token"], sorted(parser["denominator_tokens"]))
    else:
        assert upstream["fn_completion_parser"] == "ranking_parser"


def test_text_verdict_parsers():
    assert parse_pair_v2("Explanation... [[A]]") == 0.0
    assert parse_pair_v2("[[C]]") == 0.5
    assert parse_pair_v2('The format is "[[A]]" or "[[B]]". My verdict: [[B]]') == 1.0  # the final tag counts
    assert parse_pair_v2("A is better") is None and parse_pair_v2("[A]") is None
    assert parse_pandalm("1\n\n### Reason: ...") == 0.0
    assert parse_pandalm("  2\n### Reason") == 1.0
    assert parse_pandalm("Tie\n\n### Reason: both fine") == 0.5
    assert parse_pandalm("2\r\n### Reason") is None  # PandaLM splits on "\n" only: "2\r" is not "2" (it reads a tie)
    assert parse_pandalm("Response 1 is better") is None and parse_pandalm("") is None
    assert parse_autoj("... So, the final decision is Response 1") == 0.0
    assert parse_autoj("final decision is response 2.") == 1.0
    assert parse_autoj("So, the final decision is Tie.") == 0.5
    assert parse_autoj("I prefer Response 1") is None and parse_autoj("final decision is unclear") is None
    assert parse_alpaca_eval_ranking("[{'model': 'model_1', 'rank': 1}, {'model': 'model_2', 'rank': 2}]") == 0.0
    assert parse_alpaca_eval_ranking("[{'model': 'model_1', 'rank': 2}, {'model': 'model_2', 'rank': 1}]") == 1.0
    assert parse_alpaca_eval_ranking("[{'model': 'model_1', 'rank': 3}]") is None
    assert parse_alpaca_eval_ranking("model_1 is best") is None


def test_logprob_parser_is_alpaca_evals():
    # AlpacaEval's docstring example: M at -0.0176, m at -4.0488 -> preference 2 - P(m) / (P(m) + P(M))
    top = [("M", -0.017597131), ("m", -4.048847), ("Both", -14.908222)]
    p_m, p_big = math.exp(-4.048847), math.exp(-0.017597131)
    assert logprob_preference(top, "m", "M") == pytest.approx(p_big / (p_m + p_big), abs=1e-12)
    assert 1 + logprob_preference(top, "m", "M") == pytest.approx(2 - p_m / (p_m + p_big), abs=1e-12)
    assert logprob_preference([("m", -0.1)], "m", "M") == 0.0  # an absent token has probability 0
    assert logprob_preference([("The", -0.1)], "m", "M") is None
    weighted = template("weighted_alpaca_eval_gpt4_turbo")
    assert weighted.parse(JudgeReply("M", "length", (tuple(top),))) == pytest.approx(p_big / (p_m + p_big))
    assert weighted.parse(JudgeReply("M", "length", None, "no_logprobs")) is None


def test_template_configs_are_checked():
    cfg = OmegaConf.to_container(OmegaConf.load(TEMPLATES / "pair_v2.yaml"))
    with pytest.raises(ValueError, match="unknown parser"):
        JudgeTemplate.from_cfg({**cfg, "parser": "nope"})
    with pytest.raises(ValueError, match="reads verdict_text"):
        JudgeTemplate.from_cfg({**cfg, "verdict_text": {"A": "[[B]]", "B": "[[B]]", "tie": "[[C]]"}})
    with pytest.raises(ValueError, match="unknown keys"):
        JudgeTemplate.from_cfg({**cfg, "sytem": "typo"})
    with pytest.raises(ValueError, match="positions"):
        JudgeTemplate.from_cfg({**cfg, "positions": "one"})
    weighted = OmegaConf.to_container(OmegaConf.load(TEMPLATES / "weighted_alpaca_eval_gpt4_turbo.yaml"))
    with pytest.raises(ValueError, match="verdict_tokens"):
        JudgeTemplate.from_cfg({**weighted, "verdict_tokens": {"A": "m"}})
