"""Where the kernel sources are: csrc/ and kernels/ sit at the top of the source tree and are
installed inside the package (pyproject.toml maps them to anadp/csrc and anadp.kernels)."""
from __future__ import annotations

import os

PACKAGE = os.path.dirname(os.path.abspath(__file__))
TREE = os.path.dirname(PACKAGE)  # the source tree, where anadp runs from a checkout


def csrc_dir() -> str:
    """The C++ / CUDA sources: the installed package's copy, else the checkout's csrc/."""
    installed = os.path.join(PACKAGE, "csrc")
    return installed if os.path.isdir(installed) else os.path.join(TREE, "csrc")


def kernels_path() -> list[str]:
    """Where ``anadp.kernels`` is looked for besides the package: the checkout's top level when
    anadp runs from a source tree that is not installed (an installed or editable package maps it)."""
    if os.path.isdir(os.path.join(PACKAGE, "kernels")):
        return []
    return [TREE] if os.path.isfile(os.path.join(TREE, "kernels", "fused_linear.py")) else []
