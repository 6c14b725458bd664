"""The release of a step's tensors: noise on the clipped sums, and where a kernel backend runs it,
the update fused with it (the step template's phase "release the tensors").

Torch path: each clipped sum gets sigma K w_g N(0, 1) from its tensor's Philox stream and is scaled
by feed / denom into the gradient the wrapped optimizer steps on. Fused: Linear weights in the
clipped-GEMM kernel whose epilogue adds the noise and updates, the other tensors in one multi-tensor
launch per dtype; same noise, same arithmetic. ``choose_kernels`` decides which path a run takes.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

from . import adam_correction, backends, kernel_choice, sharding
from . import update_table as U
from .backends import cpu as cpu_kernels


class KernelChoice(NamedTuple):
    backend: str
    impl: object              # the backend (anadp.backends): its noise always
    share_noise_backend: object  # the CPU's, for the statistics' noise (drawn there, not in a GPU launch)
    norm_kernels: object      # the backend where its norm kernels run, else None (torch's norms)
    fused_update: bool        # noise + update in the backend's kernels
    fused_gemm: bool          # Linear weights' clipped sums formed in the update kernel


def choose_kernels(requested: str, tensors, engine, optimizer, distributed: bool) -> KernelChoice:
    """The backend's noise always; its norms and fused update where the parameters and the wrapped
    optimizer allow them, else torch's (with a warning)."""
    params = tensors.params
    device = params[0].device if params else torch.device("cpu")
    backend = backends.resolve(requested, device)
    impl = backends.get(backend)
    kernels = impl.norms or impl.fused_update
    # the GEMM-shaped kernels where a GPU check measured them faster than cuBLAS (kernel_choice)
    norms = impl.norms and kernel_choice.use_kernel("norms", backend)
    why, norm_kernels = None, impl if norms else None
    if kernels and any(p.dtype not in (torch.float32, torch.bfloat16, torch.float16) for p in engine.params):
        why, norm_kernels = "parameters other than float32 / bfloat16 / float16", None
    elif impl.fused_update:
        why = U.unsupported_reason(optimizer)
        if why is None and any(not p.is_contiguous() for p in params):
            why = "non-contiguous parameters"
        if why is None and not params:
            why = "no trainable parameters in the optimizer"
        if why is None and distributed:
            why = "distributed training (the all-reduce needs the clipped sums)"
        if why is None and tensors.shard_mask is not None:
            why = "FSDP2-sharded parameters"
    fused_update = bool(impl.fused_update and why is None)
    fused_gemm = bool(fused_update and impl.fused_gemm and kernel_choice.use_kernel("clipped_gemm", backend))
    if kernels and why is not None and impl.warn_fallback:
        warnings.warn(f"backend {backend!r}: {why}: the update runs in torch"
                      + ("" if norm_kernels is not None else ", and so do the norms"))
    return KernelChoice(backend, impl, backends.get(backends.auto(torch.device("cpu"))), norm_kernels,
                        fused_update, fused_gemm)


class Release:
    def __init__(self, tensors, sums, allocator, optimizer, impl, fused: bool, noise_variance=None):
        self.tensors, self.sums, self.allocator, self.optimizer = tensors, sums, allocator, optimizer
        self.impl, self.fused, self.noise_variance = impl, fused, noise_variance
        self._state_cache = None  # see _fused_rows
        self._step_tensors = None

    def noise_and_scale(self, std: float, denom: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Per tensor (float64): the noise std of its clipped sum, std * w, and what the noisy sum is
        multiplied by before the optimizer sees it, feed / denom."""
        w = self.allocator.scales.double()
        feed = 1.0 / w if self.allocator.whitened_feed else torch.ones_like(w)
        return std * w, feed / denom

    def _feed_scale(self, w: float) -> float:
        """What the noisy gradient of a tensor of noise scale ``w`` is multiplied by before the
        optimizer sees it."""
        return 1.0 / w if self.allocator.whitened_feed else 1.0

    def plan_fused(self, plan) -> None:
        """The fused kernels' inputs of the step ``plan``: optimizer states, hyperparameter rows, keys."""
        opt = self.optimizer
        kind = U.optimizer_kind(opt)
        states, rows = self._fused_rows(opt, kind, plan.std, plan.denom, plan.noise_var)
        device = self.tensors.params[0].device
        plan.fused = (kind, states, rows.to(device), cpu_kernels.group_keys(plan.seed, plan.step, self.tensors.noise_ids))
        plan.sens = torch.zeros(len(self.tensors), dtype=torch.float64, device=device)

    def update(self, plan) -> None:
        """The template's phase "update": the wrapped optimizer's step on the privatized gradients
        (torch path; the fused kernels updated in the release: here only Adam's step counters advance)."""
        t, params = self.tensors, self.tensors.params
        if plan.fused is not None:
            U.finish_step(self.optimizer, params, self._step_tensors)
            return
        for p, g in zip(params, self.sums.summed):  # FSDP2: each rank keeps its shard of g
            p.grad = sharding.as_shard(p, g) if t.sharded[p] else g.to(p.dtype)
        stat = self.allocator.statistic
        if stat == "abs_p_grad":  # p before the update; multi-tensor: ~200 tensors on BERT-base
            prods = torch._foreach_mul([sharding.local(p).detach().float() for p in params],
                                       [sharding.local(p.grad).float() for p in params])
            plan.stat_sums = t.tensor_sums(torch.stack(torch._foreach_norm(prods, 1)))
        elif stat == "grad_sq":  # only needed where the optimizer keeps no first moment
            plan.stat_sums = lambda: t.tensor_sums(  # noqa: E731
                torch.stack(torch._foreach_norm([sharding.local(p.grad) for p in params])).double() ** 2)
        if plan.noise_var is not None:  # Adam with the noise's variance out of v_hat
            adam_correction.adam_step_(self.optimizer, params, plan.noise_var, self.noise_variance.floor * plan.noise_var)
        else:
            self.optimizer.step()
        if t.shard_mask is not None:  # the shards' gradients are spent; None shows an untracked use next time
            for p in params:
                if t.sharded[p]:
                    p.grad = None

    def forget_states(self) -> None:
        """The wrapped optimizer's state was replaced (a checkpoint loaded)."""
        self._state_cache = None

    def release(self, plan, idx: list) -> None:
        """The noise of tensors ``idx`` (and, fused, their update; p.grad where the backend stores it).
        Torch: the privatized gradients replace the clipped sums."""
        if not idx:
            return
        t, sums = self.tensors, self.sums
        if plan.fused is not None:
            kind, states, rows, keys = plan.fused
            stat = self.allocator.statistic or "abs_p_grad"
            deferred = [i for i in idx if i in sums.deferred]
            for i in deferred:
                rec, c = sums.deferred.pop(i)
                prior = sums.summed[i].contiguous() if sums.summed[i] is not None else None
                s = self.impl.clipped_linear_update(rec.A, rec.G, c, t.params[i], kind=kind, row=rows[i],
                                                    key=keys[i], m=states[i][0], v=states[i][1], prior=prior,
                                                    transposed=rec.transposed, has_noise=plan.std > 0, stat=stat)
                plan.sens[i] = s.double().sum()
            rest = [i for i in idx if i not in deferred] if deferred else idx
            m2 = self._update_tensors(rest, kind, states, rows, keys, plan.std > 0, stat, plan.sens)
            if m2 is not None:
                plan.moment_sq = m2 if plan.moment_sq is None else plan.moment_sq + m2
                plan.moment_tensors += len(rest)
            for i in idx:
                sums.summed[i] = None  # in p.grad where the backend stores it
        else:
            sums.materialize_deferred()
            w = self.allocator.scales.tolist()
            ws = [w[i] for i in idx]
            grads = [torch.zeros(sharding.local(t.params[i]).shape, device=t.params[i].device, dtype=t.sum_dtypes[i])
                     if sums.summed[i] is None else sums.summed[i].contiguous() for i in idx]
            if plan.std > 0:  # in place: the sums are ours
                keys = cpu_kernels.group_keys(plan.seed, plan.step, [t.noise_ids[i] for i in idx])
                stds = [plan.std * x for x in ws]
                mine = [k for k, i in enumerate(idx) if i not in t.shard_rows]
                self.impl.add_noise_multi_([grads[k] for k in mine], [keys[k] for k in mine], [stds[k] for k in mine])
                for k, i in enumerate(idx):  # a shard: its elements of the whole tensor's stream
                    if i in t.shard_rows:
                        self.impl.add_noise_from_(grads[k], keys[k], stds[k], t.shard_rows[i].start)
            torch._foreach_mul_(grads, [self._feed_scale(x) / plan.denom for x in ws])
            for i, g in zip(idx, grads):
                sums.summed[i] = g
        plan.released.update(idx)

    def _update_tensors(self, idx: list, kind: int, states: list, rows: torch.Tensor, keys: list, has_noise: bool,
                        stat: str, sens: torch.Tensor) -> torch.Tensor | None:
        """Noise + update of the tensors ``idx`` from their clipped sums, one multi-tensor launch per dtype;
        adds their statistic into ``sens``; returns the per-tensor sums of m^2 after the update (zeros
        elsewhere) where the kernel forms them, else None."""
        t, summed = self.tensors, self.sums.summed
        n, device = len(t), sens.device
        moment_sq = None
        by_dtype: dict = {}
        for i in idx:
            by_dtype.setdefault(t.params[i].dtype, []).append(i)
        for group in by_dtype.values():
            grads = [summed[i].contiguous() if summed[i] is not None
                     else torch.zeros(t.params[i].shape, dtype=torch.float32, device=device) for i in group]
            params = [t.params[i] for i in group]
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
        params = self.tensors.params
        cached = self._state_cache
        if cached is not None and cached[0] is opt.state and cached[1] == len(opt.state):
            states, step_tensors = cached[2], cached[3]  # Adam's state, once created, is updated in place
            firsts = [False] * len(params)
        else:
            states, firsts, groups = [], [], U.group_of(opt)
            for p in params:
                m, v, first = U.ensure_state(opt, p, groups[id(p)])
                states.append((m, v))
                firsts.append(first)
            step_tensors = [opt.state[p]["step"] for p in params] if kind == U.ADAM else None
            if kind == U.ADAM:  # SGD's momentum buffers appear at the first step: ensure_state each time
                self._state_cache = (opt.state, len(opt.state), states, step_tensors)
        self._step_tensors = step_tensors
        steps = (torch.stack(step_tensors).tolist() if step_tensors else [None] * len(params))
        if len(opt.param_groups) == 1 and not any(firsts) and len(set(steps)) <= 1 and params:
            # the common case: one group, one step count, no first step: one row for every tensor
            rows = torch.tensor(U.hyper_row(opt, params[0], False, 0.0, 0.0, opt.param_groups[0]),
                                dtype=torch.float64).expand(len(params), U.N_COLS).clone()
            return states, self._noise_columns(rows, std, denom, noise_var)
        groups = U.group_of(opt)
        combos, which = {}, []
        for p, step, first in zip(params, steps, firsts):
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
        rows[:, U.NOISE_STD], rows[:, U.INV_DENOM] = self.noise_and_scale(std, denom)
        if noise_var is not None:
            rows[:, U.NOISE_VAR] = noise_var
            rows[:, U.VAR_FLOOR] = self.noise_variance.floor * noise_var
        return rows.float()
