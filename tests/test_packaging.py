"""The distribution as users install it: the wheel built from this tree, pip-installed with its one dependency (torch)
into an empty venv, used from a project that has its own ``baselines/`` and ``experiments/`` packages; its dependency
metadata; and the two install orders next to the ``EMOLoss`` wheel, which installs the same import package ``emo``."""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from helpers import reference_emoloss_wheel

pytestmark = pytest.mark.slow

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_SOURCES = {"emo": REPO_ROOT / "emo", "emo/baselines": REPO_ROOT / "baselines"}
"""Where each folder of the installed ``emo`` package comes from in this repository (pyproject's package-dir)."""
DIST_INFO = "emo_suite-{version}.dist-info"

USER_PROJECT_SCRIPT = r"""
import importlib.metadata, json, sys, warnings
from pathlib import Path

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import emo
import torch
import torch.nn.functional as F

import baselines, experiments  # the project's own packages, next to this script

torch.manual_seed(0)
logits, labels = torch.randn(2, 7, 13, requires_grad=True), torch.randint(0, 13, (2, 7))
labels[0, 4:] = -100
loss = emo.lm_loss(logits, labels, objective="mle")
loss.backward()
reference = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
cost = emo.CostEmbedding(torch.randn(13, 5))
print(json.dumps({
    "version": emo.__version__,
    "distribution_version": importlib.metadata.version("emo-suite"),
    "emo_file": emo.__file__,
    "prefix": sys.prefix,
    "user_packages": [baselines.OWNER, experiments.OWNER],
    "mle_minus_cross_entropy": abs(loss.item() - reference.item()),
    "emo_loss": emo.EMOLoss(logits.detach(), labels, cost).item(),
    "top_level": sorted({str(path).split("/")[0] for path in importlib.metadata.files("emo-suite")}),
    "emo_warnings": [str(w.message) for w in caught if Path(w.filename).parent.name == "emo"],
}))
"""

STATE_SCRIPT = r"""
import contextlib, io, json, runpy, warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import emo
import torch

state = {"has_emo_suite_api": hasattr(emo, "lm_loss"),
         "warnings": [str(w.message) for w in caught if "EMOLoss" in str(w.message)]}
try:
    import emo.losses
    state["submodule_error"] = None
except ImportError as error:
    state["submodule_error"] = str(error)
report = io.StringIO()
with contextlib.redirect_stdout(report):
    try:
        runpy.run_module("emo", run_name="__main__")  # `python -m emo`
    except SystemExit as exit:
        state["report_status"] = exit.code
state["report"] = report.getvalue()
torch.manual_seed(0)
logits, labels, cost = torch.randn(2, 6, 11), torch.randint(0, 11, (2, 6)), torch.randn(11, 4)
state["emo.EMOLoss"] = [emo.EMOLoss.__module__, emo.EMOLoss(logits, labels, cost).item()]
with contextlib.suppress(ImportError):
    import emo.loss
    state["emo.loss.EMOLoss"] = emo.loss.EMOLoss(logits, labels, cost).item()
print(json.dumps(state))
"""


def _clean_env() -> dict:
    """This process's environment without the variables that would let another interpreter see our sys.path."""
    return {key: value for key, value in os.environ.items() if not key.startswith("PYTHON")}


def _run(command, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=_clean_env(), **kwargs)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result


def _wheel_version(wheel: Path) -> str:
    return wheel.name.split("-")[1]


def _source_files() -> list[str]:
    """The ``.py`` files the wheel must install, by their installed paths."""
    return sorted(f"{installed}/{path.relative_to(folder)}"
                  for installed, folder in PACKAGE_SOURCES.items() for path in folder.rglob("*.py"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the files the build reads (no ``build/`` or ``*.egg-info`` in the checkout,
    and no stale ``build/lib`` left over from an earlier build can reach the wheel)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    shutil.copy(REPO_ROOT / "pyproject.toml", source)
    for folder in ("emo", "baselines"):
        shutil.copytree(REPO_ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation", "-w", str(out),
          str(source)])
    (built,) = out.glob("emo_suite-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, wheel) -> Path:
    """An empty venv (no system site-packages, no pip) into which pip installs this torch release, then the wheel;
    returns its python. torch is installed without byte-compiling its modules up front (``--no-compile``: the same
    files; Python compiles the ones imported on first use): a quarter of the CPU time of a default install."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    torch_release = importlib.metadata.version("torch").split("+")[0]  # the Makefile's pin: the local CPU build here
    _pip(python, "install", "--quiet", "--no-compile", f"torch=={torch_release}")
    installed = _pip(python, "install", str(wheel)).stdout
    assert re.search(r"^Successfully installed emo-suite-\S+$", installed, re.M), installed  # and nothing else
    return python


def _pip(python: Path, *args: str) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "pip", "--python", str(python), *args])


@pytest.fixture
def user_project(tmp_path) -> Path:
    """A user's project folder with packages of its own named ``baselines`` (with an ``objectives`` module that must
    never be imported by us) and ``experiments``."""
    for package in ("baselines", "experiments"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"OWNER = 'user {package}'\n")
    (tmp_path / "baselines" / "objectives.py").write_text("raise ImportError('emo imported the user project')\n")
    return tmp_path


def test_wheel_holds_only_the_emo_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = DIST_INFO.format(version=_wheel_version(wheel))
    assert sorted(name for name in names if not name.startswith(dist_info)) == _source_files()
    assert {name.split("/")[1] for name in names if name.startswith(dist_info)} == {
        "METADATA", "WHEEL", "top_level.txt", "RECORD"}
    assert zipfile.ZipFile(wheel).read(f"{dist_info}/top_level.txt").decode().split() == ["emo"]


def test_dependency_metadata(wheel):
    """torch is the only requirement; the ``transformers``, ``trl`` and ``triton`` extras admit what the suite's
    environment runs and exclude the transformers releases whose Trainer lacks ``_get_grad_norm`` (ObjectiveTrainer's
    hook)."""
    metadata = zipfile.ZipFile(wheel).read(f"{DIST_INFO.format(version=_wheel_version(wheel))}/METADATA").decode()
    fields = [line.split(": ", 1) for line in metadata.splitlines() if ": " in line]
    requirements = [Requirement(value) for key, value in fields if key == "Requires-Dist"]
    assert [value for key, value in fields if key == "Provides-Extra"] == ["transformers", "trl", "triton"]
    assert [str(r) for r in requirements if r.marker is None] == ["torch>=2.4"]
    by_extra = {extra: {r.name: r for r in requirements if r.marker and r.marker.evaluate({"extra": extra})}
                for extra in ("transformers", "trl", "triton")}
    assert set(by_extra["transformers"]) == {"transformers", "accelerate"}
    assert set(by_extra["trl"]) == {"emo-suite", "trl"} and by_extra["trl"]["emo-suite"].extras == {"transformers"}
    assert set(by_extra["triton"]) == {"triton"}
    for requirement in [*by_extra["transformers"].values(), by_extra["trl"]["trl"], by_extra["triton"]["triton"]]:
        assert requirement.specifier.contains(importlib.metadata.version(requirement.name)), requirement
    assert not any(by_extra["transformers"]["transformers"].specifier.contains(v) for v in ("5.0.0", "5.1.0", "5.2.0"))
    suite_floor = _requirements_floor("transformers")
    assert by_extra["transformers"]["transformers"].specifier.contains(suite_floor), suite_floor


def _requirements_floor(name: str) -> str:
    """The lowest version requirements.txt (the suite's environment) admits for ``name`` (its ``>=`` bound)."""
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text and Requirement(text).name == name:
            (floor,) = [spec.version for spec in Requirement(text).specifier if spec.operator == ">="]
            return floor
    raise AssertionError(f"requirements.txt does not name {name}")


def test_library_imports_only_its_declared_dependencies():
    """At import, the library's modules use the standard library, torch and ``emo`` only; ``emo.training`` (the
    ``transformers`` extra) adds transformers, ``emo.triton_chunk`` (the ``triton`` extra, imported only for
    ``chunk_kernel="triton"``) triton. Imports inside functions are optional and not counted."""
    allowed = set(sys.stdlib_module_names) | {"torch", "emo"}
    found = {}
    for path in [path for folder in PACKAGE_SOURCES.values() for path in sorted(folder.rglob("*.py"))]:
        tree = ast.parse(path.read_text())
        roots = {alias.name.split(".")[0] for node in tree.body if isinstance(node, ast.Import) for alias in node.names}
        roots |= {node.module.split(".")[0] for node in tree.body
                  if isinstance(node, ast.ImportFrom) and node.module and not node.level}
        if roots - allowed:
            found[str(path.relative_to(REPO_ROOT))] = roots - allowed
    assert found == {"emo/training.py": {"transformers"}, "emo/triton_chunk.py": {"triton"}}


def test_import_emo_from_a_user_project(fresh_venv, wheel, user_project):
    """``import emo`` works in the empty venv from a project with its own ``baselines`` and ``experiments``, which
    stay the project's; the version is the distribution's; only ``emo`` and its dist-info are installed."""
    (user_project / "train.py").write_text(USER_PROJECT_SCRIPT)
    facts = json.loads(_run([str(fresh_venv), "train.py"], cwd=user_project).stdout)
    assert facts["version"] == facts["distribution_version"] == _wheel_version(wheel)
    assert Path(facts["emo_file"]).is_relative_to(facts["prefix"]) and Path(facts["prefix"]) == fresh_venv.parents[1]
    assert facts["user_packages"] == ["user baselines", "user experiments"]
    assert facts["mle_minus_cross_entropy"] < 1e-6 and facts["emo_loss"] > 0
    assert facts["top_level"] == ["emo", DIST_INFO.format(version=facts["version"])]
    assert facts["emo_warnings"] == []


def _state(python: Path, cwd: Path) -> dict:
    return json.loads(_run([str(python), "-c", STATE_SCRIPT], cwd=cwd).stdout)


def test_emoloss_wheel_installed_before_or_after(fresh_venv, wheel, tmp_path):
    """Either install order is detected and explained, the EMOLoss function keeps working, and the documented
    repair (uninstall EMOLoss, reinstall emo-suite) gives a clean environment again."""
    emoloss = str(reference_emoloss_wheel())
    try:
        _pip(fresh_venv, "install", "--quiet", "--no-deps", emoloss)  # after emo-suite: its __init__ replaces ours
        after = _state(fresh_venv, tmp_path)
        assert not after["has_emo_suite_api"] and after["emo.EMOLoss"][0] == "emo.loss"
        for text in (after["submodule_error"], after["report"]):
            assert "`import emo` gives EMOLoss 0.0.3's package" in text and "`pip uninstall -y EMOLoss`" in text
        assert after["report_status"] == 1

        _pip(fresh_venv, "uninstall", "--quiet", "-y", "emo-suite")
        _pip(fresh_venv, "install", "--quiet", "--force-reinstall", "--no-deps", emoloss)
        _pip(fresh_venv, "install", "--quiet", "--no-deps", str(wheel))  # before emo-suite: ours replaces its __init__
        before = _state(fresh_venv, tmp_path)
        assert before["has_emo_suite_api"] and before["submodule_error"] is None and before["report_status"] == 1
        (warning,) = before["warnings"]
        assert warning.startswith("EMOLoss 0.0.3 is installed in this environment too") and warning in before["report"]
        module, ours = before["emo.EMOLoss"]
        assert module == "emo.losses" and ours == pytest.approx(before["emo.loss.EMOLoss"], rel=1e-6)
    finally:  # the repair the messages give
        _pip(fresh_venv, "uninstall", "--quiet", "-y", "EMOLoss")
        _pip(fresh_venv, "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel))
    repaired = _state(fresh_venv, tmp_path)
    assert repaired["has_emo_suite_api"] and repaired["warnings"] == [] and repaired["report_status"] == 0
    assert repaired["report"].splitlines()[-1] == "ok" and "emo.loss.EMOLoss" not in repaired
