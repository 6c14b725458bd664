"""The triton backend: the Triton kernels of ``anadp.kernels`` — per-sample
norms, the clipped GEMM with noise and update in its epilogue, one multi-tensor launch for every
other tensor. CUDA tensors; the CPU under TRITON_INTERPRET=1 (the tests)."""
from __future__ import annotations

import os

import torch

from . import Backend

# first Triton seen (source read: 3.6; tested: 3.9) whose randint4x puts an int64 offset's
# high word in the second counter word; older ones run Philox4x64 on int64 offsets
MIN_TRITON = (3, 6)


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


class TritonBackend(Backend):
    name = "triton"
    norms = fused_update = fused_gemm = True

    def why_unavailable(self, device: torch.device | None) -> str | None:
        on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
        try:
            import triton
        except ImportError as e:  # installing it helps only where a GPU (or the interpreter) can run it
            return f"triton is not installed ({e})" + ("; pip install triton" if on_gpu or interpreting() else
                                                       ": it needs CUDA tensors, and there are none here")
        if _version(triton.__version__) < MIN_TRITON:
            return (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, whose tl.randn4x "
                    "splits 64-bit offsets into the Philox counter the other backends use")
        if not on_gpu and not interpreting():
            return ("triton kernels need CUDA tensors" if device is not None else "no CUDA device") + \
                " (or TRITON_INTERPRET=1 to interpret them on the CPU, slowly)"
        return None

    # anadp.kernels is a namespace package (kernels/ at the top of the tree has no __init__.py, so that
    # it never shadows Hugging Face's `kernels` package where the tree is on sys.path): its modules here
    def linear_sq_norms(self, *args, **kw):
        from ..kernels import norms
        return norms.linear_sq_norms(*args, **kw)

    def embedding_sq_norms(self, *args, **kw):
        from ..kernels import norms
        return norms.embedding_sq_norms(*args, **kw)

    def multi_tensor_update(self, *args, **kw):
        from ..kernels import multi_tensor
        return multi_tensor.multi_tensor_update(*args, **kw)

    def clipped_linear_update(self, *args, **kw):
        from ..kernels import fused_linear
        return fused_linear.clipped_linear_update(*args, **kw)
