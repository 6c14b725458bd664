"""The step's choice between a backend's GEMM-shaped kernels and cuBLAS comes from measurements."""
import os
import re

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from anadp import kernel_choice, make_private

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _gpu_check_rows(path: str) -> dict:
    """kernel label -> its 'x weight-gradient GEMM' column, from a committed GPU check table."""
    rows = {}
    for line in open(os.path.join(ROOT, path)):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and re.fullmatch(r"[0-9.]+", cells[4] or "x"):
            rows[cells[0]] = float(cells[4])
    return rows


def test_the_table_restates_the_committed_gpu_check():
    """Each ratio in kernel_choice.MEASURED is the committed GPU check's kernel row over its cuBLAS row."""
    rows = _gpu_check_rows(kernel_choice._SOURCE)
    shape = "B=32 T=256 d=768 p=3072, float32"
    torch_norms = rows[f"per-sample norms, torch backend, {shape}"]
    for backend in ("triton", "cuda"):
        (ratio, _, source), = kernel_choice.MEASURED[("norms", backend)]
        assert source == kernel_choice._SOURCE
        assert ratio == pytest.approx(rows[f"per-sample norms, {backend}, {shape}"] / torch_norms, rel=1e-9)
    (ratio, _, _), = kernel_choice.MEASURED[("clipped_gemm", "triton")]
    gemm = rows[f"layer weight-gradient GEMM G^T A, torch, {shape}"]
    fused = rows[f"clipped GEMM + noise + Adam, triton, {shape}"]
    assert ratio == pytest.approx(fused / (gemm + kernel_choice._UPDATE_AFTER_GEMM), rel=1e-9)


def test_kernels_that_lost_to_cublas_are_not_used_unless_asked(monkeypatch):
    monkeypatch.delenv("ANADP_KERNELS", raising=False)
    for kernel, backend in kernel_choice.MEASURED:
        assert not kernel_choice.use_kernel(kernel, backend)  # every measured row so far: slower than cuBLAS
        assert "x the cuBLAS formulation" in kernel_choice.why_not(kernel, backend)
    assert not kernel_choice.use_kernel("clipped_gemm", "cuda")  # never measured: cuBLAS
    monkeypatch.setitem(kernel_choice.MEASURED, ("norms", "triton"), [(0.7, "a shape", "a file")])
    assert kernel_choice.use_kernel("norms", "triton")
    monkeypatch.setenv("ANADP_KERNELS", "all")
    assert kernel_choice.use_kernel("norms", "cuda") and kernel_choice.use_kernel("clipped_gemm", "triton")
    with pytest.raises(ValueError):
        kernel_choice.use_kernel("attention", "triton")


def test_the_triton_step_takes_cublas_norms_and_gemms_by_default(monkeypatch):
    """Triton still runs the multi-tensor noise + update; the norms and clipped sums are torch's."""
    pytest.importorskip("triton")
    monkeypatch.delenv("ANADP_KERNELS", raising=False)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 2)).to(dev)
    dl = DataLoader(TensorDataset(torch.randn(16, 6), torch.randint(0, 2, (16,))), batch_size=8)
    _, opt, _ = make_private(model, torch.optim.Adam(model.parameters()), dl, max_grad_norm=1.0, noise_multiplier=1.0,
                             backend="triton")
    assert opt._fused_update and opt.norm_kernels is None and not opt._fused_gemm
    assert opt.engine.instantiate_linear  # the torch engine's own choice between ghost and instantiation
    monkeypatch.setenv("ANADP_KERNELS", "all")
    _, opt, _ = make_private(model, torch.optim.Adam(model.parameters()), dl, max_grad_norm=1.0, noise_multiplier=1.0,
                             backend="triton")
    assert opt.norm_kernels is not None and opt._fused_gemm
