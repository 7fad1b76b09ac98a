"""An OpenAI-compatible judge endpoint on 127.0.0.1 for tests and by-hand runs: `/v1/chat/completions`,
`/v1/completions` and `/v1/models` (standard-library HTTP server, port 0 by default, a bounded number of requests).

In a test: `with OpenAIStub(respond) as stub: ... stub.base_url ...`, where `respond(body, n)` (the request's JSON and
its number, from 1) returns a `StubReply`: a completion (text, finish reason, first-token top logprobs), an error
status, or any raw body. From the command line it serves `length_judge` (a judge that prefers longer answers, readable
by the pair-v2, PandaLM, Auto-J and AlpacaEval templates) until stopped or its limits are reached:

    python -m tests.openai_stub --port 8011 --max-requests 2000 --seconds 900
"""

from __future__ import annotations

import argparse
import json
import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MAX_REQUESTS = 200  # more are refused with a 503: a runaway retry loop fails the test instead of hanging it


@dataclass
class StubReply:
    """What the stub sends: with `body` or `raw` set, exactly that (JSON, or bytes as `content_type`); otherwise a
    completion holding `text` (None: `content: null`), `finish_reason` and, with `top_logprobs`, the first token's
    top log-probabilities `[(token, logprob), ...]`."""

    text: str | None = ""
    finish_reason: str = "stop"
    top_logprobs: list[tuple[str, float]] | None = None
    status: int = 200
    body: object = None
    raw: bytes | None = None
    content_type: str = "application/json"
    headers: dict = field(default_factory=dict)


def error(status: int, message: str, headers: dict | None = None, code: str | None = None) -> StubReply:
    """An OpenAI-style error reply."""
    return StubReply(status=status, body={"error": {"message": message, "type": "invalid_request_error",
                                                    "code": code}}, headers=headers or {})


def completion_body(path: str, request: dict, reply: StubReply) -> dict:
    """An OpenAI chat or text completion holding `reply`."""
    logprobs = None
    if path.endswith("/chat/completions"):
        if reply.top_logprobs is not None:
            token, logprob = reply.top_logprobs[0] if reply.top_logprobs else ("", 0.0)
            logprobs = {"content": [{"token": token, "logprob": logprob, "bytes": list(token.encode()),
                                     "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                                      for t, lp in reply.top_logprobs]}]}
        return {"id": "stub", "object": "chat.completion", "created": 0, "model": request.get("model"),
                "choices": [{"index": 0, "finish_reason": reply.finish_reason, "logprobs": logprobs,
                             "message": {"role": "assistant", "content": reply.text}}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
    if reply.top_logprobs is not None:
        logprobs = {"tokens": [reply.top_logprobs[0][0]], "top_logprobs": [dict(reply.top_logprobs)]}
    return {"id": "stub", "object": "text_completion", "created": 0, "model": request.get("model"),
            "choices": [{"index": 0, "finish_reason": reply.finish_reason, "text": reply.text, "logprobs": logprobs}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


class OpenAIStub:
    """The stub server (see the module docstring); `requests` holds every request body (with its `path`) and
    `auth_headers` every Authorization header, in arrival order."""

    def __init__(self, respond: Callable[[dict, int], StubReply], port: int = 0, max_requests: int = MAX_REQUESTS):
        self.respond = respond
        self.max_requests = max_requests
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.times: list[float] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep test output quiet
                pass

            def _send(self, status: int, data: bytes, content_type: str, headers: dict) -> None:
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                data = json.dumps({"object": "list", "data": [{"id": "stub-judge", "object": "model"}]}).encode()
                self._send(200, data, "application/json", {})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests.append({"path": self.path, **body})
                    stub.auth_headers.append(self.headers.get("Authorization", ""))
                    stub.times.append(time.monotonic())
                    count = len(stub.requests)
                if count > stub.max_requests:
                    reply = error(503, "stub request budget exhausted")
                else:
                    reply = stub.respond(body, count)
                if reply.raw is not None:
                    data = reply.raw
                else:
                    payload = reply.body if reply.body is not None else completion_body(self.path, body, reply)
                    data = json.dumps(payload).encode()
                self._send(reply.status, data, reply.content_type, reply.headers)

        class QuietServer(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):  # a client that timed out closed the socket
                pass

        self.httpd = QuietServer(("127.0.0.1", port), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> OpenAIStub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def prompt_of(body: dict) -> str:
    """The user prompt of a chat or completions request."""
    return body["messages"][-1]["content"] if "messages" in body else body["prompt"]


_ANSWER_PATTERNS = (  # (answer A, answer B) in each template's prompt
    (r"\[The Start of Assistant A's Answer\]\n(.*)\n\[The End of Assistant A's Answer\]",
     r"\[The Start of Assistant B's Answer\]\n(.*)\n\[The End of Assistant B's Answer\]"),
    (r'"model_identifier": "m",\n\s*"output": """(.*?)"""', r'"model_identifier": "M",\n\s*"output": """(.*?)"""'),
    (r'"model": "model_1",\n\s*"answer": """(.*?)"""', r'"model": "model_2",\n\s*"answer": """(.*?)"""'),
    (r"\[Response 1\]: (.*)\n\*\*\*\n\[Response 2\]", r"\[Response 2\]: (.*)\n\*\*\*\n\[END DATA\]"),
    (r"### Response 1:\n(.*)\n\n### Response 2:", r"### Response 2:\n(.*)\n\n### Evaluation:"),
)


def answers_of(prompt: str) -> tuple[str, str]:
    """(answer A, answer B) from a prompt of any of the repository's judge templates."""
    for pattern_a, pattern_b in _ANSWER_PATTERNS:
        a, b = re.search(pattern_a, prompt, re.S), re.search(pattern_b, prompt, re.S)
        if a and b:
            return a.group(1), b.group(1)
    raise ValueError(f"no answers found in the prompt: {prompt[:200]!r}")


def verdict_reply(prompt: str, preference_b: float) -> StubReply:
    """A reply that the template of `prompt` reads as `preference_b` (the probability that answer B is better):
    top logprobs for AlpacaEval 2.0's weighted judge, else B above 0.6, A below 0.4, a tie in between (AlpacaEval
    1.0's ranking has no tie: A)."""
    if '"model_identifier": "m"' in prompt:
        p = min(max(preference_b, 1e-6), 1 - 1e-6)
        token = "M" if p > 0.5 else "m"
        return StubReply(token, "length", [(token, math.log(max(p, 1 - p))), ("m" if token == "M" else "M",
                                                                               math.log(min(p, 1 - p)))])
    verdict = "B" if preference_b > 0.6 else "A" if preference_b < 0.4 else "tie"
    if '"model": "model_1"' in prompt:
        first, second = (2, 1) if verdict == "B" else (1, 2)
        return StubReply(f"[{{'model': 'model_1', 'rank': {first}}}, {{'model': 'model_2', 'rank': {second}}}]")
    if "### Evaluation:" in prompt:
        return StubReply({"A": "1", "B": "2", "tie": "Tie"}[verdict] + "\n\n### Reason: compared.")
    if "[BEGIN DATA]" in prompt:
        return StubReply("Compared. So, the final decision is " + {"A": "Response 1", "B": "Response 2",
                                                                    "tie": "Tie"}[verdict])
    return StubReply(f"Compared the two. [[{ {'A': 'A', 'B': 'B', 'tie': 'C'}[verdict] }]]")


def length_judge(body: dict, count: int) -> StubReply:
    """A judge that prefers the longer answer: P(B better) = sigmoid(3 tanh((len B - len A) / 300))."""
    prompt = prompt_of(body)
    a, b = answers_of(prompt)
    return verdict_reply(prompt, 1 / (1 + math.exp(-3 * math.tanh((len(b) - len(a)) / 300))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--max-requests", type=int, default=2000)
    parser.add_argument("--seconds", type=float, default=900.0, help="stop after this long")
    args = parser.parse_args(argv)
    with OpenAIStub(length_judge, port=args.port, max_requests=args.max_requests) as stub:
        print(f"serving {stub.base_url} (length_judge) for {args.seconds:.0f} s or {args.max_requests} requests",
              flush=True)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline and len(stub.requests) < args.max_requests:
            time.sleep(0.2)


if __name__ == "__main__":
    main()
