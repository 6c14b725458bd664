"""anadp: differentially private fine-tuning with adaptive noise allocation (ANADP)."""
from .sources import kernels_path as _kernels_path

__path__ += [p for p in _kernels_path() if p not in __path__]  # a checkout run uninstalled: kernels/ beside us
from .accounting import Accountant, BudgetExhaustedError, noise_multiplier_for
from .allocation import AllocationConfig, NoiseAllocator
from .api import make_private
from .clipping import AdaptiveClipping
from .checkpoint import (load_checkpoint, load_distributed_checkpoint, save_checkpoint,
                         save_distributed_checkpoint)
from .data import DPDataLoader, PoissonBatchSampler
from .engine import BatchMismatchError, GradSampleEngine, UnsupportedModuleError
from .optimizer import DPOptimizer

__version__ = "0.1.0"
__all__ = ["make_private", "save_checkpoint", "load_checkpoint", "save_distributed_checkpoint",
           "load_distributed_checkpoint", "DPOptimizer", "GradSampleEngine", "DPDataLoader", "PoissonBatchSampler",
           "NoiseAllocator", "AllocationConfig", "AdaptiveClipping", "Accountant", "noise_multiplier_for",
           "UnsupportedModuleError", "BatchMismatchError", "BudgetExhaustedError"]
