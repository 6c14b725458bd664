"""Parameters sharded by FSDP2 (``fully_shard``: DTensor parameters, each rank holding rows of dim 0).

The DP step works on whole gradients, the same on every rank (the clipped sums all-reduced, the
noise drawn from the Philox stream at the same element indices as in one process); these helpers
hand each rank's shard of them to the wrapped optimizer, whose parameters and state stay sharded,
and sum per-tensor statistics over the shards.
"""
from __future__ import annotations

import torch

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # a torch without DTensor
    DTensor = distribute_tensor = None


def is_sharded(t) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of ``t`` (``t`` itself where it is no DTensor)."""
    return t.to_local() if is_sharded(t) else t


def shard_like(p, full: torch.Tensor):
    """``full`` (the whole tensor, equal on every rank) laid out as DTensor ``p`` is: each rank keeps
    its own shard, without communication (src_data_rank=None)."""
    return distribute_tensor(full.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def check_layout(params) -> None:
    """FSDP2 shards with DTensor placements Shard(0) on a 1-D mesh: the layout shard_like reproduces."""
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
