"""Accumulation of a step's clipped sums: what the engine hands each physical batch to.

``ClippedSums`` holds, per tensor, the sum of the clipped per-sample gradients of the step so far
and how far its logical batches have come. An accumulator turns a physical batch's records into
clip factors and adds their clipped sums: ``WhitenedAccumulator`` once the backward has ended
(whitened and global clipping), ``anadp.per_layer.PerLayerAccumulator`` group by group inside it.
Accumulators call down (records, the allocation's feed, the reducer), never up into the optimizer.
"""
from __future__ import annotations

import warnings

import torch

from .records import LinearRecord


def report_nonfinite(count: int, batch_size: int, names: list | None, policy: str, raise_note: str = "",
                     drop_note: str = "") -> None:
    """The non-finite policy, in one place: ``policy`` "raise" raises FloatingPointError, "skip" warns
    that the ``count`` samples are dropped from the step."""
    msg = f"non-finite per-sample gradient in {count} of {batch_size} samples"
    if names:
        msg += f" (parameters: {names[:3]})"
    if policy == "raise":
        raise FloatingPointError(msg + "; check the loss and learning rate, or pass nonfinite='skip' to drop such "
                                 "samples (counted in optimizer.skipped_samples)" + raise_note)
    warnings.warn(msg + ": these samples are dropped from the step" + drop_note, stacklevel=3)


class ClippedSums:
    """Per tensor of ``tensors`` (anadp.tensors.TensorTable): the clipped sum of this step so far, and
    the count of the step's chunks and completed logical batches."""

    def __init__(self, tensors):
        self.tensors = tensors
        self.reset()

    def reset(self) -> None:
        self.summed: list[torch.Tensor | None] = [None] * len(self.tensors)
        # fused update: Linear weights of the last physical batch, (record, scaled clip factors),
        # whose clipped sum is formed inside the update kernel
        self.deferred: dict[int, tuple[LinearRecord, torch.Tensor]] = {}
        self.reduced: set = set()  # FSDP2: tensors whose sum is already this rank's reduced rows
        self.logical_batches = 0
        self.chunks = 0
        self.last_ends_logical = True

    @property
    def mid_logical_batch(self) -> bool:
        return self.chunks > 0 and not self.last_ends_logical

    def count_chunk(self, ends_logical: bool) -> None:
        """A chunk's backward is accumulated: the step follows its logical batch's last chunk."""
        self.chunks += 1
        self.logical_batches += int(ends_logical)
        self.last_ends_logical = ends_logical

    def add(self, i: int, s: torch.Tensor) -> None:
        dtype = self.tensors.sum_dtypes[i]
        if s.dtype != dtype:  # autocast leaves 16-bit sums for float32 parameters
            s = s.to(dtype)
        prior = self.summed[i]
        self.summed[i] = s if prior is None else prior + s

    def materialize_deferred(self) -> None:
        for i, (rec, c) in self.deferred.items():
            self.add(i, rec.clipped_sum(c))
        self.deferred = {}


class Accumulator:
    """What both accumulators share: the chunk protocol, the non-finite policy's count, and the
    last physical batch's norms for the caller."""
    clips_in_backward = False

    def __init__(self, tensors, sums: ClippedSums, engine, clip, feed, *, nonfinite: str, check_chunks: bool):
        self.tensors, self.sums, self.engine, self.clip, self.feed = tensors, sums, engine, clip, feed
        self.nonfinite, self.check_chunks = nonfinite, check_chunks
        self.skipped_samples = 0
        self.last_per_sample_norms: torch.Tensor | None = None  # whitened norms of the last physical batch
        self.last_clip_factors: torch.Tensor | None = None

    def check_chunk(self, chunk_id: int | None) -> None:
        """One backward pass per chunk of private data, and only on private data (anadp.chunks)."""
        if self.check_chunks:  # False: an optimizer built by hand (tests of the optimizer alone)
            self.engine.chunks.accept(chunk_id)

    def reset(self) -> None:
        """A new step (the clipped sums are reset by their owner)."""

    def released_plan(self):
        """The plan of a step released in the backward (per-layer clipping), else None."""
        return None

    def check_finite(self) -> None:
        """Before a step is released: the non-finite check of its logical batch, where it was deferred."""

    def before_zero_grad(self) -> None:
        """zero_grad() is about to discard the pending records (per-layer clipping may refuse)."""

    def on_record(self, p) -> None:
        raise NotImplementedError

    def on_batch(self, batch) -> None:
        raise NotImplementedError


class WhitenedAccumulator(Accumulator):
    """Whitened (or global) clipping: one norm per sample over every tensor, once the backward has
    ended. ``defer_linear``: Linear weights' clipped sums are formed in the fused update kernel;
    ``reducer``: FSDP2-sharded tensors' sums reduce-scattered as they are formed."""

    def __init__(self, *args, norm_kernels=None, defer_linear: bool = False, reducer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.norm_kernels, self.defer_linear, self.reducer = norm_kernels, defer_linear, reducer
        self.reset()

    def reset(self) -> None:
        # nonfinite="raise": the logical batch's non-finite samples, counted on the device and read once,
        # before its step is released (check_finite): one host read a step, not one per physical batch
        self._nonfinite, self._nonfinite_rows, self._samples = None, [], 0

    def check_finite(self) -> None:
        count, self._nonfinite = self._nonfinite, None
        rows, self._nonfinite_rows = self._nonfinite_rows, []
        samples, self._samples = self._samples, 0
        if count is not None and int(count):
            report_nonfinite(int(count), samples, [n for keys, sq in rows for n in self._nonfinite_names(keys, sq)],
                             "raise")

    def _nonfinite_names(self, keys: list, sq: torch.Tensor) -> list:
        return [self.tensors.names[p] for p, s in zip(keys, sq) if not torch.isfinite(s).all()]

    @torch.no_grad()
    def on_batch(self, batch) -> None:
        self.check_chunk(batch.chunk_id)
        keys, sq = batch.sq_rows(self.norm_kernels)  # the loss-reduction scale, once below
        if sq.dtype not in (torch.float32, torch.float64):
            sq = sq.float()
        weights = self.feed.weights(keys, sq.dtype, sq.device)
        norms = (weights.whiten @ sq).sqrt() * batch.scale
        bad = ~torch.isfinite(norms)
        any_bad = self.nonfinite == "skip" and bool(bad.any())  # "skip" drops them from the records now
        if self.nonfinite == "raise":  # nothing leaves before check_finite; sums of a bad batch are not released
            n = bad.sum()
            self._nonfinite = n if self._nonfinite is None else self._nonfinite + n
            self._nonfinite_rows.append((keys, sq))  # the parameters' names, read only if it raises
            self._samples += batch.batch_size
        if any_bad:
            report_nonfinite(int(bad.sum()), batch.batch_size, self._nonfinite_names(keys, sq), self.nonfinite)
            batch.drop(bad)
            norms = torch.where(bad, 0, norms)
            self.skipped_samples += int(bad.sum())
        slack = batch.slack_rows(keys)  # 16-bit clipped sums: their rounding, absorbed by the clip factors
        if slack is not None:
            c = self.clip.factors(norms + (weights.whiten.to(slack.dtype) @ slack.square()).sqrt() * batch.scale)
        else:
            c = self.clip.factors(norms)
        if any_bad:
            c = torch.where(bad, 0, c)
        cs = c * batch.scale  # the clip factors of the records, which hold the scaled-down gradients
        if self.feed.releases_shares:
            self.feed.add_energy(weights, torch.where(bad[None], 0, sq) if any_bad else sq, cs)
        sums, index = self.sums, self.tensors.index
        sums.materialize_deferred()
        if self.defer_linear:
            now = []
            for p, recs in batch.records.items():
                i = index.get(p)
                if i is None:
                    continue
                if len(recs) == 1 and isinstance(recs[0], LinearRecord):
                    sums.deferred[i] = (recs[0], cs)
                else:
                    now.append(p)
        else:
            now = [p for p in batch.records if p in index]
        if self.reducer is not None and self.tensors.shard_rows:
            now = self.reducer.reduce_shards(batch, cs, now)
        for p, s in batch.clipped_sums(cs, now).items():
            sums.add(index[p], s)
        self.last_per_sample_norms, self.last_clip_factors = norms, c
        sums.count_chunk(batch.ends_logical)
