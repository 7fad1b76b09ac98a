"""``python -m emo``: which ``emo`` package this environment imports, the versions it runs with, and whether the
``EMOLoss`` wheel clashes with it (``emo.installation``). Exits 1 when it does."""
from __future__ import annotations

import sys

from emo.installation import (
    DISTRIBUTION,
    coexistence_message,
    emo_suite_init_loaded,
    installed_version,
    replaced_init_message,
)

OPTIONAL = (("transformers", "emo.training, the [transformers] extra"), ("trl", "the [trl] extra"))


def main() -> int:
    """Print the report; 0 if the environment imports emo-suite's ``emo`` and EMOLoss is not installed, else 1."""
    package = sys.modules["emo"]
    location = getattr(package, "__file__", None) or list(package.__path__)
    print(f"{DISTRIBUTION} {installed_version(DISTRIBUTION) or 'not installed'}; emo "
          f"{getattr(package, '__version__', '(not emo-suite)')} imported from {location}")
    for name, purpose in (("torch", "required"), *OPTIONAL):
        print(f"{name} {installed_version(name) or 'not installed'} ({purpose})")
    problem = coexistence_message() if emo_suite_init_loaded() else replaced_init_message()
    if problem is None:
        print("ok")
        return 0
    print(f"problem: {problem}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
