"""Which of a backend's GEMM-shaped kernels the step uses: the kernel where a GPU check measured it
faster than the cuBLAS formulation of the same maths, cuBLAS (the torch reference's ops) where it was
slower or where nothing was measured. The formulations compared:

* per-sample norms: the kernel's norms of a Linear from (A, G) against two ``torch.bmm`` Gram
  matrices (or the per-sample gradient where that is cheaper, records.ghost_is_cheaper);
* the clipped GEMM: the kernel's A^T diag(c) G whose epilogue adds the noise and applies the update,
  against ``torch.mm`` of the clip-scaled output gradient followed by the multi-tensor update.

``MEASURED`` holds every such row of the GPU checks so far (the kernel's time over the cuBLAS
formulation's, at the shape measured): a kernel is used only if it won in every row for its
backend. ``ANADP_KERNELS=all`` uses every kernel a backend has, whatever the table says (the kernel
tests and measurements). Memory is not at stake: both formulations keep the same (A, G).
"""
from __future__ import annotations

import os

_SOURCE = "bench/results/gpu-h200-2026-11-30/gpu-check.md"
_SHAPE = "H200, float32, B=32 T=256 d=768 p=3072"
# the separate update of a 768 x 3072 weight after cuBLAS's GEMM: 28 bytes per element (p, grad, m, v
# read; p, m, v written) at the 1682 GB/s the multi-tensor kernel reached = 0.046 of the GEMM's 0.857 ms
_UPDATE_AFTER_GEMM = 0.046

# (kernel, backend) -> [(kernel time / cuBLAS formulation's time, where, what was measured)]
MEASURED: dict = {
    ("norms", "triton"): [(2.30 / 0.48, _SHAPE, _SOURCE)],
    ("norms", "cuda"): [(13.29 / 0.48, _SHAPE, _SOURCE)],
    ("clipped_gemm", "triton"): [(2.15 / (1.00 + _UPDATE_AFTER_GEMM), _SHAPE, _SOURCE)],
}


def use_kernel(kernel: str, backend: str) -> bool:
    """Whether the step runs ``backend``'s ``kernel`` ("norms" or "clipped_gemm") instead of cuBLAS."""
    if kernel not in ("norms", "clipped_gemm"):
        raise ValueError(f"kernel must be 'norms' or 'clipped_gemm', got {kernel!r}")
    if os.environ.get("ANADP_KERNELS") == "all":
        return True
    rows = MEASURED.get((kernel, backend))
    return bool(rows) and all(ratio < 1.0 for ratio, _, _ in rows)


def why_not(kernel: str, backend: str) -> str:
    """The measurement behind a kernel not being used, for messages and ``python -m anadp info``."""
    rows = MEASURED.get((kernel, backend))
    if not rows:
        return f"no GPU check has measured {backend}'s {kernel} kernel against cuBLAS yet"
    ratio, shape, source = max(rows)
    return f"{backend}'s {kernel} kernel took {ratio:.2f}x the cuBLAS formulation's time ({shape}; {source})"
