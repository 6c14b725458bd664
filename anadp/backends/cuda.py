"""The cuda backend: the compiled csrc/ kernels (module ``anadp._cuda``, built by
setup.py where CUDA is usable) behind the interface of :class:`anadp.backends.Backend`.

It has the norm kernels and the multi-tensor noise + update; Linear weights get
their clipped sum from torch's GEMM and go through the multi-tensor kernel
(there is no CUDA GEMM-epilogue kernel). Argument checks and tables are built
here and in ``anadp.update_table``, where CPU tests reach them.
"""
from __future__ import annotations

import torch

from .. import update_table as U
from ..records import ghost_is_cheaper
from . import Backend

try:
    from .. import _cuda
    import_error = None
except ImportError as e:
    _cuda = None
    import_error = (f"the CUDA extension anadp._cuda is not built ({e}); on a machine with CUDA: "
                    "ANADP_BUILD_CUDA=1 pip install --no-build-isolation -e .")

# instantiated-norm row tile of csrc/launchers.h (kPTile)
P_TILE = 8


def _ext():
    if _cuda is None:
        raise RuntimeError(import_error)
    return _cuda


def _float_rows(x: torch.Tensor) -> torch.Tensor:
    """float32 with unit stride in the last dim (what the kernels index)."""
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def linear_sq_norms(A: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None = None,
                    out_bias: torch.Tensor | None = None, ghost: bool | None = None):
    """As anadp.kernels.linear_sq_norms: (B,) weight and bias per-sample squared norms."""
    if A.dim() != 3 or G.dim() != 3 or A.shape[:2] != G.shape[:2]:
        raise ValueError(f"need A (B, T, d) and G (B, T, p) with the same B, T; got {tuple(A.shape)}, {tuple(G.shape)}")
    B, T, d = A.shape
    p = G.shape[2]
    out = torch.empty(B, dtype=torch.float32, device=A.device) if out is None else out
    out_bias = torch.empty(B, dtype=torch.float32, device=A.device) if out_bias is None else out_bias
    ghost = ghost_is_cheaper(T, d, p) if ghost is None else ghost
    cols = T if ghost else -(-p // P_TILE)
    w_part = torch.empty(B, cols, dtype=torch.float32, device=A.device)
    b_part = torch.empty_like(w_part)
    if B and T:
        _ext().linear_sq_norms(_float_rows(A), _float_rows(G), w_part, b_part, ghost)
    torch.sum(w_part, 1, out=out)
    torch.sum(b_part, 1, out=out_bias)
    return out, out_bias


def embedding_sq_norms(idx: torch.Tensor, G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    if idx.dim() != 2 or G.dim() != 3 or idx.shape != G.shape[:2]:
        raise ValueError(f"need idx (B, T) and G (B, T, d); got {tuple(idx.shape)}, {tuple(G.shape)}")
    B, T, _ = G.shape
    out = torch.empty(B, dtype=torch.float32, device=G.device) if out is None else out
    part = torch.empty(B, T, dtype=torch.float32, device=G.device)
    if B and T:
        _ext().embedding_sq_norms(idx.long(), _float_rows(G), part)
    torch.sum(part, 1, out=out)
    return out


def multi_tensor_update(params: list, grads: list, ms: list, vs: list, keys: list[int], rows: torch.Tensor, *,
                        kind: int, has_noise: bool = True, tile: int = U.DEFAULT_TILE,
                        sens: torch.Tensor | None = None, stat: str = "abs_p_grad") -> tuple[torch.Tensor, torch.Tensor]:
    """As anadp.kernels.multi_tensor_update."""
    code = U.stat_code(stat)
    if not params:
        empty = torch.zeros(0, dtype=torch.float32)
        return empty, empty.to(torch.int32)
    dtype_code = U.check_update_args(params, grads, ms, vs, kind)
    t = U.tables(params, grads, ms, vs, keys, tile)
    n = t.tile_tensor.numel()
    sens = torch.empty(n, dtype=torch.float32, device=params[0].device) if sens is None else sens
    if n:
        _ext().multi_tensor_update(*t, rows.to(device=params[0].device, dtype=torch.float32).contiguous(), sens,
                                   dtype_code, kind, has_noise, tile, code)
    return sens, t.tile_tensor


def philox_randint(key: int, offsets: torch.Tensor) -> torch.Tensor:
    """(2, n) int32: the first two words of tl.randint4x(key, offsets), from the CUDA Philox."""
    return _ext().philox_randint(U.as_signed64(key), offsets.long().contiguous())


class CudaBackend(Backend):
    name = "cuda"
    norms = fused_update = True

    def why_unavailable(self, device: torch.device | None) -> str | None:
        if import_error is not None:
            return import_error
        if device is not None and device.type != "cuda":
            return f"the cuda extension needs CUDA tensors, the parameters are on {device}"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def linear_sq_norms(self, *args, **kw):
        return linear_sq_norms(*args, **kw)

    def embedding_sq_norms(self, *args, **kw):
        return embedding_sq_norms(*args, **kw)

    def multi_tensor_update(self, *args, **kw):
        return multi_tensor_update(*args, **kw)
