"""A synthetic "oracle" language whose next-token distribution is known exactly.

Trained on text sampled from ``OracleLanguage``, a student LM can be scored against the true distribution, per
token, on held-out contexts: forward KL(oracle||student) (recall), reverse KL(student||oracle) (precision), total
variation, and the oracle's own entropy (``exact_metrics``).

The language (defaults in brackets; all randomness from ``numpy.random.default_rng([seed, 0])``)
------------------------------------------------------------------------------------------------
An endless stream of sentences from a hidden Markov model over ``num_states`` [32] states and ``vocab_size`` [512]
tokens:

* tokens: id 0 is ``"."``, id 1 is ``","``; ids 2.. are pseudo-words in order of a Zipf-Mandelbrot prior
  ``(rank + 2.7) ** -zipf_exponent`` [1.1], so lower ids are more frequent.
* states: ``num_states - 2`` "word classes", plus one state that emits ``"."`` and one that emits ``","``. Every
  word belongs to ``classes_per_word`` [2] random classes; a class emits its words with probability
  ``softmax((log prior + noise_scale * N(0, 1)) / temperature)`` (``noise_scale`` [1.0], ``temperature`` [0.8]),
  mixed with the uniform distribution over all tokens, weight ``smoothing`` [1e-3], so every next-token
  probability is positive and reverse KL is finite.
* transitions: a class moves to ``"."`` with probability ``1 / sentence_length`` [10], to ``","`` with
  ``comma_rate`` [0.05], otherwise to a class drawn from its own Dirichlet(``concentration`` [0.1]) row (a few
  likely successors, like parts of speech). After ``","`` comes a class; after ``"."`` a new sentence starts from
  the start distribution (also Dirichlet). Dirichlet draws are floored at 1e-12 (and renormalised).

Related languages (a "pre-training domain"): ``domain`` d >= 1 with ``emission_shift`` s_e >= 0 [0] and
``transition_shift`` 0 <= s_t <= 1 [0] keeps what defines the language's structure (vocabulary, word classes, i.e.
which words each class can emit, Zipf prior, punctuation rates) and shifts its probabilities, with randomness of its
own (``default_rng([seed, 1, d])``): every class's emission logits get ``s_e * N(0, 1)`` added before the temperature
(in the units of ``noise_scale``), and every Dirichlet row (class successors, sentence start, after ``","``) becomes
``(1 - s_t) * row + s_t * (a fresh Dirichlet(concentration) draw)``. Domain 0 is the language itself (its shifts must
be 0); a domain d >= 1 samples its own text streams (``[seed, stream, d]``).

A document (one line of a corpus file) is ``sentences_per_document`` [6] sentences on average (geometric), always
starting at a sentence start and ending with the ``"."`` state. Because a sentence start forgets the past, any
concatenation of documents is itself an exact sample of the stream; this is what the Track-1 pipeline trains on,
since it packs lines into blocks without separators. There is therefore no end-of-document token in the language.

Measured at the defaults (seed 0): mean per-token entropy 3.59 nats (perplexity ~36; uniform would be
log 512 = 6.24 nats; seeds 1 and 2 give 3.65 and 3.51), 71 tokens (6 sentences) per document on average. On 2
CPU threads, ``sample`` draws 10^5 tokens in ~0.1 s and 10^6 in ~1.5 s; ``exact_metrics`` scores its default 200
documents (11.6k tokens) in ~2 s with ``OracleLM`` as the student.

Text and tokenizer
------------------
``render`` writes a document as one line: words separated by spaces, ``"."``/``","`` attached to the preceding
word (``"ta kelimu, ro nevi."``). Words are pronounceable, lowercase consonant-vowel syllables, shorter for
frequent ids, and depend only on ``vocab_size``. ``make_tokenizer`` builds the matching word-level
``PreTrainedTokenizerFast`` whose ids 0..vocab_size-1 *are* the oracle ids, followed by the special tokens
``</s>`` (eos and bos, needed by ``generate``), ``<pad>`` and ``<unk>``, which the oracle never emits. It adds no
special tokens when encoding, and ``decode`` reproduces the rendered text exactly.

Exact metrics
-------------
``exact_metrics`` scores windows of the held-out stream: each evaluation document is fed as ``["."] + document``
(the period is the sentence-start cue the student sees inside its packed training blocks), and at every position
the oracle's exact next-token distribution given that window (filtered from the stationary state distribution,
which is what a student trained on blocks starting anywhere in the stream can at best learn) is compared with the
student's softmax restricted to the ``vocab_size`` oracle tokens: mass the student puts on ``</s>``, ``<pad>``,
``<unk>`` (or any other extra id) is renormalised away.
"""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence, Union

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

PERIOD, COMMA = ".", ","
EOS, PAD, UNK = "</s>", "<pad>", "<unk>"  # the student tokenizer's special tokens, after the oracle's tokens
PERIOD_ID, COMMA_ID = 0, 1
NUM_PUNCTUATION = 2  # ids below this are "." and ","

SPLIT_STREAMS = {"train": 1, "validation": 2, "test": 3, "eval": 4}
"""Random stream (see ``OracleLanguage.sample``) of each corpus split and of the ``exact_metrics`` contexts."""

_CONSONANTS = "ptkbdgmnlrsvfz"
_VOWELS = "aeiou"


def pseudo_words(count: int) -> list[str]:
    """``count`` distinct pronounceable words (consonant-vowel syllables), shortest first, fixed order."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    rng = np.random.default_rng(20231007)
    words: list[str] = []
    level = [""]
    while len(words) < count:
        level = [w + s for w in level for s in syllables]
        words.extend(level[i] for i in rng.permutation(len(level)))
    return words[:count]


class OracleLanguage:
    """A fixed-seed hidden Markov "language" with exact next-token probabilities (see the module docstring).

    Attributes (float64 numpy arrays; H states, V tokens): ``tokens`` (id -> string), ``start`` (state distribution
    at a sentence start, ``(H,)``), ``stationary`` (long-run state distribution of the stream, ``(H,)``),
    ``transition`` (``(H, H)``) and ``emission`` (``(H, V)``), rows summing to 1; ``word_classes`` (bool,
    ``(H - 2, V)``): which words each word class can emit (the same for every domain of a seed).
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        vocab_size: int = 512,
        num_states: int = 32,
        zipf_exponent: float = 1.1,
        classes_per_word: int = 2,
        noise_scale: float = 1.0,
        temperature: float = 0.8,
        concentration: float = 0.1,
        sentence_length: float = 10.0,
        comma_rate: float = 0.05,
        smoothing: float = 1e-3,
        sentences_per_document: float = 6.0,
        max_document_length: int = 2048,
        domain: int = 0,
        emission_shift: float = 0.0,
        transition_shift: float = 0.0,
    ):
        if vocab_size <= NUM_PUNCTUATION or num_states < NUM_PUNCTUATION + classes_per_word:
            raise ValueError("need vocab_size > 2 and num_states >= 2 + classes_per_word")
        if domain < 0 or emission_shift < 0 or not 0 <= transition_shift <= 1:
            raise ValueError(f"need domain >= 0, emission_shift >= 0 and 0 <= transition_shift <= 1; got {domain}, "
                             f"{emission_shift}, {transition_shift}")
        if domain == 0 and (emission_shift or transition_shift):
            raise ValueError("emission_shift and transition_shift define a related language: give it a domain >= 1 "
                             "(domain 0 is the unshifted language)")
        self.config = dict(
            seed=seed, vocab_size=vocab_size, num_states=num_states, zipf_exponent=zipf_exponent,
            classes_per_word=classes_per_word, noise_scale=noise_scale, temperature=temperature,
            concentration=concentration, sentence_length=sentence_length, comma_rate=comma_rate,
            smoothing=smoothing, sentences_per_document=sentences_per_document,
            max_document_length=max_document_length, domain=domain, emission_shift=emission_shift,
            transition_shift=transition_shift,
        )
        self.seed = seed
        self._domain_key = (domain,) if domain else ()  # a related language samples its own text streams
        self.vocab_size = vocab_size
        self.sentences_per_document = sentences_per_document
        self.max_document_length = max_document_length
        self.tokens = [PERIOD, COMMA] + pseudo_words(vocab_size - NUM_PUNCTUATION)
        self._index = {t: i for i, t in enumerate(self.tokens)}

        rng = np.random.default_rng([seed, 0])
        classes = num_states - NUM_PUNCTUATION
        self.period_state, comma = classes, classes + 1
        words = vocab_size - NUM_PUNCTUATION

        self.word_classes = np.zeros((classes, vocab_size), dtype=bool)
        for w in range(NUM_PUNCTUATION, vocab_size):
            self.word_classes[rng.choice(classes, size=classes_per_word, replace=False), w] = True
        noise = noise_scale * rng.standard_normal((classes, words))
        start = _dirichlet(rng, concentration, classes)
        successors = _dirichlet(rng, concentration, classes, rows=classes)
        after_comma = _dirichlet(rng, concentration, classes)
        if domain:
            shift = np.random.default_rng([seed, 1, domain])
            noise = noise + emission_shift * shift.standard_normal((classes, words))
            start, successors, after_comma = (
                (1.0 - transition_shift) * row + transition_shift * _dirichlet(shift, concentration, classes, rows)
                for row, rows in ((start, None), (successors, classes), (after_comma, None)))

        log_prior = -zipf_exponent * np.log(np.arange(words) + 2.7)
        logits = np.where(self.word_classes[:, NUM_PUNCTUATION:], (log_prior + noise) / temperature, -np.inf)
        emission = np.zeros((num_states, vocab_size))
        emission[:classes, NUM_PUNCTUATION:] = (1.0 - smoothing) * _softmax(logits)
        emission[:classes] += smoothing / vocab_size
        emission[self.period_state, PERIOD_ID] = emission[comma, COMMA_ID] = 1.0
        self.emission = emission

        self.start = np.zeros(num_states)
        self.start[:classes] = start
        transition = np.zeros((num_states, num_states))
        transition[:classes, :classes] = (1.0 - 1.0 / sentence_length - comma_rate) * successors
        transition[:classes, self.period_state] = 1.0 / sentence_length
        transition[:classes, comma] = comma_rate
        transition[comma, :classes] = after_comma
        transition[self.period_state] = self.start
        self.transition = transition
        self.stationary = _stationary(transition)

    # ----------------------------------------------------------------------------------------------- sampling
    def sample(self, num_documents: int, *, stream: int = SPLIT_STREAMS["eval"]) -> list[np.ndarray]:
        """Sample ``num_documents`` documents as int64 oracle-id arrays (whole sentences, ending with ``"."``).

        Deterministic in ``(self.seed, stream)``; ``SPLIT_STREAMS`` names the streams the suite uses. A document
        ends after each ``"."`` state with probability ``1 / sentences_per_document``; one still open after
        ``max_document_length`` tokens is cut there (practically never).
        """
        rng = np.random.default_rng([self.seed, stream, *self._domain_key])
        cum_transition, cum_emission = np.cumsum(self.transition, 1), np.cumsum(self.emission, 1)
        state = _draw(np.broadcast_to(np.cumsum(self.start), (num_documents, len(self.start))), rng)
        active = np.arange(num_documents)
        owners, tokens = [], []  # per step: which documents got which token
        for t in range(self.max_document_length):
            if t:
                state = _draw(cum_transition[state], rng)
            owners.append(active)
            tokens.append(_draw(cum_emission[state], rng))
            ends = (state == self.period_state) & (rng.random(len(active)) < 1.0 / self.sentences_per_document)
            active, state = active[~ends], state[~ends]
            if not len(active):
                break
        owners, tokens = np.concatenate(owners), np.concatenate(tokens)
        order = np.argsort(owners, kind="stable")  # group by document, keeping time order
        lengths = np.bincount(owners, minlength=num_documents)
        return np.split(tokens[order], np.cumsum(lengths)[:-1])

    # ------------------------------------------------------------------------------------ exact probabilities
    def next_token_probs(self, ids: torch.Tensor, *, sentence_start: bool = False) -> torch.Tensor:
        """Exact next-token distributions: ``out[b, t] = P(x_{t+1} | ids[b, :t+1])``, shape ``(B, T, V)``, float64.

        ``ids`` is a ``(B, T)`` tensor of oracle ids; ids outside the vocabulary (padding, the student's special
        tokens) leave the state unchanged. By default each row is a window starting anywhere in the stream (state
        distribution ``stationary`` before ``ids[:, 0]``); with ``sentence_start``, ``ids[:, 0]`` begins a sentence.
        One vectorised filtering step per position.
        """
        before = np.eye(len(self.start))[self.period_state] if sentence_start else self.stationary
        return self._filter(ids, torch.as_tensor(before), torch.as_tensor(self.transition),
                            torch.as_tensor(self.emission))

    @staticmethod
    def _filter(ids, before, transition, emission):
        with _single_thread():  # many tiny ops: thread synchronisation would dominate (100x on a busy CPU)
            return OracleLanguage._filter_steps(ids, before, transition, emission)

    @staticmethod
    def _filter_steps(ids, before, transition, emission):
        """``before``: the state distribution of ``ids[:, 0]``'s predecessor."""
        ids = torch.as_tensor(ids, device=emission.device)
        batch, length = ids.shape
        vocab = emission.shape[1]
        predictive = (before @ transition).expand(batch, -1)  # P(state of the next token | tokens so far)
        states = []
        for t in range(length):
            token = ids[:, t]
            known = (token >= 0) & (token < vocab)
            posterior = predictive * emission[:, token.clamp(0, vocab - 1)].T
            posterior = posterior / posterior.sum(-1, keepdim=True)
            predictive = torch.where(known[:, None], posterior @ transition, predictive)
            states.append(predictive)
        return torch.stack(states, 1) @ emission

    # -------------------------------------------------------------------------------------------------- text
    def render(self, document: Sequence[int]) -> str:
        """One line of text for a document: words separated by spaces, ``.`` and ``,`` attached to the word before."""
        text = " ".join(self.tokens[i] for i in document)
        return text.replace(" .", ".").replace(" ,", ",")

    def parse(self, text: str) -> np.ndarray:
        """Oracle ids of a rendered line; the inverse of ``render``."""
        pieces = text.replace(".", " . ").replace(",", " , ").split()
        return np.array([self._index[p] for p in pieces], dtype=np.int64)


class OracleLM(torch.nn.Module):
    """The oracle as a causal LM: ``model(input_ids).logits`` are its exact next-token log-probabilities.

    Input ids are ``make_tokenizer`` ids (oracle ids; the special tokens leave the state unchanged), each row a
    window of the stream (as in ``OracleLanguage.next_token_probs``). Logits for ids
    ``vocab_size..total_vocab_size-1`` (the tokenizer's special tokens; default 3 of them) are ``extra_logit``
    [-inf]. Useful as the perfect student (``exact_metrics`` gives KL = TVD = 0) and for tests.
    """

    def __init__(self, oracle: OracleLanguage, *, total_vocab_size: Optional[int] = None,
                 extra_logit: float = -math.inf):
        super().__init__()
        self.vocab_size = oracle.vocab_size
        self.total_vocab_size = total_vocab_size or oracle.vocab_size + 3
        self.extra_logit = extra_logit
        self.register_buffer("stationary", torch.as_tensor(oracle.stationary))
        self.register_buffer("transition", torch.as_tensor(oracle.transition))
        self.register_buffer("emission", torch.as_tensor(oracle.emission))

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **_):
        probs = OracleLanguage._filter(input_ids, self.stationary, self.transition, self.emission)
        extra = probs.new_full((*probs.shape[:2], self.total_vocab_size - self.vocab_size), self.extra_logit)
        return SimpleNamespace(logits=torch.cat([probs.log(), extra], -1))


# ------------------------------------------------------------------------------------------------ tokenizer
def make_tokenizer(oracle: OracleLanguage) -> PreTrainedTokenizerFast:
    """Word-level tokenizer: ids ``0..V-1`` are the oracle ids, then ``</s>`` (V; eos and bos), ``<pad>``, ``<unk>``.

    Encoding adds no special tokens; ``decode`` returns the rendered text.
    Save/reload with ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    vocab = {t: i for i, t in enumerate(oracle.tokens + [EOS, PAD, UNK])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(cleanup=True)  # joins with spaces, attaches "." and ","
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=EOS, bos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )


def oracle_token_ids(tokenizer, oracle: OracleLanguage) -> torch.Tensor:
    """Student id of every oracle token, ``(V,)`` int64, in oracle-id order (the identity for ``make_tokenizer``)."""
    ids = tokenizer.convert_tokens_to_ids(oracle.tokens)
    if tokenizer.unk_token_id in ids or None in ids:
        raise ValueError("the tokenizer does not have one id per oracle token")
    return torch.tensor(ids, dtype=torch.long)


# -------------------------------------------------------------------------------------------------- corpora
def write_corpus(
    oracle: OracleLanguage,
    out_dir: Union[str, Path],
    *,
    train_documents: int = 2000,
    validation_documents: int = 200,
    test_documents: int = 200,
) -> dict[str, Path]:
    """Write ``train.txt``, ``validation.txt``, ``test.txt`` (one rendered document per line) and ``oracle.json``.

    Each split is sampled from its own stream (``SPLIT_STREAMS``), so it depends only on the oracle's seed and
    its own size. ``oracle.json`` holds the oracle's config. Returns the paths by split name.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, count in (("train", train_documents), ("validation", validation_documents), ("test", test_documents)):
        lines = [oracle.render(d) + "\n" for d in oracle.sample(count, stream=SPLIT_STREAMS[split])]
        paths[split] = out_dir / f"{split}.txt"
        paths[split].write_text("".join(lines))
    (out_dir / "oracle.json").write_text(json.dumps(oracle.config, indent=2) + "\n")
    return paths


# --------------------------------------------------------------------------------------------- exact metrics
@torch.no_grad()
def exact_metrics(
    model: torch.nn.Module,
    tokenizer,
    oracle: OracleLanguage,
    *,
    num_documents: int = 200,
    max_length: int = 128,
    batch_size: int = 32,
    documents: Optional[Sequence[np.ndarray]] = None,
) -> dict[str, float]:
    """Mean per-token distances between ``oracle`` and a student causal LM on held-out windows of the stream.

    The windows are ``num_documents`` [200] documents from the ``"eval"`` stream (or the given ``documents``,
    oracle-id arrays), each fed as ``["."] + document`` truncated to ``max_length`` [128] tokens, ``batch_size``
    [32] at a time; every position after the leading ``"."`` is scored against the oracle's exact distribution
    ``p`` given the window and the student's ``q`` (softmax over the oracle tokens only). Returns, averaged over all
    scored tokens (natural log): ``forward_kl`` KL(p||q), ``reverse_kl`` KL(q||p), ``tvd`` total variation,
    ``oracle_entropy`` H(p), ``student_entropy`` H(q), ``cross_entropy`` / ``perplexity`` of the student on the
    sampled tokens, ``oracle_cross_entropy`` the same for the oracle (a Monte-Carlo estimate of ``oracle_entropy``),
    and ``num_tokens``.
    """
    if documents is None:
        documents = oracle.sample(num_documents, stream=SPLIT_STREAMS["eval"])
    was_training = model.training
    model.eval()
    device = _device(model)
    student_ids = oracle_token_ids(tokenizer, oracle).to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    vocab = oracle.vocab_size
    names = ["forward_kl", "reverse_kl", "tvd", "oracle_entropy", "student_entropy", "cross_entropy",
             "oracle_cross_entropy"]
    totals = dict.fromkeys(names, 0.0)
    count = 0
    sequences = [np.concatenate([[PERIOD_ID], d])[: max_length + 1] for d in documents]
    for start in range(0, len(sequences), batch_size):
        ids = _pad(sequences[start : start + batch_size], pad_id=vocab)
        inputs, targets = ids[:, :-1], ids[:, 1:].to(device)
        mask = targets < vocab
        log_p = oracle.next_token_probs(inputs).to(device).log()
        inputs = inputs.to(device)
        student_inputs = torch.where(inputs < vocab, student_ids[inputs.clamp(max=vocab - 1)], pad_id)
        logits = model(input_ids=student_inputs, attention_mask=(inputs < vocab).long()).logits
        log_q = torch.log_softmax(logits.double()[..., student_ids], -1)
        p, q = log_p.exp(), log_q.exp()
        target = targets.clamp(max=vocab - 1)[..., None]
        per_token = {
            "forward_kl": (p * (log_p - log_q)).sum(-1),
            "reverse_kl": (q * (log_q - log_p)).sum(-1),
            "tvd": 0.5 * (p - q).abs().sum(-1),
            "oracle_entropy": -(p * log_p).sum(-1),
            "student_entropy": -(q * log_q).sum(-1),
            "cross_entropy": -log_q.gather(-1, target)[..., 0],
            "oracle_cross_entropy": -log_p.gather(-1, target)[..., 0],
        }
        for name in names:
            totals[name] += float(per_token[name][mask].sum())
        count += int(mask.sum())
    model.train(was_training)
    metrics = {name: totals[name] / count for name in names}
    metrics["perplexity"] = math.exp(metrics["cross_entropy"])
    metrics["num_tokens"] = float(count)
    return metrics


@torch.no_grad()
def class_cosine(embedding: torch.Tensor, oracle: OracleLanguage) -> dict[str, float]:
    """Mean cosine similarity of word embeddings within and across the oracle's word classes.

    ``embedding`` has one row per oracle token, in oracle-id order (e.g. ``lm_head.weight[oracle_token_ids(...)]``).
    Over all pairs of distinct words (punctuation excluded): ``same_class`` averages the pairs that share a word
    class, ``cross_class`` those that share none; ``difference`` is the first minus the second. A head that encodes
    the language puts same-class words closer (EMO's transport cost relies on this); a random one does not.
    """
    if embedding.shape[0] != oracle.vocab_size:
        raise ValueError(f"class_cosine needs one embedding row per oracle token ({oracle.vocab_size}), got "
                         f"{embedding.shape[0]}: select them with oracle_token_ids")
    words = torch.as_tensor(oracle.word_classes[:, NUM_PUNCTUATION:], dtype=torch.float64)
    unit = torch.nn.functional.normalize(embedding[NUM_PUNCTUATION:].detach().double(), dim=-1)
    cosine = unit @ unit.T
    shared = (words.T @ words).to(cosine.device) > 0
    pairs = torch.ones_like(shared).triu(diagonal=1)
    same, cross = cosine[pairs & shared].mean().item(), cosine[pairs & ~shared].mean().item()
    return {"same_class": same, "cross_class": cross, "difference": same - cross}


def oracle_metrics(model: torch.nn.Module, tokenizer, data_cfg) -> dict[str, float]:
    """``exact_metrics`` for the oracle and settings of a ``conf/data/oracle.yaml`` node (``oracle``,
    ``exact_metrics``)."""
    oracle = OracleLanguage(**dict(data_cfg["oracle"]))
    return exact_metrics(model, tokenizer, oracle, **dict(data_cfg["exact_metrics"]))


# ---------------------------------------------------------------------------------------------- helpers
def _softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def _dirichlet(rng: np.random.Generator, concentration: float, size: int, rows: Optional[int] = None) -> np.ndarray:
    """Symmetric Dirichlet draws, floored at 1e-12 and renormalised (no underflowing or subnormal probabilities)."""
    draws = np.maximum(rng.dirichlet(np.full(size, concentration), size=rows), 1e-12)
    return draws / draws.sum(-1, keepdims=True)


def _stationary(transition: np.ndarray) -> np.ndarray:
    """The stationary distribution ``pi = pi @ transition`` of an irreducible chain."""
    size = len(transition)
    system = np.vstack([transition.T - np.eye(size), np.ones(size)])
    pi = np.linalg.lstsq(system, np.eye(size + 1)[-1], rcond=None)[0]
    return np.clip(pi, 0.0, None) / np.clip(pi, 0.0, None).sum()


def _draw(cumulative: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One categorical draw per row of ``cumulative`` (row-wise cumulative probabilities)."""
    u = rng.random(len(cumulative)) * cumulative[:, -1]
    return np.minimum((cumulative < u[:, None]).sum(-1), cumulative.shape[1] - 1)


@contextlib.contextmanager
def _single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _pad(sequences: Sequence[np.ndarray], *, pad_id: int) -> torch.Tensor:
    out = torch.full((len(sequences), max(len(s) for s in sequences)), pad_id, dtype=torch.long)
    for i, s in enumerate(sequences):
        out[i, : len(s)] = torch.as_tensor(s)
    return out


def _device(model: torch.nn.Module) -> torch.device:
    tensor = next(model.parameters(), None)
    if tensor is None:
        tensor = next(model.buffers(), None)
    return tensor.device if tensor is not None else torch.device("cpu")
