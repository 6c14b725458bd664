"""Parameters sharded by FSDP2 (``fully_shard``: DTensor parameters, each rank holding rows of dim 0).

Each rank forms the clipped sums of its samples for whole tensors (per-sample gradients need the
whole layer); one reduce-scatter leaves each rank the sums of its own rows, it adds the noise of
those rows (the Philox stream at their element indices in the whole tensor: the noise of the
single-process run) and hands them to the wrapped optimizer as the shard's gradient; parameters and
optimizer state stay sharded, per-tensor statistics are summed over the shards.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch without DTensor
    DTensor = None


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself where it is no DTensor)."""
    return t.to_local() if is_sharded(t) else t


@dataclass(frozen=True)
class ShardRows:
    """Which rows of dim 0 each rank holds (FSDP2's Shard(0): torch.chunk's split, the last ranks'
    possibly short or empty)."""
    bounds: tuple  # (first row, row past the last) per rank
    rank: int
    row_numel: int

    @property
    def start(self) -> int:
        """This rank's first element in the whole tensor's row-major order (its noise offset)."""
        return self.bounds[self.rank][0] * self.row_numel


def row_ranges(params) -> dict:
    """{index in ``params``: ShardRows} of the sharded ones, checked against the local shards."""
    out = {}
    for i, p in enumerate(params):
        if not is_sharded(p):
            continue
        world, rank, n0 = p.device_mesh.size(), p.device_mesh.get_local_rank(), p.shape[0]
        c = -(-n0 // world)
        bounds = tuple((min(q * c, n0), min((q + 1) * c, n0)) for q in range(world))
        rows = ShardRows(bounds, rank, p.numel() // max(n0, 1))
        a, b = bounds[rank]
        if tuple(p.to_local().shape) != (b - a, *p.shape[1:]):
            raise ValueError(f"a DTensor parameter of shape {tuple(p.shape)} holds a local shard of shape "
                             f"{tuple(p.to_local().shape)} on rank {rank}, not rows {a}..{b}: anadp supports "
                             "FSDP2's even Shard(0) split")
        out[i] = rows
    return out


def reduce_scatter_rows(tensors: list, rows: dict) -> dict:
    """{i: this rank's rows of sum over ranks of tensors[i]} for the sharded i, in one
    reduce-scatter in the tensors' dtype (float32 sums, as FSDP's reduce_dtype), each rank's
    segment padded to the longest; one copy of each tensor into the send buffer."""
    import torch.distributed as dist
    idx = list(rows)
    world, rank = len(rows[idx[0]].bounds), rows[idx[0]].rank
    dtype = functools.reduce(torch.promote_types, [tensors[i].dtype for i in idx])
    sizes = [[(b - a) * rows[i].row_numel for i in idx for a, b in [rows[i].bounds[q]]] for q in range(world)]
    n = max(sum(s) for s in sizes)
    flat = torch.zeros(world * n, dtype=dtype, device=tensors[idx[0]].device)
    for q in range(world):
        offset = q * n
        for i, k in zip(idx, sizes[q]):
            flat[offset:offset + k].copy_(tensors[i][slice(*rows[i].bounds[q])].reshape(-1))
            offset += k
    mine = torch.empty(n, dtype=dtype, device=flat.device)
    dist.reduce_scatter_tensor(mine, flat)
    out, offset = {}, 0
    for i, k in zip(idx, sizes[rank]):
        a, b = rows[i].bounds[rank]
        out[i] = mine[offset:offset + k].view(b - a, *tensors[i].shape[1:])
        offset += k
    return out


def as_shard(p, local_rows: torch.Tensor):
    """This rank's rows as a gradient for DTensor ``p`` (same mesh, placements, global shape)."""
    return DTensor.from_local(local_rows.to(p.dtype), p.device_mesh, p.placements, run_check=False,
                              shape=p.shape, stride=p.stride())


def check_layout(params) -> None:
    """FSDP2 shards with DTensor placements Shard(0) on a 1-D mesh: the layout row_ranges describes."""
    from torch.distributed.tensor import Shard
    for p in params:
        if is_sharded(p) and (p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),)):
            raise ValueError(f"a parameter is a DTensor with placements {tuple(p.placements)} on a "
                             f"{p.device_mesh.ndim}-D mesh: anadp supports FSDP2's Shard(0) on a 1-D mesh "
                             "(fully_shard without HSDP or tensor parallelism)")


def summed(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-tensor sums formed on each rank's parts, summed over the ranks for the sharded tensors
    (``mask``; None: nothing sharded), the replicated ones taken from rank 0 (float64)."""
    values = values.double()
    if mask is None:
        return values
    import torch.distributed as dist
    if dist.get_rank() != 0:
        values = torch.where(mask.to(values.device), values, 0.0)
    dist.all_reduce(values)
    return values
