"""The DP optimizer: wraps the user's torch optimizer; its step is a short template of named phases.

Per physical batch (after its backward, or inside it under per-layer clipping) the engine hands
the records to the accumulator (anadp.accumulator, anadp.per_layer): per-sample norms, clip
factors, clipped sums per tensor. Per logical batch, ``step`` runs the phases: begin (finish the
clipped sums, plan), release the tensors (noise from the Philox stream, and in the fused kernels
the update: anadp.release), update (the wrapped optimizer, torch path), release the statistics
(the allocation's shares, the clipping's counts), charge the accountant (anadp.accounting's
ledger), allocate the next step's scales (anadp.allocation_feed), advance. The collaborators never
import this module; checkpoints are anadp.checkpoint's.
"""
from __future__ import annotations

import math
import os
import warnings

import torch
from torch.optim import Optimizer

from . import adam_correction, checkpoint, philox
from .accounting import PrivacyLedger
from .accumulator import ClippedSums, WhitenedAccumulator
from .allocation import AllocationConfig, NoiseAllocator, kind_of, named_scales, noise_groups
from .clipping import AdaptiveClipping, FlatClipping, PerLayerClipping
from .engine import GradSampleEngine, check_loss_reduction
from .allocation_feed import AllocationFeed
from .per_layer import PerLayerAccumulator, per_layer_clipping, total_threshold
from .reducer import Reducer, broadcast_seed
from .release import Release, choose_kernels
from .step_plan import StepPlan
from .tensors import CLIPPING_STREAM, TensorTable
from . import update_table as U

_FOREACH = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _delegated(name: str, owner: str = "original_optimizer") -> property:
    """An attribute read and written on a collaborator (the wrapped optimizer by default)."""
    return property(lambda self: getattr(getattr(self, owner), name),
                    lambda self, value: setattr(getattr(self, owner), name, value))


def random_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


def check_arguments(optimizer, *, noise_multiplier, max_grad_norm, expected_batch_size, allocation, clipping,
                    loss_reduction, seed, secure_mode, nonfinite) -> None:
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
    check_loss_reduction(loss_reduction)
    if expected_batch_size <= 0:
        raise ValueError(f"expected_batch_size must be > 0, got {expected_batch_size}")
    if secure_mode and seed is not None:
        raise ValueError("secure_mode draws every step's noise seed from the OS CSPRNG: do not pass a seed")


class DPOptimizer(Optimizer):
    def __init__(self, optimizer: Optimizer, engine: GradSampleEngine, *, noise_multiplier: float,
                 max_grad_norm: float | list | dict, expected_batch_size: int, sample_rate: float,
                 allocation: str = "anadp", allocation_config: AllocationConfig | None = None,
                 clipping: str = "whitened", accountant: str = "prv", loss_reduction: str = "mean",
                 seed: int | None = None, secure_mode: bool = False, nonfinite: str = "raise",
                 data_loader=None, distributed: bool = False, backend: str = "auto",
                 target_epsilon: float | None = None, target_delta: float | None = None,
                 budget_steps: int | None = None, adam_noise_correction: bool | float | None = False,
                 adaptive_clipping: AdaptiveClipping | None = None):
        thresholds = max_grad_norm  # per-layer: a float, list or dict; the total below
        max_grad_norm = total_threshold(max_grad_norm) if clipping == "per_layer" else max_grad_norm
        check_arguments(optimizer, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                        expected_batch_size=expected_batch_size, allocation=allocation, clipping=clipping,
                        loss_reduction=loss_reduction, seed=seed, secure_mode=secure_mode, nonfinite=nonfinite)
        if adam_noise_correction is None:  # on where it can run
            adam_noise_correction = adam_correction.unsupported_reason(optimizer) is None
        if adam_noise_correction is not False:
            why = adam_correction.unsupported_reason(optimizer)
            if why is not None:
                raise ValueError(f"adam_noise_correction corrects Adam's second moment, but {why}: wrap "
                                 "torch.optim.Adam or AdamW (without amsgrad / maximize), or leave it off")

        self.original_optimizer, self.engine = optimizer, engine
        self.tensors = t = TensorTable(optimizer, engine)
        self.params = t.params
        self._n_wrapped = sum(len(g["params"]) for g in optimizer.param_groups)  # see _check_unchanged
        if isinstance(optimizer, _FOREACH):
            for g in optimizer.param_groups:  # multi-tensor (foreach) update, also on the CPU
                if g.get("foreach") is None and not g.get("fused"):
                    g["foreach"] = True
        self.noise_multiplier, self.max_grad_norm = float(noise_multiplier), float(max_grad_norm)
        self.expected_batch_size = expected_batch_size
        self.clipping, self.loss_reduction = clipping, loss_reduction
        self.secure_mode, self.distributed = secure_mode, distributed
        self.seed = None if secure_mode else (seed if seed is not None else random_seed())
        groups, self.group_names = noise_groups([engine.names[p] for p in t.params], [p.shape for p in t.params])
        floor = adam_noise_correction
        self.noise_variance = (None if floor is False else adam_correction.NoiseVariance(
            len(t), adam_correction.DEFAULT_FLOOR if floor is True else float(floor)))
        self.allocator = NoiseAllocator([p.numel() for p in t.params], allocation, allocation_config, groups,
                                        adaptive=not isinstance(optimizer, torch.optim.SGD),
                                        kinds=[kind_of(n) for n in self.group_names],
                                        saturation=1.0 if self.noise_variance is None else self.noise_variance.floor)
        self.clip = (per_layer_clipping(thresholds, adaptive_clipping, self.allocator, self.group_names, distributed)
                     if clipping == "per_layer" else FlatClipping(self.max_grad_norm, whitened=clipping != "global"))
        if self.allocator.config.scales:  # chosen before the data: public
            if clipping != "whitened":
                raise ValueError(f"AllocationConfig.scales needs clipping='whitened' (got {clipping!r}): there the "
                                 "clip weighs each group by 1 / w^2, so any w keeps the guarantee exact")
            self.allocator.group_scales = named_scales(self.allocator.config.scales, self.group_names)
        # the budget the noise was calibrated for (None: noise_multiplier given, no budget to keep)
        self.ledger = PrivacyLedger(accountant, self.noise_multiplier, sample_rate, target_epsilon, target_delta,
                                    budget_steps)
        self.accountant = self.ledger.accountant
        self.data_loader = data_loader
        k = choose_kernels(backend, t, engine, optimizer, distributed)
        self.backend, self.impl, self.share_noise_backend, self.norm_kernels = k.backend, k.impl, \
            k.share_noise_backend, k.norm_kernels
        self._fused_update = k.fused_update
        self.sums = ClippedSums(t)
        self.feed = AllocationFeed(t, self.allocator, self.clip, self.max_grad_norm, optimizer,
                                   self.share_noise_backend)
        self.release = Release(t, self.sums, self.allocator, optimizer, self.impl, k.fused_update,
                               self.noise_variance)
        self.reducer = Reducer(t, self.sums, self.feed) if distributed else None
        common = dict(nonfinite=nonfinite, check_chunks=data_loader is not None)
        if clipping == "per_layer":  # clips in the backward, with the torch norms; the hooks form the sums
            self._fused_gemm, engine.instantiate_linear = False, True
            self.accumulator = PerLayerAccumulator(
                t, self.sums, engine, self.clip, self.feed, release=self.release, begin_step=self._begin_released_step,
                loss_reduction=loss_reduction, allocator=self.allocator, in_hook=not distributed, **common)
        else:
            self._fused_gemm = k.fused_gemm
            engine.instantiate_linear = self.norm_kernels is None  # kernel norms read (A, G)
            if self.norm_kernels is None and not k.fused_gemm and self.reducer is None:
                engine.use_flat(t.params)  # compiled forwards: per-sample gradients in one buffer (anadp.flat)
            self.accumulator = WhitenedAccumulator(t, self.sums, engine, self.clip, self.feed,
                                                   norm_kernels=self.norm_kernels, defer_linear=k.fused_gemm,
                                                   reducer=self.reducer, **common)
        self.step_count = 0
        self.stepped = False  # whether the last step() updated the parameters (see step)
        self._last_plan: StepPlan | None = None
        self._privatized: StepPlan | None = None  # between privatize() and apply()
        self._reset_accumulation()
        engine.accumulator = self.accumulator

    # torch.optim.Optimizer surface, delegated to the wrapped optimizer (LR schedulers use it)
    param_groups = _delegated("param_groups")
    state = _delegated("state")
    defaults = _delegated("defaults")
    # the ledger's settings and the accumulator's outputs
    sample_rate = _delegated("sample_rate", "ledger")
    target_epsilon = _delegated("target_epsilon", "ledger")
    target_delta = _delegated("target_delta", "ledger")
    budget_steps = _delegated("budget_steps", "ledger")
    skipped_samples = _delegated("skipped_samples", "accumulator")
    last_per_sample_norms = _delegated("last_per_sample_norms", "accumulator")
    last_clip_factors = _delegated("last_clip_factors", "accumulator")
    last_released_shares = _delegated("last_released_shares", "feed")
    last_allocation_input = _delegated("last_allocation_input", "feed")

    def __repr__(self) -> str:
        return (f"DPOptimizer(sigma={self.noise_multiplier}, C={self.max_grad_norm}, "
                f"allocation={self.allocator.mode!r}, clipping={self.clipping!r}, wrapped={self.original_optimizer!r})")

    @property
    def noise_scales(self) -> dict:
        """{noise group (the module holding a weight matrix): w_g} used by the next step (1.0 everywhere
        under uniform DP and during the allocation's warm-up, with a warning). The other tensors (norm
        weights, lone biases) form the rest group, whose w stays 1."""
        a = self.allocator
        if a.mode != "uniform" and a.updates < a.config.warmup_steps:
            warnings.warn(f"allocation {a.mode!r} is still in its warm-up: w = 1 for the first "
                          f"{a.config.warmup_steps} steps ({a.updates} taken), so far the same noise as uniform DP "
                          "(AllocationConfig(warmup_steps=...) sets it)", stacklevel=2)
        return dict(zip(self.group_names, self.allocator.group_scales.tolist()))

    @property
    def max_grad_norms(self) -> dict | None:
        """Per-layer clipping: {group name: C_g} of the next step (the rest group as '<rest>', where it
        has tensors); None under whitened or global clipping (one threshold, ``max_grad_norm``)."""
        if not isinstance(self.clip, PerLayerClipping):
            return None
        names = list(self.group_names) + (["<rest>"] if self.clip.has_rest else [])
        return dict(zip(names, self.clip.thresholds.tolist()))

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

    def _reset_accumulation(self) -> None:
        self.sums.reset()
        self.feed.reset()
        self.clip.reset_counts()
        self.accumulator.reset()

    # --- the step template ----------------------------------------------------------------
    def step(self, closure=None):
        """Clip, add noise and update once per logical batch. With physical batches (a logical
        batch split by max_physical_batch_size) the calls for the chunks before the last only
        accumulate: ``self.stepped`` says whether this call updated the parameters (step an LR
        scheduler only then). Per-layer clipping released the tensors in the backward already."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        before = self.step_count
        plan = self._begin_step()
        if plan is not None:  # None: more physical batches of this logical batch to come
            with torch.no_grad():
                self.release.release(plan, plan.unreleased(len(self.tensors)))
                self.release.update(plan)
                self._release_statistics(plan)
                self._charge_once(plan)
                self._allocate(plan)
                self._advance()
        self.stepped = self.step_count > before
        return loss

    def _begin_step(self) -> StepPlan | None:
        """Phase 1, begin: finish accumulation and plan the step (None while a split logical batch
        is still incomplete; the plan of a step the backward released, if it did)."""
        self.engine.flush()
        self._check_unchanged()
        plan = self.accumulator.released_plan()
        if plan is not None:
            return plan
        if self.tensors.shard_mask is not None:
            self.tensors.check_no_shard_grads()
        if self.sums.mid_logical_batch:
            return None
        self.accumulator.check_finite()
        if self.reducer is not None:
            self.reducer.all_reduce()
        k = self.sums.logical_batches
        if k == 0:
            if self.sums.chunks == 0 and not getattr(self.data_loader, "last_batch_empty", False):
                raise RuntimeError("optimizer.step() called without a backward pass through the private model "
                                   "since the last step (call loss.backward() first)")
            k = 1  # an empty Poisson batch: a noise-only step, still a step
        self.ledger.check(k, self.clip.exact_budget)
        return self._plan(k, self._step_seed())

    def _begin_released_step(self) -> StepPlan:
        """The step that per-layer clipping releases in the backward of its logical batch's last chunk:
        checked, budgeted and charged before anything of it leaves."""
        self._check_unchanged()
        self.ledger.check(1, self.clip.exact_budget)
        plan = self._plan(1, self._step_seed())
        self._charge_once(plan)
        return plan

    def _plan(self, k: int, seed: int) -> StepPlan:
        """The step's public constants, and the fused kernels' inputs where they run."""
        std = self.gradient_noise_multiplier * self.feed.noise_norm()
        denom = self.expected_batch_size * k if self.loss_reduction == "mean" else 1.0
        plan = StepPlan(k, seed, std, denom, float(self.expected_batch_size * k), step=self.step_count)
        if self.noise_variance is not None:  # phi_hat: the noise's variance per coordinate in Adam's input
            noise_std, scale = self.release.noise_and_scale(std, denom)
            groups = U.group_of(self.original_optimizer)
            beta2 = torch.tensor([float(groups[id(p)]["betas"][1]) for p in self.params], dtype=torch.float64)
            plan.noise_var = self.noise_variance.advance((noise_std * scale) ** 2, beta2)
        if self._fused_update:
            self.release.plan_fused(plan)
        return plan

    def _release_statistics(self, plan: StepPlan) -> None:
        """Phase 4: the statistics the step releases besides the gradient: the share sums (or, where
        the clipping fixes them, their public bound), and the clipping's own (adaptive thresholds'
        counts, from which it sets the next thresholds)."""
        plan.shares = self.feed.release_shares(plan.seed, plan.step, self.share_noise_multiplier)
        if plan.shares is None:
            plan.shares = self.clip.public_shares(self.allocator.column_scales, plan.samples)
        z = self._noise_multipliers()[2]
        noise = None
        if self.clip.released and z > 0:
            noise = torch.zeros(self.clip.released, dtype=torch.float32)
            self.share_noise_backend.add_noise_(noise, philox.group_key(plan.seed, plan.step, CLIPPING_STREAM), 1.0)
        self.clip.release(noise, z, plan.samples)

    def _charge_once(self, plan: StepPlan) -> None:
        """Phase 5: the accountant, once per step (a step released in the backward was charged then)."""
        if not plan.charged:
            self.ledger.charge(self.clip.charged(self.noise_multiplier, self.allocator.scales), plan.k)
            plan.charged = True

    def _allocate(self, plan: StepPlan) -> None:
        """Phase 6: the next step's scales, from the released outputs."""
        if plan.fused is not None:
            states = plan.fused[1]
            self.feed.update(plan.sens if self.allocator.statistic else None, plan.shares, plan.std / plan.denom,
                             plan.denom, plan.samples, first_moments=[m for m, _ in states],
                             first_moment_sq=plan.moment_sq if plan.moment_tensors == len(self.tensors) else None)
        else:
            self.feed.update(plan.stat_sums, plan.shares, plan.std / plan.denom, plan.denom, plan.samples)
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

    # --- checks --------------------------------------------------------------------------
    def _check_unchanged(self) -> None:
        """The model's trainable parameters and the wrapped optimizer's are still the wrapped ones."""
        self.engine.check_unchanged()
        if sum(len(g["params"]) for g in self.original_optimizer.param_groups) != self._n_wrapped:
            raise RuntimeError("the wrapped optimizer's parameters changed after make_private (add_param_group?): "
                               "its step would update them with gradients that anadp neither clipped nor noised. "
                               "Build the optimizer with all its parameters, then call make_private.")

    def _step_seed(self) -> int:
        """This step's noise seed: fixed, or fresh from the OS CSPRNG (secure mode; rank 0's in DDP)."""
        if not self.secure_mode:
            return self.seed
        seed = random_seed()
        return broadcast_seed(seed, self.params[0].device) if self.distributed else seed

    # --- the torch path in two halves, for callers who want the privatized gradients ------------
    @torch.no_grad()
    def privatize(self) -> list[torch.Tensor] | None:
        """Finish accumulation, noise and scale every group, release the statistics, charge; returns the
        noisy, scaled gradients (None while a split logical batch is still incomplete). ``apply``
        completes the step."""
        plan = self._begin_step()
        if plan is None:
            return None
        plan.fused = plan.sens = None
        self.release.release(plan, plan.unreleased(len(self.tensors)))
        self._release_statistics(plan)
        self._charge_once(plan)
        self._privatized = plan
        return list(self.sums.summed)

    @torch.no_grad()
    def apply(self, grads: list[torch.Tensor]) -> None:
        """The torch path's second half (after ``privatize``): it sees only the privatized gradients."""
        plan = self._privatized or StepPlan(1, 0, 0.0, 1.0, 1.0)
        self._privatized = None
        self.sums.summed = list(grads)
        self.release.update(plan)
        self._allocate(plan)
        self._advance()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.accumulator.before_zero_grad()
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()
        if not self.sums.mid_logical_batch:
            self.engine.discard()
            self._reset_accumulation()

    # --- privacy and checkpoints ----------------------------------------------------------------
    @property
    def steps_left(self) -> int | None:
        """Steps left in the budget the noise was calibrated for (None without target_epsilon)."""
        return self.ledger.steps_left

    def privacy_spent(self, delta: float) -> float:
        """Epsilon spent so far at this delta (Opacus accountant)."""
        return self.ledger.spent(delta)

    def projected_epsilon(self, delta: float, total_steps: int) -> float:
        """Epsilon at this delta after ``total_steps`` steps in all, the rest at the current noise
        multiplier and sample rate."""
        return self.ledger.projected(delta, total_steps)

    def privacy_settings(self) -> dict:
        """What the privacy guarantee of a run depends on (a checkpoint loads only where they agree)."""
        return checkpoint.privacy_settings(self)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly (anadp.checkpoint.optimizer_state)."""
        return checkpoint.optimizer_state(self)

    def load_state_dict(self, state: dict) -> None:
        checkpoint.load_optimizer_state(self, state)
        self._reset_accumulation()
