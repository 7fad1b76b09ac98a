"""Judge clients (config group `judge`): an OpenAI-compatible endpoint, a local transformers model, a fake.

Every client has `name`, `identity` (what determines its replies: part of every cache key; never a secret) and
`run(requests, on_result, show_progress)`, which calls `on_result(request, reply)` as each reply arrives so the caller
can cache it at once: a killed job keeps every reply it received.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from urllib.parse import urlsplit, urlunsplit

from experiments.pipeline.judge_templates import JudgeRequest, JudgeTemplate

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_STATUS = (408, 409, 429)  # and every 5xx
OnResult = Callable[[JudgeRequest, str], None]


class JudgeConfigError(ValueError):
    """A judge config that cannot work (missing key, unknown kind, ...)."""


class JudgeAPIError(RuntimeError):
    """A judge endpoint failed for good: a non-retryable status, or retries exhausted."""


def _progress(total: int, show: bool, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc=what, unit="judgement")


def _public_url(url: str) -> str:
    """`url` without any user:password part."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = host + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def redact(text: str, secret: str | None) -> str:
    """`text` with `secret` and anything shaped like an API key (`sk-...`, also masked ones) replaced by `***`."""
    if secret:
        text = text.replace(secret, "***")
    return re.sub(r"sk-[A-Za-z0-9_\-\*\.]{3,}", "sk-***", text)


class OpenAIJudge:
    """Any OpenAI-compatible endpoint through the `openai` package (>= 1.0), chat or completions API.

    The client's own retries are off (`max_retries=0`): requests are retried here on 429, 408, 409, 5xx, timeouts and
    connection errors, at most `max_attempts` tries each, waiting `min(backoff_max_s, backoff_base_s * 2**k)` or the
    server's `Retry-After`; other statuses (400, 401, 404, ...) fail at once. The API key comes from the environment
    variable `api_key_env` and appears in no log, error, identity or file.
    """

    def __init__(self, cfg: Mapping, template: JudgeTemplate):
        import openai

        self.template = template
        self.name = str(cfg["name"])
        self.model = str(cfg["model"])
        base_url = cfg.get("base_url") or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL
        self.endpoint = _public_url(str(base_url))
        self.api = cfg.get("api") or ("chat" if template.format == "chat" else "completions")
        if self.api not in ("chat", "completions"):
            raise JudgeConfigError(f"judge.api must be 'chat' or 'completions', got {self.api!r}.")
        if self.api == "completions" and template.system:
            raise JudgeConfigError(f"Template '{template.name}' has a system prompt; use judge.api=chat with it.")
        key_env = str(cfg.get("api_key_env") or "OPENAI_API_KEY")
        self._secret = os.environ.get(key_env) or None
        if self._secret is None:
            if self.endpoint == OPENAI_DEFAULT_BASE_URL:
                raise JudgeConfigError(f"No API key for {self.endpoint}: set the environment variable {key_env} "
                                       "(or judge.api_key_env to the variable that holds it).")
            log.info("%s is unset; sending a placeholder key to %s (local servers ignore it).", key_env, self.endpoint)
        self.temperature = cfg.get("temperature")
        self.max_tokens = cfg.get("max_tokens") or template.max_tokens
        self.token_limit_param = str(cfg.get("token_limit_param") or "max_tokens")
        self.max_concurrency = max(1, int(cfg.get("max_concurrency", 8)))
        self.max_attempts = max(1, int(cfg.get("max_attempts", 6)))
        self.backoff_base_s = float(cfg.get("backoff_base_s", 1.0))
        self.backoff_max_s = float(cfg.get("backoff_max_s", 60.0))
        self._openai = openai
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise (thousands in run.log)
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._client = openai.OpenAI(api_key=self._secret or "EMPTY", base_url=str(base_url), max_retries=0,
                                     timeout=float(cfg.get("timeout_s", 120.0)))

    @property
    def identity(self) -> dict:
        return {"kind": "openai", "endpoint": self.endpoint, "model": self.model, "api": self.api,
                "temperature": self.temperature, "max_tokens": self.max_tokens}

    def _params(self) -> dict:
        params = {}
        if self.temperature is not None:
            params["temperature"] = self.temperature
        if self.max_tokens is not None:
            params[self.token_limit_param] = self.max_tokens
        return params

    def _request_once(self, request: JudgeRequest) -> str:
        if self.api == "chat":
            response = self._client.chat.completions.create(model=self.model, messages=request.messages(),
                                                            **self._params())
            return response.choices[0].message.content or ""
        prompt = f"{request.system}\n\n{request.prompt}" if request.system else request.prompt
        response = self._client.completions.create(model=self.model, prompt=prompt, **self._params())
        return response.choices[0].text or ""

    def _describe(self, error: Exception) -> str:
        status = getattr(error, "status_code", None)
        message = getattr(error, "message", None) or str(error)
        head = f"HTTP {status} " if status else ""
        return head + f"{type(error).__name__}: {redact(str(message), self._secret)[:300]}"

    def _retry_wait(self, error: Exception, attempt: int) -> float:
        wait_s = min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt)
        response = getattr(error, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        try:
            return min(self.backoff_max_s, max(wait_s, float(retry_after))) if retry_after else wait_s
        except ValueError:
            return wait_s

    def complete(self, request: JudgeRequest, stop: threading.Event | None = None) -> str:
        """The judge's reply to one request, with bounded retries (see the class docstring); a set `stop` event
        ends the waiting between retries."""
        errors = self._openai
        for attempt in range(self.max_attempts):
            try:
                return self._request_once(request)
            except errors.APIStatusError as error:
                if error.status_code < 500 and error.status_code not in RETRYABLE_STATUS:
                    raise JudgeAPIError(f"Judge endpoint {self.endpoint} (model {self.model}) refused the request: "
                                        f"{self._describe(error)}") from None
                last = error
            except errors.APIConnectionError as error:  # includes APITimeoutError
                last = error
            if attempt + 1 < self.max_attempts:
                wait_s = self._retry_wait(last, attempt)
                log.warning("%s: %s; retry %d/%d in %.1fs", self.endpoint, self._describe(last), attempt + 1,
                            self.max_attempts - 1, wait_s)
                if (stop or threading.Event()).wait(wait_s):
                    raise JudgeAPIError(f"Judge endpoint {self.endpoint}: stopped while retrying "
                                        f"({self._describe(last)}).")
        raise JudgeAPIError(f"Judge endpoint {self.endpoint} (model {self.model}) failed {self.max_attempts} times; "
                            f"last error: {self._describe(last)}") from None

    def run(self, requests: Sequence[JudgeRequest], on_result: OnResult, show_progress: bool = False) -> None:
        """Judge `requests` with at most `max_concurrency` in flight; the first permanent failure cancels the rest
        and is raised (replies already received have been passed to `on_result`)."""
        if not requests:
            return
        lock, stop = threading.Lock(), threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency, thread_name_prefix="judge")
        with _progress(len(requests), show_progress, f"judging ({self.name})") as bar:

            def task(request: JudgeRequest) -> None:
                if stop.is_set():  # a request failed for good, or the run was interrupted: start nothing new
                    return
                try:
                    reply = self.complete(request, stop)
                except BaseException:
                    stop.set()
                    raise
                with lock:
                    on_result(request, reply)
                    bar.update(1)

            try:
                for future in as_completed([pool.submit(task, request) for request in requests]):
                    future.result()  # the first failure propagates
            finally:
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)  # waits only for requests already in flight


class HFLocalJudge:
    """A causal LM loaded with transformers that answers the judge prompt: greedy, batched, with a KV cache.

    Loaded on the first `run` with work to do, so a fully cached re-run never loads the model. Chat templates use
    the tokenizer's chat template when it has one, else `system + "\\n\\n" + user`; text templates are fed as they
    are (with the tokenizer's special tokens, e.g. BOS).
    """

    def __init__(self, cfg: Mapping, template: JudgeTemplate):
        self.template = template
        self.name = str(cfg["name"])
        self.model_path = str(cfg["model"])
        self.tokenizer_path = str(cfg.get("tokenizer") or self.model_path)
        self.dtype = cfg.get("dtype") or "auto"
        self.device = cfg.get("device") or "auto"
        self.batch_size = max(1, int(cfg.get("batch_size", 4)))
        self.max_tokens = int(cfg.get("max_tokens") or template.max_tokens or 512)
        self._model = self._tokenizer = None

    @property
    def identity(self) -> dict:
        return {"kind": "hf_local", "model": self.model_path, "tokenizer": self.tokenizer_path, "dtype": self.dtype,
                "decoding": "greedy", "max_tokens": self.max_tokens}

    def _load(self) -> None:
        import torch

        from experiments.pipeline.models import load_causal_lm, load_tokenizer

        self._tokenizer = load_tokenizer(self.tokenizer_path, padding_side="left")
        model = load_causal_lm({"name_or_path": self.model_path, "dtype": self.dtype, "from_config": None},
                               self._tokenizer)
        device = ("cuda" if torch.cuda.is_available() else "cpu") if self.device == "auto" else self.device
        self._model = model.to(device).eval()

    def _text(self, request: JudgeRequest) -> tuple[str, bool]:
        """The prompt string and whether the tokenizer should add its special tokens."""
        if self.template.format == "chat" and getattr(self._tokenizer, "chat_template", None):
            text = self._tokenizer.apply_chat_template(request.messages(), tokenize=False, add_generation_prompt=True)
            return text, False
        if request.system:
            return f"{request.system}\n\n{request.prompt}", True
        return request.prompt, True

    def run(self, requests: Sequence[JudgeRequest], on_result: OnResult, show_progress: bool = False) -> None:
        """Judge `requests` in batches of similar length, passing each reply to `on_result` per batch."""
        import torch

        if not requests:
            return
        if self._model is None:
            self._load()
        prepared = [(request, *self._text(request)) for request in requests]
        prepared.sort(key=lambda item: len(item[1]))
        with _progress(len(requests), show_progress, f"judging ({self.name})") as bar:
            for start in range(0, len(prepared), self.batch_size):
                batch = prepared[start:start + self.batch_size]
                for add_special in sorted({item[2] for item in batch}):
                    group = [item for item in batch if item[2] == add_special]
                    inputs = self._tokenizer([item[1] for item in group], return_tensors="pt", padding=True,
                                             add_special_tokens=add_special).to(self._model.device)
                    with torch.inference_mode():
                        output = self._model.generate(**inputs, do_sample=False, max_new_tokens=self.max_tokens,
                                                      pad_token_id=self._tokenizer.pad_token_id)
                    replies = self._tokenizer.batch_decode(output[:, inputs["input_ids"].shape[1]:],
                                                           skip_special_tokens=True)
                    for (request, _, _), reply in zip(group, replies, strict=True):
                        on_result(request, reply)
                bar.update(len(batch))


class FakeJudge:
    """Deterministic judge for tests: writes the template's own verdict text, so the template's parser is exercised.

    `model: longer`: the longer answer (characters) wins, equal lengths tie: the same verdict in both orders.
    `model: hash`: the verdict is a hash of (instruction, answer A, answer B) modulo 3: it depends on the order.
    """

    RULES = ("longer", "hash")

    def __init__(self, cfg: Mapping, template: JudgeTemplate):
        self.template = template
        self.name = str(cfg["name"])
        self.rule = str(cfg["model"])
        if self.rule not in self.RULES:
            raise JudgeConfigError(f"judge=fake: judge.model must be one of {self.RULES}, got {self.rule!r}.")

    @property
    def identity(self) -> dict:
        return {"kind": "fake", "rule": self.rule}

    def verdict(self, request: JudgeRequest) -> str:
        """"A", "B" or "tie" for one request."""
        if self.rule == "longer":
            a, b = len(request.answer_a), len(request.answer_b)
            return "A" if a > b else "B" if b > a else "tie"
        digest = hashlib.sha256("\0".join((request.instruction, request.answer_a, request.answer_b)).encode())
        return ("A", "B", "tie")[int(digest.hexdigest()[:8], 16) % 3]

    def run(self, requests: Sequence[JudgeRequest], on_result: OnResult, show_progress: bool = False) -> None:
        for request in requests:
            on_result(request, self.template.verdict_text[self.verdict(request)])


JUDGES = {"openai": OpenAIJudge, "hf_local": HFLocalJudge, "fake": FakeJudge}


def build_judge(judge_cfg: Mapping):
    """The judge client of a `judge` config node (`kind` picks the class; `template` is its prompt template)."""
    if "api_key" in judge_cfg:
        raise JudgeConfigError("judge.api_key is not accepted: API keys never go into configs (they would reach the "
                               "manifest). Put the key in an environment variable named by judge.api_key_env.")
    kind = judge_cfg.get("kind")
    if kind not in JUDGES:
        raise JudgeConfigError(f"Unknown judge.kind {kind!r}; known: {sorted(JUDGES)}.")
    return JUDGES[kind](judge_cfg, JudgeTemplate.from_cfg(judge_cfg["template"]))
