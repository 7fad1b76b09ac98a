"""The installed ``emo`` package and the one distribution known to clash with it: the ``EMOLoss`` wheel.

``EMOLoss`` (the paper authors' package on PyPI) installs the same import package, ``emo`` (``emo/__init__.py`` and
``emo/loss.py``). pip lets whichever of the two is installed last overwrite the other's ``emo/__init__.py`` without
a word, and uninstalling either deletes a file the other one needs. emo-suite's ``emo.EMOLoss`` is the numerically
identical drop-in, so an environment needs only emo-suite. ``import emo`` warns when EMOLoss is installed too. When
EMOLoss's ``emo/__init__.py`` replaced emo-suite's, nothing of emo-suite runs at ``import emo``: the kernel and
trainer modules (which all import ``emo.cost``) raise instead, and ``python -m emo`` reports the environment.
"""
from __future__ import annotations

import importlib.metadata
import sys
import warnings
from pathlib import Path
from typing import Optional

DISTRIBUTION = "emo-suite"
CLASHING_DISTRIBUTION = "EMOLoss"
REINSTALL = ("reinstall emo-suite as you installed it (e.g. `pip install --force-reinstall --no-deps <emo-suite "
             "wheel or checkout>`)")
KEEP_EMO_SUITE = (f"emo-suite's emo.EMOLoss is the numerically identical drop-in for {CLASHING_DISTRIBUTION}: keep "
                  f"emo-suite only: `pip uninstall -y {CLASHING_DISTRIBUTION}`")


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution``, or None if it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def emo_suite_init_loaded() -> bool:
    """True when the imported ``emo`` package is emo-suite's (its ``__init__`` sets ``__version__`` first)."""
    return getattr(sys.modules.get("emo"), "__version__", None) is not None


def _loaded_init() -> Optional[Path]:
    location = getattr(sys.modules.get("emo"), "__file__", None)
    return None if location is None else Path(location).resolve()


def _installed_init(distribution: str) -> Optional[Path]:
    """Where ``distribution`` installed an ``emo/__init__.py`` (None if it is not installed, or, like an editable
    install, lists no such file)."""
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((Path(file.locate()).resolve() for file in files if file.as_posix() == "emo/__init__.py"), None)


def replaced_init_message() -> str:
    """Why the imported ``emo`` package is not emo-suite's, and how to repair the environment."""
    loaded, emoloss = _loaded_init(), _installed_init(CLASHING_DISTRIBUTION)
    if loaded is None:
        return ("emo-suite's emo/__init__.py is missing (uninstalling EMOLoss, whose files include the same path, "
                "deletes it), so `import emo` gives a namespace package without emo-suite's API. "
                + (f"{KEEP_EMO_SUITE}, then {REINSTALL}." if emoloss is not None else f"To repair, {REINSTALL}."))
    if loaded == emoloss:
        how = ("installed after emo-suite, it replaced emo-suite's; pip does not detect this"
               if _installed_init(DISTRIBUTION) == loaded else "it comes first on sys.path")
        return (f"`import emo` gives {CLASHING_DISTRIBUTION} {installed_version(CLASHING_DISTRIBUTION)}'s package "
                f"({loaded}), without emo-suite's API: {CLASHING_DISTRIBUTION} installs the same import package "
                f"`emo`, and its emo/__init__.py is the one Python finds ({how}). {KEEP_EMO_SUITE}, then {REINSTALL}.")
    return f"`import emo` gives another package ({loaded}), without emo-suite's API. Remove it, then {REINSTALL}."


def coexistence_message() -> Optional[str]:
    """With emo-suite's ``emo`` imported: what having EMOLoss installed too means, or None if it is not installed."""
    emoloss = _installed_init(CLASHING_DISTRIBUTION)
    if emoloss is None:
        return None
    what = f"{CLASHING_DISTRIBUTION} {installed_version(CLASHING_DISTRIBUTION)} is installed in this environment too"
    if _loaded_init() == emoloss:
        return (f"{what} and installs the same import package `emo`: emo-suite's emo/__init__.py, installed after it, "
                f"replaced {CLASHING_DISTRIBUTION}'s, so `emo.EMOLoss` is emo-suite's (its `emo.loss` module is "
                f"still there), and `pip uninstall {CLASHING_DISTRIBUTION}` would delete emo-suite's emo/__init__.py. "
                f"{KEEP_EMO_SUITE}, then {REINSTALL}.")
    return (f"{what}, with its own package `emo` at {emoloss.parent}: this process imports emo-suite's from "
            f"{_loaded_init().parent}, but wherever {emoloss.parent.parent} comes first on sys.path, `import emo` "
            f"gives {CLASHING_DISTRIBUTION}'s. {KEEP_EMO_SUITE}.")


def warn_if_emoloss_installed() -> None:
    """Warn (``UserWarning``) with ``coexistence_message()`` when EMOLoss is installed too."""
    message = coexistence_message()
    if message is not None:
        warnings.warn(message, stacklevel=2)


def require_emo_suite_init() -> None:
    """Raise ``ImportError``, saying what happened and how to repair it, unless the imported ``emo`` is emo-suite's."""
    if not emo_suite_init_loaded():
        raise ImportError(replaced_init_message())
