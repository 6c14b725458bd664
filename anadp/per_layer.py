"""DP step under per-layer clipping (``clipping="per_layer"``): each noise group is clipped to
its own threshold inside the backward, as soon as the last record of its tensors arrives, and
at the last physical chunk of a logical batch its noise and update follow in the same hook.

A group is complete when each of its tensors has one record per call of each layer holding it
(``engine.expected_records``): a weight tied to two layers is complete after the second one's
backward, which has formed its input gradient before handing over its record, so the weight
never changes before every use of it is done. Groups that no backward completes (a layer whose
output the loss ignores) are clipped when the backward ends, and noised at ``step()``.
``step()`` finishes what the hooks left (those groups, the thresholds' release, the allocation)
and, on the torch backend, calls the wrapped optimizer on the privatized gradients the hooks
formed. The accountant is charged when the first group of a step is released.
"""
from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import torch

from . import philox
from . import records as R
from . import update_table as U
from .backends import cpu as cpu_kernels
from .clipping import AdaptiveClipping, PerLayerClipping
from .optimizer import DPOptimizer

# noise stream of the thresholds' count release (the share release's is 2^32 - 1)
COUNT_STREAM = 2**32 - 2


def total_threshold(max_grad_norm) -> float:
    """C = sqrt(sum_g C_g^2) of a float, list or dict of per-layer thresholds."""
    if isinstance(max_grad_norm, dict):
        return math.sqrt(sum(float(v) ** 2 for v in max_grad_norm.values()))
    if isinstance(max_grad_norm, (list, tuple)):
        return math.sqrt(sum(float(v) ** 2 for v in max_grad_norm))
    return float(max_grad_norm)


class PerLayerDPOptimizer(DPOptimizer):
    def __init__(self, optimizer, engine, *, max_grad_norm, adaptive_clipping: AdaptiveClipping | None = None,
                 **kwargs):
        kwargs["clipping"] = "per_layer"
        self._thresholds_arg = max_grad_norm
        self._adaptive_arg = adaptive_clipping
        super().__init__(optimizer, engine, max_grad_norm=total_threshold(max_grad_norm), **kwargs)

    def _setup_clipping(self) -> None:
        """Called at the end of DPOptimizer.__init__ (the groups known)."""
        if self.distributed and self._adaptive_arg is not None:
            raise ValueError("adaptive per-layer thresholds are not supported in distributed runs yet (each rank "
                             "would count only its own samples); give fixed thresholds")
        a = self.allocator
        a.per_layer = True  # no share release: the per-sample energies are the (public) thresholds
        self._col = a._col.tolist()  # group column of each tensor, rest = n_groups
        has_rest = bool((a.group_of < 0).any())
        self.clip = PerLayerClipping(self._thresholds_arg, self.group_names, has_rest, self._adaptive_arg)
        self.members: dict = {}
        for i, g in enumerate(self._col):
            self.members.setdefault(g, []).append(i)
        self._fused_gemm = False  # the hooks form the clipped sums
        # noise + update in the hook at the last chunk; distributed runs all-reduce first, at step()
        self._in_hook = not self.distributed
        self.engine.on_record = self._on_record
        self.engine.instantiate_linear = True  # the torch norms (per group, in the hook)

    @property
    def max_grad_norms(self) -> dict:
        """{group name: C_g} of the next step (the rest group as '<rest>', where it has tensors)."""
        names = list(self.group_names) + (["<rest>"] if self.clip.has_rest else [])
        return dict(zip(names, self.clip.thresholds.tolist()))

    @property
    def gradient_noise_multiplier(self) -> float:
        return self.clip.noise_multipliers(self.noise_multiplier)[0]

    @property
    def _stat_clip(self) -> float:
        return self._noise_total()

    def _noise_total(self) -> float:
        """K: group g's noise std is sigma_g * w_g * K."""
        w = torch.cat([self.allocator.group_scales, torch.ones(1, dtype=torch.float64)])
        return self.clip.noise_total(w)

    def _reset_accumulation(self):
        super()._reset_accumulation()
        self._remaining: dict = {}  # group -> records still to come in this backward
        self._clipped: set = set()  # groups clipped in this backward
        self._finished: set = set()  # tensors noised (and, fused, updated) in this step
        self._plan = None  # (k, seed, std, denom, fused) of a step released in the hooks
        self._chunk_open = False
        self._cache = R.BatchCache()
        self._sens = None
        self._moment_sq = None
        self._bad = None
        if hasattr(self, "clip"):
            self.clip.reset_counts()

    # --- in the backward ----------------------------------------------------------------
    def _open_chunk(self) -> None:
        """First record of a backward: the chunk protocol, and at the last chunk of a logical batch
        the plan of the step the hooks release."""
        eng = self.engine
        if self._finished:
            raise RuntimeError("a backward pass after per-layer clipping released a step in the backward, without "
                               "optimizer.step() in between: call optimizer.step() after every logical batch's "
                               "backward (it completes the step; the noise stream advances there)")
        self._check_chunk(SimpleNamespace(chunk_id=eng._chunk_id))
        self._chunk_open = True
        self._remaining, self._clipped = {}, set()
        if self._in_hook and eng._ends_logical and self._logical_batches == 0:
            self._plan = self._release_plan()

    def _release_plan(self):
        """(k, seed, std, denom, fused): the checks of _begin_step, the budget, the seed, the charge."""
        self.engine.check_unchanged()
        if sum(len(g["params"]) for g in self.original_optimizer.param_groups) != self._n_wrapped:
            raise RuntimeError("the wrapped optimizer's parameters changed after make_private (add_param_group?): "
                               "its step would update them with gradients that anadp neither clipped nor noised. "
                               "Build the optimizer with all its parameters, then call make_private.")
        self._check_budget(1)
        seed = self._step_seed()
        std = self.gradient_noise_multiplier * self._noise_total()
        denom = float(self.expected_batch_size) if self.loss_reduction == "mean" else 1.0
        fused = self._fused_plan(seed, std, denom)
        self._charge(1)  # released here: charged here, whether or not step() follows
        return 1, seed, std, denom, fused

    def _fused_plan(self, seed: int, std: float, denom: float):
        """(optimizer kind, states, hyperparameter rows, noise keys) of a fused step, or None (torch path)."""
        if not self._fused_update:
            return None
        opt = self.original_optimizer
        kind = U.kind_of(opt)
        states, rows = self._fused_rows(opt, kind, std, denom)
        keys = cpu_kernels.group_keys(seed, self.step_count, self.noise_ids)
        self._sens = torch.zeros(len(self.params), dtype=torch.float64, device=self.params[0].device)
        return kind, states, rows.to(self.params[0].device), keys

    def _on_record(self, p) -> None:
        if not self._chunk_open:
            self._open_chunk()
        i = self.index.get(p)
        if i is None:
            return  # not in the optimizer: never updated, dropped at the end of the backward
        g = self._col[i]
        left = self._remaining.get(g)
        if left is None:
            if g in self._clipped:
                raise RuntimeError(
                    f"parameter '{self.engine.names[p]}' got a record after its group was clipped in this backward "
                    "(a layer called during the backward, e.g. by activation checkpointing's recomputation?): "
                    "per-layer clipping cannot include it. Use clipping='whitened' with this model.")
            left = sum(self.engine.expected_records(self.params[j]) for j in self.members[g])
        left -= 1
        self._remaining[g] = left
        if left == 0:
            del self._remaining[g]
            self._clip_group(g, {self.params[j]: self.engine._records.pop(self.params[j])
                                 for j in self.members[g] if self.params[j] in self.engine._records})
            if self._plan is not None:
                self._release(self.members[g])

    def _clip_group(self, g: int, recs: dict) -> None:
        """Clip group g's samples to C_g and add the clipped sums (records consumed)."""
        self._clipped.add(g)
        if not recs:
            return
        B = next(iter(recs.values()))[0].batch_size
        scale = float(B) if self.loss_reduction == "mean" else 1.0
        sq = None
        for r in recs.values():
            s = R.sq_norm(r, self._cache)
            sq = s if sq is None else sq + s
        if sq.dtype not in (torch.float32, torch.float64):
            sq = sq.float()
        sq = sq * scale ** 2
        bad = ~torch.isfinite(sq)
        if bool(bad.any()):
            names = [self.engine.names[p] for p in recs]
            msg = f"non-finite per-sample gradient in {int(bad.sum())} of {B} samples (parameters: {names[:3]})"
            if self.nonfinite == "raise":
                raise FloatingPointError(msg + "; check the loss and learning rate, or pass nonfinite='skip' to drop "
                                         "such samples (counted in optimizer.skipped_samples). Under per-layer "
                                         "clipping the layers after it in the backward order may have been updated")
            if self._bad is None:
                warnings.warn(msg + ": these samples are dropped from the step (from this group and the ones after "
                              "it in the backward)")
            self._bad = bad if self._bad is None else self._bad | bad
        if self._bad is not None:
            sq = torch.where(self._bad, 0, sq)
            for r in recs.values():
                for rec in r:
                    rec.drop(self._bad)
        c = self.clip.factors(g, sq)
        if self._bad is not None:
            c = torch.where(self._bad, 0, c)
        cs = c * scale  # the records hold the gradients of the reduced loss
        for p, r in recs.items():
            self._add_to_sum(self.index[p], R.clipped_sum(r, cs, self._cache))
        self._sq_total = sq if getattr(self, "_sq_total", None) is None else self._sq_total + sq

    def _release(self, idx: list) -> None:
        """Noise (and, fused, the update) of tensors ``idx`` at the plan's step."""
        k, seed, std, denom, fused = self._plan
        w = self.allocator.scales
        if fused is not None:
            kind, states, rows, keys = fused
            stat = self.allocator.statistic or "abs_p_grad"
            m2 = self._update_tensors(idx, kind, states, rows, keys, std > 0, stat, self._sens)
            if m2 is not None:
                self._moment_sq = m2 if self._moment_sq is None else self._moment_sq + m2
            for i in idx:
                self._summed[i] = None  # p.grad holds it where the backend stores it
        else:
            keys = cpu_kernels.group_keys(seed, self.step_count, [self.noise_ids[i] for i in idx])
            grads = [torch.zeros(self.params[i].shape, device=self.params[i].device, dtype=self._sum_dtypes[i])
                     if self._summed[i] is None else self._summed[i].contiguous() for i in idx]
            ws = [float(w[i]) for i in idx]
            if std > 0:
                self.impl.add_noise_multi_(grads, keys, [std * s for s in ws])
            torch._foreach_mul_(grads, [self._feed_scale(s) / denom for s in ws])
            for i, gr in zip(idx, grads):
                self._summed[i] = gr
        self._finished.update(idx)

    # --- after the backward ---------------------------------------------------------------
    def _accumulate(self, batch) -> None:
        """End of a backward: clip the groups no hook completed, count the chunk."""
        if not self._chunk_open:
            self._open_chunk()
        by_group: dict = {}
        for p, recs in batch.records.items():
            i = self.index.get(p)
            if i is not None:
                by_group.setdefault(self._col[i], {})[p] = recs
        for g, recs in by_group.items():
            if g in self._clipped:
                raise RuntimeError(f"group {g} got records after it was clipped in this backward")
            self._clip_group(g, recs)
        if self._bad is not None:
            self.skipped_samples += int(self._bad.sum())
            self._bad = None
        sq = getattr(self, "_sq_total", None)
        self.last_per_sample_norms = None if sq is None else sq.sqrt()
        self._sq_total = None
        self._cache = R.BatchCache()
        self._chunk_open = False
        self._chunks += 1
        self._logical_batches += int(batch.ends_logical)
        self._last_ends_logical = batch.ends_logical

    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        before = self.step_count
        self.engine.flush()
        if self._plan is not None and not self._mid_logical_batch:
            self._step_released()
        elif self._mid_logical_batch:
            self.engine.check_unchanged()
        else:
            self._step_at_end()
        self.stepped = self.step_count > before
        return loss

    @torch.no_grad()
    def _step_released(self) -> None:
        """The hooks released this step: noise the tensors they did not reach, then the update."""
        k, seed, std, denom, fused = self._plan
        rest = [i for i in range(len(self.params)) if i not in self._finished]
        if rest:
            self._release(rest)
        self._complete(k, seed, std, denom, fused)

    @torch.no_grad()
    def _step_at_end(self) -> None:
        """No hook released this step (distributed, an empty Poisson batch, several logical batches
        before one step): the whole step here."""
        plan = self._begin_step()
        if plan is None:
            return
        k, seed, _, denom = plan
        std = self.gradient_noise_multiplier * self._noise_total()
        fused = self._fused_plan(seed, std, denom)
        self._plan = (k, seed, std, denom, fused)
        self._release(list(range(len(self.params))))
        self._charge(k)
        self._complete(k, seed, std, denom, fused)

    def _complete(self, k: int, seed: int, std: float, denom: float, fused) -> None:
        samples = self.expected_batch_size * k
        shares = self._public_shares(samples)
        self._release_counts(seed, samples)
        if fused is None:
            self._released = (shares, std / denom, denom, samples)
            self.apply(self._summed)  # the wrapped optimizer's step; advances step_count, resets
            return
        kind, states, _, _ = fused
        U.finish_step(self.original_optimizer, self.params, self._step_tensors)
        self._update_allocation(self._sens if self.allocator.statistic else None, shares, std / denom, denom,
                                samples, first_moments=[m for m, _ in states], first_moment_sq=self._moment_sq)
        self.step_count += 1
        self._reset_accumulation()

    def _public_shares(self, samples: float) -> torch.Tensor:
        """What the allocation reads instead of a share release: each group's clipped whitened energy
        per sample bounded by its threshold, (C_g / w_g)^2 / K^2 (the thresholds are public)."""
        w = torch.cat([self.allocator.group_scales, torch.ones(1, dtype=torch.float64)])
        t = self.clip.thresholds / w
        return samples * t.square() / t.square().sum()

    def _release_counts(self, seed: int, samples: float) -> None:
        z_b = self.clip.noise_multipliers(self.noise_multiplier)[1]
        noise = None
        if self.clip.adaptive is not None and z_b > 0:
            noise = torch.zeros(self.clip.n_groups, dtype=torch.float32)
            self.share_noise_backend.add_noise_(noise, philox.group_key(seed, self.step_count, COUNT_STREAM), 1.0)
        self.clip.release(noise, z_b, samples)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._finished and self._plan is not None:
            raise RuntimeError("zero_grad() between the backward and optimizer.step() under per-layer clipping: the "
                               "backward already released this step (noise, and on a kernel backend the update); "
                               "call optimizer.step() first, and zero_grad() before the next backward")
        super().zero_grad(set_to_none)

    # --- checkpoints ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["clipping"] = self.clip.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.clip.load_state_dict(state["clipping"])

    def privacy_settings(self) -> dict:
        s = super().privacy_settings()
        a = self._adaptive_arg
        s["per_layer_thresholds"] = self.clip.thresholds.tolist() if a is None else "adaptive"
        s["adaptive_clipping"] = None if a is None else vars(a).copy()
        return s
