"""The `judge=openai` client (the real `openai` package) against the OpenAI-compatible stub on 127.0.0.1
(`tests/openai_stub.py`): verdicts in both orders, AlpacaEval's seeded order, retries (jittered, `Retry-After`),
every kind of malformed or incomplete reply, over-long prompts, `rejudge`, the cache key, request parameters, the
AlpacaEval 2.0 weighted judge checked against AlpacaEval's formulas, and credentials never reaching a file."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from openai_stub import OpenAIStub, StubReply, answers_of, error, prompt_of, verdict_reply

from experiments.pipeline.judging.clients import JudgeAPIError, JudgeConfigError, build_judge
from experiments.pipeline.judging.pairwise import alpaca_eval_annotations, judge_outputs

REPO = Path(__file__).resolve().parents[1]
SECRET = "sk-test-5ecret-K3y-0123456789abcdef"
URL_PASSWORD = "pa55w0rd-in-the-url-7f3e"


def prefers_good(body: dict, count: int) -> StubReply:
    """A consistent judge: the answer containing GOOD wins, both GOOD or neither is a tie (in pair-v2, with an
    explanation that quotes a tag before the final one, as real judges do; in the template's format otherwise)."""
    prompt = prompt_of(body)
    a, b = answers_of(prompt)
    preference_b = 0.0 if "GOOD" in a and "GOOD" not in b else 1.0 if "GOOD" in b and "GOOD" not in a else 0.5
    if "[User Question]" not in prompt:
        return verdict_reply(prompt, preference_b)
    verdict = {0.0: "[[A]]", 1.0: "[[B]]", 0.5: "[[C]]"}[preference_b]
    return StubReply(f'I compared them; the format asks for "[[A]]" or "[[B]]". Final verdict: {verdict}')


MODEL = [{"instruction": "Name a colour.", "output": "GOOD red", "generator": "tiny-emo"},
         {"instruction": "Add 2 and 2.", "output": "5", "generator": "tiny-emo"},
         {"instruction": "Say hi.", "output": "GOOD hi", "generator": "tiny-emo"},
         {"instruction": "Write a haiku.", "output": "leaves fall", "generator": "tiny-emo"}]
REFERENCE = [{"instruction": "Say hi.", "output": "GOOD hello", "generator": "gpt4"},
             {"instruction": "Name a colour.", "output": "blue", "generator": "gpt4"},
             {"instruction": "Add 2 and 2.", "output": "GOOD 4", "generator": "gpt4"},
             {"instruction": "Write a haiku.", "output": "an old pond", "generator": "gpt4"}]


@pytest.fixture(autouse=True)
def local_only(monkeypatch):
    """Loopback traffic only, never through a proxy; a known secret key in the environment."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)


def judge_cfg(base_url: str, template: str = "pair_v2", **overrides):
    cfg = OmegaConf.merge(OmegaConf.load(REPO / "conf/judge/base.yaml"), OmegaConf.load(REPO / "conf/judge/openai.yaml"))
    cfg.pop("defaults")
    cfg.template = OmegaConf.load(REPO / f"conf/judge/template/{template}.yaml")
    cfg.base_url, cfg.model, cfg.backoff_base_s, cfg.max_attempts, cfg.timeout_s = base_url, "judge-x", 0.0, 3, 5.0
    cfg.name = "judge-x"
    return OmegaConf.merge(cfg, overrides)


def write_outputs(directory: Path) -> tuple[Path, Path]:
    model_file, reference_file = directory / "model.json", directory / "reference.json"
    model_file.write_text(json.dumps(MODEL))
    reference_file.write_text(json.dumps(REFERENCE))
    return model_file, reference_file


def assert_secret_nowhere(*roots: Path, texts=()):
    for secret in (SECRET, SECRET[-8:], URL_PASSWORD):
        for root in roots:
            for path in Path(root).rglob("*"):
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), f"a credential was written to {path}"
        for text in texts:
            assert secret not in text


def test_both_orders_wins_ties_losses_and_the_cache(tmp_path):
    with OpenAIStub(prefers_good) as stub:
        cfg = judge_cfg(stub.base_url)
        judgements, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(stub.requests) == 8  # 4 pairs x 2 orders
        assert all(r["path"] == "/v1/chat/completions" and r["model"] == "judge-x" for r in stub.requests)
        assert all(r["temperature"] == 0.0 and r["max_tokens"] == 2048 for r in stub.requests)
        assert stub.requests[0]["messages"][0]["role"] == "system"
        assert set(stub.auth_headers) == {f"Bearer {SECRET}"}
        outcome = {j["instruction"]: j["outcome"] for j in judgements}
        assert outcome == {"Name a colour.": "win", "Add 2 and 2.": "loss", "Say hi.": "tie", "Write a haiku.": "tie"}
        colour = next(j for j in judgements if j["instruction"] == "Name a colour.")
        assert [(v["order"], v["verdict"]) for v in colour["verdicts"]] == [("model_first", "A"),
                                                                           ("reference_first", "B")]
        assert (metrics["wins"], metrics["ties"], metrics["losses"], metrics["unparseable"]) == (1, 2, 1, 0)
        assert metrics["win_rate"] == pytest.approx(0.5) and metrics["inconsistent"] == 0
        assert metrics["generator"] == "tiny-emo" and metrics["reference_generator"] == "gpt4"

        again, metrics_again = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(stub.requests) == 8, "a second run must be served from the cache"
        assert metrics_again["requests"]["cached"] == 8 and metrics_again["requests"]["sent"] == 0
        assert [j["outcome"] for j in again] == [j["outcome"] for j in judgements]

        # only what changes an answer is in the cache key: a new label, 0 for 0.0, another endpoint URL for the same
        # model or the budget sent as max_completion_tokens hit the cache
        for same in (dict(name="renamed judge"), dict(temperature=0), dict(max_tokens=2048),
                     dict(token_limit_param="max_completion_tokens"), dict(base_url=stub.base_url + "/")):
            _, relabelled = judge_outputs(MODEL, REFERENCE, judge_cfg=OmegaConf.merge(cfg, same), cache_dir=tmp_path)
            assert relabelled["requests"]["sent"] == 0, same
        assert len(stub.requests) == 8 and len(list((tmp_path / "judgements").iterdir())) == 1
        judge_outputs(MODEL, REFERENCE, judge_cfg=judge_cfg(stub.base_url, temperature=0.7), cache_dir=tmp_path)
        assert len(stub.requests) == 16, "another sampling parameter is another cache entry"
        judge_outputs(MODEL, REFERENCE, judge_cfg=judge_cfg(stub.base_url, request_kwargs={"seed": 1}),
                      cache_dir=tmp_path)
        assert len(stub.requests) == 24
    assert_secret_nowhere(tmp_path)


def test_position_bias_gives_inconsistent_ties_and_unparseable_replies_are_listed(tmp_path):
    def biased(body, count):
        return StubReply("I cannot decide." if "haiku" in prompt_of(body) else "[[A]]")

    with OpenAIStub(biased) as stub:
        judgements, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=judge_cfg(stub.base_url), cache_dir=None)
    assert metrics["inconsistent"] == 3 and metrics["ties"] == 3
    assert metrics["unparseable"] == 1 and metrics["n_judged"] == 3 and metrics["n_pairs"] == 4
    assert metrics["unparseable_pairs"] == [{"instruction": "Write a haiku.",
                                             "orders": {"model_first": "unparseable",
                                                        "reference_first": "unparseable"}}]
    assert metrics["win_rate"] == pytest.approx(0.5)
    haiku = next(j for j in judgements if j["instruction"] == "Write a haiku.")
    assert haiku["outcome"] == "unparseable" and haiku["score"] is None
    assert haiku["verdicts"][0]["reply"] == "I cannot decide."


def test_random_swap_uses_alpaca_evals_seeded_switch():
    with OpenAIStub(prefers_good) as stub:
        cfg = judge_cfg(stub.base_url, positions="random_swap", seed=3)
        first, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=None)
        assert len(stub.requests) == 4
    for row in first:  # AlpacaEval: RandomSwitchTwoColumnsProcessor, seed "is_switched_outputs" + instruction + seed
        switched = random.Random("is_switched_outputs" + row["instruction"] + "3").choices([False, True], k=1)[0]
        assert [v["order"] for v in row["verdicts"]] == ["model_first" if switched else "reference_first"]
    assert (metrics["wins"], metrics["ties"], metrics["losses"]) == (1, 2, 1)


def test_429_retry_after_is_honoured_beyond_the_backoff_cap():
    def rate_limited(body, count):
        if count == 1:
            return error(429, "Rate limit reached", {"Retry-After": "1"})
        return prefers_good(body, count)

    with OpenAIStub(rate_limited) as stub:
        cfg = judge_cfg(stub.base_url, max_concurrency=1, backoff_base_s=0.01, backoff_max_s=0.05)
        _, metrics = judge_outputs(MODEL[:1], REFERENCE[1:2], judge_cfg=cfg, cache_dir=None)
        assert len(stub.requests) == 3  # refused, retried, then the other order
        assert stub.times[1] - stub.times[0] >= 0.95, "the server's Retry-After must not be cut to backoff_max_s"
    assert metrics["wins"] == 1


def test_backoff_is_jittered():
    judge = build_judge(judge_cfg("http://127.0.0.1:9/v1", backoff_base_s=1.0, backoff_max_s=60.0))
    waits = [judge._retry_wait(RuntimeError("x"), attempt=3) for _ in range(50)]
    assert all(0.0 <= w <= 8.0 for w in waits) and len(set(waits)) > 40


def test_timeout_is_retried():
    def slow_first(body, count):
        if count == 1:
            time.sleep(2.0)  # the client gives up after 1 s
        return prefers_good(body, count)

    with OpenAIStub(slow_first) as stub:
        cfg = judge_cfg(stub.base_url, timeout_s=1.0, max_concurrency=1)
        _, metrics = judge_outputs(MODEL[:1], REFERENCE[1:2], judge_cfg=cfg, cache_dir=None)
        assert len(stub.requests) == 3  # timed out, retried, then the second order
    assert metrics["wins"] == 1


MALFORMED = {
    "empty choices": StubReply(body={"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": []}),
    "not JSON": StubReply(raw=b"<html>502 Bad Gateway</html>", content_type="text/html"),
    "no choices": StubReply(body={"id": "x", "object": "chat.completion", "created": 0, "model": "m"}),
    "an error in a 200": StubReply(body={"error": {"message": "upstream overloaded"}}),
    "no message": StubReply(body={"id": "x", "object": "chat.completion", "created": 0, "model": "m",
                                  "choices": [{"index": 0, "finish_reason": "stop"}]}),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_replies_are_retried_then_fail_naming_the_endpoint_and_model(kind, tmp_path):
    def malformed_once(body, count):
        return MALFORMED[kind] if count == 1 else prefers_good(body, count)

    with OpenAIStub(malformed_once) as stub:
        cfg = judge_cfg(stub.base_url, max_concurrency=1)
        _, metrics = judge_outputs(MODEL[:1], REFERENCE[1:2], judge_cfg=cfg, cache_dir=tmp_path)
        assert len(stub.requests) == 3 and metrics["wins"] == 1  # the malformed reply was asked again
    with OpenAIStub(lambda body, count: MALFORMED[kind]) as stub:
        with pytest.raises(JudgeAPIError) as failure:
            judge_outputs(MODEL[:1], REFERENCE[1:2], judge_cfg=judge_cfg(stub.base_url, model="judge-y",
                                                                          max_concurrency=1), cache_dir=tmp_path)
        assert len(stub.requests) == 3  # max_attempts
    message = str(failure.value)
    assert stub.base_url in message and "judge-y" in message and "malformed" in message


def test_empty_and_truncated_replies_are_recorded_not_scored_and_rejudge_asks_for_exactly_those(tmp_path):
    broken = {"Say hi.": StubReply(None), "Add 2 and 2.": StubReply("Let me think step by step about [[", "length")}

    def flaky(body, count):
        broken_reply = next((reply for instruction, reply in broken.items() if instruction in prompt_of(body)), None)
        return broken_reply or prefers_good(body, count)

    with OpenAIStub(flaky) as stub:
        cfg = judge_cfg(stub.base_url)
        judgements, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(stub.requests) == 8  # incomplete replies are not retried at once: they are recorded
        assert metrics["unparseable"] == 2 and metrics["n_judged"] == 2
        assert metrics["requests"]["failed"] == {"empty": 2, "truncated": 2}
        hi = next(j for j in judgements if j["instruction"] == "Say hi.")
        assert [v["failure"] for v in hi["verdicts"]] == ["empty", "empty"] and hi["score"] is None
        assert [j["preference"] for j in alpaca_eval_annotations(judgements)].count(None) == 2
        _, again = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(stub.requests) == 8 and again["unparseable"] == 2, "nothing paid is re-bought by a plain rerun"

        broken.clear()  # the endpoint behaves now
        _, only_empty = judge_outputs(MODEL, REFERENCE, judge_cfg=OmegaConf.merge(cfg, {"rejudge": "empty"}),
                                      cache_dir=tmp_path)
        assert len(stub.requests) == 10 and only_empty["requests"]["rejudged"] == 2
        assert only_empty["unparseable"] == 1  # the truncated pair is still without a verdict
        _, fixed = judge_outputs(MODEL, REFERENCE, judge_cfg=OmegaConf.merge(cfg, {"rejudge": "failed"}),
                                 cache_dir=tmp_path)
        assert len(stub.requests) == 12 and all("Add 2 and 2." in prompt_of(r) for r in stub.requests[10:])
        assert fixed["unparseable"] == 0 and (fixed["wins"], fixed["ties"], fixed["losses"]) == (1, 2, 1)
        _, settled = judge_outputs(MODEL, REFERENCE, judge_cfg=OmegaConf.merge(cfg, {"rejudge": "failed"}),
                                   cache_dir=tmp_path)
        assert len(stub.requests) == 12 and settled["requests"]["sent"] == 0


def test_a_prompt_too_long_for_the_judge_is_skipped_and_listed_or_stops_the_run(tmp_path):
    vllm_message = ("This model's maximum context length is 2048 tokens. However, you requested 2300 tokens (1788 in "
                    "the messages, 512 in the completion). Please reduce the length of the messages or completion.")

    def short_context(body, count):
        if "haiku" in prompt_of(body):
            return error(400, vllm_message, code="context_length_exceeded")
        return prefers_good(body, count)

    with OpenAIStub(short_context) as stub:
        cfg = judge_cfg(stub.base_url, "autoj")
        judgements, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(stub.requests) == 8 and metrics["skipped"] == 1 and metrics["n_judged"] == 3
        assert metrics["skipped_pairs"] == [{"instruction": "Write a haiku.", "reason": "too_long"}]
        judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(stub.requests) == 8, "a recorded too-long prompt is not sent again"
        judge_outputs(MODEL, REFERENCE, judge_cfg=OmegaConf.merge(cfg, {"rejudge": "too_long"}), cache_dir=tmp_path)
        assert len(stub.requests) == 10
        with pytest.raises(JudgeAPIError, match="exceeds the model's context"):
            judge_outputs(MODEL, REFERENCE, judge_cfg=OmegaConf.merge(cfg, {"too_long": "stop", "model": "other"}),
                          cache_dir=None)


def test_request_kwargs_reach_the_endpoint_as_they_are():
    def autoj(body, count):
        return StubReply("Response 2 is right. So, the final decision is Response 2")

    with OpenAIStub(autoj) as stub:
        cfg = judge_cfg(stub.base_url, "pandalm", request_kwargs={"use_beam_search": True, "best_of": 4,
                                                                  "repetition_penalty": 1.2},
                        token_limit_param="max_completion_tokens")
        judge_outputs(MODEL[:1], REFERENCE[1:2], judge_cfg=cfg, cache_dir=None)
        request = stub.requests[0]
        assert request["path"] == "/v1/completions" and request["prompt"].startswith("Below are two responses")
        assert (request["use_beam_search"], request["best_of"], request["repetition_penalty"]) == (True, 4, 1.2)
        assert request["max_completion_tokens"] == 512 and "max_tokens" not in request


def test_completions_api_for_text_templates():
    def autoj(body, count):
        assert body["prompt"].startswith("[INST] You are assessing two submitted responses")
        assert body["max_tokens"] == 1024  # the template's budget (Auto-J)
        return StubReply("Response 2 is right. So, the final decision is Response 2")

    with OpenAIStub(autoj) as stub:
        _, metrics = judge_outputs(MODEL[:1], REFERENCE[1:2], judge_cfg=judge_cfg(stub.base_url, "autoj"),
                                   cache_dir=None)
        assert {r["path"] for r in stub.requests} == {"/v1/completions"}
    assert metrics["inconsistent"] == 1 and metrics["ties"] == 1  # always "Response 2": position-biased


def _sem(values) -> float:
    values = np.asarray(values, dtype=float)
    return float(values.std(ddof=1) / math.sqrt(len(values)))


def test_weighted_alpaca_eval_judge_matches_alpaca_evals_formulas(tmp_path):
    """AlpacaEval 2.0's weighted judge on stub logprobs: preferences (logprob_parser, then 3 - x for switched pairs),
    win rate and s.e. (AbsoluteScoringRule), discrete win rate (ZeroOneScoringRule) and the LC win rate with its s.e.
    (glm_winrate: the fitted GLM's mean prediction at zero length difference and the sem of those predictions),
    computed here from AlpacaEval's published formulas on the logprobs the stub sent."""
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    n = 40
    instructions = [f"Instruction {i}: explain topic {i}." for i in range(n)]
    reference = [{"instruction": q, "output": "r" * int(rng.integers(50, 400)), "generator": "gpt4_1106_preview"}
                 for q in instructions]
    model = [{"instruction": q, "output": "m" * int(rng.integers(50, 400)), "generator": "emo"} for q in instructions]
    model[7]["output"] = reference[7]["output"]  # identical answers: 1.5 without a request
    difficulty = {q: float(rng.normal()) for q in instructions}
    (tmp_path / "difficulty.json").write_text(json.dumps(difficulty))
    sent = {}

    def weighted(body, count):
        assert (body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) == (1, 1.0, True, 5)
        prompt = prompt_of(body)
        a, b = answers_of(prompt)
        p_b = float(rng.uniform(0.05, 0.95))
        top = [("M", math.log(0.9 * p_b)), ("m", math.log(0.9 * (1 - p_b))), ("Both", math.log(0.1))]
        instruction = next(q for q in instructions if f'"""{q}"""' in prompt)
        sent[instruction] = {"model_at_m": a.startswith("m"), "logprobs": dict(top)}
        return StubReply("M", "length", top)

    with OpenAIStub(weighted) as stub:
        cfg = judge_cfg(stub.base_url, "weighted_alpaca_eval_gpt4_turbo", max_concurrency=1,
                        length_control={"instruction_difficulty": str(tmp_path / "difficulty.json"), "folds": 0})
        judgements, metrics = judge_outputs(model, reference, judge_cfg=cfg, cache_dir=None)
        assert len(stub.requests) == n - 1

    expected = {}
    for q in instructions:
        if q not in sent:
            expected[q] = 1.5
            continue
        switched = random.Random("is_switched_outputs" + q + "0").choices([False, True], k=1)[0]
        assert sent[q]["model_at_m"] == switched  # output_1 is the baseline; switched: the model is shown first
        p_m, p_big = math.exp(sent[q]["logprobs"]["m"]), math.exp(sent[q]["logprobs"]["M"])
        preference = 2 - p_m / (p_m + p_big)  # logprob_parser, is_binarize false
        expected[q] = 3 - preference if switched else preference
    annotations = {a["instruction"]: a["preference"] for a in alpaca_eval_annotations(judgements)}
    assert annotations == pytest.approx(expected, abs=1e-12)

    x = np.array([expected[q] - 1 for q in instructions])
    assert 100 * metrics["win_rate"] == pytest.approx(100 * x.mean(), abs=1e-9)
    assert 100 * metrics["win_rate_se"] == pytest.approx(100 * _sem(x), abs=1e-9)
    n_wins, n_base, n_draws = (x > 0.5).sum(), (x < 0.5).sum(), (x == 0.5).sum()
    assert (metrics["wins"], metrics["losses"], metrics["ties"]) == (n_wins, n_base, n_draws) and n_draws == 1
    assert metrics["discrete_win_rate"] == pytest.approx((n_wins + n_draws / 2) / n)

    # GLM: preference ~ tanh(std_delta_len) + instruction_difficulty + intercept, soft labels; AlpacaEval's
    # std_delta_len is (len baseline - len model) / its std. Our fit: L2 penalty 1 / (2C) on the two slopes (C = 100
    # with folds=0), the intercept free (docs/track3_judging.md).
    delta = np.array([len(r["output"]) - len(m["output"]) for r, m in zip(reference, model)], dtype=float)
    features = np.column_stack([np.tanh(delta / delta.std(ddof=1)), [difficulty[q] for q in instructions]])

    def objective(theta):
        z = theta[0] + features @ theta[1:]
        log_p, log_q = -np.logaddexp(0, -z), -np.logaddexp(0, z)
        return 0.5 * theta[1:] @ theta[1:] / 100.0 - np.sum(x * log_p + (1 - x) * log_q)

    theta = minimize(objective, np.zeros(3), method="BFGS", options={"gtol": 1e-10}).x
    predicted = 1 / (1 + np.exp(-(theta[0] + features[:, 1] * theta[2])))  # at zero length difference
    lc = metrics["length_controlled"]
    assert lc["win_rate"] == pytest.approx(predicted.mean(), abs=1e-5)
    assert lc["win_rate_se"] == pytest.approx(_sem(predicted), abs=1e-5)
    assert lc["weights"]["tanh_std_delta_len"] == pytest.approx(-theta[1], abs=1e-3)  # model - reference: sign flips


def test_key_rules(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = judge_cfg("https://api.openai.com/v1")
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY"):
        build_judge(cfg)
    build_judge(judge_cfg("http://127.0.0.1:9/v1"))  # local servers need no key
    with pytest.raises(JudgeConfigError, match="never go into configs"):
        build_judge(OmegaConf.merge(judge_cfg("http://127.0.0.1:9/v1"), {"api_key": SECRET}))
    with pytest.raises(JudgeConfigError, match="OPENAI_BASE_URL"):
        build_judge(judge_cfg(f"http://user:{URL_PASSWORD}@127.0.0.1:9/v1"))


def test_a_500_forever_fails_clearly_keeps_finished_judgements_and_writes_no_run(tmp_path, compose_cfg, caplog):
    from experiments.judge import run

    def failing_haiku(body, count):
        if "haiku" in prompt_of(body):
            return error(500, f"upstream exploded (key {SECRET})")
        return prefers_good(body, count)

    model_file, reference_file = write_outputs(tmp_path)
    with OpenAIStub(failing_haiku) as stub:
        cfg = compose_cfg("experiment=judge", "judge=openai", f"judge.base_url={stub.base_url}",
                          "judge.model=judge-x", "judge.backoff_base_s=0", "judge.max_attempts=3",
                          "judge.max_concurrency=1", f"pairwise.model_outputs={model_file}",
                          f"pairwise.reference_outputs={reference_file}",
                          f"paths.results_dir={tmp_path / 'results'}", f"paths.cache_dir={tmp_path / 'cache'}",
                          f"paths.output_dir={tmp_path / 'out'}")
        with pytest.raises(JudgeAPIError) as failure:
            run(cfg)
        message = str(failure.value)
        assert stub.base_url in message and "HTTP 500" in message and "3 times" in message
        haiku_requests = [r for r in stub.requests if "haiku" in prompt_of(r)]
        assert 3 <= len(haiku_requests) <= 6  # bounded: max_attempts per order (2 orders), then the run stops
    results = tmp_path / "results"
    assert not (results / "judge").exists() or not any((results / "judge").iterdir())
    cached = (tmp_path / "cache" / "judgements").glob("*.jsonl")
    assert sum(len(p.read_text().splitlines()) for p in cached) >= 1  # finished judgements survive the failure
    assert_secret_nowhere(tmp_path, texts=[message, caplog.text])


def test_a_full_run_writes_alpaca_eval_files_and_no_secret_and_a_401_is_not_retried(tmp_path, compose_cfg, caplog):
    from experiments.judge import run

    model_file, reference_file = write_outputs(tmp_path)
    overrides = ["experiment=judge", "judge=openai", "judge.model=judge-x", "judge.backoff_base_s=0",
                 f"pairwise.model_outputs={model_file}", f"pairwise.reference_outputs={reference_file}",
                 f"paths.results_dir={tmp_path / 'results'}", f"paths.cache_dir={tmp_path / 'cache'}",
                 f"paths.output_dir={tmp_path / 'out'}", "pairwise.objective=EMO"]
    with OpenAIStub(prefers_good) as stub:
        metrics = run(compose_cfg(*overrides, f"judge.base_url={stub.base_url}"))
    assert metrics["win_rate"] == pytest.approx(0.5) and metrics["objective"] == "EMO"
    run_dir = next((tmp_path / "results" / "judge").iterdir())
    assert {p.name for p in run_dir.iterdir()} == {"metrics.json", "manifest.json", "judgements.jsonl",
                                                   "annotations.json", "leaderboard.csv"}
    assert len((run_dir / "judgements.jsonl").read_text().splitlines()) == 4

    def unauthorized(body, count):
        return error(401, f"Incorrect API key provided: {SECRET[:6]}***{SECRET[-4:]} / {SECRET}")

    with OpenAIStub(unauthorized) as stub:
        with pytest.raises(JudgeAPIError) as failure:
            run(compose_cfg(*overrides, f"judge.base_url={stub.base_url}", "judge.model=other",
                            "judge.max_concurrency=1"))
        assert len(stub.requests) == 1 and "HTTP 401" in str(failure.value)
    assert_secret_nowhere(tmp_path, texts=[str(failure.value), caplog.text])


def _run_py(tmp_path: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    environment = {**os.environ, "OPENAI_API_KEY": SECRET, "EMO_RESULTS_DIR": str(tmp_path / "results"),
                   "EMO_CACHE_DIR": str(tmp_path / "cache"), "EMO_LOG_DIR": str(tmp_path / "outputs"), **(env or {})}
    return subprocess.run([sys.executable, "run.py", *overrides], cwd=REPO, env=environment, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("override", [f"+judge.api_key={SECRET}", f"++judge.api_key={SECRET}", f"+api_key={SECRET}",
                                      f"judge.base_url=http://user:{URL_PASSWORD}@127.0.0.1:9/v1",
                                      f"+judge.extra={SECRET}"])
def test_run_py_refuses_a_command_line_credential_before_hydra_writes_a_file(tmp_path, override):
    done = _run_py(tmp_path, "experiment=judge", "judge=fake", "pairwise.model_outputs=a.json", override)
    assert done.returncode == 2 and done.stderr.startswith("run.py: refused: ") and len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "outputs").exists() and not (tmp_path / "results").exists()
    assert_secret_nowhere(texts=[done.stdout, done.stderr])


@pytest.mark.slow
def test_the_documented_command_with_credentials_in_the_environment_writes_none(tmp_path):
    model_file, reference_file = write_outputs(tmp_path)
    with OpenAIStub(prefers_good) as stub:
        url_with_password = stub.base_url.replace("http://", f"http://judge:{URL_PASSWORD}@")
        done = _run_py(tmp_path, "experiment=judge", "judge=openai", "judge.model=gpt-4",
                       f"pairwise.model_outputs={model_file}", f"pairwise.reference_outputs={reference_file}",
                       env={"OPENAI_BASE_URL": url_with_password})
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(stub.requests) == 8
    (run_dir,) = (tmp_path / "results" / "judge").iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["win_rate"] == pytest.approx(0.5) and metrics["judge_identity"]["endpoint"] == stub.base_url
    assert any((tmp_path / "outputs").rglob("run.log")) and any((tmp_path / "outputs").rglob("config.yaml"))
    assert_secret_nowhere(tmp_path, texts=[done.stdout, done.stderr])
