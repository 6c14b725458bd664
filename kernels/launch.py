"""Launcher helpers shared by the kernels' host code."""
import os

import torch
import triton


def block_size(n: int, hi: int = 64) -> int:
    """A power-of-two block for a dimension of n: at least 16 (tl.dot's minimum), at most hi."""
    return max(16, min(hi, triton.next_power_of_2(max(n, 1))))


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has unit stride (what the kernels index), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()


def dot16(x: torch.Tensor) -> bool:
    """Whether a kernel's dots take ``x``'s 16 bits as they are (tensor cores: exact products, float32
    accumulation). Not under TRITON_INTERPRET, whose numpy dots do not read bfloat16: there the tiles
    are upcast, the same products."""
    return x.dtype in (torch.bfloat16, torch.float16) and os.environ.get("TRITON_INTERPRET", "0") in ("", "0")
