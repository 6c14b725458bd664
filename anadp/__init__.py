"""anadp: differentially private fine-tuning with adaptive noise allocation (ANADP)."""
import importlib.abc as _abc
import importlib.util as _util
import os as _os
import sys as _sys

from .accounting import Accountant, noise_multiplier_for
from .allocation import AllocationConfig, NoiseAllocator
from .api import make_private
from .checkpoint import load_checkpoint, save_checkpoint
from .data import DPDataLoader, PoissonBatchSampler
from .engine import BatchMismatchError, GradSampleEngine, UnsupportedModuleError
from .optimizer import DPOptimizer

__version__ = "0.1.0"
__all__ = ["make_private", "save_checkpoint", "load_checkpoint", "DPOptimizer", "GradSampleEngine", "DPDataLoader", "PoissonBatchSampler",
           "NoiseAllocator", "AllocationConfig", "Accountant", "noise_multiplier_for",
           "UnsupportedModuleError", "BatchMismatchError"]


_SOURCE_KERNELS = _os.path.join(_os.path.dirname(_os.path.dirname(_os.path.abspath(__file__))), "kernels")


class _SourceKernelsFinder(_abc.MetaPathFinder):
    """A source checkout used without pip install (the GPU check machine): kernels/, which
    setup installs as anadp.kernels, sits beside anadp/. Consulted after the regular finders."""

    def find_spec(self, name, path=None, target=None):
        if name != "anadp.kernels" or not _os.path.isfile(_os.path.join(_SOURCE_KERNELS, "__init__.py")):
            return None
        return _util.spec_from_file_location(name, _os.path.join(_SOURCE_KERNELS, "__init__.py"),
                                             submodule_search_locations=[_SOURCE_KERNELS])


if not any(isinstance(f, _SourceKernelsFinder) for f in _sys.meta_path):
    _sys.meta_path.append(_SourceKernelsFinder())
