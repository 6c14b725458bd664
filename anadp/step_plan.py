"""One optimizer step's plan: its public constants, and what its phases hand on to each other."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class StepPlan:
    k: int            # logical batches in the step
    seed: int
    std: float        # noise std per coordinate before the group scales
    denom: float      # what the clipped sum is divided by
    samples: float    # the expected number of samples in it (public)
    step: int = 0     # the step's index in the noise stream
    fused: tuple | None = None  # (optimizer kind, states, hyperparameter rows, noise keys) of the kernels
    sens: torch.Tensor | None = None  # per-tensor statistic the kernels formed
    moment_sq: torch.Tensor | None = None  # per-tensor sums of m^2 after the update, where formed
    moment_tensors: int = 0  # how many tensors moment_sq covers
    stat_sums: object = None  # torch path: the statistic (a tensor, or a callable formed on demand)
    shares: torch.Tensor | None = None
    released: set = field(default_factory=set)  # tensors already noised (and, fused, updated)
    charged: bool = False
    noise_var: torch.Tensor | None = None  # Adam's noise correction: phi_hat per tensor (adam_correction)

    def unreleased(self, n: int) -> list:
        """The tensors of ``n`` whose noise this step has not released yet."""
        return [i for i in range(n) if i not in self.released]
