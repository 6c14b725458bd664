"""The distributed reduction of a step (DDP-style ranks, FSDP2 shards): the ranks' clipped sums
added up before the noise, which every rank then draws the same; and the seeds the ranks share."""
from __future__ import annotations

import torch

from . import sharding

REDUCE_BUCKET = 1 << 22  # elements of whole clipped sums formed and reduce-scattered at a time (FSDP2)


def broadcast_seed(seed: int, device) -> int:
    """Rank 0's seed on every rank (63 bits: an int64 tensor; NCCL broadcasts GPU tensors only)."""
    import torch.distributed as dist
    shared = torch.tensor([seed >> 1], dtype=torch.int64, device=device)
    dist.broadcast(shared, src=0)
    return int(shared[0])


class Reducer:
    def __init__(self, tensors, sums, feed):
        self.tensors, self.sums, self.feed = tensors, sums, feed

    def reduce_shards(self, batch, cs: torch.Tensor, now: list) -> list:
        """FSDP2: the clipped sums of this chunk's sharded tensors, REDUCE_BUCKET elements of them at a
        time, reduce-scattered at once (the reduction is linear: the chunks' shards add up to the
        shard of the sum), so a rank never holds more than a bucket of whole sums. Every rank reduces
        every sharded tensor each chunk (zeros where it has no record), so the collectives match.
        Returns the tensors left to sum as before."""
        t = self.tensors
        mine = {t.index[p] for p in now}
        for bucket in self._shard_buckets():
            params = [t.params[i] for i in bucket if i in mine]
            sums = batch.clipped_sums(cs, params) if params else {}
            full = {i: sums[t.params[i]] if i in mine else
                    torch.zeros(t.params[i].shape, dtype=t.sum_dtypes[i], device=cs.device) for i in bucket}
            for i, s in sharding.reduce_scatter_rows(full, {i: t.shard_rows[i] for i in bucket}).items():
                self.sums.add(i, s.to(t.sum_dtypes[i]))
                self.sums.reduced.add(i)
        return [p for p in now if t.index[p] not in t.shard_rows]

    def _shard_buckets(self) -> list:
        t = self.tensors
        buckets, size = [[]], 0
        for i in t.shard_rows:
            n = t.params[i].numel()
            if buckets[-1] and size + n > REDUCE_BUCKET:
                buckets.append([])
                size = 0
            buckets[-1].append(i)
            size += n
        return buckets if buckets[0] else []

    def all_reduce(self) -> None:
        """Sum the ranks' clipped sums: FSDP2-sharded tensors in one reduce-scatter (each rank gets
        the sums of its own rows), the rest and the share sums in one all-reduce; the counters take
        their maximum (a rank whose share of the Poisson batch is empty may have had no backward)."""
        import torch.distributed as dist
        t, acc, feed = self.tensors, self.sums, self.feed
        feed.fold()
        summed = [torch.zeros(p.shape, dtype=t.sum_dtypes[i], device=sharding.local(p).device) if s is None else s
                  for i, (p, s) in enumerate(zip(t.params, acc.summed))]
        whole = [i for i, p in enumerate(t.params) if not t.sharded[p]]
        flat = torch.cat([summed[i].flatten().to(torch.float64) for i in whole]
                         + [feed.share_sum.to(device=summed[0].device)])
        dist.all_reduce(flat)
        feed.share_sum = flat[-len(feed.share_sum):].cpu()
        offset = 0
        for i in whole:
            s = summed[i]
            acc.summed[i] = flat[offset:offset + s.numel()].view_as(s).to(s.dtype)
            offset += s.numel()
        rest = {i: r for i, r in t.shard_rows.items() if i not in acc.reduced}  # per-layer: whole sums
        if rest:
            for i, s in sharding.reduce_scatter_rows(summed, rest).items():
                acc.summed[i] = s.to(summed[i].dtype)
        counts = torch.tensor([acc.logical_batches, acc.chunks], dtype=torch.int64, device=flat.device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        acc.logical_batches, acc.chunks = int(counts[0]), int(counts[1])
