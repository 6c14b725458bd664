"""The allocation's feed: what the noise allocator sees of a step, the released outputs only.

Per physical batch, each sample's clipped whitened energy per group (where the allocation releases
shares); per step, those sums with noise (the share release), and the per-tensor statistic of
the noisy gradient or of the optimizer's first moment, from which ``NoiseAllocator.update`` sets
the next step's scales.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from . import philox, sharding
from .tensors import SHARE_STREAM


class ChunkWeights(NamedTuple):
    """For the records of one physical batch, row by row: ``whiten`` (1 / w^2 per row, where the
    clipping whitens), ``to_group`` (row -> share group, 1 / w^2), ``key`` (its cache key)."""
    whiten: torch.Tensor
    to_group: torch.Tensor
    key: tuple


class AllocationFeed:
    def __init__(self, tensors, allocator, clip, max_grad_norm: float, optimizer, share_noise_backend):
        self.tensors, self.allocator, self.clip = tensors, allocator, clip
        self.max_grad_norm, self.optimizer, self.share_noise_backend = max_grad_norm, optimizer, share_noise_backend
        self._layouts: dict = {}  # see weights
        self.last_released_shares: torch.Tensor | None = None
        self.last_allocation_input = None
        self.reset()

    def reset(self) -> None:
        self.share_sum = torch.zeros(self.allocator.n_groups + 1, dtype=torch.float64)
        self._energy: dict = {}  # weights key -> per-row clipped energy, folded into share_sum per step
        self._weights: dict = {}  # the scales change between steps

    @property
    def releases_shares(self) -> bool:
        return self.allocator.releases_shares

    def noise_norm(self) -> float:
        """K: the gradient's noise std per coordinate is gradient_noise_multiplier * K * w_g (C under
        whitened clipping, the released shares' unit)."""
        return self.clip.noise_total(self.allocator.column_scales)

    def weights(self, params: list, dtype, device) -> ChunkWeights:
        """The ChunkWeights of the records of ``params``: the scales are fixed within a step, so every
        physical chunk of it reuses them."""
        key = (tuple(map(id, params)), dtype, device)
        found = self._weights.get(key)
        if found is None:
            layout = self._layouts.get(key)  # which row is which tensor: the same from step to step
            if layout is None:
                i = [self.tensors.index.get(p) for p in params]
                rows = torch.tensor([r for r, k in enumerate(i) if k is not None], dtype=torch.long)
                cols = torch.tensor([k for k in i if k is not None], dtype=torch.long)
                layout = self._layouts[key] = (rows, cols)
            rows, cols = layout
            w = self.allocator.scales
            whiten = torch.ones(len(params), dtype=torch.float64)
            if self.clip.whitens:
                whiten[rows] = w[cols].pow(-2)
            to_group = torch.zeros(len(params), self.allocator.n_groups + 1, dtype=torch.float64)
            to_group[rows, self.allocator._col[cols]] = w[cols].pow(-2)
            found = self._weights[key] = ChunkWeights(whiten.to(dtype=dtype, device=device), to_group, key)
        return found

    def add_energy(self, weights: ChunkWeights, sq: torch.Tensor, c: torch.Tensor) -> None:
        """Add each sample's clipped whitened energy per group, c_i^2 ||g_ig||^2 / (w_g^2 C^2)
        (at most 1 in total per sample), to the sums that the step releases with noise: per chunk
        one product sum_i c_i^2 sq[:, i] (``sq``: (rows, B) squared norms, dropped samples zeroed),
        mapped to the groups once per step (``fold``)."""
        e = sq.double() @ (c.double() ** 2)
        key = weights.key
        self._energy[key] = e if key not in self._energy else self._energy[key] + e

    def fold(self) -> None:
        for key, e in self._energy.items():
            self.share_sum += (e.cpu() @ self._weights[key].to_group) / self.max_grad_norm ** 2
        self._energy = {}

    def release_shares(self, seed: int, step: int, noise_multiplier: float) -> torch.Tensor | None:
        """The share sums plus N(0, noise_multiplier^2) noise: the released statistic."""
        if not self.allocator.releases_shares:
            return None
        self.fold()
        shares = self.share_sum.clone()
        if noise_multiplier > 0:  # the compiled kernel where there is one: the torch stream's
            # ~100 small int64 ops per step crawl when another process holds a core
            z = torch.zeros(shares.shape, dtype=torch.float32)
            self.share_noise_backend.add_noise_(z, philox.group_key(seed, step, SHARE_STREAM), 1.0)
            shares += noise_multiplier * z.double()
        self.last_released_shares = shares
        return shares

    def momentum_energy(self, first_moments: list | None = None, first_moment_sq: torch.Tensor | None = None):
        """(per-tensor sum of m^2, sum_k a_k^2, (sum_k a_k)^2) for the optimizer's first moment
        m = sum_k a_k grad_(t-k) after this step (Adam's exp_avg, SGD's momentum buffer): an average
        of the released gradients whose noise energy shrinks by sum a_k^2 / (sum a_k)^2 (1/19 at
        beta 0.9), where the square of one noisy step keeps all of it. None where there is none."""
        opt, betas = self.optimizer, set()
        for g in opt.param_groups:
            if "betas" in g:
                betas.add((float(g["betas"][0]), 1 - float(g["betas"][0])))
            elif g.get("momentum", 0) > 0:
                betas.add((float(g["momentum"]), 1 - float(g.get("dampening", 0))))
            else:
                return None
        if len(betas) != 1 or next(iter(betas))[0] <= 0:
            return None
        beta, a = next(iter(betas))
        params = self.tensors.params
        ms = first_moments or [opt.state[p].get("exp_avg", opt.state[p].get("momentum_buffer")) for p in params]
        if any(m is None for m in ms):
            return None
        t = self.allocator.updates + 1
        noise = a * a * (1 - beta ** (2 * t)) / (1 - beta * beta)
        signal = (a * (1 - beta ** t) / (1 - beta)) ** 2
        if first_moment_sq is not None:
            return first_moment_sq, noise, signal
        return (self.tensors.tensor_sums(torch.stack(torch._foreach_norm([sharding.local(m) for m in ms])).double() ** 2),
                noise, signal)

    def update(self, sums, shares, noise_std: float, denom: float, samples: float,
               first_moments: list | None = None, first_moment_sq: torch.Tensor | None = None) -> None:
        """The allocation sees the released outputs only: per-tensor sums over the noisy gradient
        the optimizer got (or over its first moment, an average of them), the noisy share release,
        and public constants. ``first_moments``: the optimizer's first moments where the caller has them,
        ``first_moment_sq``: their per-tensor sums of squares where the fused update formed them."""
        factors = {}
        if self.allocator.statistic == "grad_sq":
            momentum = self.momentum_energy(first_moments, first_moment_sq)
            if momentum is not None:
                sums, factors["stat_noise"], factors["stat_signal"] = momentum
        if callable(sums):
            sums = sums()
        self.last_allocation_input = (None if sums is None else sums.detach().cpu(), shares, factors)
        self.allocator.update(None if sums is None else sums.detach().cpu(), shares, noise_std=noise_std,
                              clip=self.noise_norm(), denom=denom, samples=samples, **factors)
