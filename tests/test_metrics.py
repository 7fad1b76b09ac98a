"""MAUVE from precomputed features, featurizers, distinct-n and rep-n."""

import time

import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2Model

from experiments.pipeline.hub import OfflineError
from experiments.pipeline.metrics import Featurizer, distinct_n, diversity, mauve_score, mean_std, rep_n

MAUVE_OPTIONS = {"num_buckets": 4, "kmeans_num_redo": 2}


def test_distinct_and_rep():
    assert distinct_n(["a b a b", "a b c"], 1) == pytest.approx(3 / 7)
    assert distinct_n(["a b a b", "a b c"], 2) == pytest.approx(3 / 5)
    assert rep_n(["a b a b", "a b c"], 2) == pytest.approx((1 - 2 / 3 + 0.0) / 2)
    assert distinct_n([""], 2) == 0.0 and rep_n(["a"], 2) == 0.0
    assert set(diversity(["a b"], [1, 2], [2])) == {"distinct_1", "distinct_2", "rep_2"}


def test_mean_std():
    assert mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2 ** 0.5), "values": [1.0, 3.0]}
    assert mean_std([0.5])["std"] == 0.0


def test_mauve_separates_distributions():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(200, 8)).astype(np.float32)
    same = rng.normal(size=(200, 8)).astype(np.float32)
    far = rng.normal(loc=4.0, size=(200, 8)).astype(np.float32)
    close = mauve_score(p, same, kmeans_seeds=[1, 2], mauve_options=MAUVE_OPTIONS)
    apart = mauve_score(p, far, kmeans_seeds=[1], mauve_options=MAUVE_OPTIONS)
    assert close["mauve"] > 0.9 and apart["mauve"] < 0.1 and len(close["per_kmeans_seed"]) == 2


def test_minilm_featurizer():
    feats = Featurizer("minilm", max_text_length=64, batch_size=4)(["a cat", "a dog", "stock markets fell"])
    assert feats.shape == (3, 384) and feats.dtype == np.float32
    assert np.linalg.norm(feats[0] - feats[1]) < np.linalg.norm(feats[0] - feats[2])


def test_local_model_featurizer_uses_last_token_and_ignores_padding(tmp_path, gpt2_tokenizer):
    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=len(gpt2_tokenizer), n_positions=64))
    model.save_pretrained(tmp_path / "tiny-gpt2")
    gpt2_tokenizer.save_pretrained(tmp_path / "tiny-gpt2")
    featurize = Featurizer(str(tmp_path / "tiny-gpt2"), max_text_length=32, batch_size=2)
    texts = ["short", "a somewhat longer text here"]
    batched = featurize(texts)
    single = np.concatenate([featurize([t]) for t in texts])
    assert batched.shape == (2, 16) and np.allclose(batched, single, atol=1e-5)


def test_offline_hub_featurizer_fails_fast():
    start = time.monotonic()
    with pytest.raises(OfflineError, match="metrics.featurizer=minilm"):
        Featurizer("not-cached-org/gpt2-large-xyz", max_text_length=8, batch_size=1)
    assert time.monotonic() - start < 5
