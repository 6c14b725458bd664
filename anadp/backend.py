"""Which backend runs the per-sample norms and the fused update.

``torch``: pure PyTorch, any device (the reference). ``triton``: the kernels in
``anadp.kernels``, for CUDA tensors (or the CPU under TRITON_INTERPRET=1, for
tests). ``cuda``: the compiled csrc/ extension. ``auto`` takes triton for CUDA
tensors and torch otherwise; the environment variable ANADP_BACKEND forces one.
"""
from __future__ import annotations

import os

import torch

BACKENDS = ("torch", "triton", "cuda")
# first Triton seen (source read: 3.6; tested: 3.9) whose randint4x puts an int64 offset's
# high word in the second counter word; older ones run Philox4x64 on int64 offsets
MIN_TRITON = (3, 6)


def _version(text: str) -> tuple:
    parts = []
    for piece in text.split("+")[0].split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class BackendUnavailableError(RuntimeError):
    pass


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def why_unavailable(name: str, device: torch.device | None = None) -> str | None:
    """None if backend ``name`` can run on ``device`` (any device if None), else the reason."""
    if name == "torch":
        return None
    if name == "triton":
        try:
            import triton
        except ImportError as e:
            return f"triton is not installed ({e}); pip install triton"
        if _version(triton.__version__) < MIN_TRITON:
            return (f"triton {triton.__version__} is older than {'.'.join(map(str, MIN_TRITON))}, whose tl.randn "
                    "splits 64-bit offsets into the Philox counter the other backends use")
        on_gpu = torch.cuda.is_available() if device is None else device.type == "cuda"
        if not on_gpu and not _interpreting():
            return ("triton kernels need CUDA tensors" if device is not None else "no CUDA device") + \
                " (or TRITON_INTERPRET=1 to interpret them on the CPU, slowly)"
        return None
    if name == "cuda":
        from . import cuda_ops
        if cuda_ops.import_error is not None:
            return cuda_ops.import_error
        if device is not None and device.type != "cuda":
            return f"the cuda extension needs CUDA tensors, the parameters are on {device}"
        if device is None and not torch.cuda.is_available():
            return "no CUDA device"
        return None
    raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")


def resolve(requested: str = "auto", device: torch.device | None = None) -> str:
    """The backend to use: ANADP_BACKEND if set, else ``requested``; 'auto' picks by device."""
    name = os.environ.get("ANADP_BACKEND") or requested
    if name == "auto":
        if device is not None and device.type == "cuda" and why_unavailable("triton", device) is None:
            return "triton"
        return "torch"
    reason = why_unavailable(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    return name


def kernels(name: str):
    """The module holding backend ``name``'s kernels (None for torch)."""
    if name == "triton":
        from . import kernels as k
        return k
    if name == "cuda":
        from . import cuda_ops
        return cuda_ops
    return None


def report() -> str:
    """One line per backend: available, or why not (``python -m anadp info``)."""
    lines = []
    for name in BACKENDS:
        reason = why_unavailable(name)
        lines.append(f"backend {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    from . import cpu_ops
    why = cpu_ops.why_unavailable()
    lines.append(f"cpu noise kernel {'available (csrc/cpu, compiled and cached)' if why is None else 'unavailable: ' + why}"
                 + ("" if why is None else "; the torch ops draw the noise"))
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    lines.append(f"auto on {device.type}: {resolve('auto', device)}"
                 + (f" (ANADP_BACKEND={os.environ['ANADP_BACKEND']} overrides)" if os.environ.get("ANADP_BACKEND") else ""))
    return "\n".join(lines)
