"""Judge clients (config group `judge`): an OpenAI-compatible endpoint, a local transformers model, a fake.

Every client has `name` (a display label), `template`, `identity` (what determines its replies besides the request:
the cache file and part of every cache key; never a secret), `request_params` (the sampling parameters it sends,
normalised into every cache key), `record` (what metrics.json says about it) and
`run(requests, on_result, show_progress)`, which calls `on_result(request, reply)` with a `JudgeReply` as each reply
arrives so the caller can cache it at once: a killed job keeps every reply it received, complete or not.
"""

from __future__ import annotations

import email.utils
import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed

from experiments.pipeline.credentials import public_url, redact, url_credentials
from experiments.pipeline.judging.templates import JudgeReply, JudgeRequest, JudgeTemplate

log = logging.getLogger(__name__)

OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_STATUS = (408, 409, 429)  # and every 5xx
TOO_LONG = re.compile(r"context.length|maximum context|context window|too long|max_model_len|maximum model length|"
                      r"must be <= \d+", re.IGNORECASE)
"""How OpenAI, vLLM and TGI word a 400 for a prompt (plus reply budget) longer than the model's context."""
OnResult = Callable[[JudgeRequest, JudgeReply], None]


def endpoint_settings(cfg: Mapping) -> tuple[str, str]:
    """An OpenAI-compatible judge's base URL (`judge.base_url`, else `OPENAI_BASE_URL`, else OpenAI's; it may hold
    credentials: record only its `public_url`) and the name of the environment variable holding its API key
    (`judge.api_key_env`, default `OPENAI_API_KEY`)."""
    base_url = str(cfg.get("base_url") or os.environ.get("OPENAI_BASE_URL") or OPENAI_DEFAULT_BASE_URL)
    return base_url, str(cfg.get("api_key_env") or "OPENAI_API_KEY")


class JudgeConfigError(ValueError):
    """A judge config that cannot work (missing key, unknown kind, credentials in the config, ...)."""


class JudgeAPIError(RuntimeError):
    """A judge endpoint failed for good: a non-retryable status, or retries exhausted."""


class MalformedReplyError(JudgeAPIError):
    """A 200 reply that is not a completion (not JSON, no choices, missing fields); retried like a 5xx."""


def _progress(total: int, show: bool, what: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not show, desc=what, unit="judgement")


def _field(value, name: str):
    """`value.name` or `value[name]` (the `openai` client builds replies without validating them)."""
    return value.get(name) if isinstance(value, Mapping) else getattr(value, name, None)


def _chat_top_logprobs(choice) -> tuple | None:
    content = _field(_field(choice, "logprobs"), "content")
    if not content:
        return None
    return tuple(tuple((str(_field(top, "token")), float(_field(top, "logprob")))
                       for top in (_field(token, "top_logprobs") or [])) for token in content)


def _completion_top_logprobs(choice) -> tuple | None:
    tops = _field(_field(choice, "logprobs"), "top_logprobs")
    if not tops:
        return None
    return tuple(tuple((str(token), float(logprob)) for token, logprob in (top or {}).items()) for top in tops)


class OpenAIJudge:
    """Any OpenAI-compatible endpoint through the `openai` package (>= 1.0), chat or completions API.

    Sampling parameters: `temperature` and `max_tokens` (sent as `token_limit_param`) from the judge config, else the
    template's; `request_kwargs` (the template's, then the judge config's) go into the request body as they are, so
    server-specific options (vLLM's `use_beam_search`, `repetition_penalty`, ...) pass through.

    Failures. The client's own retries are off (`max_retries=0`): 429, 408, 409, 5xx, timeouts, connection errors and
    malformed 200 replies (not JSON, no choices, missing fields) are retried here, at most `max_attempts` tries each,
    waiting a random time in `[0, min(backoff_max_s, backoff_base_s * 2**k)]` (full jitter) or, when longer, the
    server's `Retry-After`; then the run stops with `JudgeAPIError`. A 400 saying the prompt exceeds the model's
    context is `too_long`: with `too_long: skip` the request gets a `too_long` reply (recorded; the pair is listed as
    skipped), with `stop` the run stops. Other statuses (400, 401, 404, ...) stop the run at once. Complete replies
    that hold no verdict (empty text, `finish_reason: length` for a text template, no logprobs for a logprob template)
    are returned with their `failure` set. The API key comes from the environment variable `api_key_env`; a key or
    credentials inside a URL appear in no log, error, identity or file.
    """

    def __init__(self, cfg: Mapping, template: JudgeTemplate):
        import openai

        self.template = template
        self.name = str(cfg["name"])
        self.model = str(cfg["model"])
        if cfg.get("base_url") and url_credentials(str(cfg["base_url"])):
            raise JudgeConfigError("judge.base_url holds a user name or password, which would be recorded with the "
                                   "config: set OPENAI_BASE_URL to that URL instead and leave judge.base_url null.")
        base_url, key_env = endpoint_settings(cfg)
        self.endpoint = public_url(base_url)
        self.api = cfg.get("api") or ("chat" if template.format == "chat" else "completions")
        if self.api not in ("chat", "completions"):
            raise JudgeConfigError(f"judge.api must be 'chat' or 'completions', got {self.api!r}.")
        if self.api == "completions" and template.system:
            raise JudgeConfigError(f"Template '{template.name}' has a system prompt; use judge.api=chat with it.")
        if self.api == "completions" and template.reads_logprobs:
            raise JudgeConfigError(f"Template '{template.name}' reads chat logprobs; use judge.api=chat with it.")
        key = os.environ.get(key_env) or None
        if key is None:
            if self.endpoint == OPENAI_DEFAULT_BASE_URL:
                raise JudgeConfigError(f"No API key for {self.endpoint}: set the environment variable {key_env} "
                                       "(or judge.api_key_env to the variable that holds it).")
            log.info("%s is unset; sending a placeholder key to %s (local servers ignore it).", key_env, self.endpoint)
        self._secrets = [key, *url_credentials(base_url)]
        self.too_long = str(cfg.get("too_long") or "skip")
        if self.too_long not in ("skip", "stop"):
            raise JudgeConfigError(f"judge.too_long must be 'skip' or 'stop', got {self.too_long!r}.")
        temperature = cfg.get("temperature")
        self.temperature = template.temperature if temperature is None else float(temperature)
        self.max_tokens = cfg.get("max_tokens") or template.max_tokens
        self.request_kwargs = {**template.request_kwargs, **dict(cfg.get("request_kwargs") or {})}
        self.token_limit_param = str(cfg.get("token_limit_param") or "max_tokens")
        self.max_concurrency = max(1, int(cfg.get("max_concurrency", 8)))
        self.max_attempts = max(1, int(cfg.get("max_attempts", 6)))
        self.backoff_base_s = float(cfg.get("backoff_base_s", 1.0))
        self.backoff_max_s = float(cfg.get("backoff_max_s", 60.0))
        self._jitter = random.Random()
        self._openai = openai
        for name in ("httpx", "httpx2"):  # one INFO line per request otherwise (thousands in run.log)
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)
        self._client = openai.OpenAI(api_key=key or "EMPTY", base_url=base_url, max_retries=0,
                                     timeout=float(cfg.get("timeout_s", 120.0)))

    @property
    def identity(self) -> dict:
        return {"kind": "openai", "model": self.model, "api": self.api}

    @property
    def request_params(self) -> dict:
        return {"temperature": self.temperature, "max_tokens": self.max_tokens, **self.request_kwargs}

    @property
    def record(self) -> dict:
        return {**self.identity, "endpoint": self.endpoint, "params": self.request_params,
                "token_limit_param": self.token_limit_param}

    def _send(self, request: JudgeRequest):
        body = {self.token_limit_param: self.max_tokens, **self.request_kwargs}  # as they are, whatever the API
        options = {"extra_body": {key: value for key, value in body.items() if value is not None}}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.api == "chat":
            return self._client.chat.completions.create(model=self.model, messages=request.messages(), **options)
        return self._client.completions.create(model=self.model, prompt=request.prompt, **options)

    def _malformed(self, what: str) -> MalformedReplyError:
        return MalformedReplyError(f"Judge endpoint {self.endpoint} (model {self.model}) sent a malformed reply: "
                                   f"{redact(what, self._secrets)[:300]}")

    def _read(self, raw) -> JudgeReply:
        """The `JudgeReply` in a 200 response; `MalformedReplyError` when it is not a completion."""
        if isinstance(raw, (str, bytes)):
            body = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")
            raise self._malformed(f"not a JSON completion: {body[:200]!r}")
        choices = _field(raw, "choices")
        if not isinstance(choices, list) or not choices:
            error = _field(raw, "error")
            raise self._malformed(f"no choices{f' (error: {error})' if error else ''}")
        choice = choices[0]
        try:
            if self.api == "chat":
                message = _field(choice, "message")
                if message is None:
                    raise self._malformed("a choice without a message")
                text, top_logprobs = _field(message, "content"), _chat_top_logprobs(choice)
            else:
                text, top_logprobs = _field(choice, "text"), _completion_top_logprobs(choice)
        except (TypeError, ValueError, AttributeError) as error:
            raise self._malformed(f"unreadable choice ({type(error).__name__}: {error})") from None
        if text is not None and not isinstance(text, str):
            raise self._malformed(f"content of type {type(text).__name__}")
        finish_reason = _field(choice, "finish_reason")
        return JudgeReply(text, finish_reason, top_logprobs, self._failure(text, finish_reason, top_logprobs))

    def _failure(self, text: str | None, finish_reason: str | None, top_logprobs) -> str | None:
        if self.template.reads_logprobs:  # one token, finish_reason "length" by design; the text is not read
            return None if top_logprobs else "no_logprobs"
        if not (text or "").strip():
            return "empty"
        return "truncated" if finish_reason == "length" else None

    def _describe(self, error: Exception) -> str:
        status = getattr(error, "status_code", None)
        message = getattr(error, "message", None) or str(error)
        head = f"HTTP {status} " if status else ""
        return head + f"{type(error).__name__}: {redact(str(message), self._secrets)[:300]}"

    def _retry_wait(self, error: Exception, attempt: int) -> float:
        """Full-jitter exponential backoff, or the server's Retry-After (seconds, HTTP date, or `retry-after-ms`)
        when that is longer: a server's wait is never cut short."""
        wait_s = self._jitter.uniform(0.0, min(self.backoff_max_s, self.backoff_base_s * 2 ** attempt))
        response = getattr(error, "response", None)
        headers = response.headers if response is not None else {}
        server_s = None
        try:
            if headers.get("retry-after-ms"):
                server_s = float(headers["retry-after-ms"]) / 1000.0
            elif headers.get("retry-after"):
                value = headers["retry-after"]
                try:
                    server_s = float(value)
                except ValueError:
                    server_s = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            server_s = None
        return max(wait_s, server_s or 0.0)

    def complete(self, request: JudgeRequest, stop: threading.Event | None = None) -> JudgeReply:
        """The judge's reply to one request, with bounded retries (see the class docstring); a set `stop` event
        ends the waiting between retries."""
        errors = self._openai
        for attempt in range(self.max_attempts):
            try:
                return self._read(self._send(request))
            except MalformedReplyError as error:
                last = error
            except errors.APIStatusError as error:
                if error.status_code == 400 and TOO_LONG.search(str(getattr(error, "message", "")) + str(error.body)):
                    if self.too_long == "skip":
                        log.warning("%s: prompt too long for %s, skipped: %s", self.endpoint, self.model,
                                    self._describe(error))
                        return JudgeReply(None, None, None, "too_long")
                    raise JudgeAPIError(f"Judge endpoint {self.endpoint} (model {self.model}): a prompt exceeds the "
                                        f"model's context (judge.too_long=skip skips such pairs): "
                                        f"{self._describe(error)}") from None
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
    """A causal LM loaded with transformers that answers the judge prompt: greedy (or `request_kwargs` passed to
    `generate`, e.g. PandaLM's `num_beams: 4, repetition_penalty: 1.2`), batched, with a KV cache.

    Loaded on the first `run` with work to do, so a fully cached re-run never loads the model. Chat templates use
    the tokenizer's chat template when it has one, else `system + "\\n\\n" + user`; text templates are fed as they
    are (with the tokenizer's special tokens, e.g. BOS). A reply that used the whole budget without an end-of-sequence
    token is `truncated`.
    """

    def __init__(self, cfg: Mapping, template: JudgeTemplate):
        if template.reads_logprobs:
            raise JudgeConfigError(f"judge=hf_local returns reply text; template '{template.name}' reads logprobs: "
                                   "serve the model behind an OpenAI-compatible endpoint (e.g. vLLM) with judge=openai.")
        self.template = template
        self.name = str(cfg["name"])
        self.model_path = str(cfg["model"])
        self.tokenizer_path = str(cfg.get("tokenizer") or self.model_path)
        self.dtype = cfg.get("dtype") or "auto"
        self.device = cfg.get("device") or "auto"
        self.batch_size = max(1, int(cfg.get("batch_size", 4)))
        self.max_tokens = int(cfg.get("max_tokens") or template.max_tokens or 512)
        self.request_kwargs = dict(cfg.get("request_kwargs") or {})
        self._model = self._tokenizer = None

    @property
    def identity(self) -> dict:
        return {"kind": "hf_local", "model": self.model_path, "tokenizer": self.tokenizer_path, "dtype": self.dtype}

    @property
    def request_params(self) -> dict:
        return {"decoding": "greedy", "max_tokens": self.max_tokens, **self.request_kwargs}

    @property
    def record(self) -> dict:
        return {**self.identity, "params": self.request_params}

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

    def _reply(self, generated) -> JudgeReply:
        text = self._tokenizer.decode(generated, skip_special_tokens=True)
        eos = self._tokenizer.eos_token_id
        finished = eos is None or eos in generated.tolist()
        failure = "empty" if not text.strip() else None if finished else "truncated"
        return JudgeReply(text, "stop" if finished else "length", None, failure)

    def run(self, requests: Sequence[JudgeRequest], on_result: OnResult, show_progress: bool = False) -> None:
        """Judge `requests` in batches of similar length, passing each reply to `on_result` per batch."""
        import torch

        if not requests:
            return
        if self._model is None:
            self._load()
        prepared = [(request, *self._text(request)) for request in requests]
        prepared.sort(key=lambda item: len(item[1]))
        options = {"do_sample": False, **self.request_kwargs, "max_new_tokens": self.max_tokens,
                   "pad_token_id": self._tokenizer.pad_token_id}
        with _progress(len(requests), show_progress, f"judging ({self.name})") as bar:
            for start in range(0, len(prepared), self.batch_size):
                batch = prepared[start:start + self.batch_size]
                for add_special in sorted({item[2] for item in batch}):
                    group = [item for item in batch if item[2] == add_special]
                    inputs = self._tokenizer([item[1] for item in group], return_tensors="pt", padding=True,
                                             add_special_tokens=add_special).to(self._model.device)
                    with torch.inference_mode():
                        output = self._model.generate(**inputs, **options)
                    for (request, _, _), generated in zip(group, output[:, inputs["input_ids"].shape[1]:],
                                                          strict=True):
                        on_result(request, self._reply(generated))
                bar.update(len(batch))


class FakeJudge:
    """Deterministic judge for tests: writes the template's own verdict (text, or logprobs for a logprob template), so
    the template's parser is exercised.

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

    @property
    def request_params(self) -> dict:
        return {}

    @property
    def record(self) -> dict:
        return self.identity

    def verdict(self, request: JudgeRequest) -> str:
        """"A", "B" or "tie" for one request."""
        if self.rule == "longer":
            a, b = len(request.answer_a), len(request.answer_b)
            return "A" if a > b else "B" if b > a else "tie"
        digest = hashlib.sha256("\0".join((request.instruction, request.answer_a, request.answer_b)).encode())
        return ("A", "B", "tie")[int(digest.hexdigest()[:8], 16) % 3]

    def run(self, requests: Sequence[JudgeRequest], on_result: OnResult, show_progress: bool = False) -> None:
        for request in requests:
            on_result(request, self.template.reply_for(self.verdict(request)))


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
