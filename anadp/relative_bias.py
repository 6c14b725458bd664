"""T5-style relative position bias (T5, mT5, UMT5, LongT5, Switch Transformers, ...): an
``nn.Embedding`` indexed by a (query, key) bucket matrix that the whole batch shares, whose output
(1, heads, Tq, Tk) is added to every sample's attention scores. Autograd sums the samples'
gradients at that broadcast, before the embedding sees them, so per-sample gradients cannot be
recovered at the embedding. The attention's ``compute_bias`` is therefore replaced (per instance)
by one that indexes the embedding with the buckets expanded to the batch, (B, Tq, Tk): the bias is
(B, heads, Tq, Tk), each sample's own copy, the scores it is added to are unchanged, and the
embedding's records are ordinary per-sample embedding records.

Checked when installed: the replacement, on one sample, equals the model's own compute_bias.
"""
from __future__ import annotations

import inspect
import types

import torch
from torch import nn

from .layers import UnsupportedModuleError


def _parameters(fn) -> list:
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return []


def applies(module: nn.Module) -> bool:
    """T5's form: compute_bias(query_length, key_length, ...) indexing relative_attention_bias by buckets of
    key - query positions (LongT5's local attention, compute_bias(block_length), is another form: its
    embedding is refused as shared-index)."""
    emb = getattr(module, "relative_attention_bias", None)
    return (isinstance(emb, nn.Embedding) and emb.weight.requires_grad
            and _parameters(getattr(module, "compute_bias", None))[:2] == ["query_length", "key_length"]
            and callable(getattr(module, "_relative_position_bucket", None)))


def _buckets(module, query_length: int, key_length: int, device, past, cache_position) -> torch.Tensor:
    if cache_position is not None:
        context = cache_position.to(device)[:, None]
    else:
        context = torch.arange(query_length, dtype=torch.long, device=device)[:, None] + past
    memory = torch.arange(key_length, dtype=torch.long, device=device)[None, :]
    bucket = module._relative_position_bucket
    if "bidirectional" not in _parameters(bucket):  # UMT5's reads its settings from the module
        return bucket(memory - context)
    return bucket(memory - context, bidirectional=not module.is_decoder,
                  num_buckets=module.relative_attention_num_buckets, max_distance=module.relative_attention_max_distance)


class RelativeBias:
    """The replacement compute_bias of one attention module."""

    def __init__(self, module: nn.Module, name: str, engine):
        self.module, self.name, self.engine = module, name, engine
        self.original = module.compute_bias

    def compute_bias(self, module, query_length, key_length, device=None, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.original(query_length, key_length, device, *args, **kwargs)
        B = self.engine.batch_size or 1
        return self.values(query_length, key_length, device, B, *args, **kwargs)

    def values(self, query_length, key_length, device, B, past_seen_tokens=0, cache_position=None, **kwargs):
        m = self.module
        device = m.relative_attention_bias.weight.device if device is None else device
        idx = _buckets(m, query_length, key_length, device, past_seen_tokens, cache_position)
        idx = idx.unsqueeze(0).expand(B, *idx.shape)
        return m.relative_attention_bias(idx).permute(0, 3, 1, 2)  # (B, heads, Tq, Tk)

    def install(self):
        try:
            with torch.no_grad():  # the embedding's plain forward: the model's own bias against ours
                want = self.original(3, 5)
                got = self.values(3, 5, None, 1)
            same = want.shape == got.shape and torch.equal(want, got)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            same = False
        if not same:
            raise UnsupportedModuleError(
                f"module '{self.name}' ({type(self.module).__name__}): its relative position bias is not the T5 form "
                "anadp knows (buckets of key - query positions indexing relative_attention_bias), so its per-sample "
                "gradients are unknown; freeze relative_attention_bias (requires_grad_(False))")
        self.module.compute_bias = types.MethodType(self.compute_bias, self.module)

    def remove(self):
        self.module.__dict__.pop("compute_bias", None)
