"""Per-sample squared gradient norms, without per-sample gradients in memory.

Torch references: ``anadp.records.LinearRecord.sq_norm`` (weight),
``DenseRecord(G.sum(1)).sq_norm`` (bias) and ``EmbeddingRecord.sq_norm``.

Linear / Conv1D on sequences, A (B, T, d), G (B, T, p):

* ghost:        ||G_b^T A_b||^2 = sum_{t,t'} (a_t . a_t')(g_t . g_t'); the bias
                norm ||sum_t g_t||^2 = sum_{t,t'} g_t . g_t' comes from the same
                G G^T tiles for free;
* instantiated: the (p, d) per-sample gradient one tile at a time in registers.

Each program writes one partial per (sample, tile row); the launcher sums them,
so the kernels need no atomics and no zeroed outputs.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from anadp.records import ghost_is_cheaper

from .launch import block_size, dot16, rows_contiguous


@triton.jit
def _gram_tile(X, stride_t, T, i0, j0, K, BT: tl.constexpr, BK: tl.constexpr, DOT16: tl.constexpr):
    """(BT, BT) tile of X X^T for rows i0.., j0.. of one sample, X (T, K) with unit stride in K."""
    ri = i0 + tl.arange(0, BT)
    rj = j0 + tl.arange(0, BT)
    rk = tl.arange(0, BK)
    acc = tl.zeros((BT, BT), dtype=tl.float32)
    for k0 in range(0, K, BK):
        kk = k0 + rk
        xi = tl.load(X + ri[:, None] * stride_t + kk[None, :], mask=(ri[:, None] < T) & (kk[None, :] < K), other=0.0)
        xj = tl.load(X + rj[:, None] * stride_t + kk[None, :], mask=(rj[:, None] < T) & (kk[None, :] < K), other=0.0)
        if DOT16:  # 16-bit: tensor cores, exact products, float32 accumulation
            acc += tl.dot(xi, tl.trans(xj))
        else:  # exact float32 products (torch's float32 GEMMs, TF32 off)
            acc += tl.dot(xi.to(tl.float32), tl.trans(xj.to(tl.float32)), input_precision="ieee")
    return acc


@triton.jit
def _ghost_norm_kernel(A, G, W_OUT, B_OUT, T, d, p, stride_ab, stride_at, stride_gb, stride_gt, n_i,
                       BT: tl.constexpr, BK: tl.constexpr, DOT16: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1)
    i0 = i * BT
    Ab = A + b.to(tl.int64) * stride_ab
    Gb = G + b.to(tl.int64) * stride_gb
    w_sq = 0.0
    b_sq = 0.0
    for j0 in range(i0, T, BT):  # upper triangle of tiles; off-diagonal tiles count twice
        aa = _gram_tile(Ab, stride_at, T, i0, j0, d, BT, BK, DOT16)
        gg = _gram_tile(Gb, stride_gt, T, i0, j0, p, BT, BK, DOT16)
        f = tl.where(j0 == i0, 1.0, 2.0)
        w_sq += f * tl.sum(aa * gg)
        b_sq += f * tl.sum(gg)
    tl.store(W_OUT + b * n_i + i, w_sq)
    tl.store(B_OUT + b * n_i + i, b_sq)


@triton.jit
def _instantiated_norm_kernel(A, G, W_OUT, B_OUT, T, d, p, stride_ab, stride_at, stride_gb, stride_gt, n_i,
                              BP: tl.constexpr, BD: tl.constexpr, BT: tl.constexpr, DOT16: tl.constexpr):
    b = tl.program_id(0)
    i = tl.program_id(1)
    Ab = A + b.to(tl.int64) * stride_ab
    Gb = G + b.to(tl.int64) * stride_gb
    rp = i * BP + tl.arange(0, BP)
    rt = tl.arange(0, BT)
    rd = tl.arange(0, BD)
    w_sq = 0.0
    gsum = tl.zeros((BP,), dtype=tl.float32)
    for d0 in range(0, d, BD):
        dd = d0 + rd
        acc = tl.zeros((BP, BD), dtype=tl.float32)
        for t0 in range(0, T, BT):
            tt = t0 + rt
            g = tl.load(Gb + tt[:, None] * stride_gt + rp[None, :], mask=(tt[:, None] < T) & (rp[None, :] < p),
                        other=0.0)
            a = tl.load(Ab + tt[:, None] * stride_at + dd[None, :], mask=(tt[:, None] < T) & (dd[None, :] < d),
                        other=0.0)
            if DOT16:  # 16-bit: tensor cores, exact products, float32 accumulation
                acc += tl.dot(tl.trans(g), a)
            else:
                acc += tl.dot(tl.trans(g.to(tl.float32)), a.to(tl.float32), input_precision="ieee")
            if d0 == 0:  # bias gradient of this row tile, on the first pass over T only
                gsum += tl.sum(g.to(tl.float32), axis=0)
        w_sq += tl.sum(acc * acc)
    tl.store(W_OUT + b * n_i + i, w_sq)
    tl.store(B_OUT + b * n_i + i, tl.sum(gsum * gsum))


@triton.jit
def _embedding_norm_kernel(IDX, G, OUT, T, d, stride_ib, stride_it, stride_gb, stride_gt, n_i,
                           BT: tl.constexpr, BK: tl.constexpr):
    """sum_{t,t'} [idx_t = idx_t'] (g_t . g_t') for one sample and one row tile."""
    b = tl.program_id(0)
    i = tl.program_id(1)
    i0 = i * BT
    Gb = G + b.to(tl.int64) * stride_gb
    ri = i0 + tl.arange(0, BT)
    idx_i = tl.load(IDX + b.to(tl.int64) * stride_ib + ri * stride_it, mask=ri < T, other=-1)
    total = 0.0
    for j0 in range(i0, T, BT):
        rj = j0 + tl.arange(0, BT)
        idx_j = tl.load(IDX + b.to(tl.int64) * stride_ib + rj * stride_it, mask=rj < T, other=-2)
        gg = _gram_tile(Gb, stride_gt, T, i0, j0, d, BT, BK, False)
        same = idx_i[:, None] == idx_j[None, :]
        f = tl.where(j0 == i0, 1.0, 2.0)
        total += f * tl.sum(tl.where(same, gg, 0.0))
    tl.store(OUT + b * n_i + i, total)


def linear_sq_norms(A: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None = None,
                    out_bias: torch.Tensor | None = None, ghost: bool | None = None):
    """(B,) squared norms of the per-sample weight gradients G_b^T A_b and of the bias
    gradients sum_t G_b[t]; A (B, T, d), G (B, T, p). ``ghost=None``: the torch backend's cost rule."""
    if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != G.shape[:2]:
        raise ValueError(f"need A (B, T, d) and G (B, T, p) with the same B, T; got {tuple(A.shape)}, {tuple(G.shape)}")
    if A.dtype != G.dtype:  # the dots take one dtype: 16-bit on tensor cores (exact products) or float32
        A, G = A.float(), G.float()
    A, G = rows_contiguous(A), rows_contiguous(G)
    B, T, d = A.shape
    p = G.shape[2]
    out = torch.empty(B, dtype=torch.float32, device=A.device) if out is None else out
    out_bias = torch.empty(B, dtype=torch.float32, device=A.device) if out_bias is None else out_bias
    if B == 0:
        return out, out_bias
    if ghost is None:
        ghost = ghost_is_cheaper(T, d, p)
    if ghost:
        BT = block_size(T, hi=32)
        n_i = triton.cdiv(T, BT)
        w_part = torch.empty(B, n_i, dtype=torch.float32, device=A.device)
        b_part = torch.empty_like(w_part)
        _ghost_norm_kernel[(B, n_i)](A, G, w_part, b_part, T, d, p, A.stride(0), A.stride(1), G.stride(0),
                                     G.stride(1), n_i, BT=BT, BK=block_size(max(d, p), hi=64), DOT16=dot16(A))
    else:
        BP = block_size(p, hi=64)
        n_i = triton.cdiv(p, BP)
        w_part = torch.empty(B, n_i, dtype=torch.float32, device=A.device)
        b_part = torch.empty_like(w_part)
        _instantiated_norm_kernel[(B, n_i)](A, G, w_part, b_part, T, d, p, A.stride(0), A.stride(1), G.stride(0),
                                            G.stride(1), n_i, BP=BP, BD=block_size(d, hi=64), BT=block_size(T, hi=32),
                                            DOT16=dot16(A))
    torch.sum(w_part, 1, out=out)
    torch.sum(b_part, 1, out=out_bias)
    return out, out_bias


def embedding_sq_norms(idx: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) squared norms of per-sample embedding gradients; idx (B, T), G (B, T, d)
    (rows of padding indices already zeroed in G, as ``EmbeddingRecord`` does)."""
    if idx.dim() != 2 or G.dim() != 3 or idx.shape != G.shape[:2]:
        raise ValueError(f"need idx (B, T) and G (B, T, d); got {tuple(idx.shape)}, {tuple(G.shape)}")
    G = rows_contiguous(G)
    B, T, d = G.shape
    out = torch.empty(B, dtype=torch.float32, device=G.device) if out is None else out
    if B == 0:
        return out
    BT = block_size(T, hi=32)
    n_i = triton.cdiv(T, BT)
    part = torch.empty(B, n_i, dtype=torch.float32, device=G.device)
    _embedding_norm_kernel[(B, n_i)](idx, G, part, T, d, idx.stride(0), idx.stride(1), G.stride(0), G.stride(1),
                                     n_i, BT=BT, BK=block_size(d, hi=64))
    torch.sum(part, 1, out=out)
    return out
