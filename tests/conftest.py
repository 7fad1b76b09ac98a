"""Shared test setup: offline Hub, no W&B uploads, a throw-away datasets cache, and the repository's data fixtures."""

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
try:
    import emo  # noqa: F401
except ModuleNotFoundError as error:  # `baselines/` is `emo.baselines` only through an install (pyproject package-dir)
    if error.name != "emo.baselines":
        raise
    pytest.exit(f"{error}: install this checkout first: `make install`, or `{sys.executable} -m pip install --no-deps "
                f"-e {REPO_ROOT}`", returncode=4)
_DATASETS_CACHE = tempfile.mkdtemp(prefix="emo-test-datasets-")
os.environ["HF_DATASETS_CACHE"] = _DATASETS_CACHE
DATA_DIR = REPO_ROOT / "data"
os.environ["EMO_DATA_DIR"] = str(DATA_DIR)
if not torch.cuda.is_available():  # Triton kernels (emo.triton_chunk) run on CPU tensors in Triton's interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_DATASETS_CACHE, ignore_errors=True)


def require_data(relative: str) -> Path:
    """`data/<relative>` of the repository; a missing fixture fails the test (it is part of the repository)."""
    path = DATA_DIR / relative
    if not path.exists():
        pytest.fail(f"repository data fixture missing: {path} (restore it from git)")
    return path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The repository's small offline data folder (`data/`)."""
    return require_data("")


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    """The heads of WikiText-2 raw valid and test (`data/wikitext2`)."""
    return require_data("wikitext2")


@pytest.fixture(scope="session")
def gpt2_tokenizer():
    """The real GPT-2 tokenizer from `data/gpt2_tokenizer`, prepared for sampling (pad = eos, left padding)."""
    from experiments.pipeline.models import load_tokenizer

    path = require_data("gpt2_tokenizer")
    return load_tokenizer(str(path), {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"})


@pytest.fixture
def compose_cfg():
    """`compose_cfg(*overrides)` -> the composed run.py config (Hydra compose API, no run), with run.py's resolvers."""
    from hydra import compose, initialize_config_dir

    import experiments.pipeline.distributed  # noqa: F401  registers ${launch_name:}, as run.py does

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


@pytest.fixture(scope="session")
def loopback_hub():
    """A loopback Hugging Face Hub (tests/loopback_hub.py) with replicas of every resource the configs name."""
    from loopback_hub import paper_hub

    hub = paper_hub(REPO_ROOT / "conf", require_data(""))
    yield hub
    hub.stop()


@pytest.fixture
def hub_online(loopback_hub, monkeypatch, tmp_path):
    """This test's Hub clients online and talking to `loopback_hub` (a fresh Hub cache, no token); the run record
    of remote resources starts empty."""
    from experiments.pipeline import hub
    from loopback_hub import go_online

    go_online(monkeypatch, loopback_hub, tmp_path / "hf")
    hub.clear_record()
    yield loopback_hub
    hub.clear_record()

