"""The compiled CUDA backend (csrc/, built by setup.py where CUDA is usable)."""
from __future__ import annotations

try:
    from . import _cuda  # noqa: F401
    import_error = None
except ImportError as e:
    _cuda = None
    import_error = (f"the CUDA extension anadp._cuda is not built ({e}); build it on a machine with CUDA: "
                    "ANADP_BUILD_CUDA=1 pip install -e .")
