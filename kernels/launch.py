"""Launcher helpers shared by the kernels' host code."""
import torch
import triton


def block_size(n: int, hi: int = 64) -> int:
    """A power-of-two block for a dimension of n: at least 16 (tl.dot's minimum), at most hi."""
    return max(16, min(hi, triton.next_power_of_2(max(n, 1))))


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dim has unit stride (what the kernels index), else a copy."""
    return x if x.stride(-1) == 1 else x.contiguous()
