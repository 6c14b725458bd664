"""Triton kernels of anadp (installed as ``anadp.kernels``).

Each kernel's torch reference is named in its module; tests/test_kernels.py
compares them. Importing this package needs triton; ``anadp.backends`` says
whether it can run (CUDA tensors, or the CPU under TRITON_INTERPRET=1).
"""
from .fused_linear import clipped_linear_update
from .multi_tensor import multi_tensor_update
from .norms import embedding_sq_norms, linear_sq_norms

__all__ = ["clipped_linear_update", "embedding_sq_norms", "linear_sq_norms", "multi_tensor_update"]
