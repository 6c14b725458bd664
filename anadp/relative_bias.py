"""Relative position biases (T5, mT5, UMT5, Switch Transformers; MPNet): an ``nn.Embedding`` indexed
by a (query, key) bucket matrix that the whole batch shares, whose output is added to every sample's
attention scores. Autograd sums the samples' gradients at that broadcast, before the embedding sees
them, so per-sample gradients cannot be recovered at the embedding. The module's bias method
(T5's ``compute_bias``, MPNet's ``compute_position_bias``) is therefore replaced per instance by one
that indexes the embedding with the buckets expanded to the batch, (B, Tq, Tk): the bias is (B, heads,
Tq, Tk), each sample's own copy, the scores it is added to are unchanged, and the embedding's records
are ordinary per-sample embedding records.

Checked when installed: the replacement, on one sample, equals the model's own method.
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
    """The replacement of one module's bias method (``method``): the model's own without gradients, else
    the embedding indexed by the buckets expanded to the batch."""
    method = ""

    def __init__(self, module: nn.Module, name: str, engine):
        self.module, self.name, self.engine = module, name, engine
        self.original = getattr(module, self.method)

    @staticmethod
    def applies(module: nn.Module) -> bool:
        raise NotImplementedError

    def values(self, B: int, *args, **kwargs) -> torch.Tensor:
        """The bias of a batch of B, each sample with its own copy."""
        raise NotImplementedError

    def probe(self) -> tuple:
        """(arguments of the model's method on one sample, the same for ``values``)."""
        raise NotImplementedError

    def replacement(self, module, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.original(*args, **kwargs)
        return self.values(self.engine.batch_size or 1, *args, **kwargs)

    def install(self):
        try:
            args = self.probe()
            with torch.no_grad():  # the embedding's plain forward: the model's own bias against ours
                want, got = self.original(*args), self.values(1, *args)
            same = want.shape == got.shape and torch.equal(want, got)
        except (TypeError, ValueError, RuntimeError, AttributeError):
            same = False
        if not same:
            raise UnsupportedModuleError(
                f"module '{self.name}' ({type(self.module).__name__}): its relative position bias is not the form "
                "anadp knows (buckets of key - query positions indexing relative_attention_bias), so its per-sample "
                "gradients are unknown; freeze relative_attention_bias (requires_grad_(False))")
        setattr(self.module, self.method, types.MethodType(self.replacement, self.module))

    def remove(self):
        self.module.__dict__.pop(self.method, None)


class T5Bias(RelativeBias):
    """T5, mT5, UMT5, Switch Transformers: compute_bias(query_length, key_length, device, ...) -> (1, heads,
    Tq, Tk), added to the scores. (LongT5's local attention, compute_bias(block_length), is another form:
    its embedding is refused as shared-index.)"""
    method = "compute_bias"

    @staticmethod
    def applies(module: nn.Module) -> bool:
        emb = getattr(module, "relative_attention_bias", None)
        return (isinstance(emb, nn.Embedding) and emb.weight.requires_grad
                and _parameters(getattr(module, "compute_bias", None))[:2] == ["query_length", "key_length"]
                and callable(getattr(module, "_relative_position_bucket", None)))

    def probe(self) -> tuple:
        return 3, 5

    def values(self, B, query_length, key_length, device=None, past_seen_tokens=0, cache_position=None, **kwargs):
        m = self.module
        device = m.relative_attention_bias.weight.device if device is None else device
        idx = _buckets(m, query_length, key_length, device, past_seen_tokens, cache_position)
        idx = idx.unsqueeze(0).expand(B, *idx.shape)
        return m.relative_attention_bias(idx).permute(0, 3, 1, 2)  # (B, heads, Tq, Tk)


class MPNetBias(RelativeBias):
    """MPNet: compute_position_bias(x, position_ids=None, num_buckets=32) -> (B, heads, T, T), one bucket matrix
    looked up once and expanded to the batch."""
    method = "compute_position_bias"

    @staticmethod
    def applies(module: nn.Module) -> bool:
        emb = getattr(module, "relative_attention_bias", None)
        return (isinstance(emb, nn.Embedding) and emb.weight.requires_grad
                and _parameters(getattr(module, "compute_position_bias", None))[:1] == ["x"]
                and callable(getattr(module, "relative_position_bucket", None)))

    def probe(self) -> tuple:
        return (torch.zeros(1, 5, 1, device=self.module.relative_attention_bias.weight.device),)

    def values(self, B, x, position_ids=None, num_buckets=32):
        if position_ids is not None:  # the model's own handles only the default positions
            return self.original(x, position_ids, num_buckets)
        T = x.size(1)
        position = torch.arange(T, dtype=torch.long, device=x.device)
        bucket = self.module.relative_position_bucket(position[None, :] - position[:, None], num_buckets=num_buckets)
        idx = bucket.unsqueeze(0).expand(B, T, T)
        return self.module.relative_attention_bias(idx).permute(0, 3, 1, 2).contiguous()  # (B, heads, T, T)


ADAPTERS = (T5Bias, MPNetBias)
