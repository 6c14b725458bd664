"""Shared test helpers: per-sample gradient references by a loop over samples."""
from __future__ import annotations

import copy

import torch


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN anywhere gives inf so that it never passes."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def slice_batch(batch, i):
    if isinstance(batch, dict):
        return {k: slice_batch(v, i) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(slice_batch(v, i) for v in batch)
    if isinstance(batch, torch.Tensor):
        return batch[i:i + 1]
    return batch


def call(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def per_sample_grads(model, batch, loss_fn, B):
    """{param name: (B, *shape)} by one backward per sample on an unhooked copy."""
    ref = copy.deepcopy(model)
    params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    out = {n: [] for n in params}
    for i in range(B):
        ref.zero_grad(set_to_none=True)
        loss_fn(call(ref, slice_batch(batch, i)), i).backward()
        for n, p in params.items():
            out[n].append(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
    return {n: torch.stack(v) for n, v in out.items()}
