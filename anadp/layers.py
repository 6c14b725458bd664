"""Supported layers: each gets a forward that runs through a custom autograd
Function whose backward returns the input gradient only and hands
(activation, output gradient) to the engine. Autograd therefore never forms
the weight gradient; the engine forms the clipped sum later, from (A, G) or,
where they are smaller, from per-sample gradients formed in the hook.

Here: nn.Linear, Hugging Face Conv1D, nn.Embedding (and scaled word
embeddings), nn.LayerNorm, nn.RMSNorm, the Hugging Face Llama-style and T5
RMSNorm modules; nn.MultiheadAttention in attention.py, convolutions in
conv.py; every other module with trainable parameters in generic.py. PEFT LoRA
layers are made of nn.Linear modules and need nothing more.
"""
from __future__ import annotations

import functools
import types

import torch
import torch.nn.functional as F
from torch import nn

from . import compiled
from .records import (DenseRecord, EmbeddingRecord, LinearRecord, TokenSumRecord, _acc, instantiate_at_backward,
                      token_sum)


def _direct_apply(fn: type):
    """``fn.apply`` without autograd.Function.apply's Python wrapper (argument binding for
    setup_context, functorch's dead-wrapper unwrapping: ~1/4 of a hooked Linear's forward host
    time), which these functions need only under functorch transforms; there, and on a torch
    without the C entry point, the wrapper."""
    base = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
    if base is None or not hasattr(base, "__get__"):
        return fn.apply
    direct = base.__get__(None, fn)
    active = torch._C._are_functorch_transforms_active

    def apply(*args):
        return fn.apply(*args) if active() else direct(*args)
    return apply


def _own(y: torch.Tensor) -> torch.Tensor:
    """``y`` as a tensor of its own where an op returned it as a view of an intermediate (F.linear with a
    bias on a 3-D input, F.embedding on a 2-D index): autograd forbids writing in place into views made
    inside a custom Function, and models write into layer outputs (``h[:, 0] += ...``). Same storage, no copy."""
    return torch.ops.aten._unsafe_view(y, y.shape) if y._base is not None else y


def _linear_out(x, weight, bias, transposed):
    if transposed:
        y = x @ weight
        return y + bias if bias is not None else y
    if bias is not None and x.dim() > 2 and x.is_contiguous():
        # F.linear's own path (addmm on the flattened input) with an output of its own, not a view
        y = torch.addmm(bias, x.view(-1, x.shape[-1]), weight.t())
        return torch.ops.aten._unsafe_view(y, (*x.shape[:-1], weight.shape[0]))
    return F.linear(x, weight, bias)


def _linear_input_grad(g, weight, transposed):
    weight = weight.to(g.dtype)  # a no-op where the forward kept autocast's cast
    return g @ weight.t() if transposed else g @ weight


class _TracedFn(torch.autograd.Function):
    """A hooked layer's call inside torch.compile: its forward (``op_out``) is traced with the model, so it runs no
    Python, and so is its backward (``traced_backward``), but for an op that files the records (anadp.compiled):
    whatever of the input gradient and the records' algebra is plain tensor maths is in the graph. Nothing counts
    the calls there: per-layer clipping, which completes a group in the backward by its layers' call counts, clips
    these groups when the backward ends; and each record takes one reader, which decides only how its norm is
    formed (ghost or per-sample gradients), not its value."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer, buf, tick):
        ctx.layer, ctx.buf = layer, buf  # the flat path's buffer of the layer's block and its tick, else None
        ctx.save_for_backward(*layer.op_saved(x, weight, bias))
        return layer.op_out(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        needs = ctx.needs_input_grad[0]
        saved = list(ctx.saved_tensors)
        if ctx.buf is None:
            gx = ctx.layer.traced_backward(saved, g, needs)
            return (gx if needs else None), None, None, None, None, None
        gx = ctx.layer.flat_backward(saved, g, needs, ctx.buf)
        return (gx if needs else None), None, None, None, None, g.new_zeros(())  # tick: "a backward ran"


class _LinearFn(torch.autograd.Function):
    """y = x W^T + b (or x W + b for Conv1D); backward: input gradient only."""

    @staticmethod
    def forward(ctx, x, weight, bias, transposed, on_backward):
        kind = x.device.type
        if torch.is_autocast_enabled(kind) and weight.dtype != torch.get_autocast_dtype(kind) and weight.is_floating_point():
            # the cast autocast would make (and cache) here, made once and kept for the backward's input gradient
            weight = weight.to(torch.get_autocast_dtype(kind))
        ctx.save_for_backward(x, weight)
        ctx.transposed, ctx.on_backward = transposed, on_backward
        return _linear_out(x, weight, bias, transposed)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = _linear_input_grad(g, weight, ctx.transposed) if ctx.needs_input_grad[0] else None
        ctx.on_backward(x, g)
        return gx, None, None, None, None


class _EmbeddingFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, idx, weight, padding_idx, on_backward):
        ctx.save_for_backward(idx)
        ctx.on_backward = on_backward
        return _own(F.embedding(idx, weight, padding_idx))

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        ctx.on_backward(idx, g)
        return None, None, None, None


class _AffineFn(torch.autograd.Function):
    """y = xhat * w (+ b), the parameterized tail of LayerNorm / RMSNorm. Saves the norm's input x,
    which the normalization keeps for its own backward anyway, not xhat (one more activation-sized
    tensor per norm layer): the hook gets xhat recomputed, under the forward's autocast state."""

    @staticmethod
    def forward(ctx, xhat, weight, bias, x, normalize, on_backward):
        ctx.save_for_backward(x, weight)
        ctx.normalize, ctx.on_backward, ctx.xhat_dtype = normalize, on_backward, xhat.dtype
        kind = x.device.type
        ctx.amp = (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind))
        y = xhat * weight
        return y + bias if bias is not None else y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        gx = (g * weight).to(ctx.xhat_dtype) if ctx.needs_input_grad[0] else None
        with torch.no_grad(), torch.autocast(x.device.type, dtype=ctx.amp[1], enabled=ctx.amp[0]):
            xhat = ctx.normalize(x)
        ctx.on_backward(xhat, g)
        return gx, None, None, None, None, None


class _LayerNormFn(torch.autograd.Function):
    """y = LayerNorm(x) * w + b in torch's fused kernel: one output tensor, as without the hook
    (the generic tail below allocates xhat, xhat * w and the sum). Saves x and w; the backward
    recomputes the statistics, hands (xhat, g) to the hook and takes the input gradient from
    torch's fused backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, shape, eps, on_backward):
        y = F.layer_norm(x, shape, weight, bias, eps)  # autocast decides the dtype, as in the module
        ctx.save_for_backward(x, weight)
        ctx.shape, ctx.eps, ctx.on_backward, ctx.dtype = shape, eps, on_backward, y.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        xhat, gx = _layer_norm_backward(x.to(ctx.dtype), weight, g, ctx.shape, ctx.eps, ctx.needs_input_grad[0])
        ctx.on_backward(xhat, g)
        return gx, None, None, None, None, None


def _layer_norm_backward(x, weight, g, shape, eps, input_grad: bool):
    """(xhat, input gradient or None) of y = LayerNorm(x) w + b; ``x`` as the forward normalized it (float32
    under CUDA autocast)."""
    xhat, mean, rstd = torch.native_layer_norm(_acc(x), shape, None, None, eps)
    gx = None
    if input_grad:
        stat = torch.promote_types(x.dtype, weight.dtype)  # the fused kernels' statistics dtype
        gx = torch.ops.aten.native_layer_norm_backward(g, x, shape, mean.to(stat), rstd.to(stat), weight,
                                                      None, [True, False, False])[0]
    return xhat, gx


class UnsupportedModuleError(ValueError):
    """A module anadp cannot train privately as it is (the message says why and what to do)."""


_linear = _direct_apply(_LinearFn)
_embedding = _direct_apply(_EmbeddingFn)
_affine = _direct_apply(_AffineFn)
_layer_norm = _direct_apply(_LayerNormFn)


def _trainable(p) -> bool:
    return p is not None and p.requires_grad


def _tokens(t: torch.Tensor, feature_dims: int = 1) -> torch.Tensor:
    """(B, ..., *features) -> (B, T, *features); also for B = 0 (empty Poisson batch)."""
    k = t.dim() - feature_dims
    if k == 2:  # already (B, T, ...): no view op to dispatch
        return t
    return t.unsqueeze(1) if k == 1 else t.flatten(1, k - 1)


def record_linear(engine, weight, bias, A, G, transposed=False, readers=1, copy=False):
    """Record the weight (and bias) of y = A W^T + b from its input A (B, T, d) and output gradient
    G (B, T, p): as (A, G), or as per-sample gradients where those are smaller. ``copy``: a kept A or G
    is copied unless the record made its own already (see LinearLayer.op_record)."""
    rec = LinearRecord(A, G, transposed, readers) if _trainable(weight) else None
    if rec is not None and engine.instantiate_linear and instantiate_at_backward(A.shape[1], A.shape[2], G.shape[2],
                                                                                 readers):
        with torch.no_grad():
            rec = DenseRecord(rec.dense())  # A and G are not kept
    if copy and isinstance(rec, LinearRecord):
        rec.A = engine.copy_of(A) if rec.A is A else rec.A  # one copy of an input that q, k and v read
        rec.G = rec.G.clone() if rec.G is G else rec.G
    if rec is not None:
        engine.record(weight, rec)
    if _trainable(bias):  # source: a norm kernel gives the bias norm with the weight's
        engine.record(bias, TokenSumRecord(rec) if isinstance(rec, LinearRecord) else DenseRecord(token_sum(G)))


def call_on_blocks(layer, module, x, *rest):
    """``layer.forward`` on a flattened batch ``x`` (B k, ...) whose rows are the samples' k tokens in
    blocks (engine.flat_rows): run on the (B, k, ...) view, so that its records are batch first, and
    the output flattened back (and marked as a flattened batch for the layers after it); None where
    ``x`` is not provably such a batch."""
    engine = layer.engine
    k = engine.flat_rows(x)
    if not k:
        return None
    y = layer.forward(module, x.view(engine.batch_size, k, *x.shape[1:]), *rest)
    y = y.flatten(0, 1)
    engine.mark_rows(y, k)
    return y


def _flattened(engine, x) -> bool:
    """Whether x may be a flattened batch: more rows than the batch (tokens of (B T, d); Swin's windows of
    (B n_windows, N, d)) (cheap; call_on_blocks decides)."""
    B = engine.batch_size
    return B is not None and x.dim() >= 2 and x.shape[0] != B and engine.batch_first


class Layer:
    """One hooked module: installs its forward and turns backward calls into records."""

    def __init__(self, module: nn.Module, name: str, engine):
        self.module, self.name, self.engine = module, name, engine
        # the parameters as wrapped, which key the records: FSDP2 (fully_shard) swaps unsharded tensors
        # into the module around each forward and backward and the sharded ones back after
        self.params = dict(module.named_parameters(recurse=self.whole, remove_duplicate=False))

    def param(self, name: str):
        """The wrapped parameter ``name`` (None if the module has none), or the module's attribute
        where it is no parameter (a parametrization or a property)."""
        p = self.params.get(name)
        return p if p is not None or name in self.module._parameters else getattr(self.module, name, None)

    # True: the layer computes its submodules' per-sample gradients too (they are not hooked alone)
    whole = False
    slot = 0  # its index in engine.layers (engine.calls counts its calls per forward)

    @staticmethod
    def refusal(module: nn.Module) -> str | None:
        """Why this module cannot be trained privately as configured (checked at wrap time), or None."""
        return None

    @staticmethod
    def fits(module: nn.Module) -> bool:
        """Whether this layer's math is the module's as configured (else the generic path takes it)."""
        return True

    def install(self):
        forward = self.forward
        if not hasattr(self, "op_out"):
            # a layer with no op for the compiler (convolutions, attention, the generic path) runs eagerly
            # inside a compiled model: a graph break there, never a trace of its book-keeping
            forward = functools.partial(compiled.eagerly, self.forward)
        self.module.forward = types.MethodType(forward, self.module)
        self.key = compiled.register(self)

    def remove(self):
        self.module.__dict__.pop("forward", None)
        compiled.unregister(self.key)

    # Inside torch.compile's tracing a layer's call is traced (``_TracedFn``): op_out its output, op_saved the
    # tensors its backward gets, traced_backward its backward. Here that is the op anadp::record_backward
    # (anadp.compiled), whose body is op_record, and no input gradient (an embedding's input is indices); a
    # Linear traces its input gradient beside that op, a norm its input gradient and per-sample gradients
    # beside the op that files them (anadp::record_dense).
    def trainable_params(self) -> list:
        """The trainable ones of the layer's weight and bias, in that order."""
        return [p for p in (self.param("weight"), self.param("bias")) if _trainable(p)]

    def op_saved(self, x, weight, bias) -> list:
        return [x, weight]

    def traced_backward(self, saved, g, input_grad):
        if input_grad:  # (a layer whose input takes a gradient traces it: Linear, the norms)
            raise NotImplementedError(f"{type(self).__name__} traces no input gradient")
        torch.ops.anadp.record_backward.default(saved, g, self.key)
        return None

    def op_record(self, saved, g):
        """The records of a traced call (anadp::record_backward), at run time."""
        raise NotImplementedError

    def compiled_call(self, x, weight, bias) -> torch.Tensor:
        """The layer's call inside torch.compile: on the flat path where the engine takes it (anadp.flat)."""
        compiled.require()
        flat = self.engine.flat_now()
        if flat is None:
            return _TracedFn.apply(x, weight, bias, self, None, None)
        return _TracedFn.apply(x, weight, bias, self, flat.bufs[self.flat_block], flat.tick)

    # the flat path (anadp.flat): the layer's backward adds the per-sample gradients of its trainable weight and
    # bias (in that order, flattened, side by side) into its block's buffer (``flat_block``: the block's index,
    # set by the engine) and returns its input gradient
    flat_backward = None
    flat_block = None

    @staticmethod
    def flat_add(buf: torch.Tensor, parts: list) -> None:
        B = buf.shape[0]
        buf.add_(parts[0].reshape(B, -1) if len(parts) == 1 else torch.cat([t.reshape(B, -1) for t in parts], 1))


class RowwiseLayer(Layer):
    """A layer that treats every row (token) of its input alike (Linear, the norms): one forward for the
    three ways it is called (uncompiled, inside torch.compile, on a flattened batch); ``hooked_forward``
    is the layer's own."""

    def forward(self, module, x):
        if not torch.is_grad_enabled():
            return type(module).forward(module, x)
        if compiled.compiling():
            if not _flattened(self.engine, x):
                return self.compiled_forward(module, x)
            return compiled.eagerly(self.refuse_flattened, x)  # raised uncompiled: the error reaches the caller as it is
        return self.uncompiled_forward(module, x)

    def refuse_flattened(self, x):
        raise UnsupportedModuleError(
            f"module '{self.name}' is called on a flattened batch of shape {tuple(x.shape)} ({self.engine.batch_size} "
            "samples) inside torch.compile: anadp proves the rows of a flattened batch from autograd's graph, which "
            "the compiled model replaces, so it cannot form their per-sample gradients there. Run this model uncompiled")

    def uncompiled_forward(self, module, x):
        if _flattened(self.engine, x) and self.takes_blocks(module):
            y = call_on_blocks(self, module, x)
            if y is not None:
                return y
        return self.hooked_forward(module, x)

    def hooked_forward(self, module, x):
        raise NotImplementedError

    @staticmethod
    def takes_blocks(module) -> bool:
        """Whether a flattened batch (B k, ...) may be run as (B, k, ...) (see call_on_blocks)."""
        return True

    def compiled_forward(self, module, x):
        params = module._parameters  # (a norm may have no bias attribute at all)
        weight, bias = (params["weight"], params.get("bias")) if "weight" in params else _weight_and_bias(module)
        kind = x.device.type
        if self.autocast is not None and torch.is_autocast_enabled(kind):
            # the op's body runs without autocast: its casts here, in the graph (a 16-bit GEMM, a float32 norm)
            dtype = torch.get_autocast_dtype(kind) if self.autocast == "low" else torch.float32
            x, weight = x.to(dtype), weight.to(dtype)
            bias = bias.to(dtype) if bias is not None else None
        return self.compiled_call(x, weight, bias)

    # what autocast makes of the layer's op: "low" (its 16-bit dtype), "float32", or None (nothing)
    autocast = None


def _weight_and_bias(module: nn.Module) -> tuple:
    """module.weight, module.bias, read from the parameter dict where they are there (nn.Module's
    attribute fallback is a Python call per read: four per hooked Linear a step)."""
    params = module._parameters
    if "weight" in params and "bias" in params:
        return params["weight"], params["bias"]
    return module.weight, module.bias  # a parametrization or a property


class LinearLayer(RowwiseLayer):
    transposed = False
    autocast = "low"

    def count_call(self, x):
        """The engine's count of this layer's calls and of x's readers (q, k and v share one input)."""
        self.engine.calls[self.slot] += 1
        self.engine.count_reader(x)

    def hooked_forward(self, module, x):
        self.count_call(x)
        weight, bias = _weight_and_bias(module)
        return _linear(x, weight, bias, self.transposed, self.on_backward)

    def op_out(self, x, weight, bias):
        return _linear_out(x, weight, bias, self.transposed)

    def traced_backward(self, saved, g, input_grad):  # y = x W^T + b (x W + b transposed)
        torch.ops.anadp.record_backward.default(saved, g, self.key)
        return _linear_input_grad(g, saved[1], self.transposed) if input_grad else None

    def flat_backward(self, saved, g, input_grad, buf):
        x, weight = saved
        A, G = (_tokens(t).to(buf.dtype) for t in self.engine.to_batch_first(self.name, x, g))
        parts = []
        if _trainable(self.param("weight")):
            parts.append(torch.bmm(A.transpose(1, 2), G) if self.transposed else torch.bmm(G.transpose(1, 2), A))
        if _trainable(self.param("bias")):
            parts.append(G.sum(1))
        self.flat_add(buf, parts)
        return _linear_input_grad(g, weight, self.transposed) if input_grad else None

    def op_record(self, saved, g):
        """The records of a traced call (anadp::record_backward): of copies of x and g (a compiled graph reuses
        their memory once the op returns, knowing nothing of the records that hold them), one reader each."""
        x, g = self.engine.to_batch_first(self.name, saved[0], g)
        record_linear(self.engine, self.param("weight"), self.param("bias"), _tokens(x), _tokens(g), self.transposed,
                      copy=True)

    def on_backward(self, x, g):
        engine = self.engine
        readers = engine.readers(x)
        x, g = engine.to_batch_first(self.name, x, g)
        record_linear(engine, self.param("weight"), self.param("bias"), _tokens(x), _tokens(g), self.transposed, readers)


class Conv1DLayer(LinearLayer):
    """Hugging Face GPT-2 Conv1D: a Linear whose weight is stored (in, out)."""
    transposed = True


class EmbeddingLayer(Layer):
    @staticmethod
    def refusal(module):
        if module.max_norm is not None:
            return ("nn.Embedding(max_norm=...) renormalizes the looked-up rows in place at every forward, a write "
                    "to the weights outside the noisy update; use max_norm=None")
        if module.scale_grad_by_freq:
            return ("nn.Embedding(scale_grad_by_freq=True) divides each row's gradient by its count in the whole "
                    "batch, so one sample changes the others' gradients (clipping no longer bounds its influence); "
                    "use scale_grad_by_freq=False")
        return None

    def forward(self, module, idx):
        if not torch.is_grad_enabled():
            return type(module).forward(module, idx)
        if not compiled.compiling():
            self.engine.calls[self.slot] += 1
        idx = self.engine.broadcast_indices(self.name, idx)
        B, dim = self.engine.batch_size, (0 if self.engine.batch_first else 1)
        if B is not None and (idx.dim() <= dim or idx.shape[dim] != B):
            raise UnsupportedModuleError(
                f"module '{self.name}' is indexed by a tensor of shape {tuple(idx.shape)} without the batch dimension "
                f"({B} samples): its output is shared by the batch, and autograd sums the samples' gradients before "
                "they reach it, so its per-sample gradients cannot be formed. Index it per sample (expand the index "
                "to the batch), or freeze it (weight.requires_grad_(False))")
        if compiled.compiling():
            return self.compiled_call(idx, module.weight, None)
        return _embedding(idx, module.weight, module.padding_idx, self.on_backward)

    def op_out(self, idx, weight, bias):
        return _own(F.embedding(idx, weight, self.module.padding_idx))

    def op_saved(self, idx, weight, bias):
        return [idx]

    def op_record(self, saved, g):
        self.on_backward(saved[0].clone(), g.clone())  # copies: see LinearLayer.op_record

    def flat_backward(self, saved, g, input_grad, buf):
        idx, g = self.engine.to_batch_first(self.name, saved[0], g)
        idx, G = _tokens(idx, 0), _tokens(g).to(buf.dtype)
        m = self.module
        if m.padding_idx is not None:  # the padding row gets no gradient
            G = torch.where((idx == m.padding_idx)[..., None], 0, G)
        B = idx.shape[0]
        rows = torch.arange(B, device=idx.device)[:, None].expand(idx.shape)
        buf.view(B, m.num_embeddings, -1).index_put_((rows, idx), G, accumulate=True)
        return None

    def on_backward(self, idx, g):
        idx, g = self.engine.to_batch_first(self.name, idx, g)
        m = self.module
        self.engine.record(self.param("weight"), EmbeddingRecord(_tokens(idx, 0), _tokens(g), m.num_embeddings, m.padding_idx))


class ScaledEmbeddingLayer(EmbeddingLayer):
    """An embedding whose forward scales the lookup: weight[idx] * embed_scale (Gemma, BART, M2M100 ...;
    recognized by ``recognize``). The scale is applied by autograd after the hooked lookup, so the
    lookup's output gradient, which the records keep, already carries it."""

    @staticmethod
    def lookup(module, idx):
        scale = module.embed_scale
        if isinstance(scale, torch.Tensor):
            scale = scale.to(module.weight.dtype)
        return F.embedding(idx, module.weight, module.padding_idx) * scale

    def forward(self, module, idx):
        if not torch.is_grad_enabled():
            return type(module).forward(module, idx)
        scale = module.embed_scale
        out = super().forward(module, idx)
        return out * (scale.to(module.weight.dtype) if isinstance(scale, torch.Tensor) else scale)


class NormLayer(RowwiseLayer):
    """LayerNorm / RMSNorm: normalization through autograd, affine tail hooked (``_AffineFn``);
    LayerNorm overrides the forward with one fused function."""

    def normalize(self, module, x):
        raise NotImplementedError

    @staticmethod
    def takes_blocks(module) -> bool:
        return module.weight.dim() == 1

    def hooked_forward(self, module, x):
        self.engine.calls[self.slot] += 1
        xhat = self.normalize(module, x)
        return _affine(xhat, module.weight, getattr(module, "bias", None), x,
                       lambda t: self.normalize(module, t), self.on_backward)

    # compiled (every NormLayer but LayerNorm normalizes by the root mean square: xhat = x r, r = (mean x^2 + eps)^-1/2)
    def op_out(self, x, weight, bias):
        y = self.normalize(self.module, x) * weight
        return y + bias if bias is not None else y

    def norm_backward(self, saved, g, input_grad):
        """(xhat, the input gradient or None) of a traced call."""
        x, weight = saved
        xhat = self.normalize(self.module, x)
        gx = None
        if input_grad:  # d(x r)/dx v = r (v - xhat mean(v xhat)), in float32
            xf, v = x.float(), (g * weight).float()
            eps = getattr(self.module, "variance_epsilon", getattr(self.module, "eps", None))
            r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + (torch.finfo(xf.dtype).eps if eps is None else eps))
            h = xf * r
            gx = (r * (v - h * (v * h).mean(-1, keepdim=True))).to(x.dtype)
        return xhat, gx

    def traced_backward(self, saved, g, input_grad):
        """The input gradient and the per-sample gradients in the graph; the op only files them."""
        xhat, gx = self.norm_backward(saved, g, input_grad)
        if not self.engine.batch_first:
            xhat, g = xhat.movedim(1, 0), g.movedim(1, 0)
        parts = self.per_sample_grads(xhat, g)
        if parts:
            torch.ops.anadp.record_dense.default(parts, self.key)
        return gx

    def flat_backward(self, saved, g, input_grad, buf):
        xhat, gx = self.norm_backward(saved, g, input_grad)
        if not self.engine.batch_first:
            xhat, g = xhat.movedim(1, 0), g.movedim(1, 0)
        self.flat_add(buf, self.per_sample_grads(xhat, g))  # the trainable of weight and bias, in that order
        return gx

    def op_record_dense(self, parts):
        """The records of a traced call (anadp::record_dense), whose per-sample gradients the graph formed:
        copies, as the graph reuses their memory once the op returns."""
        self.engine.check_batch(self.name, parts[0])
        for p, part in zip(self.trainable_params(), parts):
            self.engine.record(p, DenseRecord(part.clone()))

    def on_backward(self, xhat, g):
        xhat, g = self.engine.to_batch_first(self.name, xhat, g)
        for p, part in zip(self.trainable_params(), self.per_sample_grads(xhat, g)):
            self.engine.record(p, DenseRecord(part))

    def per_sample_grads(self, xhat, g) -> list:
        """The per-sample gradients of the trainable ones of weight and bias, from batch-first xhat (recomputed
        for the backward: ours to overwrite) and g."""
        k = self.param("weight").dim()
        parts = []
        if _trainable(self.param("weight")):
            # in place where xhat's dtype is the product's (of two float dtypes: the same, or the wider one),
            # told without dispatching an op (torch.result_type does not trace, torch.promote_types dispatches)
            wider = xhat.dtype == g.dtype or xhat.dtype.itemsize > g.dtype.itemsize
            gx = xhat.mul_(g) if wider else xhat * g
            parts.append(token_sum(_tokens(gx, k)))
        if _trainable(self.param("bias")):
            parts.append(token_sum(_tokens(g, k)))
        return parts


class LayerNormLayer(NormLayer):
    """nn.LayerNorm, whole, through one fused function (``_LayerNormFn``)."""
    autocast = "float32"

    @staticmethod
    def takes_blocks(module) -> bool:
        return len(module.normalized_shape) == 1

    def hooked_forward(self, module, x):
        self.engine.calls[self.slot] += 1
        return _layer_norm(x, module.weight, module.bias, module.normalized_shape, module.eps, self.on_backward)

    def op_out(self, x, weight, bias):
        m = self.module
        return F.layer_norm(x, m.normalized_shape, weight, bias, m.eps)

    def norm_backward(self, saved, g, input_grad):
        x, weight = saved
        m = self.module
        return _layer_norm_backward(x, weight, g, m.normalized_shape, m.eps, input_grad)


class RMSNormLayer(NormLayer):
    def normalize(self, module, x):
        return F.rms_norm(x, module.normalized_shape, None, module.eps)


class HFRMSNormLayer(NormLayer):
    """Llama/Qwen/Mistral RMSNorm: normalize in float32, cast back, then scale."""

    def normalize(self, module, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return h.to(x.dtype)


class T5NormLayer(NormLayer):
    """T5's RMSNorm: the mean square in float32, the input (in its own dtype) times its rsqrt, cast to a
    16-bit weight's dtype, then scaled."""

    def normalize(self, module, x):
        h = x * torch.rsqrt(x.to(torch.float32).pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
        return h.to(module.weight.dtype) if module.weight.dtype in (torch.float16, torch.bfloat16) else h


try:
    from torch.distributed.fsdp import FSDPModule as _FSDPModule
except ImportError:  # a torch without FSDP2
    _FSDPModule = None

REGISTRY: dict = {nn.Linear: LinearLayer, nn.Embedding: EmbeddingLayer, nn.LayerNorm: LayerNormLayer}
if hasattr(nn, "RMSNorm"):
    REGISTRY[nn.RMSNorm] = RMSNormLayer


def register(module_type):
    """Class decorator: the Layer that handles modules of exactly ``module_type``."""
    def add(cls):
        REGISTRY[module_type] = cls
        return cls
    return add


def module_type(module: nn.Module) -> type:
    """The module's class; for a module wrapped with FSDP2's fully_shard (class FSDP<Name>, a subclass
    of FSDPModule and the original class), the original class."""
    cls = type(module)
    if _FSDPModule is not None and issubclass(cls, _FSDPModule):
        cls = next((b for b in cls.__bases__ if not issubclass(b, _FSDPModule)), cls)
    return cls


def layer_class(module: nn.Module):
    """The Layer class that handles this module, or None (then anadp.generic's, if it has trainable
    parameters). A subclass of a registered layer is that layer only if it keeps the parent's forward,
    or if its forward is recognized (``recognize``): never by assuming the parent's math."""
    cls = module_type(module)
    layer = REGISTRY.get(cls)
    if layer is None:
        name = cls.__name__
        if name == "Conv1D" and cls.__module__.startswith("transformers"):
            return Conv1DLayer
        # Llama-style: weight * normalize(x.float()).to(dtype); Gemma's (1 + weight) has no variance_epsilon
        if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            return HFRMSNormLayer
        if name.endswith("T5LayerNorm") and hasattr(module, "variance_epsilon"):
            return T5NormLayer
        parent = next((b for b in cls.__mro__[1:] if b in REGISTRY), None)
        if parent is None:
            return None
        layer = REGISTRY[parent] if cls.forward is parent.forward else recognize(module, parent)
    return layer if layer is not None and layer.fits(module) else None


def recognize(module: nn.Module, parent: type):
    """The Layer for a subclass of a registered layer with its own forward, where that forward is provably
    the parent's math on a random probe input: Falcon's FalconLinear (x W^T + b written out) as a Linear,
    and the scaled word embeddings of Gemma, BART and others (the lookup times ``embed_scale``) as
    ``ScaledEmbeddingLayer``. None otherwise (the generic path, exact for any forward)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.device.type == "meta" or not w.is_floating_point():
        return None
    g = torch.Generator(device=w.device).manual_seed(0)
    try:
        with torch.no_grad():
            if parent is nn.Linear:
                x = torch.randn(2, 3, w.shape[1], generator=g, device=w.device, dtype=w.dtype)
                same = _close(type(module).forward(module, x), F.linear(x, w, module.bias))
                return LinearLayer if same else None
            if parent is nn.Embedding and hasattr(module, "embed_scale") and module.max_norm is None:
                idx = torch.randint(0, w.shape[0], (2, 3), generator=g, device=w.device)
                same = _close(type(module).forward(module, idx), ScaledEmbeddingLayer.lookup(module, idx))
                return ScaledEmbeddingLayer if same else None
    except (TypeError, ValueError, RuntimeError, IndexError, AttributeError):  # a forward of another signature
        return None
    return None


def _close(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(a.dtype, 1e-2)
    return bool(((a.double() - b.double()).norm() <= tol * b.double().norm()).item())
