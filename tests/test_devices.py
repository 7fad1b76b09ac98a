"""Device independence: the kernels follow their inputs' device, nothing is created at import time, and (on a CUDA
machine) the golden comparisons and a Trainer step run on the GPU in fp32 and bf16.

The ``meta`` tests run everywhere: a meta tensor has no data, so any buffer the kernels created on a fixed device (for
example a module-level CPU constant) meets a meta tensor in the same op and fails with a cross-device error.
"""
from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest
import torch

import emo
from emo import CostEmbedding, EMOLoss, linear_lm_loss, lm_loss
from emo.fused import _FusedLinearObjective
from emo.losses import _ObjectiveOnLogits
from emo.registry import get_objective
from helpers import load_reference_emoloss, tiny_gpt2, tiny_llama, train_once

REPO_ROOT = Path(__file__).resolve().parents[1]
LIBRARY_PACKAGES = {"emo": REPO_ROOT / "emo", "emo.baselines": REPO_ROOT / "baselines"}
"""The library's packages (what the wheel installs) and their source folders."""
HALF_DTYPES = [torch.bfloat16, torch.float16]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _meta_cost(spec, vocab):
    if not spec.needs_cost_embedding:
        return None
    return CostEmbedding(torch.empty(vocab, 8, device="meta"), validate=False).normalized


@pytest.mark.parametrize("with_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_materialized_kernel_runs_on_meta(objective, dtype, with_grad):
    spec, positions, vocab = get_objective(objective), 14, 50
    logits = torch.empty(positions, vocab, dtype=dtype, device="meta", requires_grad=with_grad)
    targets = torch.empty(positions, dtype=torch.long, device="meta")
    valid = torch.empty(positions, dtype=torch.bool, device="meta")
    values = _ObjectiveOnLogits.apply(
        logits, targets, valid, spec, spec.resolve_hparams({}), _meta_cost(spec, vocab), 4, with_grad
    )
    assert values.device.type == "meta" and values.shape == (positions,)
    if with_grad:
        (values.sum() * 65536.0).backward()
        assert logits.grad.device.type == "meta" and logits.grad.dtype == dtype and logits.grad.shape == logits.shape


@pytest.mark.parametrize("mode", ["total", "tokens"])
@pytest.mark.parametrize("with_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("dtype", [torch.float32, *HALF_DTYPES], ids=str)
@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_fused_kernel_runs_on_meta(objective, dtype, with_grad, mode):
    spec, tokens, width, vocab = get_objective(objective), 11, 16, 50
    leaves = [
        torch.empty(tokens, width, dtype=dtype, device="meta", requires_grad=with_grad),
        torch.empty(vocab, width, dtype=dtype, device="meta", requires_grad=with_grad),
        torch.empty(vocab, dtype=dtype, device="meta", requires_grad=with_grad),
    ]
    targets = torch.empty(tokens, dtype=torch.long, device="meta")
    values = _FusedLinearObjective.apply(
        *leaves, targets, None, spec, spec.resolve_hparams({}), _meta_cost(spec, vocab), 4, mode
    )
    assert values.device.type == "meta"
    if with_grad:
        values.sum().backward()
        for leaf in leaves:
            assert leaf.grad.device.type == "meta" and leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape


def _library_files():
    for folder in LIBRARY_PACKAGES.values():
        yield from sorted(folder.rglob("*.py"))


def _import_time_calls(tree: ast.Module):
    """Calls evaluated at import: module and class bodies, default values, not function bodies or decorators."""
    pending = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            pending.extend(node.args.defaults + [d for d in node.args.kw_defaults if d is not None])
            continue
        if isinstance(node, ast.Lambda):
            continue
        if isinstance(node, ast.ClassDef):
            pending.extend(node.bases + node.keywords + node.body)
            continue
        if isinstance(node, ast.Call):
            yield node
        pending.extend(ast.iter_child_nodes(node))


def _torch_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.asname or a.name.split(".")[0] for a in node.names if a.name.split(".")[0] == "torch")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "torch":
            names.update(a.asname or a.name for a in node.names)
    return names


def _root_name(node: ast.AST):
    while isinstance(node, (ast.Attribute, ast.Call, ast.Subscript)):
        node = node.func if isinstance(node, ast.Call) else node.value
    return node.id if isinstance(node, ast.Name) else None


@pytest.mark.parametrize("path", list(_library_files()), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_library_calls_no_torch_at_import_and_names_no_device(path):
    """No torch call (which could create a tensor on a fixed device) runs at import; no literal device anywhere."""
    tree = ast.parse(path.read_text(), filename=str(path))
    torch_names = _torch_names(tree)
    at_import = [
        f"line {call.lineno}: {ast.unparse(call)}"
        for call in _import_time_calls(tree)
        if _root_name(call) in torch_names
    ]
    assert not at_import, f"{path.name} calls torch at import time: {at_import}"
    literal_devices = [
        f"line {node.lineno}: {ast.unparse(node)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.keyword) and node.arg == "device" and isinstance(node.value, ast.Constant)
    ]
    assert not literal_devices, f"{path.name} names a fixed device: {literal_devices}"


def _ours(value) -> bool:
    module = value.__module__ if isinstance(value, type) else type(value).__module__
    return (module or "").split(".")[0] == "emo"


def _tensors_in(value, seen):
    """Tensors reachable from ``value`` through containers, library classes and library-class instances."""
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors_in(item, seen)
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            yield from _tensors_in(item, seen)
    elif _ours(value) and hasattr(value, "__dict__"):
        yield from _tensors_in(dict(vars(value)), seen)


def test_library_modules_hold_no_tensors_after_import():
    """Every module of the library, once imported, holds no tensor (constants, registries, class attributes)."""
    found = []
    for package_name in LIBRARY_PACKAGES:
        package = importlib.import_module(package_name)
        names = [package_name] + [m.name for m in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}.")]
        for name in names:
            for attribute, value in vars(importlib.import_module(name)).items():
                found += [f"{name}.{attribute}" for _ in _tensors_in(value, set())]
    assert not found, f"tensors created at import time: {found}"


# ---- CUDA: run where a GPU is available (skipped otherwise, with that reason) ----

def _golden_case(seed, vocab=257, width=24, batch=3, seq=17):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(batch, seq, vocab, generator=gen)
    labels = torch.randint(0, vocab, (batch, seq), generator=gen)
    labels[torch.rand(batch, seq, generator=gen) < 0.3] = -100
    return logits, labels, torch.randn(vocab, width, generator=gen)


def _tolerances(dtype):
    return dict(rtol=1e-4, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-4)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", [1, 2])
def test_cuda_emoloss_matches_reference(mode, dtype):
    """Our EMOLoss on CUDA logits of ``dtype`` vs the published EMOLoss on the same values in fp32 on the CPU."""
    reference = load_reference_emoloss()
    logits, labels, cost = _golden_case(mode)
    logits = logits.to(dtype).float()  # the values the GPU sees, exactly
    ref_logits = logits.clone().requires_grad_()
    expected = reference(ref_logits, labels, cost, mode=mode)
    expected.backward()
    gpu_logits = logits.to("cuda", dtype).requires_grad_()
    ours = EMOLoss(gpu_logits, labels.cuda(), CostEmbedding(cost).to("cuda"), mode=mode)
    ours.backward()
    assert ours.device.type == "cuda" and gpu_logits.grad.dtype == dtype
    torch.testing.assert_close(ours.cpu(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu_logits.grad.float().cpu(), ref_logits.grad, **_tolerances(dtype))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("objective", emo.OBJECTIVES)
def test_cuda_materialized_and_fused_match_cpu(objective, dtype):
    """Both implementations on CUDA vs the materialised loss in fp32 on the CPU, values and gradients."""
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 17, 32, generator=gen).to(dtype).float()
    weight = (torch.randn(257, 32, generator=gen) / 32**0.5).to(dtype).float()
    _, labels, cost = _golden_case(6)
    cpu_hidden, cpu_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    logits = (cpu_hidden @ cpu_weight.T).to(dtype).float()  # as a dtype LM head would produce them
    expected = lm_loss(logits, labels, objective=objective, cost_embedding=cost)
    expected.backward()
    gpu_cost, gpu_labels = CostEmbedding(cost).to("cuda"), labels.cuda()
    gpu_hidden, gpu_weight = hidden.to("cuda", dtype).requires_grad_(), weight.to("cuda", dtype).requires_grad_()
    materialized = lm_loss(gpu_hidden @ gpu_weight.T, gpu_labels, objective=objective, cost_embedding=gpu_cost)
    materialized.backward()
    grads = (gpu_hidden.grad, gpu_weight.grad)
    gpu_hidden.grad = gpu_weight.grad = None
    fused = linear_lm_loss(gpu_hidden, gpu_weight, gpu_labels, objective=objective, cost_embedding=gpu_cost)
    fused.backward()
    for ours, our_grads in ((materialized, grads), (fused, (gpu_hidden.grad, gpu_weight.grad))):
        torch.testing.assert_close(ours.cpu(), expected.detach(), **_tolerances(dtype))
        for grad, reference in zip(our_grads, (cpu_hidden.grad, cpu_weight.grad)):
            assert grad.dtype == dtype
            torch.testing.assert_close(grad.float().cpu(), reference, **_tolerances(dtype))


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("impl", ["materialized", "fused"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("build_model", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_cuda_trainer_step_matches_cpu(build_model, precision, impl, tmp_path):
    """ObjectiveTrainer on CUDA (fp32, and bf16 mixed precision) trains like the fp32 CPU run."""
    _, cpu_losses = train_once(build_model, "emo", batch_size=2, accumulation=2, tmp_path=tmp_path / "cpu", steps=2)
    model, gpu_losses = train_once(
        build_model, "emo", batch_size=2, accumulation=2, tmp_path=tmp_path / "gpu", steps=2, impl=impl,
        use_cpu=False, bf16=precision == "bf16",
    )
    assert next(model.parameters()).device.type == "cuda"
    assert all(torch.isfinite(torch.tensor(gpu_losses)))
    assert gpu_losses == pytest.approx(cpu_losses, rel=1e-3 if precision == "fp32" else 3e-2)

