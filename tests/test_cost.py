"""Cost embeddings: frozen copies of a model's head, files of several formats, and validation."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from emo import CostEmbedding, cost_embedding_from_model, load_cost_embedding
from helpers import tiny_gpt2, tiny_llama


@pytest.mark.parametrize("build_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_copy_of_head_is_frozen_and_normalised(build_model):
    model = build_model()
    cost = cost_embedding_from_model(model)
    head = model.get_output_embeddings().weight
    torch.testing.assert_close(cost.normalized, torch.nn.functional.normalize(head.detach(), dim=1))
    with torch.no_grad():
        head.add_(1.0)
    assert not torch.allclose(cost.normalized, torch.nn.functional.normalize(head.detach(), dim=1))
    assert not cost.normalized.requires_grad


def test_load_from_files_and_model_dir(tmp_path):
    weight = torch.randn(64, 12)
    torch.save(weight, tmp_path / "cost.pt")
    save_file({"weight": weight}, str(tmp_path / "cost.safetensors"))
    np.save(tmp_path / "cost.npy", weight.numpy())
    model = tiny_gpt2()
    model.save_pretrained(tmp_path / "model")
    for name in ("cost.pt", "cost.safetensors", "cost.npy"):
        loaded = load_cost_embedding(tmp_path / name, vocab_size=64)
        torch.testing.assert_close(loaded.normalized, CostEmbedding(weight).normalized)
    from_model = load_cost_embedding(tmp_path / "model", vocab_size=64)
    torch.testing.assert_close(from_model.normalized, cost_embedding_from_model(model).normalized)


def test_load_rejects_wrong_vocab_and_ambiguous_files(tmp_path):
    torch.save(torch.randn(10, 4), tmp_path / "small.pt")
    with pytest.raises(ValueError, match="has 10 rows but the model's vocabulary has 64"):
        load_cost_embedding(tmp_path / "small.pt", vocab_size=64)
    save_file({"a": torch.randn(3, 2), "b": torch.randn(3, 2)}, str(tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match="exactly one 2-D tensor"):
        load_cost_embedding(tmp_path / "two.safetensors")


def test_model_without_output_embedding_is_a_value_error():
    with pytest.raises(ValueError, match="Linear has no output embedding"):
        cost_embedding_from_model(torch.nn.Linear(3, 4))
