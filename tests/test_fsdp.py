"""FSDP (Tracks 2 and 3): the trainer configs ask transformers for FSDP2 full_shard auto-wrapped on the model's own
decoder layer, bf16, activation checkpointing as an option; FSDP without GPUs is an error; the objectives under
`torch.distributed.fsdp.fully_shard` (2 gloo processes) give one process's losses and gradients, with the cost
embedding replicated on every rank and never trained; on a GPU, a 1-GPU FSDP run of the tiny Track-2 and Track-3
experiments trains (`pytest -m cuda tests/test_fsdp.py -s` prints its losses)."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import VOCAB, tiny_gpt2, tiny_llama

REPO_ROOT = Path(__file__).resolve().parent.parent
OBJECTIVES = ("mle", "emo", "cft/emo2", "sft/emo")
STEPS = 2


def fsdp_plugin(node, monkeypatch, tmp_path):
    """accelerate's FSDP plugin as the Trainer would build it from trainer config `node` (CUDA faked for our check)."""
    from accelerate.utils import FullyShardedDataParallelPlugin

    from emo.training import ObjectiveTrainingArguments
    from experiments.pipeline.training import fsdp_options

    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        sharding = fsdp_options(OmegaConf.to_container(node, resolve=True))
    args = ObjectiveTrainingArguments(output_dir=str(tmp_path), report_to="none", **sharding)
    return FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)


@pytest.mark.parametrize("trainer", ["sft", "cft_fsdp"])
def test_fsdp_trainers_wrap_the_models_own_decoder_layer_with_fsdp2(compose_cfg, monkeypatch, tmp_path, trainer):
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    node = compose_cfg(f"trainer={trainer}").trainer
    assert node.fsdp is True and node.mixed_precision == "bf16"
    plugin = fsdp_plugin(node, monkeypatch, tmp_path)
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True  # full_shard
    assert not plugin.activation_checkpointing
    for model, layer in ((tiny_llama(), "LlamaDecoderLayer"), (tiny_gpt2(), "GPT2Block")):
        policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
        assert {type(module).__name__ for module in model.modules() if policy(module)} == {layer}

    checkpointed = compose_cfg(f"trainer={trainer}", "trainer.fsdp_config.activation_checkpointing=true").trainer
    assert fsdp_plugin(checkpointed, monkeypatch, tmp_path).activation_checkpointing is True


def test_fsdp_without_gpus_is_a_clear_error(compose_cfg, monkeypatch, tmp_path):
    from experiments.pipeline.training import training_arguments

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for trainer in ("sft", "cft_fsdp"):
        node = compose_cfg(f"trainer={trainer}").trainer  # bf16 too, but FSDP is the first problem named
        with pytest.raises(ValueError, match=r"trainer.fsdp=true needs CUDA GPUs \(accelerate would silently fall back "
                                             r"to DDP on CPU\); set trainer.fsdp=false"):
            training_arguments(node, output_dir=tmp_path, report_to=[], seed=1, run_name="x")
    legacy = compose_cfg("trainer=tiny", "trainer.fsdp=full_shard auto_wrap").trainer
    with pytest.raises(ValueError, match="trainer.fsdp is true or false, got 'full_shard auto_wrap'"):
        training_arguments(legacy, output_dir=tmp_path, report_to=[], seed=1, run_name="x")


def batch():
    """4 sequences with different numbers of valid labels (-100 padding)."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (4, 12), generator=generator)
    labels = input_ids.clone()
    for row, length in ((1, 7), (2, 4), (3, 10)):
        labels[row, length:] = -100
    return input_ids, labels


def train_steps(objective_node: dict, rank: int = 0, world: int = 1) -> dict:
    """`STEPS` SGD steps of a seeded tiny LLaMA with `objective_node`'s loss, as the Trainer runs it: each process takes
    its share of `batch()`, divides its summed token losses by the global token count and scales by the process count
    (FSDP averages gradients), and the divergence guard checks the step as ObjectiveTrainer does. Returns the global
    losses and gradient norms, the first step's full gradients and cost-embedding facts."""
    from torch.distributed.tensor import DTensor

    from emo.training import DivergenceGuard
    from experiments.pipeline.training import objective_loss

    torch.manual_seed(0)
    model = tiny_llama()
    loss = objective_loss(OmegaConf.create(objective_node), model, cost_source=None, device="cpu", fsdp=world > 1)
    cost = loss.cost_embedding.normalized.clone() if loss.cost_embedding is not None else None
    if world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world,))
        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    input_ids, labels = batch()
    num_items = (labels[:, 1:] != -100).sum()
    guard, losses, grad_norms, grads = DivergenceGuard(), [], [], None
    for step in range(STEPS):
        value = loss(model(input_ids=input_ids[rank::world]), labels[rank::world], num_items)
        (value * world).backward()
        total = guard.observe_loss(value.detach()).clone()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), float("inf"))  # a DTensor under FSDP2
        assert guard.check_step(grad_norm, step=step + 1, device=torch.device("cpu"))
        if world > 1:
            torch.distributed.all_reduce(total)
        losses.append(total.item())
        grad_norms.append(grad_norm.full_tensor().item() if isinstance(grad_norm, DTensor) else grad_norm.item())
        if step == 0:
            grads = {name: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).clone()
                     for name, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    result = {"losses": losses, "grad_norms": grad_norms, "grads": grads}
    if cost is not None:
        held = loss.cost_embedding.normalized
        tensors = [t.to_local() if isinstance(t, DTensor) else t for t in (*model.parameters(), *model.buffers())]
        gathered = [torch.empty_like(held) for _ in range(world)]
        if world > 1:
            torch.distributed.all_gather(gathered, held)
        result["cost"] = {"plain_tensor": type(held) is torch.Tensor, "requires_grad": held.requires_grad,
                          "shape": tuple(held.shape), "unchanged": torch.equal(held, cost),
                          "in_model": any(held.data_ptr() == t.data_ptr() for t in tensors),
                          "same_on_every_rank": all(torch.equal(g, held) for g in gathered) if world > 1 else True}
    return result


def sharded_worker(rank: int, world: int, port: int, nodes: dict, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {label: train_steps(node, rank, world) for label, node in nodes.items()}
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_objectives_under_fully_shard_match_one_process(compose_cfg, tmp_path):
    nodes = {name: OmegaConf.to_container(compose_cfg(f"objective={name}").objective, resolve=True)
             for name in OBJECTIVES}
    torch.multiprocessing.spawn(sharded_worker, args=(2, free_port(), nodes, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, node in nodes.items():
        single = train_steps(node)
        for sharded in (ranks[0][name], ranks[1][name]):
            torch.testing.assert_close(sharded["losses"], single["losses"], rtol=1e-5, atol=1e-6, msg=name)
            torch.testing.assert_close(sharded["grad_norms"], single["grad_norms"], rtol=1e-5, atol=1e-6, msg=name)
            assert sharded["grads"].keys() == single["grads"].keys()
            for param, grad in single["grads"].items():
                torch.testing.assert_close(sharded["grads"][param], grad, rtol=1e-4, atol=1e-6, msg=f"{name} {param}")
            if name != "mle":  # the EMO presets hold a frozen cost embedding: a full copy on every rank, untouched
                assert sharded["cost"] == {"plain_tensor": True, "requires_grad": False, "shape": (VOCAB, 16),
                                           "unchanged": True, "in_model": False, "same_on_every_rank": True}
        assert single["losses"][1] < single["losses"][0]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("experiment", [
    ["experiment=sft_tiny"],
    ["experiment=cft_tiny", "adapter=none", "cft.evaluate=false"],  # full fine-tuning, validation perplexity
])
def test_one_gpu_fsdp_run_of_the_tiny_experiments(tmp_path, experiment):
    """torchrun on 1 GPU with the FSDP2 trainer options (bf16): trains, logs finite losses, writes its record."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "EMO_RESULTS_DIR": str(tmp_path / "results"),
           "EMO_LOG_DIR": str(tmp_path / "logs"), "EMO_CACHE_DIR": str(tmp_path / "cache")}
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "run.py",
                               *experiment, "run_id=fsdp", "trainer.fsdp=true", "trainer.mixed_precision=bf16"],
                              cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    log = launched.stdout + launched.stderr
    assert launched.returncode == 0, log[-4000:]
    steps = [line for line in launched.stdout.splitlines() if line.startswith("{'loss'")]
    print(f"\n{' '.join(experiment)}, 1 GPU, FSDP2 bf16:", *steps, sep="\n  ")
    assert "FSDP2 on 1 process(es), mixed precision bf16" in log
    (run_dir,) = (tmp_path / "results" / experiment[0].split("=")[1]).iterdir()
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["train"]["global_step"] >= 3 and metrics["train"]["skipped_nonfinite_steps"] == 0
    assert torch.isfinite(torch.tensor(metrics["train"]["train_loss"])) and len(steps) >= 3
