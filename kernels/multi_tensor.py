"""Noise + optimizer update + sensitivity for a list of tensors in one launch.

apex's multi_tensor_apply idea: a table of addresses (parameter, clipped sum,
state) per tensor and one program per chunk of one tensor. Each program adds the
group's Philox noise to its chunk of the clipped sum, scales it, writes the
partial sum of |p * grad| (the ANADP sensitivity, from the privatized gradient)
and updates the parameter and its state in place.

Torch reference: ``DPOptimizer.privatize`` + ``NoiseAllocator.update``'s
sensitivity + the wrapped torch optimizer's foreach step.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from anadp import update_table as U

from . import update

_TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _multi_tensor_update_kernel(CHUNK_TENSOR, CHUNK_START, P_ADDR, G_ADDR, M_ADDR, V_ADDR, NUMEL, KEYS, ROWS, SENS,
                                P_DTYPE: tl.constexpr, KIND: tl.constexpr, HAS_NOISE: tl.constexpr,
                                CHUNK: tl.constexpr, BLOCK: tl.constexpr):
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
    for b0 in range(0, tl.minimum(CHUNK, n - start), BLOCK):
        offs = start + b0 + tl.arange(0, BLOCK)
        mask = offs < n
        grad = update.privatize(tl.load(G + offs, mask=mask, other=0.0), key, offs, row, HAS_NOISE)
        sens += update.apply(P, M, V, offs, mask, grad, row, KIND)
    tl.store(SENS + pid, tl.sum(sens))


def multi_tensor_update(params: list, grads: list, ms: list, vs: list, keys: list[int], rows: torch.Tensor, *,
                        kind: int, has_noise: bool = True, chunk: int = U.DEFAULT_CHUNK,
                        sens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One launch for all ``params`` (one dtype, one device). grads: float32 clipped sums;
    ms / vs: float32 state or None (SGD without momentum); rows: (n, N_COLS) float32.
    Returns (per-chunk partial sums of |p * grad|, the chunk's tensor index)."""
    if not params:
        empty = torch.zeros(0, dtype=torch.float32)
        return empty, empty.to(torch.int32)
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or next(iter(dtypes)) not in _TL_DTYPE:
        raise TypeError(f"multi_tensor_update: one parameter dtype among float32/bfloat16/float16 per launch, got {dtypes}")
    device = params[0].device
    for name, ts in (("grads", grads), ("ms", ms), ("vs", vs)):
        for p, t in zip(params, ts):
            if t is not None and (t.shape != p.shape or t.dtype != torch.float32 or not t.is_contiguous()
                                  or t.device != device):
                raise ValueError(f"multi_tensor_update: {name} must be contiguous float32 tensors shaped as the params")
    if any(not p.is_contiguous() for p in params):
        raise ValueError("multi_tensor_update: parameters must be contiguous")
    if kind == U.ADAM and any(m is None or v is None for m, v in zip(ms, vs)):
        raise ValueError("multi_tensor_update: Adam needs both moments of every tensor")
    tensor, start = U.chunk_table([p.numel() for p in params], chunk)
    if tensor.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=device), tensor.to(device)

    def addresses(ts):
        return torch.tensor([(t if t is not None else p).data_ptr() for p, t in zip(params, ts)], dtype=torch.int64,
                            device=device)

    sens = torch.empty(tensor.numel(), dtype=torch.float32, device=device) if sens is None else sens
    numel = torch.tensor([p.numel() for p in params], dtype=torch.int64, device=device)
    key_t = torch.tensor([U.as_signed64(k) for k in keys], dtype=torch.int64, device=device)
    tensor, start = tensor.to(device), start.to(device)
    _multi_tensor_update_kernel[(tensor.numel(),)](
        tensor, start, addresses(params), addresses(grads), addresses(ms), addresses(vs), numel, key_t,
        rows.to(device=device, dtype=torch.float32).contiguous(), sens,
        P_DTYPE=_TL_DTYPE[params[0].dtype], KIND=kind, HAS_NOISE=has_noise, CHUNK=chunk,
        BLOCK=min(chunk, 1024))
    return sens, tensor
