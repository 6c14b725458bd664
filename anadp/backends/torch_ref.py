"""The torch backend: PyTorch ops only, on any device — the reference every kernel is tested
against. Norms come from anadp.records, the update from the wrapped torch optimizer."""
from __future__ import annotations

import torch

from .. import philox
from . import Backend


class TorchBackend(Backend):
    name = "torch"

    def add_noise_(self, out: torch.Tensor, key: int, std: float) -> None:
        out.add_(philox.gaussian_of_key(key, out.shape, out.device).to(out.dtype), alpha=std)
