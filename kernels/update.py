"""Optimizer arithmetic shared by the fused kernels: the exact sequence of
torch's foreach SGD / Adam / AdamW, on float32 values, hyperparameters read from
one row of the table built by ``anadp.update_table``."""
import triton
import triton.language as tl

from anadp import update_table as U

# columns of the hyperparameter table: anadp/update_table.py is their one definition
LR = tl.constexpr(U.LR)
WD = tl.constexpr(U.WD)
BETA1 = tl.constexpr(U.BETA1)
BETA2 = tl.constexpr(U.BETA2)
EPS = tl.constexpr(U.EPS)
STEP_SIZE = tl.constexpr(U.STEP_SIZE)
BC2_SQRT = tl.constexpr(U.BC2_SQRT)
FLAG = tl.constexpr(U.FLAG)
FIRST = tl.constexpr(U.FIRST)
NOISE_STD = tl.constexpr(U.NOISE_STD)
INV_DENOM = tl.constexpr(U.INV_DENOM)
ONE_MINUS_BETA1 = tl.constexpr(U.ONE_MINUS_BETA1)
ONE_MINUS_BETA2 = tl.constexpr(U.ONE_MINUS_BETA2)
DECAY = tl.constexpr(U.DECAY)
NOISE_VAR = tl.constexpr(U.NOISE_VAR)
VAR_FLOOR = tl.constexpr(U.VAR_FLOOR)
N_COLS = tl.constexpr(U.N_COLS)


@triton.jit
def gaussian(key, offs):
    """Elements ``offs`` (any layout) of the group's stream, anadp.philox.randn: component offs % 4 of
    tl.randn4x(key, offs // 4) (four Gaussians drawn per element kept: for tiles whose rows do not
    start at multiples of 4)."""
    z0, z1, z2, z3 = tl.randn4x(key, offs >> 2)
    q = offs & 3
    return tl.where(q == 0, z0, tl.where(q == 1, z1, tl.where(q == 2, z2, z3)))


@triton.jit
def gaussian_block(key, start, BLOCK: tl.constexpr):
    """Elements start .. start + BLOCK - 1 of the stream (start and BLOCK multiples of 4): one
    tl.randn4x call per four elements, interleaved into element order."""
    z0, z1, z2, z3 = tl.randn4x(key, (start >> 2) + tl.arange(0, BLOCK // 4))
    return tl.interleave(tl.interleave(z0, z2), tl.interleave(z1, z3))


@triton.jit
def privatize(summed, key, offs, row, HAS_NOISE: tl.constexpr):
    """(clipped sum + noise_std * z) / expected batch size; z = the Philox stream of the group."""
    g = summed
    if HAS_NOISE:
        g += tl.load(row + NOISE_STD) * gaussian(key, offs)
    return g * tl.load(row + INV_DENOM)


@triton.jit
def privatize_block(summed, key, start, row, HAS_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """privatize for the contiguous elements start .. start + BLOCK - 1 (see gaussian_block)."""
    g = summed
    if HAS_NOISE:
        g += tl.load(row + NOISE_STD) * gaussian_block(key, start, BLOCK)
    return g * tl.load(row + INV_DENOM)


@triton.jit
def sgd(p, g, buf, row):
    """torch SGD (weight decay, momentum with dampening, nesterov); returns (p, buf)."""
    g = g + tl.load(row + WD) * p
    momentum = tl.load(row + BETA1)
    if momentum != 0.0:
        if tl.load(row + FIRST) != 0.0:
            buf = g
        else:
            buf = buf * momentum + tl.load(row + ONE_MINUS_BETA1) * g
        if tl.load(row + FLAG) != 0.0:
            g = g + momentum * buf
        else:
            g = buf
    return p - tl.load(row + LR) * g, buf


@triton.jit
def adam(p, g, m, v, row):
    """torch Adam / AdamW (decoupled weight decay when FLAG), bias-corrected; returns (p, m, v)."""
    if tl.load(row + FLAG) != 0.0:
        p = p * tl.load(row + DECAY)
    else:
        g = g + tl.load(row + WD) * p
    m = m + tl.load(row + ONE_MINUS_BETA1) * (g - m)  # lerp, as torch
    v = v * tl.load(row + BETA2) + tl.load(row + ONE_MINUS_BETA2) * (g * g)
    noise_var = tl.load(row + NOISE_VAR)
    if noise_var > 0.0:  # the noise's variance out of v_hat, floored (anadp.adam_correction)
        bc2 = tl.load(row + BC2_SQRT)
        denom = tl.sqrt(tl.maximum(v / (bc2 * bc2) - noise_var, tl.load(row + VAR_FLOOR))) + tl.load(row + EPS)
    else:
        denom = tl.sqrt(v) / tl.load(row + BC2_SQRT) + tl.load(row + EPS)
    return p - tl.load(row + STEP_SIZE) * (m / denom), m, v


@triton.jit
def apply(P, M, V, offs, mask, grad, row, KIND: tl.constexpr, STAT: tl.constexpr):
    """Update the elements ``offs`` of parameter P and its state M, V (float32) in place
    (KIND 0: SGD, M the momentum buffer; 1: Adam / AdamW). Returns the allocation's
    statistic, zero outside ``mask``: |p * grad| with p before the update (STAT 0) or grad^2 (1)."""
    p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
    if STAT == 1:
        sens = tl.where(mask, grad * grad, 0.0)
    else:
        sens = tl.where(mask, tl.abs(p * grad), 0.0)
    if KIND == 0:
        if tl.load(row + BETA1) != 0.0:
            m = tl.load(M + offs, mask=mask, other=0.0)
            p, m = sgd(p, grad, m, row)
            tl.store(M + offs, m, mask=mask)
        else:
            p, m = sgd(p, grad, grad, row)
    else:
        m = tl.load(M + offs, mask=mask, other=0.0)
        v = tl.load(V + offs, mask=mask, other=0.0)
        p, m, v = adam(p, grad, m, v, row)
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)
    tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
    return sens
