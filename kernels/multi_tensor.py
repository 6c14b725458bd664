"""Noise + optimizer update + sensitivity for a list of tensors in one launch.

apex's multi_tensor_apply idea: a table of addresses (parameter, clipped sum,
state) per tensor and one program per tile of one tensor. Each program adds the
group's Philox noise to its tile of the clipped sum, scales it, writes the
partial sum of the allocation's statistic over the privatized gradient
(|p * grad| or grad^2) and updates the parameter and its state in place.

Torch reference: ``DPOptimizer.privatize`` + the statistic of ``DPOptimizer.apply``
+ the wrapped torch optimizer's foreach step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from anadp import update_table as U

from . import update

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _multi_tensor_update_kernel(CHUNK_TENSOR, CHUNK_START, P_ADDR, G_ADDR, M_ADDR, V_ADDR, NUMEL, KEYS, ROWS, SENS,  # U.Tables order
                                P_DTYPE: tl.constexpr, KIND: tl.constexpr, HAS_NOISE: tl.constexpr,
                                STAT: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(CHUNK_TENSOR + pid)
    start = tl.load(CHUNK_START + pid)
    n = tl.load(NUMEL + t)
    P = tl.load(P_ADDR + t).to(tl.pointer_type(P_DTYPE))
    G = tl.load(G_ADDR + t).to(tl.pointer_type(tl.float32))
    M = tl.load(M_ADDR + t).to(tl.pointer_type(tl.float32))
    V = tl.load(V_ADDR + t).to(tl.pointer_type(tl.float32))
    key = tl.load(KEYS + t)
    row = ROWS + t * update.N_COLS
    sens = tl.zeros((BLOCK,), dtype=tl.float32)
    for b0 in range(0, tl.minimum(TILE, n - start), BLOCK):
        offs = start + b0 + tl.arange(0, BLOCK)
        mask = offs < n
        grad = update.privatize_block(tl.load(G + offs, mask=mask, other=0.0), key, start + b0, row, HAS_NOISE, BLOCK)
        sens += update.apply(P, M, V, offs, mask, grad, row, KIND, STAT)
    tl.store(SENS + pid, tl.sum(sens))


def multi_tensor_update(params: list, grads: list, ms: list, vs: list, keys: list[int], rows: torch.Tensor, *,
                        kind: int, has_noise: bool = True, tile: int = U.DEFAULT_TILE,
                        sens: torch.Tensor | None = None, stat: str = "abs_p_grad") -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for all ``params`` (one dtype, one device). grads: float32 clipped sums;
    ms / vs: float32 state or None (SGD without momentum); rows: (n, N_COLS) float32.
    Returns (per-tile partial sums of ``stat`` (update_table.STATS), the tile's tensor index)."""
    code = U.stat_code(stat)
    if not params:
        empty = torch.zeros(0, dtype=torch.float32)
        return empty, empty.to(torch.int32)
    U.check_update_args(params, grads, ms, vs, kind)
    t = U.tables(params, grads, ms, vs, keys, tile)
    n = t.tile_tensor.numel()
    sens = torch.empty(n, dtype=torch.float32, device=params[0].device) if sens is None else sens
    if n == 0:
        return sens, t.tile_tensor
    _multi_tensor_update_kernel[(n,)](
        *t, rows.to(device=params[0].device, dtype=torch.float32).contiguous(), sens,
        P_DTYPE=_TL_DTYPE[params[0].dtype], KIND=kind, HAS_NOISE=has_noise, STAT=code, TILE=tile,
        BLOCK=min(tile, 1024))
    return sens, t.tile_tensor
