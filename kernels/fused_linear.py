"""Clipped GEMM with noise and the optimizer update in its epilogue.

For a Linear weight W (p, d) (or a Conv1D weight stored (d, p)):
    grad = (A^T diag(c) G + prior + noise_std * z) * inv_denom
and the SGD / Adam / AdamW update of W and its state, tile by tile: the
gradient lives in registers only. z is the group's Philox stream at the
element's row-major index in W as stored, so it equals the torch backend's
``philox.gaussian(seed, step, group, W.shape)`` whatever the tiling.

Torch reference: ``LinearRecord.clipped_sum`` + ``DPOptimizer.privatize`` +
the wrapped torch optimizer's step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from anadp import update_table as U

from . import update
from .launch import block_size, dot16, rows_contiguous


@triton.jit
def _round_bf16(x):
    """float32 x rounded to the nearest bfloat16 (ties to even), as float32: done on the bits, so that
    the interpreter (whose casts truncate) and a GPU round alike."""
    bits = x.to(tl.int32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _clipped_linear_update_kernel(
        A, G, C, W, M, V, PRIOR, KEYS, ROW, SENS,
        R, T, d, p, stride_ar, stride_gr, stride_wp, stride_wd,
        KIND: tl.constexpr, HAS_PRIOR: tl.constexpr, HAS_NOISE: tl.constexpr, STAT: tl.constexpr,
        BP: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, DOT16: tl.constexpr):
    pid_p = tl.program_id(0)
    pid_d = tl.program_id(1)
    rp = pid_p * BP + tl.arange(0, BP)
    rd = pid_d * BD + tl.arange(0, BD)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BP, BD), dtype=tl.float32)
    for r0 in range(0, R, BK):  # rows r = (sample, token), sample = r // T
        rr = r0 + rk
        c = tl.load(C + rr // T, mask=rr < R, other=0.0)
        g = tl.load(G + rr[:, None].to(tl.int64) * stride_gr + rp[None, :], mask=(rr[:, None] < R) & (rp[None, :] < p),
                    other=0.0)
        a = tl.load(A + rr[:, None].to(tl.int64) * stride_ar + rd[None, :], mask=(rr[:, None] < R) & (rd[None, :] < d),
                    other=0.0)
        if G.dtype.element_ty == tl.float32:
            acc += tl.dot(tl.trans(g * c[:, None]), a, input_precision="ieee")
        else:  # bfloat16: c g rounded to it (the clip factors absorb that: records.rounding_slack)
            gc = _round_bf16(g.to(tl.float32) * c[:, None])
            if DOT16:  # tensor cores (gc is a bfloat16 value: exact in the cast)
                acc += tl.dot(tl.trans(gc.to(tl.bfloat16)), a)
            else:
                acc += tl.dot(tl.trans(gc), a.to(tl.float32), input_precision="ieee")

    mask = (rp[:, None] < p) & (rd[None, :] < d)
    offs = rp[:, None].to(tl.int64) * stride_wp + rd[None, :].to(tl.int64) * stride_wd  # index in W as stored
    if HAS_PRIOR:
        acc += tl.load(PRIOR + offs, mask=mask, other=0.0)
    grad = update.privatize(acc, tl.load(KEYS), offs, ROW, HAS_NOISE)
    sens = update.apply(W, M, V, offs, mask, grad, ROW, KIND, STAT)
    tl.store(SENS + pid_p * tl.num_programs(1) + pid_d, tl.sum(sens))


def _blocks(p: int, d: int, rows: int) -> tuple[int, int, int]:
    return block_size(p), block_size(d), block_size(rows, hi=32)


def n_tiles(p: int, d: int) -> int:
    """Length of the sensitivity output for a (p, d) weight: one partial per tile."""
    BP, BD, _ = _blocks(p, d, 1)
    return triton.cdiv(p, BP) * triton.cdiv(d, BD)


def clipped_linear_update(A: torch.Tensor, G: torch.Tensor, c: torch.Tensor, W: torch.Tensor, *, kind: int,
                          row: torch.Tensor, key: int, m: torch.Tensor | None = None, v: torch.Tensor | None = None,
                          prior: torch.Tensor | None = None, transposed: bool = False, has_noise: bool = True,
                          sens: torch.Tensor | None = None, stat: str = "abs_p_grad") -> torch.Tensor:
    """Update W (and m, v) in place from A (B, T, d), G (B, T, p) and clip factors c (B,)
    (loss-reduction scale included). ``row``: this tensor's float32 hyperparameters
    (``anadp.update_table``); ``prior``: clipped sum of earlier physical batches, float32, W's layout.
    Returns the (tiles,) partial sums of ``stat`` (update_table.STATS: |w * grad| with w before the
    update, or grad^2; grad privatized)."""
    code = U.stat_code(stat)
    if W.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fused update: weights must be float32, bfloat16 or float16, got {W.dtype}")
    if not W.is_contiguous():
        raise ValueError("fused update: the weight must be contiguous")
    B, T, d = A.shape
    p = G.shape[2]
    if W.shape != ((d, p) if transposed else (p, d)):
        raise ValueError(f"weight of shape {tuple(W.shape)} does not match A (.., {d}) and G (.., {p})")
    if A.dtype != G.dtype or G.dtype not in (torch.float32, torch.bfloat16):
        # one 16-bit dtype on tensor cores: bfloat16, whose rounding of c g the clip factors absorb
        # (records.rounding_slack); float16 (and mixed inputs) in exact float32
        A, G = A.float(), G.float()
    A2 = rows_contiguous(A.reshape(B * T, d))
    G2 = rows_contiguous(G.reshape(B * T, p))
    if kind == U.ADAM and (m is None or v is None):
        raise ValueError("fused update: Adam needs both moments")
    for name, t in (("m", m), ("v", v), ("prior", prior)):
        if t is not None and (t.shape != W.shape or t.dtype != torch.float32 or not t.is_contiguous()):
            raise ValueError(f"fused update: {name} must be a contiguous float32 tensor of W's shape")
    BP, BD, BK = _blocks(p, d, B * T)
    grid = (triton.cdiv(p, BP), triton.cdiv(d, BD))
    if sens is None:
        sens = torch.empty(grid[0] * grid[1], dtype=torch.float32, device=W.device)
    elif sens.shape != (grid[0] * grid[1],) or sens.dtype != torch.float32:
        raise ValueError(f"sens must be float32 of shape ({grid[0] * grid[1]},) (n_tiles(p, d))")
    keys = torch.tensor([U.as_signed64(key)], dtype=torch.int64, device=W.device)
    stride_wp, stride_wd = (1, p) if transposed else (d, 1)
    unused = W  # stands in for pointers the kernel never reads (no momentum, no second moment, no prior)
    _clipped_linear_update_kernel[grid](
        A2, G2, c.to(torch.float32).contiguous(), W, unused if m is None else m, unused if v is None else v,
        unused if prior is None else prior, keys, row, sens,
        B * T, T, d, p, A2.stride(0), G2.stride(0), stride_wp, stride_wd,
        KIND=kind, HAS_PRIOR=prior is not None, HAS_NOISE=has_noise, STAT=code, BP=BP, BD=BD, BK=BK,
        DOT16=dot16(A2))
    return sens
