"""The synthetic oracle language: exact probabilities, sampler, tokenizer, corpora and exact metrics."""
import json

import numpy as np
import pytest
import torch
from scipy import stats
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from experiments.pipeline.oracle import (PERIOD_ID, OracleLanguage, OracleLM, class_cosine, exact_metrics,
                                         make_tokenizer, oracle_metrics, write_corpus)

TINY = dict(vocab_size=16, num_states=6, sentence_length=4.0, sentences_per_document=2.0, smoothing=0.02)


def padded(documents, pad_id):
    """``["."] + document`` rows, right-padded with ``pad_id``."""
    rows = [torch.as_tensor(np.concatenate([[PERIOD_ID], d])) for d in documents]
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id)


@pytest.fixture(scope="module")
def oracle():
    return OracleLanguage()


@pytest.fixture(scope="module")
def tokenizer(oracle):
    return make_tokenizer(oracle)


def test_probabilities_sum_to_one(oracle):
    for matrix in (oracle.start[None], oracle.stationary[None], oracle.transition, oracle.emission):
        np.testing.assert_allclose(matrix.sum(-1), 1.0, atol=1e-12)
    probs = oracle.next_token_probs(padded(oracle.sample(20), oracle.vocab_size))
    assert probs.shape[-1] == oracle.vocab_size and (probs > 0).all()
    torch.testing.assert_close(probs.sum(-1), torch.ones(probs.shape[:2], dtype=torch.float64))


def test_entropy_is_moderate(oracle):
    metrics = exact_metrics(OracleLM(oracle), make_tokenizer(oracle), oracle, num_documents=100)
    assert 2.5 < metrics["oracle_entropy"] < 4.5 < np.log(oracle.vocab_size)


def test_first_and_second_tokens_match_exact_distribution():
    tiny = OracleLanguage(**TINY)
    documents = tiny.sample(20000, stream=11)
    first = np.bincount([d[0] for d in documents], minlength=tiny.vocab_size)
    expected = tiny.start @ tiny.emission * len(documents)
    assert stats.chisquare(first, expected).pvalue > 1e-3
    token = int(np.argmax(first))
    second = np.bincount([d[1] for d in documents if d[0] == token and len(d) > 1], minlength=tiny.vocab_size)
    probs = tiny.next_token_probs(torch.tensor([[token]]), sentence_start=True)[0, 0].numpy()
    assert stats.chisquare(second, probs * second.sum()).pvalue > 1e-3


def test_documents_are_whole_sentences():
    tiny = OracleLanguage(**TINY)
    documents = tiny.sample(500, stream=15)
    assert all(d[-1] == PERIOD_ID for d in documents)
    assert np.mean([(d == PERIOD_ID).sum() for d in documents]) == pytest.approx(2.0, rel=0.15)


def test_token_counts_match_summed_exact_probabilities(oracle):
    """Along sampled documents, counts minus summed predicted probabilities is a martingale: small z-scores."""
    ids = padded(oracle.sample(400, stream=12), oracle.vocab_size)[:, :65]  # 25k tokens, 100 MB of probs
    probs = oracle.next_token_probs(ids[:, :-1])
    mask = ids[:, 1:] < oracle.vocab_size
    p = probs[mask]
    counts = torch.bincount(ids[:, 1:][mask], minlength=oracle.vocab_size).double()
    z = (counts - p.sum(0)) / (p * (1 - p)).sum(0).sqrt()
    assert z[:50].abs().max() < 5


def test_perfect_student_scores_zero(oracle, tokenizer):
    for extra_logit in (-float("inf"), 3.0):  # mass on </s>, <pad>, <unk> is renormalised away
        student = OracleLM(oracle, total_vocab_size=len(tokenizer), extra_logit=extra_logit)
        metrics = exact_metrics(student, tokenizer, oracle, num_documents=200, max_length=64, batch_size=64)
        for name in ("forward_kl", "reverse_kl", "tvd"):
            assert abs(metrics[name]) < 1e-9, name
        assert metrics["student_entropy"] == pytest.approx(metrics["oracle_entropy"])
        assert metrics["cross_entropy"] == pytest.approx(metrics["oracle_cross_entropy"])
    assert metrics["oracle_cross_entropy"] == pytest.approx(metrics["oracle_entropy"], abs=0.1)


def test_oracle_metrics_from_the_data_config(oracle, tokenizer, compose_cfg):
    data = compose_cfg("data=oracle", "data.exact_metrics.num_documents=20").data
    student = OracleLM(oracle, total_vocab_size=len(tokenizer))
    metrics = oracle_metrics(student, tokenizer, data)
    assert metrics["tvd"] < 1e-9 and 3.0 < metrics["oracle_entropy"] < 4.2
    assert metrics == exact_metrics(student, tokenizer, oracle, num_documents=20, max_length=128, batch_size=32)


def test_exact_metrics_agree_with_monte_carlo():
    tiny, other = OracleLanguage(**TINY), OracleLanguage(**{**TINY, "temperature": 0.4})  # a sharper student
    tokenizer = make_tokenizer(tiny)
    documents = tiny.sample(30, stream=13)
    metrics = exact_metrics(OracleLM(other), tokenizer, tiny, documents=documents)

    ids = padded(documents, tiny.vocab_size)
    mask = ids[:, 1:] < tiny.vocab_size
    p, q = tiny.next_token_probs(ids[:, :-1])[mask], other.next_token_probs(ids[:, :-1])[mask]
    generator = torch.Generator().manual_seed(0)
    from_p = torch.multinomial(p, 4000, replacement=True, generator=generator)
    from_q = torch.multinomial(q, 4000, replacement=True, generator=generator)
    ratio_p = p.gather(1, from_p) / q.gather(1, from_p)  # p/q at samples from p
    ratio_q = q.gather(1, from_q) / p.gather(1, from_q)
    assert metrics["forward_kl"] == pytest.approx(float(ratio_p.log().mean()), rel=0.03)
    assert metrics["reverse_kl"] == pytest.approx(float(ratio_q.log().mean()), rel=0.03)
    assert metrics["tvd"] == pytest.approx(float((1 - 1 / ratio_p).clamp(min=0).mean()), rel=0.03)
    assert metrics["num_tokens"] == mask.sum()

    many = exact_metrics(OracleLM(other), tokenizer, tiny, num_documents=2000, batch_size=500)
    assert many["cross_entropy"] - many["oracle_cross_entropy"] == pytest.approx(many["forward_kl"], rel=0.1)
    assert many["oracle_cross_entropy"] == pytest.approx(many["oracle_entropy"], rel=0.02)


def test_hf_student_interface(oracle, tokenizer):
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    metrics = exact_metrics(GPT2LMHeadModel(config), tokenizer, oracle, num_documents=8, max_length=63)
    assert metrics["forward_kl"] > 0.1 and metrics["reverse_kl"] > 0 and 0 < metrics["tvd"] < 1
    assert metrics["perplexity"] == pytest.approx(np.exp(metrics["cross_entropy"]))


def test_corpus_is_deterministic(tmp_path):
    sizes = dict(train_documents=50, validation_documents=5, test_documents=5)
    first = write_corpus(OracleLanguage(seed=3), tmp_path / "a", **sizes)
    again = write_corpus(OracleLanguage(seed=3), tmp_path / "b", **{**sizes, "test_documents": 9})
    other = write_corpus(OracleLanguage(seed=4), tmp_path / "c", **sizes)
    text = {split: path.read_text() for split, path in first.items()}
    assert set(text) == {"train", "validation", "test"}
    assert len(text["train"].splitlines()) == 50
    assert again["train"].read_text() == text["train"]  # a split does not depend on the others' sizes
    assert other["train"].read_text() != text["train"]
    assert not set(text["validation"].splitlines()) & set(text["train"].splitlines()[:5])  # independent streams
    config = json.loads((tmp_path / "a" / "oracle.json").read_text())
    rebuilt, original = OracleLanguage(**config).sample(3), OracleLanguage(seed=3).sample(3)
    assert all(np.array_equal(x, y) for x, y in zip(rebuilt, original))


def test_tokenizer_round_trip(oracle, tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == oracle.vocab_size + 3
    assert (reloaded.eos_token_id, reloaded.bos_token_id) == (oracle.vocab_size,) * 2
    assert reloaded.pad_token_id == oracle.vocab_size + 1
    for document in oracle.sample(50, stream=14):
        text = oracle.render(document)
        assert "\n" not in text
        ids = reloaded(text)["input_ids"]
        assert ids == document.tolist() == oracle.parse(text).tolist()
        assert reloaded.decode(ids) == text
        assert reloaded.decode(ids + [reloaded.eos_token_id], skip_special_tokens=True) == text


SHIFTS = [(0.25, 0.1), (0.5, 0.25), (1.0, 0.5)]


def test_related_language_keeps_words_and_classes_and_shifts_probabilities():
    """A pre-training domain: same vocabulary, word classes (emission supports) and punctuation rates; probabilities
    shifted by a seeded draw of its own, farther from the language as the shifts grow; its own text streams."""
    base = OracleLanguage(**TINY)
    related = [OracleLanguage(**TINY, domain=1, emission_shift=e, transition_shift=t) for e, t in SHIFTS]
    floor = TINY["smoothing"] / TINY["vocab_size"]
    for shifted in related:
        assert shifted.tokens == base.tokens
        np.testing.assert_array_equal(shifted.word_classes, base.word_classes)
        np.testing.assert_array_equal(shifted.emission > floor * 1.0001, base.emission > floor * 1.0001)
        for matrix in (shifted.start[None], shifted.stationary[None], shifted.transition, shifted.emission):
            np.testing.assert_allclose(matrix.sum(-1), 1.0, atol=1e-12)
        np.testing.assert_array_equal(shifted.transition[:, -2:], base.transition[:, -2:])  # "." and "," rates
        assert not np.allclose(shifted.emission, base.emission) and not np.allclose(shifted.transition,
                                                                                     base.transition)
    again = OracleLanguage(**TINY, domain=1, emission_shift=0.5, transition_shift=0.25)
    np.testing.assert_array_equal(again.emission, related[1].emission)
    other = OracleLanguage(**TINY, domain=2, emission_shift=0.5, transition_shift=0.25)
    assert not np.allclose(other.emission, related[1].emission)

    tokenizer = make_tokenizer(base)
    distances = [exact_metrics(OracleLM(shifted), tokenizer, base, num_documents=100)["forward_kl"]
                 for shifted in related]
    assert 0.0 < distances[0] < distances[1] < distances[2]

    unshifted = OracleLanguage(**TINY, domain=1)  # same probabilities, its own samples
    np.testing.assert_array_equal(unshifted.emission, base.emission)
    np.testing.assert_array_equal(unshifted.transition, base.transition)
    assert not all(np.array_equal(x, y) for x, y in zip(unshifted.sample(5), base.sample(5)))
    with pytest.raises(ValueError, match="domain >= 1"):
        OracleLanguage(**TINY, emission_shift=0.5)
    with pytest.raises(ValueError, match="transition_shift"):
        OracleLanguage(**TINY, domain=1, transition_shift=1.5)


def test_class_cosine_separates_class_structure_from_noise(oracle):
    """Rows built from the word classes are closer within a class; random rows are not."""
    features = np.concatenate([oracle.word_classes.T, np.zeros((oracle.vocab_size, 8))], 1)
    structured = class_cosine(torch.as_tensor(features, dtype=torch.float32) + 0.1, oracle)
    assert structured["same_class"] > structured["cross_class"] + 0.2
    assert structured["difference"] == pytest.approx(structured["same_class"] - structured["cross_class"])
    random = class_cosine(torch.randn(oracle.vocab_size, 64, generator=torch.Generator().manual_seed(0)), oracle)
    assert abs(random["difference"]) < 0.01 and abs(random["same_class"]) < 0.02
    with pytest.raises(ValueError, match="one embedding row per oracle token"):
        class_cosine(torch.zeros(oracle.vocab_size + 3, 4), oracle)
