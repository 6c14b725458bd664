"""Backends: who draws the noise, computes the per-sample norms and runs the fused update.

A backend is one module in this folder holding a subclass of :class:`Backend` (the
interface, written once below) and one line in ``REGISTRY``:

=========  =====================================================  ==========================
``torch``  PyTorch ops only, any device: the reference              noise
``cpu``    ``torch`` + the compiled CPU noise kernel (csrc/cpu/)    noise
``triton`` the Triton kernels of kernels/ (``anadp.kernels``)       noise, norms, update, GEMM
``cuda``   the compiled CUDA kernels of csrc/ (``anadp._cuda``)     noise, norms, update
=========  =====================================================  ==========================

All of them draw the same Philox noise for the same (seed, step, tensor, element), so
switching backend changes a run by float rounding only. ``auto`` takes triton for CUDA
tensors and cpu (else torch) otherwise; the environment variable ANADP_BACKEND forces
one, and a backend that cannot run says why (``python -m anadp info`` lists them all).
The kernels' table of hyperparameters, optimizer kinds and statistics is defined once,
in :mod:`anadp.update_table` (csrc/update.cuh mirrors it; a test compares them).
"""
from __future__ import annotations

import importlib
import os

import torch

REGISTRY = {"torch": "torch_ref:TorchBackend", "cpu": "cpu:CpuBackend", "triton": "triton:TritonBackend",
            "cuda": "cuda:CudaBackend"}
BACKENDS = tuple(REGISTRY)


class BackendUnavailableError(RuntimeError):
    pass


class Backend:
    """The interface. A backend implements ``add_noise_`` and whichever of the optional
    capabilities it sets: per-sample norms (``norms``), the multi-tensor noise + optimizer
    update (``fused_update``), the clipped GEMM with the update in its epilogue (``fused_gemm``).
    Without a capability the torch reference does that part."""

    name = "?"
    norms = False
    fused_update = False
    fused_gemm = False
    # warn when a capability cannot run for this model or optimizer (False: a fallback that only costs time)
    warn_fallback = True
    # the fused update leaves the privatized gradient in p.grad (multi_tensor_update(store_grad=True));
    # False: p.grad is never formed (the GPU kernels, where it would be one more model-sized buffer)
    stores_grad = False

    def why_unavailable(self, device: torch.device | None) -> str | None:
        """None if this backend can run for tensors on ``device`` (any device if None), else why."""
        return None

    def add_noise_(self, out: torch.Tensor, key: int, std: float) -> None:
        """out += std * z in place, z the Philox stream of ``key`` (anadp.philox.group_key) at
        out's row-major element indices. Default: through the fused update (plain SGD at lr -1
        on a zero gradient adds the noise)."""
        if not self.fused_update:
            raise NotImplementedError
        from .. import update_table as U
        if not (out.is_contiguous() and out.dtype == torch.float32):  # the kernels take contiguous float32
            tmp = out.float().contiguous()
            self.add_noise_(tmp, key, std)
            out.copy_(tmp)
            return
        row = torch.zeros(1, U.N_COLS, device=out.device)
        row[0, U.LR], row[0, U.NOISE_STD], row[0, U.INV_DENOM] = -1.0, std, 1.0
        flat = out.view(-1)
        self.multi_tensor_update([flat], [torch.zeros_like(flat)], [None], [None], [key], row, kind=U.SGD)

    def add_noise_from_(self, out: torch.Tensor, key: int, std: float, start: int) -> None:
        """add_noise_ from element ``start`` of the stream on: out holds elements start .. start +
        out.numel() - 1 of a larger tensor (an FSDP2 shard). Default: the torch reference's draw."""
        from .. import philox
        out.add_(philox.gaussian_of_key(key, out.shape, out.device, start=start).to(out.dtype), alpha=std)

    def add_noise_multi_(self, outs: list, keys: list, stds: list) -> None:
        """add_noise_ on every tensor of ``outs`` with its key and std; a backend may do it in one call."""
        for out, key, std in zip(outs, keys, stds):
            self.add_noise_(out, key, std)

    # --- norms (optional) ---------------------------------------------------------------
    def linear_sq_norms(self, A: torch.Tensor, G: torch.Tensor, out=None, out_bias=None, ghost=None):
        """(weight, bias) per-sample squared norms, (B,) each, of a Linear with input A (B, T, d) and
        output gradient G (B, T, p), into ``out`` / ``out_bias`` if given; ``ghost`` forces the ghost
        (True) or instantiated (False) computation. Reference: anadp.records.LinearRecord.sq_norm."""
        raise NotImplementedError

    def embedding_sq_norms(self, idx: torch.Tensor, G: torch.Tensor, out=None) -> torch.Tensor:
        """(B,) per-sample squared norms of an embedding's gradient. Reference: EmbeddingRecord.sq_norm."""
        raise NotImplementedError

    # --- fused update (optional) ----------------------------------------------------------
    def multi_tensor_update(self, params, grads, ms, vs, keys, rows, *, kind, has_noise=True, tile=None,
                            sens=None, stat="abs_p_grad"):
        """One launch: grad = (clipped sum + noise_std z) * inv_denom, then the SGD / Adam update of
        every tensor (anadp.update_table rows); returns (per-tile sums of ``stat``, tile owner)."""
        raise NotImplementedError

    def clipped_linear_update(self, A, G, c, W, *, kind, row, key, m=None, v=None, prior=None, transposed=False,
                              has_noise=True, sens=None, stat="abs_p_grad"):
        """The same for one Linear weight whose clipped sum A^T diag(c) G never leaves the GEMM."""
        raise NotImplementedError


_instances: dict[str, Backend] = {}


def get(name: str) -> Backend:
    """The backend object registered under ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {('auto',) + BACKENDS}")
    if name not in _instances:
        module, cls = REGISTRY[name].split(":")
        _instances[name] = getattr(importlib.import_module(f"{__name__}.{module}"), cls)()
    return _instances[name]


def why_unavailable(name: str, device: torch.device | None = None) -> str | None:
    """None if backend ``name`` can run on ``device`` (any device if None), else the reason."""
    return get(name).why_unavailable(device)


def auto(device: torch.device | None = None) -> str:
    """What 'auto' picks for tensors on ``device``: triton for CUDA, else cpu, else torch."""
    if device is not None and device.type == "cuda" and why_unavailable("triton", device) is None:
        return "triton"
    return "cpu" if why_unavailable("cpu", device) is None else "torch"


def resolve(requested: str = "auto", device: torch.device | None = None) -> str:
    """The backend to use: ANADP_BACKEND if set, else ``requested``; 'auto' picks by device."""
    name = os.environ.get("ANADP_BACKEND") or requested
    if name == "auto":
        return auto(device)
    reason = why_unavailable(name, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {name!r} is not available: {reason}")
    return name


def report() -> str:
    """One line per backend: available, or why not (``python -m anadp info``)."""
    lines = []
    for name in BACKENDS:
        reason = why_unavailable(name)
        lines.append(f"backend {name:7s} {'available' if reason is None else 'unavailable: ' + reason}")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    lines.append(f"auto on {device.type}: {resolve('auto', device)}"
                 + (f" (ANADP_BACKEND={os.environ['ANADP_BACKEND']} overrides)" if os.environ.get("ANADP_BACKEND") else ""))
    return "\n".join(lines)
