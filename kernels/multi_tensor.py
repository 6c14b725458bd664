"""Noise + optimizer update + sensitivity for a list of tensors in one launch.

apex's multi_tensor_apply idea: a table of element offsets (parameter, clipped sum,
state; from one base pointer each) per tensor and one program per tile of one tensor. Each program adds the
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
def _multi_tensor_update_kernel(TILE_TENSOR, TILE_START, P_OFF, G_OFF, M_OFF, V_OFF, NUMEL, KEYS, ROWS, SENS,
                                P_BASE, G_BASE, M_BASE, V_BASE,
                                P_DTYPE: tl.constexpr, KIND: tl.constexpr, HAS_NOISE: tl.constexpr,
                                STAT: tl.constexpr, TILE: tl.constexpr, BLOCK: tl.constexpr, ALIGN: tl.constexpr):
    """Tensor t's elements are at X_BASE + X_OFF[t] (element offsets from one base pointer per operand):
    with ALIGN > 1 every offset is a multiple of ALIGN elements (16 bytes), so Triton knows the
    alignment of every address and loads and stores whole blocks as 16-byte vectors."""
    pid = tl.program_id(0)
    t = tl.load(TILE_TENSOR + pid)
    start = tl.load(TILE_START + pid)
    n = tl.load(NUMEL + t)
    p_off = tl.load(P_OFF + t)
    g_off = tl.load(G_OFF + t)
    m_off = tl.load(M_OFF + t)
    v_off = tl.load(V_OFF + t)
    if ALIGN > 1:  # tiles start at multiples of TILE (a multiple of 4); the host checked the offsets
        start = tl.multiple_of(start, 4)
        p_off = tl.multiple_of(p_off, ALIGN)
        g_off = tl.multiple_of(g_off, 4)
        m_off = tl.multiple_of(m_off, 4)
        v_off = tl.multiple_of(v_off, 4)
    P = P_BASE + p_off
    G = G_BASE + g_off
    M = M_BASE + m_off
    V = V_BASE + v_off
    key = tl.load(KEYS + t)
    row = ROWS + t * update.N_COLS
    sens = tl.zeros((BLOCK,), dtype=tl.float32)
    length = tl.minimum(TILE, n - start)
    full = (length // BLOCK) * BLOCK
    every = tl.full((BLOCK,), 1, tl.int1)
    for b0 in range(0, full, BLOCK):  # whole blocks: no mask, so the loads and stores are vectors
        offs = start + b0 + tl.arange(0, BLOCK)
        grad = update.privatize_block(tl.load(G + offs), key, start + b0, row, HAS_NOISE, BLOCK)
        sens += update.apply(P, M, V, offs, every, grad, row, KIND, STAT)
    if full < length:  # the tile's last, partial block
        offs = start + full + tl.arange(0, BLOCK)
        mask = offs < n
        grad = update.privatize_block(tl.load(G + offs, mask=mask, other=0.0), key, start + full, row, HAS_NOISE,
                                      BLOCK)
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
    device = params[0].device
    tile_tensor, tile_start = U.tile_table([p.numel() for p in params], tile)
    n = tile_tensor.numel()
    sens = torch.empty(n, dtype=torch.float32, device=device) if sens is None else sens
    if n == 0:
        return sens, tile_tensor.to(device)
    # one base pointer per operand and every tensor's element offset from it (a state a tensor does not
    # have, never read: offset 0); ALIGN where every address is 16-byte aligned. The offsets, sizes and
    # keys go to the device in one copy (U.tables' address table is the cuda backend's)
    bases, table = [], []
    for ts in (params, grads, ms, vs):
        base = next((x for x in ts if x is not None), grads[0])
        bases.append(base)
        table.append([(x.data_ptr() - base.data_ptr()) // base.element_size() if x is not None else 0 for x in ts])
    table += [[p.numel() for p in params], [U.as_signed64(k) for k in keys]]
    p_off, g_off, m_off, v_off, numel, key_bits = torch.tensor(table, dtype=torch.int64).to(device).unbind(0)
    addresses = [x.data_ptr() for ts in (params, grads, ms, vs) for x in ts if x is not None]
    align = 16 // params[0].element_size() if all(a % 16 == 0 for a in addresses) else 1
    tile_tensor = tile_tensor.to(device)
    _multi_tensor_update_kernel[(n,)](
        tile_tensor, tile_start.to(device), p_off, g_off, m_off, v_off, numel, key_bits,
        rows.to(device=device, dtype=torch.float32).contiguous(), sens, *bases,
        P_DTYPE=_TL_DTYPE[params[0].dtype], KIND=kind, HAS_NOISE=has_noise, STAT=code, TILE=tile,
        BLOCK=min(tile, 1024), ALIGN=align)
    return sens, tile_tensor
