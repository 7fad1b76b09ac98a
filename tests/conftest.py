"""Shared test setup: offline Hub, no W&B uploads, a throw-away datasets cache, and fixtures for the shared data."""

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_DATASETS_CACHE = tempfile.mkdtemp(prefix="emo-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
SHARED_DATA = Path(os.environ.get("EMO_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()
os.environ["EMO_SHARED_DATA"] = str(SHARED_DATA)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"shared test data not found at {path} (set EMO_SHARED_DATA to the shared/data folder)")
    return path


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The shared offline data folder (`EMO_SHARED_DATA`, default `<repo>/../shared/data`); skips if absent."""
    return _require(SHARED_DATA)


@pytest.fixture(scope="session")
def wikitext_dir(shared_data) -> Path:
    """WikiText-2 raw (valid and test files only)."""
    return _require(shared_data / "wikitext-2-raw-v1")


@pytest.fixture(scope="session")
def gpt2_tokenizer(shared_data):
    """The real GPT-2 tokenizer from the shared data, prepared for sampling (pad = eos, left padding)."""
    from emo.models import load_tokenizer

    path = _require(shared_data / "gpt2_tokenizer")
    return load_tokenizer(str(path), {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})


@pytest.fixture
def compose_cfg():
    """`compose_cfg(*overrides)` -> the composed run.py config (Hydra compose API, no run)."""
    from hydra import compose, initialize_config_dir

    def compose_(*overrides, return_hydra_config=False):
        with initialize_config_dir(version_base="1.3", config_dir=str(REPO_ROOT / "conf")):
            return compose("config", overrides=list(overrides), return_hydra_config=return_hydra_config)

    return compose_


@pytest.fixture
def one_thread():
    """One torch thread, as `make demo` runs (so numbers match across processes), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
