"""Load the published ``EMOLoss==0.0.3`` reference by file path, so its top-level ``emo`` never shadows ours.

``make install`` downloads the wheel into ``.cache/reference``; this module extracts ``emo/loss.py`` from it.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REFERENCE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "reference"
WHEEL = "EMOLoss-0.0.3-py3-none-any.whl"


def _wheel() -> Path:
    wheel = REFERENCE_DIR / WHEEL
    if not wheel.exists():
        REFERENCE_DIR.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "EMOLoss==0.0.3", "-d", str(REFERENCE_DIR)],
            check=False,
            capture_output=True,
        )
    if not wheel.exists():
        pytest.skip(f"reference wheel {WHEEL} is not in {REFERENCE_DIR} and PyPI is unreachable (run `make install`)")
    return wheel


def load_reference_emoloss():
    """The reference ``EMOLoss`` function from the published wheel."""
    target = REFERENCE_DIR / "EMOLoss-0.0.3" / "emo" / "loss.py"
    if not target.exists():
        with zipfile.ZipFile(_wheel()) as wheel:
            wheel.extract("emo/loss.py", target.parents[1])
    spec = importlib.util.spec_from_file_location("reference_emoloss_0_0_3", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.EMOLoss
