"""The DP optimizer: wraps the user's torch optimizer.

Per physical batch (after its backward): per-sample norms in the whitened
space, clip factors c_i, clipped sums accumulated per group.
Per logical batch (``step``): add noise sigma*C*w_g*z_g from the Philox
stream, divide by the expected batch size, update the importance EMAs from
the privatized gradient, call the wrapped optimizer, charge the accountant.
"""
from __future__ import annotations

import math
import os
import warnings
from dataclasses import asdict, dataclass, field

import torch
from torch.optim import Optimizer

from . import backends
from . import kernel_choice
from .backends import cpu as cpu_kernels
from . import adam_correction
from . import philox
from . import sharding as S
from . import update_table as U
from .accounting import Accountant, BudgetExhaustedError
from .allocation import AllocationConfig, NoiseAllocator, kind_of, noise_groups
from .clipping import FlatClipping
from .engine import GradSampleEngine, PhysicalBatch
from .records import HALF, LinearRecord

_FOREACH = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)
# noise streams of the share release and of the clipping's own (parameters' streams are their
# positions in the model)
SHARE_STREAM, CLIPPING_STREAM = 2**32 - 1, 2**32 - 2


@dataclass
class StepPlan:
    """One step: its public constants and what its phases hand on."""
    k: int            # logical batches in the step
    seed: int
    std: float        # noise std per coordinate before the group scales
    denom: float      # what the clipped sum is divided by
    samples: float    # the expected number of samples in it (public)
    fused: tuple | None = None  # (optimizer kind, states, hyperparameter rows, noise keys) of the kernels
    sens: torch.Tensor | None = None  # per-tensor statistic the kernels formed
    moment_sq: torch.Tensor | None = None  # per-tensor sums of m^2 after the update, where formed
    moment_tensors: int = 0  # how many tensors moment_sq covers
    stat_sums: object = None  # torch path: the statistic (a tensor, or a callable formed on demand)
    shares: torch.Tensor | None = None
    released: set = field(default_factory=set)  # tensors already noised (and, fused, updated)
    charged: bool = False
    noise_var: torch.Tensor | None = None  # Adam's noise correction: phi_hat per tensor (adam_correction)


def _delegated(name: str) -> property:
    """An attribute read and written on the wrapped optimizer."""
    return property(lambda self: getattr(self.original_optimizer, name),
                    lambda self, value: setattr(self.original_optimizer, name, value))


def _sum_dtype(p: torch.Tensor) -> torch.dtype:
    """The dtype a parameter's clipped sum and noisy gradient are kept in: float32 for 16-bit parameters."""
    return torch.float32 if p.dtype in HALF else p.dtype


def _random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


class DPOptimizer(Optimizer):
    def __init__(self, optimizer: Optimizer, engine: GradSampleEngine, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: int, sample_rate: float,
                 allocation: str = "anadp", allocation_config: AllocationConfig | None = None,
                 clipping: str = "whitened", accountant: str = "prv", loss_reduction: str = "mean",
                 seed: int | None = None, secure_mode: bool = False, nonfinite: str = "raise",
                 data_loader=None, distributed: bool = False, backend: str = "auto",
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 budget_steps: int | None = None, adam_noise_correction: bool | float | None = False):
        if noise_multiplier < 0 or not math.isfinite(noise_multiplier):
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if noise_multiplier == 0:
            warnings.warn("noise_multiplier=0: no privacy (epsilon is infinite); use only for testing")
        if not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0, got {max_grad_norm}")
        if clipping not in ("whitened", "global", "per_layer"):
            raise ValueError(f"clipping must be 'whitened', 'global' or 'per_layer', got {clipping!r}")
        if clipping == "per_layer" and allocation == "clip":
            raise ValueError("allocation='clip' reads each sample's clipped energy split over the groups, which "
                             "per-layer clipping fixes at the thresholds: use 'anadp', 'uniform' or 'paper'")
        if clipping == "global" and allocation not in ("paper", "uniform"):
            raise ValueError(f"clipping='global' is the paper's mechanism: use it with allocation='paper' or "
                             f"'uniform', not {allocation!r} (whose statistics assume whitened clipping)")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        if expected_batch_size <= 0:
            raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
        if secure_mode and seed is not None:
            raise ValueError("secure_mode draws every step's noise seed from the OS CSPRNG: do not pass a seed")
        if adam_noise_correction is None:  # on where it can run
            adam_noise_correction = adam_correction.unsupported_reason(optimizer) is None
        if adam_noise_correction is not False:
            why = adam_correction.unsupported_reason(optimizer)
            if why is not None:
                raise ValueError(f"adam_noise_correction corrects Adam's second moment, but {why}: wrap "
                                 "torch.optim.Adam or AdamW (without amsgrad / maximize), or leave it off")

        self.original_optimizer, self.engine = optimizer, engine
        self.params = [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]
        self._n_wrapped = sum(len(g["params"]) for g in optimizer.param_groups)  # see _begin_step
        owned = set(engine.params)
        foreign = [i for i, p in enumerate(self.params) if p not in owned]
        if foreign:
            raise ValueError(f"the optimizer holds {len(foreign)} trainable parameter(s) (positions {foreign[:5]}) "
                             "that the wrapped model does not own")
        mine = set(self.params)
        missing = [engine.names[p] for p in engine.params if p not in mine]
        if missing:
            warnings.warn(f"{len(missing)} trainable model parameters are not in the optimizer and will not be "
                          f"updated (first: {missing[0]}); they still count in the clipping norm")
        if isinstance(optimizer, _FOREACH):
            for g in optimizer.param_groups:  # multi-tensor (foreach) update, also on the CPU
                if g.get("foreach") is None and not g.get("fused"):
                    g["foreach"] = True
        self.index = {p: i for i, p in enumerate(self.params)}
        S.check_layout(self.params)
        self._sharded = {p: S.is_sharded(p) for p in self.params}  # FSDP2 (fully_shard) DTensor parameters
        self._shard_mask = (torch.tensor([self._sharded[p] for p in self.params])
                            if any(self._sharded.values()) else None)
        self._shard_rows = S.row_ranges(self.params) if self._shard_mask is not None else {}
        self._sum_dtypes = [_sum_dtype(p) for p in self.params]
        # noise stream of a group: keyed by the parameter's position in the model, so that
        # how an optimizer orders its param groups does not change the noise
        position = {p: k for k, p in enumerate(engine.params)}
        self.noise_ids = [position[p] for p in self.params]
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size, self.sample_rate = expected_batch_size, sample_rate
        self.clipping, self.loss_reduction, self.nonfinite = clipping, loss_reduction, nonfinite
        self.secure_mode, self.distributed = secure_mode, distributed
        # the budget the noise was calibrated for (None: noise_multiplier given, no budget to keep)
        self.target_epsilon, self.target_delta, self.budget_steps = target_epsilon, target_delta, budget_steps
        self.seed = None if secure_mode else (seed if seed is not None else _random_seed())
        groups, self.group_names = noise_groups([engine.names[p] for p in self.params], [p.shape for p in self.params])
        floor = adam_noise_correction
        self.noise_variance = (None if floor is False else adam_correction.NoiseVariance(
            len(self.params), adam_correction.DEFAULT_FLOOR if floor is True else float(floor)))
        self.allocator = NoiseAllocator([p.numel() for p in self.params], allocation, allocation_config, groups,
                                        adaptive=not isinstance(optimizer, torch.optim.SGD),
                                        kinds=[kind_of(n) for n in self.group_names],
                                        saturation=1.0 if self.noise_variance is None else self.noise_variance.floor)
        self.clip = self._make_clipping()
        self.accountant = Accountant(accountant)
        self.data_loader = data_loader
        self._init_backend(backend)
        self.step_count = 0
        self.skipped_samples = 0
        self.stepped = False  # whether the last step() updated the parameters (see step)
        self.last_per_sample_norms: torch.Tensor | None = None  # whitened norms of the last physical batch
        self.last_clip_factors: torch.Tensor | None = None
        self._layouts: dict = {}  # see _chunk_plan
        self._state_cache = None  # see _fused_rows
        self._last_plan: StepPlan | None = None
        self._privatized: StepPlan | None = None  # between privatize() and apply()
        self._reset_accumulation()
        engine.on_batch = self._accumulate
        self._setup_clipping()

    def _make_clipping(self):
        """The clipping (anadp.clipping): whitened or global here, per-layer in its variant."""
        return FlatClipping(self.max_grad_norm, whitened=self.clipping != "global")

    def _setup_clipping(self) -> None:
        """What a clipping variant sets up once the optimizer is built (see per_layer)."""

    def _init_backend(self, requested: str) -> None:
        """The backend (anadp.backends): its noise always; its norms and fused update where the
        parameters and the wrapped optimizer allow them, else torch's (with a warning)."""
        device = self.params[0].device if self.params else torch.device("cpu")
        self.backend = backends.resolve(requested, device)
        self.impl = backends.get(self.backend)
        # the share sums live on the CPU: their noise is drawn there, not in a GPU launch
        self.share_noise_backend = backends.get(backends.auto(torch.device("cpu")))
        kernels = self.impl.norms or self.impl.fused_update
        # the GEMM-shaped kernels where a GPU check measured them faster than cuBLAS (kernel_choice)
        norms = self.impl.norms and kernel_choice.use_kernel("norms", self.backend)
        why, self.norm_kernels = None, self.impl if norms else None
        if kernels and any(p.dtype not in (torch.float32, torch.bfloat16, torch.float16) for p in self.engine.params):
            why, self.norm_kernels = "parameters other than float32 / bfloat16 / float16", None
        elif self.impl.fused_update:
            why = U.unsupported_reason(self.original_optimizer)
            if why is None and any(not p.is_contiguous() for p in self.params):
                why = "non-contiguous parameters"
            if why is None and not self.params:
                why = "no trainable parameters in the optimizer"
            if why is None and self.distributed:
                why = "distributed training (the all-reduce needs the clipped sums)"
            if why is None and self._shard_mask is not None:
                why = "FSDP2-sharded parameters"
        self.engine.instantiate_linear = self.norm_kernels is None  # kernel norms read (A, G)
        self._fused_update = self.impl.fused_update and why is None
        # Linear weights in the clipped-GEMM kernel (triton); the cuda backend forms their sums with torch
        self._fused_gemm = (self._fused_update and self.impl.fused_gemm
                            and kernel_choice.use_kernel("clipped_gemm", self.backend))
        if kernels and why is not None and self.impl.warn_fallback:
            warnings.warn(f"backend {self.backend!r}: {why}: the update runs in torch"
                          + ("" if self.norm_kernels is not None else ", and so do the norms"))

    # torch.optim.Optimizer surface, delegated to the wrapped optimizer (LR schedulers use it)
    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")

    def __repr__(self) -> str:
        return (f"DPOptimizer(sigma={self.noise_multiplier}, C={self.max_grad_norm}, "
                f"allocation={self.allocator.mode!r}, clipping={self.clipping!r}, wrapped={self.original_optimizer!r})")

    def _warn_in_warmup(self) -> None:
        a = self.allocator
        if a.mode != "uniform" and a.updates < a.config.warmup_steps:
            warnings.warn(f"allocation {a.mode!r} is still in its warm-up: w = 1 for the first "
                          f"{a.config.warmup_steps} steps ({a.updates} taken), so far the same noise as uniform DP "
                          "(AllocationConfig(warmup_steps=...) sets it)", stacklevel=3)

    @property
    def noise_scales(self) -> dict:
        """{noise group (the module holding a weight matrix): w_g} used by the next step (1.0 everywhere
        under uniform DP and during the allocation's warm-up, with a warning). The other tensors (norm
        weights, lone biases) form the rest group, whose w stays 1."""
        self._warn_in_warmup()
        return dict(zip(self.group_names, self.allocator.group_scales.tolist()))

    def _noise_multipliers(self) -> tuple[float, float, float]:
        """(gradient, share release, clipping release) noise multipliers that together cost
        noise_multiplier: the allocation's split of sigma, then the clipping's of what is left
        (sigma_g^-2 + sigma_b^-2 + z^-2 = sigma^-2 when both release)."""
        rest, shares = self.allocator.noise_multipliers(self.noise_multiplier)
        gradient, clipping = self.clip.noise_multipliers(rest)
        return gradient, shares, clipping

    @property
    def gradient_noise_multiplier(self) -> float:
        """The gradient's noise multiplier: ``noise_multiplier`` itself, or a little more where the
        step also releases statistics (the allocation's shares, adaptive thresholds' counts: together
        they cost noise_multiplier)."""
        return self._noise_multipliers()[0]

    @property
    def share_noise_multiplier(self) -> float:
        """Noise multiplier of the per-group share release (0 when the allocation releases none)."""
        return self._noise_multipliers()[1]

    def _reset_accumulation(self):
        self._summed: list[torch.Tensor | None] = [None] * len(self.params)
        # fused update: Linear weights of the last physical batch, (record, scaled clip factors),
        # whose clipped sum is formed inside the update kernel
        self._deferred: dict[int, tuple[LinearRecord, torch.Tensor]] = {}
        self._share_sum = torch.zeros(self.allocator.n_groups + 1, dtype=torch.float64)
        self._energy: dict = {}  # chunk plan key -> per-row clipped energy, folded into _share_sum per step
        self._plans: dict = {}  # see _chunk_plan; the scales change between steps
        self._logical_batches = 0
        self._chunks = 0
        self._last_ends_logical = True
        self._reduced: set = set()  # FSDP2: tensors whose _summed is already this rank's reduced rows
        self.clip.reset_counts()

    @property
    def _mid_logical_batch(self) -> bool:
        return self._chunks > 0 and not self._last_ends_logical

    # --- per physical batch -------------------------------------------------------
    def _check_chunk(self, chunk_id: int | None) -> None:
        """One backward pass per chunk of private data, and only on private data (anadp.chunks)."""
        if self.data_loader is not None:  # None: built by hand (tests of the optimizer alone)
            self.engine.chunks.accept(chunk_id)

    def _count_chunk(self, ends_logical: bool) -> None:
        """A chunk's backward is accumulated: the step follows its logical batch's last chunk."""
        self._chunks += 1
        self._logical_batches += int(ends_logical)
        self._last_ends_logical = ends_logical

    @torch.no_grad()
    def _accumulate(self, batch: PhysicalBatch) -> None:
        self._check_chunk(batch.chunk_id)
        keys, S = batch.sq_rows(self.norm_kernels)  # the loss-reduction scale, once below
        if S.dtype not in (torch.float32, torch.float64):
            S = S.float()
        dtype, device = S.dtype, S.device
        plan = self._chunk_plan(keys, dtype, device)
        norms = (plan[0] @ S).sqrt() * batch.scale
        bad = ~torch.isfinite(norms)
        any_bad = bool(bad.any())
        if any_bad:
            names = [self.engine.names[p] for p, s in zip(keys, S) if not torch.isfinite(s).all()]
            msg = (f"non-finite per-sample gradient in {int(bad.sum())} of {batch.batch_size} samples "
                   f"(parameters: {names[:3]})")
            if self.nonfinite == "raise":
                raise FloatingPointError(msg + "; check the loss and learning rate, or pass nonfinite='skip' "
                                         "to drop such samples (counted in optimizer.skipped_samples)")
            warnings.warn(msg + ": these samples are dropped from the step")
            batch.drop(bad)
            norms = torch.where(bad, 0, norms)
            self.skipped_samples += int(bad.sum())
        c = self.clip.factors(norms)
        if any_bad:
            c = torch.where(bad, 0, c)
        cs = c * batch.scale  # the clip factors of the records, which hold the scaled-down gradients
        if self.allocator.releases_shares:
            self._add_shares(plan, torch.where(bad[None], 0, S) if any_bad else S, cs)
        self._materialize_deferred()
        index = self.index
        if self._fused_gemm:
            now = []
            for p, recs in batch.records.items():
                i = index.get(p)
                if i is None:
                    continue
                if len(recs) == 1 and isinstance(recs[0], LinearRecord):
                    self._deferred[i] = (recs[0], cs)
                else:
                    now.append(p)
        else:
            now = [p for p in batch.records if p in index]
        if self.distributed and self._shard_rows:
            now = self._reduce_shards(batch, cs, now)
        for p, s in batch.clipped_sums(cs, now).items():
            self._add_to_sum(index[p], s)
        self.last_per_sample_norms, self.last_clip_factors = norms, c
        self._count_chunk(batch.ends_logical)

    REDUCE_BUCKET = 1 << 22  # elements of whole clipped sums formed and reduce-scattered at a time (FSDP2)

    def _reduce_shards(self, batch: PhysicalBatch, cs: torch.Tensor, now: list) -> list:
        """FSDP2: the clipped sums of this chunk's sharded tensors, REDUCE_BUCKET elements of them at a
        time, reduce-scattered at once (the reduction is linear: the chunks' shards add up to the
        shard of the sum), so a rank never holds more than a bucket of whole sums. Every rank reduces
        every sharded tensor each chunk (zeros where it has no record), so the collectives match.
        Returns the tensors left to sum as before."""
        mine = {self.index[p] for p in now}
        for bucket in self._shard_buckets():
            params = [self.params[i] for i in bucket if i in mine]
            sums = batch.clipped_sums(cs, params) if params else {}
            full = {i: sums[self.params[i]] if i in mine else
                    torch.zeros(self.params[i].shape, dtype=self._sum_dtypes[i], device=cs.device) for i in bucket}
            for i, s in S.reduce_scatter_rows(full, {i: self._shard_rows[i] for i in bucket}).items():
                self._add_to_sum(i, s.to(self._sum_dtypes[i]))
                self._reduced.add(i)
        return [p for p in now if self.index[p] not in self._shard_rows]

    def _shard_buckets(self) -> list:
        buckets, size = [[]], 0
        for i in self._shard_rows:
            n = self.params[i].numel()
            if buckets[-1] and size + n > self.REDUCE_BUCKET:
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += n
        return buckets if buckets[0] else []

    def _chunk_plan(self, params: list, dtype, device) -> tuple:
        """(whitening weights 1 / w^2 per row of S, share matrix row -> group, its key) for the records of
        ``params``: the scales are fixed within a step, so every physical chunk of it reuses them."""
        key = (tuple(map(id, params)), dtype, device)
        plan = self._plans.get(key)
        if plan is None:
            layout = self._layouts.get(key)  # which row is which tensor: the same from step to step
            if layout is None:
                i = [self.index.get(p) for p in params]
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
            plan = self._plans[key] = (whiten.to(dtype=dtype, device=device), to_group, key)
        return plan

    def _add_shares(self, plan: tuple, S: torch.Tensor, c: torch.Tensor) -> None:
        """Add each sample's clipped whitened energy per group, c_i^2 ||g_ig||^2 / (w_g^2 C^2)
        (at most 1 in total per sample), to the sums that the step releases with noise: per chunk
        one product sum_i c_i^2 S[:, i] (``S``: (rows, B) squared norms, dropped samples zeroed),
        mapped to the groups once per step (``_fold_shares``)."""
        e = S.double() @ (c.double() ** 2)
        key = plan[2]
        self._energy[key] = e if key not in self._energy else self._energy[key] + e

    def _fold_shares(self) -> None:
        for key, e in self._energy.items():
            self._share_sum += (e.cpu() @ self._plans[key][1]) / self.max_grad_norm ** 2
        self._energy = {}

    def _release_shares(self, seed: int) -> torch.Tensor | None:
        """The share sums plus N(0, (sigma_b)^2) noise: the released statistic."""
        if not self.allocator.releases_shares:
            return None
        self._fold_shares()
        shares = self._share_sum.clone()
        if self.share_noise_multiplier > 0:  # the compiled kernel where there is one: the torch stream's
            # ~100 small int64 ops per step crawl when another process holds a core
            z = torch.zeros(shares.shape, dtype=torch.float32)
            self.share_noise_backend.add_noise_(z, philox.group_key(seed, self.step_count, SHARE_STREAM), 1.0)
            shares += self.share_noise_multiplier * z.double()
        self.last_released_shares = shares
        return shares

    def _feed_scale(self, w: float) -> float:
        """What the noisy gradient of a tensor of noise scale ``w`` is multiplied by before the
        optimizer sees it."""
        return 1.0 / w if self.allocator.whitened_feed else 1.0

    def _add_to_sum(self, i: int, s: torch.Tensor) -> None:
        dtype = self._sum_dtypes[i]
        if s.dtype != dtype:  # autocast leaves 16-bit sums for float32 parameters
            s = s.to(dtype)
        prior = self._summed[i]
        self._summed[i] = s if prior is None else prior + s

    def _materialize_deferred(self) -> None:
        for i, (rec, c) in self._deferred.items():
            self._add_to_sum(i, rec.clipped_sum(c))
        self._deferred = {}

    # --- per logical batch ------------------------------------------------------------
    def _begin_step(self) -> StepPlan | None:
        """Phase 1, begin: finish accumulation and plan the step (None while a split logical batch
        is still incomplete)."""
        self.engine.flush()
        self._check_unchanged()
        if self._shard_mask is not None:
            self._check_no_shard_grads()
        if self._mid_logical_batch:
            return None
        if self.distributed:
            self._all_reduce()
        k = self._logical_batches
        if k == 0:
            if self._chunks == 0 and not getattr(self.data_loader, "last_batch_empty", False):
                raise RuntimeError("optimizer.step() called without a backward pass through the private model "
                                   "since the last step (call loss.backward() first)")
            k = 1  # an empty Poisson batch: a noise-only step, still a step
        self._check_budget(k)
        return self._plan(k, self._step_seed())

    def _check_no_shard_grads(self) -> None:
        """FSDP2 reduce-scatters what autograd gives the unsharded parameters into the shards' .grad; the
        hooked layers give none, so a gradient there comes from a use outside them (which the engine's
        gradient hooks, on the sharded parameters, do not see) and would be dropped by the step."""
        used = [self.engine.names[p] for p in self.params if self._sharded[p] and p.grad is not None]
        if used:
            raise RuntimeError(
                f"FSDP2-sharded parameter(s) {used[:3]} got a gradient from autograd: from a use outside their "
                "module's forward (for example F.linear(h, emb.weight) as a tied head), or from a backward outside "
                "make_private's model. anadp forms per-sample gradients only through the hooked modules, so this "
                "gradient would be dropped: call the module (a tied head as an nn.Linear sharing the Parameter).")

    def _check_unchanged(self) -> None:
        """The model's trainable parameters and the wrapped optimizer's are still the wrapped ones."""
        self.engine.check_unchanged()
        if sum(len(g["params"]) for g in self.original_optimizer.param_groups) != self._n_wrapped:
            raise RuntimeError("the wrapped optimizer's parameters changed after make_private (add_param_group?): "
                               "its step would update them with gradients that anadp neither clipped nor noised. "
                               "Build the optimizer with all its parameters, then call make_private.")

    def _plan(self, k: int, seed: int) -> StepPlan:
        """The step's public constants, and the fused kernels' inputs where they run."""
        std = self.gradient_noise_multiplier * self._noise_norm()
        denom = self.expected_batch_size * k if self.loss_reduction == "mean" else 1.0
        plan = StepPlan(k, seed, std, denom, float(self.expected_batch_size * k))
        if self.noise_variance is not None:
            plan.noise_var = self._noise_variance(std, denom)
        if self._fused_update:
            opt = self.original_optimizer
            kind = U.kind_of(opt)
            states, rows = self._fused_rows(opt, kind, std, denom, plan.noise_var)
            device = self.params[0].device
            plan.fused = (kind, states, rows.to(device), cpu_kernels.group_keys(seed, self.step_count, self.noise_ids))
            plan.sens = torch.zeros(len(self.params), dtype=torch.float64, device=device)
        return plan

    def _noise_and_scale(self, std: float, denom: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tensor (float64): the noise std of its clipped sum, std * w, and what the noisy sum is
        multiplied by before the optimizer sees it, feed / denom."""
        w = self.allocator.scales.double()
        feed = 1.0 / w if self.allocator.whitened_feed else torch.ones_like(w)
        return std * w, feed / denom

    def _noise_variance(self, std: float, denom: float) -> torch.Tensor:
        """phi_hat per tensor: the variance per coordinate of the noise in the gradient the wrapped
        Adam gets this step, (std w_k feed_k / denom)^2, averaged as Adam averages g^2."""
        noise_std, scale = self._noise_and_scale(std, denom)
        phi = (noise_std * scale) ** 2
        groups = U.group_of(self.original_optimizer)
        beta2 = torch.tensor([float(groups[id(p)]["betas"][1]) for p in self.params], dtype=torch.float64)
        return self.noise_variance.advance(phi, beta2)

    def _noise_norm(self) -> float:
        """K: the gradient's noise std per coordinate is gradient_noise_multiplier * K * w_g (C under
        whitened clipping, the released shares' unit)."""
        return self.clip.noise_total(self.allocator.column_scales)

    @torch.no_grad()
    def privatize(self) -> list[torch.Tensor] | None:
        """The torch path's first half, for callers who want the privatized gradients: finish
        accumulation, noise and scale every group, release the statistics, charge; returns the noisy,
        scaled gradients (None while a split logical batch is still incomplete). ``apply`` completes it."""
        plan = self._begin_step()
        if plan is None:
            return None
        plan.fused = plan.sens = None
        self._release_tensors(plan, self._unreleased(plan))
        self._release_statistics(plan)
        self._charge_once(plan)
        self._privatized = plan
        return list(self._summed)

    def _all_reduce(self) -> None:
        """Sum the ranks' clipped sums: FSDP2-sharded tensors in one reduce-scatter (each rank gets
        the sums of its own rows), the rest and the share sums in one all-reduce; the counters take
        their maximum (a rank whose share of the Poisson batch is empty may have had no backward)."""
        import torch.distributed as dist
        self._fold_shares()
        summed = [torch.zeros(p.shape, dtype=_sum_dtype(p), device=S.local(p).device) if s is None else s
                  for p, s in zip(self.params, self._summed)]
        whole = [i for i, p in enumerate(self.params) if not self._sharded[p]]
        flat = torch.cat([summed[i].flatten().to(torch.float64) for i in whole]
                         + [self._share_sum.to(device=summed[0].device)])
        dist.all_reduce(flat)
        self._share_sum = flat[-len(self._share_sum):].cpu()
        offset = 0
        for i in whole:
            s = summed[i]
            self._summed[i] = flat[offset:offset + s.numel()].view_as(s).to(s.dtype)
            offset += s.numel()
        rest = {i: r for i, r in self._shard_rows.items() if i not in self._reduced}  # per-layer: whole sums
        if rest:
            for i, s in S.reduce_scatter_rows(summed, rest).items():
                self._summed[i] = s.to(summed[i].dtype)
        counts = torch.tensor([self._logical_batches, self._chunks], dtype=torch.int64, device=flat.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        self._logical_batches, self._chunks = int(counts[0]), int(counts[1])

    def _step_seed(self) -> int:
        """This step's noise seed: fixed, or fresh from the OS CSPRNG (secure mode; rank 0's in DDP)."""
        if not self.secure_mode:
            return self.seed
        seed = _random_seed()
        if self.distributed:
            import torch.distributed as dist
            t = torch.tensor([seed >> 1], dtype=torch.int64, device=self.params[0].device)  # NCCL: on the GPU
            dist.broadcast(t, src=0)
            seed = int(t)
        return seed

    @property
    def steps_left(self) -> int | None:
        """Steps left in the budget the noise was calibrated for (None without target_epsilon)."""
        return None if self.budget_steps is None else max(0, self.budget_steps - self.accountant.steps)

    def _check_budget(self, k: int) -> None:
        """No step past the steps the noise was calibrated for, nor past target_epsilon: k > 1 Poisson
        batches under one draw are charged k releases at sigma / sqrt(k), more than k steps at sigma."""
        if self.budget_steps is None:
            return
        steps = self.accountant.steps + k
        spent = None
        if steps <= self.budget_steps:
            if k == 1 or not self.clip.exact_budget:  # global: the paper's mechanism overspends by design (warned)
                return
            acc = Accountant(self.accountant.name)
            acc.history = list(self.accountant.history) + [(self.noise_multiplier / math.sqrt(k), self.sample_rate, k)]
            spent = acc.get_epsilon(self.target_delta)
            if spent <= self.target_epsilon * (1 + 1e-3):
                return
        if spent is None:
            spent = self.projected_epsilon(self.target_delta, steps)
        raise BudgetExhaustedError(
            f"this step would be step {steps} of a run whose noise multiplier {self.noise_multiplier:.4g} was "
            f"calibrated for {self.budget_steps} steps (target epsilon {self.target_epsilon:g} at delta "
            f"{self.target_delta:g}): it would spend epsilon {spent:.3f}. Stop training here "
            "(optimizer.steps_left says how many are left), or call make_private again with the longer budget.")

    def _charge(self, k: int) -> None:
        """One accountant entry per logical batch. k > 1 full Poisson batches summed under
        one noise draw are k releases with noise sigma/sqrt(k) each (post-processing of them)."""
        z = self.clip.charged(self.noise_multiplier, self.allocator.scales)
        for _ in range(k):
            self.accountant.step(z / math.sqrt(k), self.sample_rate)

    def step(self, closure=None):
        """Clip, add noise and update once per logical batch. With physical batches (a logical
        batch split by max_physical_batch_size) the calls for the chunks before the last only
        accumulate: ``self.stepped`` says whether this call updated the parameters (step an LR
        scheduler only then).

        One template, in phases: begin (finish the clipped sums, plan), release the tensors (noise,
        and in the fused kernels the update), update (the wrapped optimizer on the torch path),
        release the statistics, charge the accountant, allocate the next step's scales, advance.
        A clipping variant overrides phases (per_layer releases tensors in the backward)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        before = self.step_count
        plan = self._begin_step()
        if plan is not None:  # None: more physical batches of this logical batch to come
            with torch.no_grad():
                self._release_tensors(plan, self._unreleased(plan))
                self._update(plan)
                self._release_statistics(plan)
                self._charge_once(plan)
                self._allocate(plan)
                self._advance()
        self.stepped = self.step_count > before
        return loss

    def _unreleased(self, plan: StepPlan) -> list:
        return [i for i in range(len(self.params)) if i not in plan.released]

    def _release_tensors(self, plan: StepPlan, idx: list) -> None:
        """Phase 2: the noise of tensors ``idx``. Fused: noise and update in the kernels (Linear weights
        in the clipped-GEMM kernel whose epilogue adds the noise and updates, the rest in one
        multi-tensor launch per dtype; p.grad where the backend stores it). Torch: the privatized
        gradients replace the clipped sums. Same noise, same arithmetic either way."""
        if not idx:
            return
        if plan.fused is not None:
            kind, states, rows, keys = plan.fused
            stat = self.allocator.statistic or "abs_p_grad"
            deferred = [i for i in idx if i in self._deferred]
            for i in deferred:
                rec, c = self._deferred.pop(i)
                prior = self._summed[i].contiguous() if self._summed[i] is not None else None
                s = self.impl.clipped_linear_update(rec.A, rec.G, c, self.params[i], kind=kind, row=rows[i],
                                                    key=keys[i], m=states[i][0], v=states[i][1], prior=prior,
                                                    transposed=rec.transposed, has_noise=plan.std > 0, stat=stat)
                plan.sens[i] = s.double().sum()
            rest = [i for i in idx if i not in deferred] if deferred else idx
            m2 = self._update_tensors(rest, kind, states, rows, keys, plan.std > 0, stat, plan.sens)
            if m2 is not None:
                plan.moment_sq = m2 if plan.moment_sq is None else plan.moment_sq + m2
                plan.moment_tensors += len(rest)
            for i in idx:
                self._summed[i] = None  # in p.grad where the backend stores it
        else:
            self._materialize_deferred()
            w = self.allocator.scales.tolist()
            ws = [w[i] for i in idx]
            grads = [torch.zeros(S.local(self.params[i]).shape, device=self.params[i].device, dtype=self._sum_dtypes[i])
                     if self._summed[i] is None else self._summed[i].contiguous() for i in idx]
            if plan.std > 0:  # in place: the sums are ours
                keys = cpu_kernels.group_keys(plan.seed, self.step_count, [self.noise_ids[i] for i in idx])
                stds = [plan.std * x for x in ws]
                mine = [k for k, i in enumerate(idx) if i not in self._shard_rows]
                self.impl.add_noise_multi_([grads[k] for k in mine], [keys[k] for k in mine], [stds[k] for k in mine])
                for k, i in enumerate(idx):  # a shard: its elements of the whole tensor's stream
                    if i in self._shard_rows:
                        self.impl.add_noise_from_(grads[k], keys[k], stds[k], self._shard_rows[i].start)
            torch._foreach_mul_(grads, [self._feed_scale(x) / plan.denom for x in ws])
            for i, g in zip(idx, grads):
                self._summed[i] = g
        plan.released.update(idx)

    def _update(self, plan: StepPlan) -> None:
        """Phase 3: the wrapped optimizer's step on the privatized gradients (torch path; the fused
        kernels updated in phase 2: here only Adam's step counters advance)."""
        if plan.fused is not None:
            U.finish_step(self.original_optimizer, self.params, self._step_tensors)
            return
        for p, g in zip(self.params, self._summed):  # FSDP2: each rank keeps its shard of g
            p.grad = S.as_shard(p, g) if self._sharded[p] else g.to(p.dtype)
        stat = self.allocator.statistic
        if stat == "abs_p_grad":  # p before the update; multi-tensor: ~200 tensors on BERT-base
            prods = torch._foreach_mul([S.local(p).detach().float() for p in self.params],
                                       [S.local(p.grad).float() for p in self.params])
            plan.stat_sums = self._tensor_sums(torch.stack(torch._foreach_norm(prods, 1)))
        elif stat == "grad_sq":  # only needed where the optimizer keeps no first moment
            plan.stat_sums = lambda: self._tensor_sums(  # noqa: E731
                torch.stack(torch._foreach_norm([S.local(p.grad) for p in self.params])).double() ** 2)
        if plan.noise_var is not None:  # Adam with the noise's variance out of v_hat
            adam_correction.adam_step_(self.original_optimizer, self.params, plan.noise_var,
                                       self.noise_variance.floor * plan.noise_var)
        else:
            self.original_optimizer.step()
        if self._shard_mask is not None:  # the shards' gradients are spent; None shows an untracked use next time
            for p in self.params:
                if self._sharded[p]:
                    p.grad = None

    def _tensor_sums(self, values: torch.Tensor) -> torch.Tensor:
        """Per-tensor sums formed on this rank's parts, summed over the shards of FSDP2-sharded
        tensors (the replicated ones counted once)."""
        return S.summed(values, self._shard_mask)

    def _release_statistics(self, plan: StepPlan) -> None:
        """Phase 4: the statistics the step releases besides the gradient: the share sums (or, where
        the clipping fixes them, their public bound), and the clipping's own (adaptive thresholds'
        counts, from which it sets the next thresholds)."""
        plan.shares = self._release_shares(plan.seed)
        if plan.shares is None:
            plan.shares = self.clip.public_shares(self.allocator.column_scales, plan.samples)
        z = self._noise_multipliers()[2]
        noise = None
        if self.clip.released and z > 0:
            noise = torch.zeros(self.clip.released, dtype=torch.float32)
            self.share_noise_backend.add_noise_(noise, philox.group_key(plan.seed, self.step_count, CLIPPING_STREAM),
                                                1.0)
        self.clip.release(noise, z, plan.samples)

    def _charge_once(self, plan: StepPlan) -> None:
        """Phase 5: the accountant, once per step (a variant that released earlier charged then)."""
        if not plan.charged:
            self._charge(plan.k)
            plan.charged = True

    def _allocate(self, plan: StepPlan) -> None:
        """Phase 6: the next step's scales, from the released outputs."""
        n = len(self.params)
        if plan.fused is not None:
            states = plan.fused[1]
            self._update_allocation(plan.sens if self.allocator.statistic else None, plan.shares,
                                    plan.std / plan.denom, plan.denom, plan.samples,
                                    first_moments=[m for m, _ in states],
                                    first_moment_sq=plan.moment_sq if plan.moment_tensors == n else None)
        else:
            self._update_allocation(plan.stat_sums, plan.shares, plan.std / plan.denom, plan.denom, plan.samples)
        self._last_plan = plan

    def _advance(self) -> None:
        """Phase 7: the next step's noise stream and an empty accumulation."""
        self.step_count += 1
        self._reset_accumulation()

    @property
    def _released(self) -> tuple:
        """(shares, noise std, divisor, samples) of the last step's releases."""
        p = self._last_plan
        return (p.shares, p.std / p.denom, p.denom, p.samples) if p is not None else (None, 0.0, 1.0, 1.0)

    def _update_tensors(self, idx: list, kind: int, states: list, rows: torch.Tensor, keys: list, has_noise: bool,
                        stat: str, sens: torch.Tensor) -> torch.Tensor | None:
        """Noise + update of the tensors ``idx`` from their clipped sums, one multi-tensor launch per dtype;
        adds their statistic into ``sens``; returns the per-tensor sums of m^2 after the update (zeros
        elsewhere) where the kernel forms them, else None."""
        n, device = len(self.params), sens.device
        moment_sq = None
        by_dtype: dict = {}
        for i in idx:
            by_dtype.setdefault(self.params[i].dtype, []).append(i)
        for group in by_dtype.values():
            grads = [self._summed[i].contiguous() if self._summed[i] is not None
                     else torch.zeros(self.params[i].shape, dtype=torch.float32, device=device) for i in group]
            params = [self.params[i] for i in group]
            extra = {}
            if self.impl.stores_grad:  # the cpu kernel: p.grad, and the first moments' energy with it
                extra = {"store_grad": True, "moment_sq": torch.zeros(len(group), dtype=torch.float64)}
            s, owner = self.impl.multi_tensor_update(
                params, grads, [states[i][0] for i in group], [states[i][1] for i in group],
                [keys[i] for i in group], rows[group], kind=kind, has_noise=has_noise, stat=stat, **extra)
            sens.index_add_(0, torch.tensor(group, device=device)[owner.long()], s.double())
            if extra:
                for p, g in zip(params, grads):
                    p.grad = g if g.dtype == p.dtype else g.to(p.dtype)
                moment_sq = torch.zeros(n, dtype=torch.float64) if moment_sq is None else moment_sq
                moment_sq[group] = extra["moment_sq"]
        return moment_sq

    def _fused_rows(self, opt, kind: int, std: float, denom: float, noise_var=None) -> tuple[list, torch.Tensor]:
        """(per tensor (first moment, second moment), the (tensors, N_COLS) float32 hyperparameter table)
        of the coming fused step: one update_table.hyper_row per (param group, step, first step) and
        the per-tensor noise columns as vectors, not a row of Python floats per tensor."""
        cached = self._state_cache
        if cached is not None and cached[0] is opt.state and cached[1] == len(opt.state):
            states, step_tensors = cached[2], cached[3]  # Adam's state, once created, is updated in place
            firsts = [False] * len(self.params)
        else:
            states, firsts, groups = [], [], U.group_of(opt)
            for p in self.params:
                m, v, first = U.ensure_state(opt, p, groups[id(p)])
                states.append((m, v))
                firsts.append(first)
            step_tensors = [opt.state[p]["step"] for p in self.params] if kind == U.ADAM else None
            if kind == U.ADAM:  # SGD's momentum buffers appear at the first step: ensure_state each time
                self._state_cache = (opt.state, len(opt.state), states, step_tensors)
        self._step_tensors = step_tensors
        steps = (torch.stack(step_tensors).tolist() if step_tensors else [None] * len(self.params))
        if len(opt.param_groups) == 1 and not any(firsts) and len(set(steps)) <= 1 and self.params:
            # the common case: one group, one step count, no first step: one row for every tensor
            rows = torch.tensor(U.hyper_row(opt, self.params[0], False, 0.0, 0.0, opt.param_groups[0]),
                                dtype=torch.float64).expand(len(self.params), U.N_COLS).clone()
            return states, self._noise_columns(rows, std, denom, noise_var)
        groups = U.group_of(opt)
        combos, which = {}, []
        for p, step, first in zip(self.params, steps, firsts):
            g = groups[id(p)]
            key = (id(g), step, first)
            if key not in combos:
                combos[key] = (len(combos), U.hyper_row(opt, p, first, 0.0, 0.0, g))
            which.append(combos[key][0])
        base = torch.tensor([row for _, row in combos.values()], dtype=torch.float64).view(-1, U.N_COLS)
        return states, self._noise_columns(base[torch.tensor(which, dtype=torch.long)], std, denom, noise_var)

    def _noise_columns(self, rows: torch.Tensor, std: float, denom: float, noise_var=None) -> torch.Tensor:
        """The table's per-tensor noise std and scale, and Adam's noise correction (float64 rows in),
        as float32."""
        rows[:, U.NOISE_STD], rows[:, U.INV_DENOM] = self._noise_and_scale(std, denom)
        if noise_var is not None:
            rows[:, U.NOISE_VAR] = noise_var
            rows[:, U.VAR_FLOOR] = self.noise_variance.floor * noise_var
        return rows.float()

    @torch.no_grad()
    def apply(self, grads: list[torch.Tensor]) -> None:
        """The torch path's second half (after ``privatize``): it sees only the privatized gradients."""
        plan = self._privatized or StepPlan(1, 0, 0.0, 1.0, 1.0)
        self._privatized = None
        self._summed = list(grads)
        self._update(plan)
        self._allocate(plan)
        self._advance()

    def _momentum_energy(self, first_moments: list | None = None, first_moment_sq: torch.Tensor | None = None):
        """(per-tensor sum of m^2, sum_k a_k^2, (sum_k a_k)^2) for the optimizer's first moment
        m = sum_k a_k grad_(t-k) after this step (Adam's exp_avg, SGD's momentum buffer): an average
        of the released gradients whose noise energy shrinks by sum a_k^2 / (sum a_k)^2 (1/19 at
        beta 0.9), where the square of one noisy step keeps all of it. None where there is none."""
        opt, betas = self.original_optimizer, set()
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
        ms = first_moments or [opt.state[p].get("exp_avg", opt.state[p].get("momentum_buffer")) for p in self.params]
        if any(m is None for m in ms):
            return None
        t = self.allocator.updates + 1
        noise = a * a * (1 - beta ** (2 * t)) / (1 - beta * beta)
        signal = (a * (1 - beta ** t) / (1 - beta)) ** 2
        if first_moment_sq is not None:
            return first_moment_sq, noise, signal
        return self._tensor_sums(torch.stack(torch._foreach_norm([S.local(m) for m in ms])).double() ** 2), noise, signal

    def _update_allocation(self, sums, shares, noise_std: float, denom: float, samples: float,
                           first_moments: list | None = None, first_moment_sq: torch.Tensor | None = None) -> None:
        """The allocation sees the released outputs only: per-tensor sums over the noisy gradient
        the optimizer got (or over its first moment, an average of them), the noisy share release,
        and public constants. ``first_moments``: the optimizer's first moments where the caller has them,
        ``first_moment_sq``: their per-tensor sums of squares where the fused update formed them."""
        factors = {}
        if self.allocator.statistic == "grad_sq":
            momentum = self._momentum_energy(first_moments, first_moment_sq)
            if momentum is not None:
                sums, factors["stat_noise"], factors["stat_signal"] = momentum
        if callable(sums):
            sums = sums()
        self.last_allocation_input = (None if sums is None else sums.detach().cpu(), shares, factors)
        self.allocator.update(None if sums is None else sums.detach().cpu(), shares, noise_std=noise_std,
                              clip=self._noise_norm(), denom=denom, samples=samples, **factors)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        if not self._mid_logical_batch:
            self.engine.discard()
            self._reset_accumulation()

    def privacy_spent(self, delta: float) -> float:
        """Epsilon spent so far at this delta (Opacus accountant)."""
        return self.accountant.get_epsilon(delta)

    def projected_epsilon(self, delta: float, total_steps: int) -> float:
        """Epsilon at this delta after ``total_steps`` steps in all, the rest at the current noise
        multiplier and sample rate."""
        acc = Accountant(self.accountant.name)
        acc.history = list(self.accountant.history)
        if total_steps > self.accountant.steps:
            acc.history.append((self.noise_multiplier, self.sample_rate, total_steps - self.accountant.steps))
        return acc.get_epsilon(delta)

    # --- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly: the wrapped optimizer, accountant,
        allocation, noise seed and step, the Poisson sampler's RNG, and torch's global RNG states
        (CPU and every CUDA device: dropout draws from them), restored by load_state_dict."""
        if self._chunks:
            raise RuntimeError("state_dict() in the middle of a logical batch: save after optimizer.step()")
        state = {"optimizer": self.original_optimizer.state_dict(), "allocator": self.allocator.state_dict(),
                 "accountant": self.accountant.state_dict(), "step_count": self.step_count, "seed": self.seed,
                 "privacy": self.privacy_settings(), "skipped_samples": self.skipped_samples,
                 "rng": {"torch": torch.get_rng_state(),
                         "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
        if hasattr(self.data_loader, "state_dict"):
            state["data_loader"] = self.data_loader.state_dict()
        if self.noise_variance is not None:
            state["noise_variance"] = self.noise_variance.state_dict()
        clipping = self.clip.state_dict()
        if clipping:
            state["clipping"] = clipping
        return state

    def privacy_settings(self) -> dict:
        """What the privacy guarantee of a run depends on; a checkpoint holds them and loads only into an
        optimizer made with the same ones."""
        return {"noise_multiplier": self.noise_multiplier, "max_grad_norm": self.max_grad_norm,
                "allocation": self.allocator.mode, "allocation_config": asdict(self.allocator.config),
                "clipping": self.clipping, "accountant": self.accountant.name, "sample_rate": self.sample_rate,
                "expected_batch_size": self.expected_batch_size, "loss_reduction": self.loss_reduction,
                "secure_mode": self.secure_mode, "target_epsilon": self.target_epsilon,
                "target_delta": self.target_delta, "budget_steps": self.budget_steps,
                **self.clip.privacy_settings()}

    def _check_privacy_settings(self, state: dict) -> None:
        saved = state.get("privacy") or {k: state[k] for k in ("noise_multiplier", "max_grad_norm") if k in state}
        if "privacy" not in state and "allocator" in state:
            saved["allocation"] = state["allocator"].get("mode")
        mine = self.privacy_settings()

        def same(a, b):
            if isinstance(a, float) and isinstance(b, float):
                return math.isclose(a, b, rel_tol=1e-12)
            return a == b
        differ = [f"{k}: checkpoint {saved[k]!r}, this optimizer {mine[k]!r}" for k in mine
                  if k in saved and not same(saved[k], mine[k])]
        if differ:
            raise ValueError("the checkpoint was saved by a run with other privacy settings (" + "; ".join(differ)
                             + "): continuing it here would change the noise or the accounting mid-run. Make the "
                             "optimizer with the checkpoint's settings, or start a new run from the model alone.")

    def load_state_dict(self, state: dict) -> None:
        self._check_privacy_settings(state)
        if self.noise_variance is not None:
            if "noise_variance" not in state:
                raise ValueError("the checkpoint was saved without adam_noise_correction: this optimizer corrects "
                                 "Adam's second moment by a running average it does not hold. Make the optimizer "
                                 "as the checkpoint's run was made: make_private(..., adam_noise_correction=False), "
                                 "the default")
            self.noise_variance.load_state_dict(state["noise_variance"])
        elif "noise_variance" in state:
            raise ValueError("the checkpoint was saved with adam_noise_correction: make the optimizer with it too")
        self._state_cache = None
        self.original_optimizer.load_state_dict(state["optimizer"])
        self.allocator.load_state_dict(state["allocator"])
        self.accountant.load_state_dict(state["accountant"])
        if self.clip.state_dict():
            if "clipping" not in state:
                raise ValueError("the checkpoint holds no per-layer thresholds: it was saved by a run with other "
                                 "clipping; make the optimizer with that run's clipping")
            self.clip.load_state_dict(state["clipping"])
        self.step_count, self.skipped_samples = state["step_count"], state["skipped_samples"]
        self.seed = None if self.secure_mode else state["seed"]
        if "data_loader" in state and hasattr(self.data_loader, "load_state_dict"):
            self.data_loader.load_state_dict(state["data_loader"])
        if "rng" in state:
            torch.set_rng_state(state["rng"]["torch"])
            if state["rng"]["cuda"] and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self._reset_accumulation()
