"""Fast, explicit network checks before anything touches the Hugging Face Hub or a remote URL.

Without them a missing model or dataset costs ~45 s of HTTP retries when the machine is offline; with them the user gets
an error within seconds that says how to point the config at local files instead.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
_TRUTHY = {"1", "true", "yes", "on"}


class OfflineError(ConnectionError):
    """A remote resource was requested while the Hub / network is unavailable."""


def hub_offline() -> bool:
    """True when the user asked for offline mode (`HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE` or `HF_DATASETS_OFFLINE`)."""
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    if any(os.environ.get(flag, "").strip().lower() in _TRUTHY for flag in flags):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    return bool(constants.HF_HUB_OFFLINE)


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Open and close one TCP connection to `host:port` within `timeout` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def ensure_remote_available(what: str, name: str, hint: str, url: str | None = None) -> None:
    """Raise `OfflineError` quickly when `name` (a Hub id, or `url`) cannot be fetched.

    `what` ("dataset", "model", ...) and `hint` (how to use local files instead) go into the message.
    """
    if hub_offline():
        reason = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE)"
    else:
        parsed = urlparse(url) if url else urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        host = parsed.hostname or "huggingface.co"
        port = parsed.port or (80 if parsed.scheme == "http" else 443)
        if host_reachable(host, port):
            return
        reason = (f"{host}:{port} is not reachable within {PROBE_TIMEOUT_S:g} s (set HF_HUB_OFFLINE=1 to use "
                  "copies already in the Hugging Face cache)")
    raise OfflineError(f"Cannot fetch {what} '{name}': {reason}. {hint}")


def _in_hf_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an invalid repo id raises a validation error: treat it as "not cached"
        return False


def ensure_model_available(what: str, name_or_path: str, hint: str) -> None:
    """Fail fast for a model/tokenizer that is neither a local path nor in the local HF cache and cannot be fetched."""
    if Path(name_or_path).exists() or _in_hf_cache(name_or_path):
        return
    ensure_remote_available(what, name_or_path, hint)
