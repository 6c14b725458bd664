"""The cuda backend: the compiled csrc/ kernels (module ``anadp._cuda``, built by
setup.py where CUDA is usable) behind the interface of :class:`anadp.backends.Backend`.

It has the multi-tensor noise + update; the norms and the Linear weights' clipped sums are
torch's (cuBLAS) GEMMs, which then go through the multi-tensor kernel. Its per-sample norm
kernel, a scalar loop at 28x cuBLAS's time on an H200 (2026-11-30) that could not reach tensor
cores, was deleted. Argument checks and tables are built here and in ``anadp.update_table``,
where CPU tests reach them.
"""
from __future__ import annotations

import torch

from .. import update_table as U
from . import Backend

try:
    from .. import _cuda
    import_error = None
except ImportError as e:
    _cuda = None
    import_error = (f"the CUDA extension anadp._cuda is not built ({e}); on a machine with CUDA: "
                    "ANADP_BUILD_CUDA=1 pip install --no-build-isolation -e .")

def _ext():
    if _cuda is None:
        raise RuntimeError(import_error)
    return _cuda


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
    fused_update = True

    def why_unavailable(self, device: torch.device | None) -> str | None:
        if import_error is not None:
            return import_error
        if device is not None and device.type != "cuda":
            return f"the cuda extension needs CUDA tensors, the parameters are on {device}"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device"
        return None

    def multi_tensor_update(self, *args, **kw):
        return multi_tensor_update(*args, **kw)
