"""Optimizer arithmetic shared by the fused kernels: the exact sequence of
torch's foreach SGD / Adam / AdamW, on float32 values, hyperparameters read from
one row of the table built by ``anadp.update_table``."""
import triton
import triton.language as tl

# columns, as in anadp/update_table.py
LR = tl.constexpr(0)
WD = tl.constexpr(1)
BETA1 = tl.constexpr(2)
BETA2 = tl.constexpr(3)
EPS = tl.constexpr(4)
STEP_SIZE = tl.constexpr(5)
BC2_SQRT = tl.constexpr(6)
FLAG = tl.constexpr(7)
FIRST = tl.constexpr(8)
NOISE_STD = tl.constexpr(9)
INV_DENOM = tl.constexpr(10)
ONE_MINUS_BETA1 = tl.constexpr(11)
ONE_MINUS_BETA2 = tl.constexpr(12)
DECAY = tl.constexpr(13)
N_COLS = tl.constexpr(14)


@triton.jit
def privatize(summed, key, offs, row, HAS_NOISE: tl.constexpr):
    """(clipped sum + noise_std * z) / expected batch size; z = the Philox stream of the group."""
    g = summed
    if HAS_NOISE:
        g += tl.load(row + NOISE_STD) * tl.randn(key, offs)
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
