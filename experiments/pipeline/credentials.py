"""Credentials never reach a config, a manifest, a log or a result.

run.py calls `refuse_credential_overrides(sys.argv[1:])` before Hydra starts: Hydra writes the command-line overrides
and the composed config to `.hydra/*.yaml` before any recipe runs, so a key given on the command line must be refused
before then. The rest of the suite uses `public_url` (a URL without its user:password part) and `redact` (error text
without any secret) wherever an endpoint is recorded or reported.

Standard library only: run.py imports this before anything heavy.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit, urlunsplit

SECRET_KEY_NAMES = frozenset({"api_key", "apikey", "api_token", "access_token", "auth_token", "hf_token", "secret",
                              "secret_key", "password", "passwd"})
"""Config field names (the last part of a dotted key, any case) whose value would be a credential."""
SECRET_VALUE = re.compile(r"\b(sk-[A-Za-z0-9_\-]{16,}|hf_[A-Za-z0-9]{30,})")
"""Values shaped like an OpenAI or Hugging Face key."""
URL_WITH_CREDENTIALS = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/\s@]+@")
"""`scheme://user[:password]@...`"""
_MASKED_KEY = re.compile(r"sk-[A-Za-z0-9_\-*.]{3,}")


class CredentialInConfigError(SystemExit):
    """A command-line override that would write a credential to disk (exits run.py with status 2 and one line)."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _override_key_and_value(argument: str) -> tuple[str, str] | None:
    """`(key, value)` of a Hydra override `[+|++|~]key=value` (None for flags such as `-m`, `--cfg`)."""
    if argument.startswith("-") or "=" not in argument:
        return None
    key, value = argument.split("=", 1)
    return key.lstrip("+~"), value


def credential_problem(argument: str) -> str | None:
    """Why the command-line `argument` would put a credential on disk, or None when it would not."""
    parsed = _override_key_and_value(argument)
    key, value = parsed if parsed else ("", argument)
    field = key.rsplit(".", 1)[-1].lower()
    if field in SECRET_KEY_NAMES:
        return (f"'{key}' on the command line: Hydra would write its value to .hydra/*.yaml and the manifest. Put the "
                "key in an environment variable instead (for a judge: the variable named by judge.api_key_env, "
                "OPENAI_API_KEY by default).")
    if URL_WITH_CREDENTIALS.search(value):
        return (f"'{key or argument.split('=')[0]}' holds a URL with a user name or password: it would be written to "
                ".hydra/*.yaml and the manifest. Pass such a URL through an environment variable instead (for a "
                "judge: OPENAI_BASE_URL, with judge.base_url unset); only its public part is ever recorded.")
    if SECRET_VALUE.search(value):
        return (f"'{key or argument}' holds a value shaped like an API key: it would be written to .hydra/*.yaml and "
                "the manifest. Put keys in environment variables (judge.api_key_env names the judge's).")
    return None


def refuse_credential_overrides(arguments: Sequence[str]) -> None:
    """Raise `CredentialInConfigError` (one line on stderr, exit status 2) if any command-line argument carries a
    credential: a key-named field (`judge.api_key=...`, any `api_key`, `password`, ...), a URL with a user name or
    password, or a value shaped like an OpenAI / Hugging Face key. Call it before Hydra parses the command line."""
    for argument in arguments:
        problem = credential_problem(argument)
        if problem:
            print(f"run.py: refused: {problem}", file=sys.stderr)
            raise CredentialInConfigError(problem)


def url_credentials(url: str) -> list[str]:
    """The user name and password inside `url` (empty when it has none)."""
    parts = urlsplit(url)
    return [part for part in (parts.username, parts.password) if part]


def public_url(url: str) -> str:
    """`url` without its user:password part, query and fragment, and without a trailing slash."""
    parts = urlsplit(url)
    netloc = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every one of `secrets` and anything shaped like an API key (`sk-...`, masked ones too) replaced by
    `***`."""
    for secret in sorted((s for s in secrets if s), key=len, reverse=True):
        text = text.replace(secret, "***")
    return _MASKED_KEY.sub("sk-***", SECRET_VALUE.sub("***", text))
