"""Per-layer clipping (``clipping="per_layer"``) as an accumulator the optimizer holds: each noise
group is clipped to its own threshold inside the backward, as soon as the last record of its
tensors arrives, and at the last physical chunk of a logical batch its noise and update follow in
the backward (the template's phase "release the tensors", in batches of RELEASE_BATCH elements:
one multi-tensor launch per batch, not one per layer). A large Linear weight kept as (A, G) is
clipped in one pass over its per-sample gradients (``_clip_one_pass``).

A group is complete when each of its tensors has one record per call of each layer holding it
(``engine.expected_records``): a weight tied to two layers is complete after the second one's
backward, which has formed its input gradient before handing over its record, so the weight
never changes before every use of it is done. Groups that no backward completes (a layer whose
output the loss ignores) are clipped when the backward ends, and noised at ``step()``; so are the
groups of layers whose calls are traced inside torch.compile (not counted: anadp.layers' ``_TracedFn``),
all at once, as whitened clipping clips every group.
``step()`` runs the remaining phases (the wrapped optimizer on the privatized gradients on the torch
backend, the thresholds' release, the allocation). The step released in the backward is planned,
budgeted and charged when that backward begins (``begin_step``, the optimizer's).
"""
from __future__ import annotations

import math

import torch

from . import records as R
from .accumulator import Accumulator, report_nonfinite
from .clipping import AdaptiveClipping, PerLayerClipping
from .physical_batch import PhysicalBatch, reduction_scale


def total_threshold(max_grad_norm) -> float:
    """C = sqrt(sum_g C_g^2) of a float, list or dict of per-layer thresholds."""
    if isinstance(max_grad_norm, dict):
        return math.sqrt(sum(float(v) ** 2 for v in max_grad_norm.values()))
    if isinstance(max_grad_norm, (list, tuple)):
        return math.sqrt(sum(float(v) ** 2 for v in max_grad_norm))
    return float(max_grad_norm)


def per_layer_clipping(max_grad_norm, adaptive: AdaptiveClipping | None, allocator, group_names: list,
                       distributed: bool) -> PerLayerClipping:
    if distributed and adaptive is not None:
        raise ValueError("adaptive per-layer thresholds are not supported in distributed runs yet (each rank "
                         "would count only its own samples); give fixed thresholds")
    allocator.per_layer = True  # no share release: the per-sample energies are the (public) thresholds
    return PerLayerClipping(max_grad_norm, group_names, bool((allocator.group_of < 0).any()), adaptive)


class PerLayerAccumulator(Accumulator):
    clips_in_backward = True
    # released per layer, at the latest when this many elements wait (1: every layer in its own hook)
    RELEASE_BATCH = 1 << 20
    # on a device where each op is a launch (a GPU): each release is preceded by one host read (the
    # finite check), which stalls the launches queued behind it; BERT-base's 110M numbers release once
    RELEASE_BATCH_NATIVE = 1 << 27
    # complete groups whose records hold at most CLIP_BATCH / 4 numbers wait to be clipped together,
    # until CLIP_BATCH numbers wait: their norms and clipped sums then take one product per stack of
    # one shape (PhysicalBatch), not ~35 small ops per group; the records they keep bound the memory
    CLIP_BATCH = 1 << 22
    # on a device whose GEMMs take 16-bit inputs (a GPU), where each op is a launch, as stacks.linear_stacks
    CLIP_BATCH_NATIVE = 1 << 27

    def __init__(self, *args, release, begin_step, loss_reduction: str, allocator, in_hook: bool, **kwargs):
        """``release``: anadp.release.Release; ``begin_step()``: the plan of a step released in the
        backward (checked, budgeted and charged); ``in_hook``: whether the noise and update run in
        the backward (not in distributed runs, which all-reduce first, at step())."""
        super().__init__(*args, **kwargs)
        self.release, self.begin_step, self.loss_reduction = release, begin_step, loss_reduction
        self.col = allocator._col.tolist()  # group column of each tensor, rest = n_groups
        self.members: dict = {}
        for i, g in enumerate(self.col):
            self.members.setdefault(g, []).append(i)
        self.in_hook = in_hook
        self._launches = bool(self.tensors.params) and self.tensors.params[0].device.type in R.NATIVE_16BIT_DEVICES
        self.hook_plan = None
        self.reset()

    def reset(self) -> None:
        self._remaining: dict = {}  # group -> records still to come in this backward
        self._clipped: set = set()  # groups clipped in this backward
        self.hook_plan = None  # the step the hooks release (the last chunk of a logical batch)
        self._waiting: list = []  # clipped tensors of that step not yet released (see RELEASE_BATCH)
        self._waiting_numel = 0
        self._chunk_open = False
        self._cache = R.BatchCache()
        self._pending: dict = {}  # records of complete groups waiting to be clipped together (CLIP_BATCH)
        self._pending_groups: list = []
        self._pending_numel = 0
        self._bad = None
        self._sq_total = None
        self._unchecked: list = []  # earlier chunks' per-sample totals, read with the next check (check_finite)

    def released_plan(self):
        plan, self.hook_plan = self.hook_plan, None
        return plan

    def before_zero_grad(self) -> None:
        if self.hook_plan is not None:
            raise RuntimeError("zero_grad() between the backward and optimizer.step() under per-layer clipping: the "
                               "backward already began releasing this step (it is charged; noise, and on a kernel "
                               "backend the update, are under way); "
                               "call optimizer.step() first, and zero_grad() before the next backward")

    # --- in the backward ----------------------------------------------------------------
    def _open_chunk(self) -> None:
        """First record of a backward: the chunk protocol, and at the last chunk of a logical batch
        the plan of the step the hooks release (it is released in this backward whether or not
        step() follows)."""
        eng = self.engine
        if self.hook_plan is not None:
            raise RuntimeError("a backward pass after per-layer clipping released a step in the backward, without "
                               "optimizer.step() in between: call optimizer.step() after every logical batch's "
                               "backward (it completes the step; the noise stream advances there)")
        self.check_chunk(eng.chunk_id)
        self._chunk_open = True
        self._remaining, self._clipped = {}, set()
        if self.in_hook and eng.ends_logical and self.sums.logical_batches == 0:
            self.hook_plan = self.begin_step()

    def on_record(self, p) -> None:
        if not self._chunk_open:
            self._open_chunk()
        i = self.tensors.index.get(p)
        if i is None:
            return  # not in the optimizer: never updated, dropped at the end of the backward
        g = self.col[i]
        left = self._remaining.get(g)
        if left is None:
            if g in self._clipped:
                raise RuntimeError(
                    f"parameter '{self.tensors.names[p]}' got a record after its group was clipped in this backward "
                    "(a layer called during the backward, e.g. by activation checkpointing's recomputation?): "
                    "per-layer clipping cannot include it. Use clipping='whitened' with this model.")
            # none expected: its layers' calls are traced in a compiled model, uncounted; inf: never complete
            # here, clipped at the end of the backward (on_batch) with the other groups left there
            left = sum(self.engine.expected_records(self.tensors.params[j]) for j in self.members[g]) or math.inf
        left -= 1
        self._remaining[g] = left
        if left == 0:
            del self._remaining[g]
            self._pend(g, self.engine.pop_records([self.tensors.params[j] for j in self.members[g]]))

    def _wait(self, idx: list) -> None:
        """Release clipped tensors of the hooks' step in batches of RELEASE_BATCH elements: one
        multi-tensor noise (+ update) launch per batch, not one per layer."""
        self._waiting += idx
        self._waiting_numel += sum(self.tensors.params[i].numel() for i in idx)
        if self._waiting_numel >= (self.RELEASE_BATCH_NATIVE if self._launches else self.RELEASE_BATCH):
            self._release_waiting()

    def _release_waiting(self, checked: bool = False) -> None:
        if self._waiting:
            if not checked:
                self.check_finite()
            self.release.release(self.hook_plan, self._waiting)
        self._waiting, self._waiting_numel = [], 0

    def check_finite(self) -> None:
        """nonfinite="raise": no clipped sum of a non-finite per-sample gradient is released (one host read
        of the norms clipped since the last release and of the logical batch's earlier chunks, not one
        per layer or chunk)."""
        parts = self._unchecked + ([self._sq_total] if self._sq_total is not None else [])
        self._unchecked = []
        if self.nonfinite == "raise" and parts and not math.isfinite(float(sum(t.sum() for t in parts))):
            report_nonfinite(sum(int((~torch.isfinite(t)).sum()) for t in parts), sum(len(t) for t in parts), None,
                             "raise", raise_note=(". Under per-layer clipping the layers released earlier in this "
                                                  "backward have taken their step"))

    def _pend(self, g: int, recs: dict) -> None:
        """A complete group: clipped now (large records), or kept to be clipped with others."""
        self._clipped.add(g)
        numel = sum(R.kept_numel(r) for rs in recs.values() for r in rs)
        native = any(isinstance(r, R.LinearRecord) and R._native_16bit(r.A) for rs in recs.values() for r in rs)
        limit = self.CLIP_BATCH_NATIVE if native else self.CLIP_BATCH
        if numel > limit // 4:
            self._clip_groups([g], recs)
            return
        self._pending_groups.append(g)
        self._pending.update(recs)
        self._pending_numel += numel
        if self._pending_numel >= limit:
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
        index = self.tensors.index
        if len(groups) == 1 and self._clip_one_pass(groups[0], recs):
            recs = {}
        if recs:
            B = next(iter(recs.values()))[0].batch_size
            scale = reduction_scale(B, self.loss_reduction)
            batch = PhysicalBatch(recs, B, 1.0, True, cache=self._cache)  # Gram matrices shared over groups
            keys, sq_rows = batch.sq_rows()  # (rows, B), one product per stack of records of one shape
            if sq_rows.dtype not in (torch.float32, torch.float64):
                sq_rows = sq_rows.float()
            where = {g: k for k, g in enumerate(groups)}
            pos = [where[self.col[index[p]]] for p in keys]
            if len(groups) == 1:
                sq = sq_rows.sum(0, keepdim=True)
            else:  # a 0/1 product, not index_add_ (atomics: not bitwise reproducible on a GPU)
                M = torch.zeros(len(groups), len(keys), dtype=sq_rows.dtype, device=sq_rows.device)
                M[pos, range(len(keys))] = 1
                sq = M @ sq_rows
            sq = sq * scale ** 2  # (groups, B): each sample's squared norm in each group
            # "raise": checked once per release (check_finite), before anything of these groups leaves;
            # "skip": here, so that the bad samples can be dropped from the records still at hand
            total = sq.sum(0)
            if self.nonfinite == "skip" and (self._bad is not None or not math.isfinite(float(total.sum()))):
                total = self._drop_nonfinite(total, batch)
                sq = torch.where(self._bad, 0, sq)
            norms = sq.sqrt()
            slack = batch.slack_rows(keys)  # 16-bit clipped sums: their rounding, absorbed by the clip factors
            if slack is not None:
                slack = slack.square()
                norms = norms + (slack.sum(0, keepdim=True) if len(groups) == 1 else M.to(slack.dtype) @ slack).sqrt() \
                    * scale
            c = self.clip.factors(norms, groups)
            if self._bad is not None:
                c = torch.where(self._bad, 0, c)
            cs = c * scale  # the records hold the gradients of the reduced loss
            rows = dict(zip(keys, pos))
            for p, s in batch.clipped_sums(cs, list(recs), rows).items():
                self.sums.add(index[p], s)
            self._sq_total = total if self._sq_total is None else self._sq_total + total
        if self.hook_plan is not None:
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
        scale = reduction_scale(rec.batch_size, self.loss_reduction)
        extra = None
        for p in others:
            extra = recs[p][0].sq_norm() if extra is None else extra + recs[p][0].sq_norm()

        def factors(sq: torch.Tensor) -> torch.Tensor:  # the records hold the gradients of the reduced loss
            return self.clip.factors((sq * scale ** 2).sqrt()[None], [g])[0] * scale

        sq, cs, s = rec.one_pass(factors, extra, self._cache)
        index = self.tensors.index
        self.sums.add(index[w], s)
        for p in others:
            self.sums.add(index[p], recs[p][0].clipped_sum(cs))
        sq = sq * scale ** 2
        self._sq_total = sq if self._sq_total is None else self._sq_total + sq
        return True

    def _drop_nonfinite(self, total: torch.Tensor, batch: PhysicalBatch) -> torch.Tensor:
        """Samples with a non-finite gradient: raise, or drop them from these groups and the ones after
        them in the backward."""
        bad = ~torch.isfinite(total)
        if bool(bad.any()):
            if self.nonfinite == "raise" or self._bad is None:  # "skip" warns once per backward
                report_nonfinite(int(bad.sum()), batch.batch_size, [self.tensors.names[p] for p in batch.records],
                                 self.nonfinite, raise_note=(". Under per-layer clipping the layers before it in the "
                                                             "backward may have been updated"),
                                 drop_note=" (from these groups and the ones after them in the backward)")
            self._bad = bad if self._bad is None else self._bad | bad
        batch.drop(self._bad)
        return torch.where(self._bad, 0, total)

    # --- after the backward ---------------------------------------------------------------
    def on_batch(self, batch) -> None:
        """End of a backward: clip the groups no hook completed, count the chunk; at the hooks' step,
        release every tensor still waiting (all are clipped now)."""
        if not self._chunk_open:
            self._open_chunk()
        self._clip_pending()
        groups, recs = [], {}
        for p, rs in batch.records.items():
            i = self.tensors.index.get(p)
            if i is not None:
                g = self.col[i]
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
        if self.hook_plan is None and self._sq_total is not None:  # nothing of it leaves before step()
            self._unchecked.append(self._sq_total)
        self.last_per_sample_norms = None if self._sq_total is None else self._sq_total.sqrt()
        self._cache = R.BatchCache()
        self._chunk_open = False
        self.sums.count_chunk(batch.ends_logical)
        if self.hook_plan is not None:
            with torch.no_grad():
                self.check_finite()  # once, for the waiting tensors and the rest
                self._release_waiting(checked=True)
                self.release.release(self.hook_plan, self.hook_plan.unreleased(len(self.tensors)))
        self._sq_total = None
