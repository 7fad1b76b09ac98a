"""The `judge=openai` client against a local OpenAI-compatible server started in the test (standard library HTTP
server on 127.0.0.1, port 0): verdict parsing, both orders, ties, inconsistent verdicts, retries, permanent failures,
the cache, and the API key never reaching a file, a log or an error."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from experiments.pipeline.judge_clients import JudgeAPIError, JudgeConfigError, build_judge
from experiments.pipeline.judging import judge_outputs

SECRET = "sk-test-5ecret-K3y-0123456789abcdef"
MAX_REQUESTS = 200  # the server refuses more: a runaway retry loop fails the test instead of hanging it


class FakeOpenAIServer:
    """OpenAI-compatible `/v1/chat/completions` and `/v1/completions` on 127.0.0.1. `respond(request_json, n)`
    returns `(status, reply_text_or_error_body, headers)`; `n` counts requests from 1."""

    def __init__(self, respond):
        self.respond = respond
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, **body})
                    server.auth_headers.append(self.headers.get("Authorization", ""))
                    count = len(server.requests)
                if count > MAX_REQUESTS:
                    status, payload, headers = 503, {"error": {"message": "request budget exhausted"}}, {}
                else:
                    status, payload, headers = server.respond(body, count)
                if status == 200:
                    payload = server.completion(self.path, body, payload)
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        class QuietServer(ThreadingHTTPServer):
            def handle_error(self, request, client_address):  # a client that timed out closed the socket
                pass

        self.httpd = QuietServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @staticmethod
    def completion(path: str, body: dict, text: str) -> dict:
        if path.endswith("/chat/completions"):
            return {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": text}}]}
        return {"id": "c1", "object": "text_completion", "created": 0, "model": body["model"],
                "choices": [{"index": 0, "finish_reason": "stop", "text": text, "logprobs": None}]}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


def answers_of(prompt: str) -> tuple[str, str]:
    """(answer A, answer B) from a pair-v2 prompt."""
    a = re.search(r"\[The Start of Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\]", prompt, re.S)
    b = re.search(r"\[The Start of Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]", prompt, re.S)
    return a.group(1), b.group(1)


def prefers_good(body: dict, count: int):
    """A consistent judge: the answer containing GOOD wins, both GOOD or neither is a tie (with an explanation that
    quotes a tag before the final one, as real judges do)."""
    a, b = answers_of(prompt_of(body))
    verdict = "[[A]]" if "GOOD" in a and "GOOD" not in b else "[[B]]" if "GOOD" in b and "GOOD" not in a else "[[C]]"
    return 200, f'I compared them; the format asks for "[[A]]" or "[[B]]". Final verdict: {verdict}', {}


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
    repo = Path(__file__).resolve().parents[1]
    cfg = OmegaConf.merge(OmegaConf.load(repo / "conf/judge/base.yaml"),
                          OmegaConf.load(repo / "conf/judge/openai.yaml"))
    cfg.pop("defaults")
    cfg.template = OmegaConf.load(repo / f"conf/judge/template/{template}.yaml")
    cfg.base_url, cfg.model, cfg.backoff_base_s, cfg.max_attempts, cfg.timeout_s = base_url, "judge-x", 0.0, 3, 5.0
    return OmegaConf.merge(cfg, overrides)


def assert_secret_nowhere(*roots: Path, texts=()):
    for root in roots:
        for path in Path(root).rglob("*"):
            if path.is_file():
                assert SECRET.encode() not in path.read_bytes(), f"API key written to {path}"
                assert SECRET[-8:].encode() not in path.read_bytes(), f"part of the API key written to {path}"
    for text in texts:
        assert SECRET not in text and SECRET[-8:] not in text


def test_both_orders_wins_ties_losses_and_the_cache(tmp_path):
    with FakeOpenAIServer(prefers_good) as server:
        cfg = judge_cfg(server.base_url)
        judgements, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(server.requests) == 8  # 4 pairs x 2 orders
        assert all(r["path"] == "/v1/chat/completions" and r["model"] == "judge-x" for r in server.requests)
        assert all(r["temperature"] == 0.0 and r["max_tokens"] == 2048 for r in server.requests)
        assert server.requests[0]["messages"][0]["role"] == "system"
        assert set(server.auth_headers) == {f"Bearer {SECRET}"}
        outcome = {j["instruction"]: j["outcome"] for j in judgements}
        assert outcome == {"Name a colour.": "win", "Add 2 and 2.": "loss", "Say hi.": "tie", "Write a haiku.": "tie"}
        colour = next(j for j in judgements if j["instruction"] == "Name a colour.")
        assert [(v["order"], v["verdict"]) for v in colour["verdicts"]] == [("model_first", "A"),
                                                                           ("reference_first", "B")]
        assert (metrics["wins"], metrics["ties"], metrics["losses"], metrics["unparseable"]) == (1, 2, 1, 0)
        assert metrics["win_rate"] == pytest.approx(0.5) and metrics["inconsistent"] == 0
        assert metrics["generator"] == "tiny-emo" and metrics["reference_generator"] == "gpt4"

        again, metrics_again = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(server.requests) == 8, "a second run must be served from the cache"
        assert metrics_again["requests"] == {"prompts": 8, "distinct": 8, "cached": 8, "sent": 0}
        assert [j["outcome"] for j in again] == [j["outcome"] for j in judgements]

        judge_outputs(MODEL, REFERENCE, judge_cfg=judge_cfg(server.base_url, temperature=0.7), cache_dir=tmp_path)
        assert len(server.requests) == 16, "another judge setting is another cache entry"
    assert_secret_nowhere(tmp_path)


def test_position_bias_gives_inconsistent_ties_and_unparseable_replies_are_listed(tmp_path):
    def biased(body, count):
        prompt = prompt_of(body)
        if "haiku" in prompt:
            return 200, "I cannot decide.", {}
        return 200, "[[A]]", {}

    with FakeOpenAIServer(biased) as server:
        judgements, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=judge_cfg(server.base_url), cache_dir=None)
    assert metrics["inconsistent"] == 3 and metrics["ties"] == 3
    assert metrics["unparseable"] == 1 and metrics["n_judged"] == 3 and metrics["n_pairs"] == 4
    assert metrics["unparseable_pairs"] == [{"instruction": "Write a haiku.",
                                             "orders": ["model_first", "reference_first"]}]
    assert metrics["win_rate"] == pytest.approx(0.5)
    haiku = next(j for j in judgements if j["instruction"] == "Write a haiku.")
    assert haiku["outcome"] == "unparseable" and haiku["score"] is None
    assert haiku["verdicts"][0]["reply"] == "I cannot decide."


def test_random_swap_judges_once_per_pair_with_a_seeded_order():
    with FakeOpenAIServer(prefers_good) as server:
        cfg = judge_cfg(server.base_url, positions="random_swap", seed=3)
        first, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=None)
        second, _ = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=None)
        assert len(server.requests) == 8
    assert all(len(j["verdicts"]) == 1 for j in first)
    assert [j["verdicts"][0]["order"] for j in first] == [j["verdicts"][0]["order"] for j in second]
    assert (metrics["wins"], metrics["ties"], metrics["losses"]) == (1, 2, 1)


def test_429_then_success_is_retried_with_backoff(tmp_path):
    def rate_limited(body, count):
        if count <= 2:
            return 429, {"error": {"message": "Rate limit reached", "type": "requests"}}, {"Retry-After": "0"}
        return prefers_good(body, count)

    with FakeOpenAIServer(rate_limited) as server:
        cfg = judge_cfg(server.base_url, max_concurrency=1)
        _, metrics = judge_outputs(MODEL, REFERENCE, judge_cfg=cfg, cache_dir=tmp_path)
        assert len(server.requests) == 10  # 2 refused + 8 answered
    assert metrics["wins"] == 1 and metrics["unparseable"] == 0


def test_timeout_is_retried():
    def slow_first(body, count):
        if count == 1:
            time.sleep(2.0)  # the client gives up after 1 s
        return prefers_good(body, count)

    with FakeOpenAIServer(slow_first) as server:
        cfg = judge_cfg(server.base_url, timeout_s=1.0, max_concurrency=1)
        _, metrics = judge_outputs(MODEL[:1], REFERENCE[1:2], judge_cfg=cfg, cache_dir=None)
        assert len(server.requests) == 3  # timed out, retried, then the second order
    assert metrics["wins"] == 1


def test_500_forever_fails_clearly_keeps_finished_judgements_and_writes_no_run(tmp_path, compose_cfg, caplog):
    from experiments.judge import run

    def failing_haiku(body, count):
        if "haiku" in prompt_of(body):
            return 500, {"error": {"message": f"upstream exploded (key {SECRET})"}}, {}
        return prefers_good(body, count)

    model_file, reference_file = tmp_path / "model.json", tmp_path / "reference.json"
    model_file.write_text(json.dumps(MODEL))
    reference_file.write_text(json.dumps(REFERENCE))
    with FakeOpenAIServer(failing_haiku) as server:
        cfg = compose_cfg("experiment=judge", "judge=openai", f"judge.base_url={server.base_url}",
                          "judge.model=judge-x", "judge.backoff_base_s=0", "judge.max_attempts=3",
                          "judge.max_concurrency=1", f"pairwise.model_outputs={model_file}",
                          f"pairwise.reference_outputs={reference_file}",
                          f"paths.results_dir={tmp_path / 'results'}", f"paths.cache_dir={tmp_path / 'cache'}",
                          f"paths.output_dir={tmp_path / 'out'}")
        with pytest.raises(JudgeAPIError) as error:
            run(cfg)
        message = str(error.value)
        assert server.base_url in message and "HTTP 500" in message and "3 times" in message
        haiku_requests = [r for r in server.requests if "haiku" in prompt_of(r)]
        assert 3 <= len(haiku_requests) <= 6  # bounded: max_attempts per order (2 orders), then the run stops
    results = tmp_path / "results"
    assert not (results / "judge").exists() or not any((results / "judge").iterdir())
    cached = (tmp_path / "cache" / "judgements").glob("*.jsonl")
    assert sum(len(p.read_text().splitlines()) for p in cached) >= 1  # finished judgements survive the failure
    assert_secret_nowhere(tmp_path, texts=[message, caplog.text])


def test_a_full_run_writes_no_secret_and_a_401_is_not_retried(tmp_path, compose_cfg, caplog):
    from experiments.judge import run

    model_file, reference_file = tmp_path / "model.json", tmp_path / "reference.json"
    model_file.write_text(json.dumps(MODEL))
    reference_file.write_text(json.dumps(REFERENCE))
    overrides = ["experiment=judge", "judge=openai", "judge.model=judge-x", "judge.backoff_base_s=0",
                 f"pairwise.model_outputs={model_file}", f"pairwise.reference_outputs={reference_file}",
                 f"paths.results_dir={tmp_path / 'results'}", f"paths.cache_dir={tmp_path / 'cache'}",
                 f"paths.output_dir={tmp_path / 'out'}", "pairwise.objective=EMO"]
    with FakeOpenAIServer(prefers_good) as server:
        metrics = run(compose_cfg(*overrides, f"judge.base_url={server.base_url}"))
    assert metrics["win_rate"] == pytest.approx(0.5) and metrics["objective"] == "EMO"
    run_dir = next((tmp_path / "results" / "judge").iterdir())
    assert {p.name for p in run_dir.iterdir()} == {"metrics.json", "manifest.json", "judgements.jsonl"}
    assert len((run_dir / "judgements.jsonl").read_text().splitlines()) == 4

    def unauthorized(body, count):
        return 401, {"error": {"message": f"Incorrect API key provided: {SECRET[:6]}***{SECRET[-4:]} / {SECRET}"}}, {}

    with FakeOpenAIServer(unauthorized) as server:
        with pytest.raises(JudgeAPIError) as error:
            run(compose_cfg(*overrides, f"judge.base_url={server.base_url}", "judge.model=other",
                            "judge.max_concurrency=1"))
        assert len(server.requests) == 1 and "HTTP 401" in str(error.value)
    assert_secret_nowhere(tmp_path, texts=[str(error.value), caplog.text])


def test_completions_api_for_text_templates():
    def autoj(body, count):
        assert body["prompt"].startswith("[INST] You are assessing two submitted responses")
        assert body["max_tokens"] == 1024  # the template's budget (Auto-J)
        return 200, "Response 2 is right. So, the final decision is Response 2", {}

    with FakeOpenAIServer(autoj) as server:
        _, metrics = judge_outputs(MODEL[:1], REFERENCE[1:2], judge_cfg=judge_cfg(server.base_url, "autoj"),
                                   cache_dir=None)
        assert {r["path"] for r in server.requests} == {"/v1/completions"}
    assert metrics["inconsistent"] == 1 and metrics["ties"] == 1  # always "Response 2": position-biased


def test_key_rules(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = judge_cfg("https://api.openai.com/v1")
    with pytest.raises(JudgeConfigError, match="OPENAI_API_KEY"):
        build_judge(cfg)
    build_judge(judge_cfg("http://127.0.0.1:9/v1"))  # local servers need no key
    with pytest.raises(JudgeConfigError, match="never go into configs"):
        build_judge(OmegaConf.merge(judge_cfg("http://127.0.0.1:9/v1"), {"api_key": SECRET}))


@pytest.mark.slow
def test_the_documented_command_through_run_py_leaves_no_key_in_hydra_logs(tmp_path):
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    (tmp_path / "a.json").write_text(json.dumps(MODEL))
    (tmp_path / "b.json").write_text(json.dumps(REFERENCE))
    env = {**os.environ, "OPENAI_API_KEY": SECRET, "EMO_RESULTS_DIR": str(tmp_path / "results"),
           "EMO_CACHE_DIR": str(tmp_path / "cache"), "EMO_LOG_DIR": str(tmp_path / "outputs")}
    with FakeOpenAIServer(prefers_good) as server:
        done = subprocess.run([sys.executable, "run.py", "experiment=judge", "judge=openai", "judge.model=gpt-4",
                               f"judge.base_url={server.base_url}", f"pairwise.model_outputs={tmp_path / 'a.json'}",
                               f"pairwise.reference_outputs={tmp_path / 'b.json'}"],
                              cwd=repo, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        assert len(server.requests) == 8
    (run_dir,) = (tmp_path / "results" / "judge").iterdir()
    assert json.loads((run_dir / "metrics.json").read_text())["win_rate"] == pytest.approx(0.5)
    assert any((tmp_path / "outputs").rglob("run.log"))
    assert_secret_nowhere(tmp_path, texts=[done.stdout, done.stderr])
