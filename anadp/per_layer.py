"""DP step under per-layer clipping (``clipping="per_layer"``): each noise group is clipped to
its own threshold inside the backward, as soon as the last record of its tensors arrives, and
at the last physical chunk of a logical batch its noise and update follow in the backward
(DPOptimizer's phase "release the tensors", run by the hooks in batches of RELEASE_BATCH
elements: one multi-tensor launch per batch, not one per layer). A large Linear weight kept as
(A, G) is clipped in one pass over its per-sample gradients (``_clip_one_pass``).

A group is complete when each of its tensors has one record per call of each layer holding it
(``engine.expected_records``): a weight tied to two layers is complete after the second one's
backward, which has formed its input gradient before handing over its record, so the weight
never changes before every use of it is done. Groups that no backward completes (a layer whose
output the loss ignores) are clipped when the backward ends, and noised at ``step()``.
``step()`` runs the remaining phases of DPOptimizer's template (the wrapped optimizer on the
privatized gradients on the torch backend, the thresholds' release, the allocation). The
accountant is charged when the backward that releases a step begins.
"""
from __future__ import annotations

import math
import warnings

import torch

from . import records as R
from .clipping import AdaptiveClipping, PerLayerClipping
from .engine import PhysicalBatch
from .optimizer import DPOptimizer


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

    def _make_clipping(self) -> PerLayerClipping:
        if self.distributed and self._adaptive_arg is not None:
            raise ValueError("adaptive per-layer thresholds are not supported in distributed runs yet (each rank "
                             "would count only its own samples); give fixed thresholds")
        a = self.allocator
        a.per_layer = True  # no share release: the per-sample energies are the (public) thresholds
        return PerLayerClipping(self._thresholds_arg, self.group_names, bool((a.group_of < 0).any()),
                                self._adaptive_arg)

    def _setup_clipping(self) -> None:
        """Called at the end of DPOptimizer.__init__: the hooks' tables."""
        self._col = self.allocator._col.tolist()  # group column of each tensor, rest = n_groups
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

    def _reset_accumulation(self):
        super()._reset_accumulation()
        self._remaining: dict = {}  # group -> records still to come in this backward
        self._clipped: set = set()  # groups clipped in this backward
        self._hook_plan = None  # the step the hooks release (the last chunk of a logical batch)
        self._waiting: list = []  # clipped tensors of that step not yet released (see RELEASE_BATCH)
        self._waiting_numel = 0
        self._chunk_open = False
        self._cache = R.BatchCache()
        self._pending: dict = {}  # records of complete groups waiting to be clipped together (CLIP_BATCH)
        self._pending_groups: list = []
        self._pending_numel = 0
        self._bad = None
        self._sq_total = None

    # --- in the backward ----------------------------------------------------------------
    def _open_chunk(self) -> None:
        """First record of a backward: the chunk protocol, and at the last chunk of a logical batch
        the plan of the step the hooks release (checked, budgeted and charged here: it is released
        in this backward whether or not step() follows)."""
        eng = self.engine
        if self._hook_plan is not None:
            raise RuntimeError("a backward pass after per-layer clipping released a step in the backward, without "
                               "optimizer.step() in between: call optimizer.step() after every logical batch's "
                               "backward (it completes the step; the noise stream advances there)")
        self._check_chunk(eng._chunk_id)
        self._chunk_open = True
        self._remaining, self._clipped = {}, set()
        if self._in_hook and eng._ends_logical and self._logical_batches == 0:
            self._check_unchanged()
            self._check_budget(1)
            plan = self._plan(1, self._step_seed())
            self._charge_once(plan)
            self._hook_plan = plan

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
            records = self.engine._records
            self._pend(g, {self.params[j]: records.pop(self.params[j])
                           for j in self.members[g] if self.params[j] in records})

    def _wait(self, idx: list) -> None:
        """Release clipped tensors of the hooks' step in batches of RELEASE_BATCH elements: one
        multi-tensor noise (+ update) launch per batch, not one per layer."""
        self._waiting += idx
        self._waiting_numel += sum(self.params[i].numel() for i in idx)
        if self._waiting_numel >= self.RELEASE_BATCH:
            self._release_waiting()

    def _release_waiting(self) -> None:
        if self._waiting:
            self._check_finite()
            self._release_tensors(self._hook_plan, self._waiting)
        self._waiting, self._waiting_numel = [], 0

    def _check_finite(self) -> None:
        """nonfinite="raise": no clipped sum of a non-finite per-sample gradient is released (one check
        of the norms clipped since the last release, not one per layer)."""
        sq = self._sq_total
        if self.nonfinite == "raise" and sq is not None and not math.isfinite(float(sq.sum())):
            bad = ~torch.isfinite(sq)
            raise FloatingPointError(
                f"non-finite per-sample gradient in {int(bad.sum())} of {len(sq)} samples; check the loss and "
                "learning rate, or pass nonfinite='skip' to drop such samples (counted in "
                "optimizer.skipped_samples). Under per-layer clipping the layers released earlier in this backward "
                "have taken their step")

    # released per layer, at the latest when this many elements wait (1: every layer in its own hook)
    RELEASE_BATCH = 1 << 20
    # complete groups whose records hold at most CLIP_BATCH / 4 numbers wait to be clipped together,
    # until CLIP_BATCH numbers wait: their norms and clipped sums then take one product per stack of
    # one shape (PhysicalBatch), not ~35 small ops per group; the records they keep bound the memory
    CLIP_BATCH = 1 << 22

    def _pend(self, g: int, recs: dict) -> None:
        """A complete group: clipped now (large records), or kept to be clipped with others."""
        self._clipped.add(g)
        numel = sum(R.kept_numel(r) for rs in recs.values() for r in rs)
        if numel > self.CLIP_BATCH // 4:
            self._clip_groups([g], recs)
            return
        self._pending_groups.append(g)
        self._pending.update(recs)
        self._pending_numel += numel
        if self._pending_numel >= self.CLIP_BATCH:
            self._clip_pending()

    def _clip_pending(self) -> None:
        if self._pending_groups:
            groups, recs = self._pending_groups, self._pending
            self._pending_groups, self._pending, self._pending_numel = [], {}, 0
            self._clip_groups(groups, recs)

    @torch.no_grad()
    def _clip_groups(self, groups: list, recs: dict) -> None:
        """Clip each group's samples to its C_g and add the clipped sums (records consumed); at the
        hooks' step their tensors then wait for release."""
        if len(groups) == 1 and self._clip_one_pass(groups[0], recs):
            recs = {}
        if recs:
            B = next(iter(recs.values()))[0].batch_size
            scale = float(B) if self.loss_reduction == "mean" else 1.0
            batch = PhysicalBatch(recs, B, 1.0, True, cache=self._cache)  # Gram matrices shared over groups
            keys, S = batch.sq_rows()  # (rows, B), one product per stack of records of one shape
            if S.dtype not in (torch.float32, torch.float64):
                S = S.float()
            where = {g: k for k, g in enumerate(groups)}
            pos = [where[self._col[self.index[p]]] for p in keys]
            if len(groups) == 1:
                sq = S.sum(0, keepdim=True)
            else:  # a 0/1 product, not index_add_ (atomics: not bitwise reproducible on a GPU)
                M = torch.zeros(len(groups), len(keys), dtype=S.dtype, device=S.device)
                M[pos, range(len(keys))] = 1
                sq = M @ S
            sq = sq * scale ** 2  # (groups, B): each sample's squared norm in each group
            # "raise": checked once per release (_check_finite), before anything of these groups leaves;
            # "skip": here, so that the bad samples can be dropped from the records still at hand
            total = sq.sum(0)
            if self.nonfinite == "skip" and (self._bad is not None or not math.isfinite(float(total.sum()))):
                total = self._drop_nonfinite(total, batch)
                sq = torch.where(self._bad, 0, sq)
            c = self.clip.factors(sq.sqrt(), groups)
            if self._bad is not None:
                c = torch.where(self._bad, 0, c)
            cs = c * scale  # the records hold the gradients of the reduced loss
            rows = dict(zip(keys, pos))
            for p, s in batch.clipped_sums(cs, list(recs), rows).items():
                self._add_to_sum(self.index[p], s)
            self._sq_total = total if self._sq_total is None else self._sq_total + total
        if self._hook_plan is not None:
            self._wait([i for g in groups for i in self.members[g]])

    def _clip_one_pass(self, g: int, recs: dict) -> bool:
        """A group of one Linear weight kept as (A, G) and its bias: the weight's per-sample gradients
        a chunk at a time (records.LinearRecord.one_pass), one product per layer as in a non-private
        step. False (nothing consumed) where it does not apply: several records of a tensor, 16-bit or
        GPU records, nonfinite="skip" (which drops samples from every group of the batch)."""
        if self.nonfinite != "raise" or any(len(rs) != 1 for rs in recs.values()):
            return False
        weights = [p for p, rs in recs.items() if isinstance(rs[0], R.LinearRecord)]
        if len(weights) != 1 or not recs[weights[0]][0].one_pass_applies():
            return False
        w = weights[0]
        rec, others = recs[w][0], [p for p in recs if p is not w]
        scale = float(rec.batch_size) if self.loss_reduction == "mean" else 1.0
        extra = None
        for p in others:
            extra = recs[p][0].sq_norm() if extra is None else extra + recs[p][0].sq_norm()

        def factors(sq: torch.Tensor) -> torch.Tensor:  # the records hold the gradients of the reduced loss
            return self.clip.factors((sq * scale ** 2).sqrt()[None], [g])[0] * scale

        sq, cs, s = rec.one_pass(factors, extra, self._cache)
        self._add_to_sum(self.index[w], s)
        for p in others:
            self._add_to_sum(self.index[p], recs[p][0].clipped_sum(cs))
        sq = sq * scale ** 2
        self._sq_total = sq if self._sq_total is None else self._sq_total + sq
        return True

    def _drop_nonfinite(self, total: torch.Tensor, batch: PhysicalBatch) -> torch.Tensor:
        """Samples with a non-finite gradient: raise, or drop them from these groups and the ones after
        them in the backward."""
        bad = ~torch.isfinite(total)
        if bool(bad.any()):
            names = [self.engine.names[p] for p in batch.records]
            msg = (f"non-finite per-sample gradient in {int(bad.sum())} of {batch.batch_size} samples "
                   f"(parameters: {names[:3]})")
            if self.nonfinite == "raise":
                raise FloatingPointError(msg + "; check the loss and learning rate, or pass nonfinite='skip' to drop "
                                         "such samples (counted in optimizer.skipped_samples). Under per-layer "
                                         "clipping the layers before it in the backward may have been updated")
            if self._bad is None:
                warnings.warn(msg + ": these samples are dropped from the step (from these groups and the ones "
                              "after them in the backward)")
            self._bad = bad if self._bad is None else self._bad | bad
        batch.drop(self._bad)
        return torch.where(self._bad, 0, total)

    # --- after the backward ---------------------------------------------------------------
    def _accumulate(self, batch) -> None:
        """End of a backward: clip the groups no hook completed, count the chunk; at the hooks' step,
        release every tensor still waiting (all are clipped now)."""
        if not self._chunk_open:
            self._open_chunk()
        self._clip_pending()
        groups, recs = [], {}
        for p, rs in batch.records.items():
            i = self.index.get(p)
            if i is not None:
                g = self._col[i]
                if g in self._clipped:
                    raise RuntimeError(f"group {g} got records after it was clipped in this backward")
                if g not in groups:
                    groups.append(g)
                recs[p] = rs
        if groups:
            self._clip_groups(groups, recs)
        if self._bad is not None:
            self.skipped_samples += int(self._bad.sum())
            self._bad = None
        if self._hook_plan is None:
            self._check_finite()
        self.last_per_sample_norms = None if self._sq_total is None else self._sq_total.sqrt()
        self._cache = R.BatchCache()
        self._chunk_open = False
        self._count_chunk(batch.ends_logical)
        if self._hook_plan is not None:
            with torch.no_grad():
                self._release_waiting()
                self._check_finite()
                self._release_tensors(self._hook_plan, self._unreleased(self._hook_plan))
        self._sq_total = None

    def _begin_step(self):
        """The hooks' step where they released one (the rest of it was released when the backward
        ended), else the whole step here (distributed, an empty Poisson batch, several logical
        batches before one step)."""
        if self._hook_plan is None:
            return super()._begin_step()
        self.engine.flush()
        self._check_unchanged()
        plan, self._hook_plan = self._hook_plan, None
        return plan

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._hook_plan is not None:
            raise RuntimeError("zero_grad() between the backward and optimizer.step() under per-layer clipping: the "
                               "backward already began releasing this step (it is charged; noise, and on a kernel "
                               "backend the update, are under way); "
                               "call optimizer.step() first, and zero_grad() before the next backward")
        super().zero_grad(set_to_none)
