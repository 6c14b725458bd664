"""The hooked layers as custom ops, for torch.compile: where dynamo traces a private model, each hooked
layer's backward is one opaque op (``anadp::hooked_backward``, the records), its call another (``anadp::hooked``)
where per-layer clipping needs the calls counted (else the call is traced: anadp.layers' ``_TracedFn``), and
the engine's per-forward book-keeping a third (``anadp::begin_forward``).
Their bodies run eagerly at run time, so the engine's Python state (calls, readers, records, the
accumulator's clipping in the backward) is the eager path's; the compiler sees only tensors in, tensors
out, and traces the rest of the model whole (``fullgraph=True``).

The backward op and the book-keeping op return nothing the graph needs (the layers' parameters get no
gradient from autograd: the engine forms it), so they are registered as ordered side effects
(torch.library's effect registry): the compiler keeps them, in program order, instead of removing
them as dead code.
"""
from __future__ import annotations

import itertools
import weakref

import torch

# key -> the Layer or engine an op call stands for (ops take ints, not objects); held weakly, so that a
# private model nobody holds is freed with its engine
_OBJECTS: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
_next_key = itertools.count()


# whether dynamo is tracing the caller (the layers' and the engine's forward side switch to the ops there)
compiling = getattr(torch.compiler, "is_compiling", lambda: False)


def eagerly(fn, *args, **kwargs):
    """fn(*args, **kwargs), run uncompiled where dynamo traces the caller (a graph break there). The
    disabled wrapper is made only there: importing anadp does not import dynamo (~1 s), and an
    uncompiled call costs one check, not dynamo's disable context."""
    if compiling():
        return torch.compiler.disable(fn)(*args, **kwargs)
    return fn(*args, **kwargs)


def available() -> bool:
    """Whether this torch can compile a private model: custom ops whose side effects the compiler keeps."""
    return _EFFECTS


def register(obj) -> int:
    key = next(_next_key)
    _OBJECTS[key] = obj
    return key


def unregister(key: int) -> None:
    _OBJECTS.pop(key, None)


def _hooked(x, weight, bias, key):
    return _OBJECTS[key].op_forward(x, weight, bias)


def _hooked_fake(x, weight, bias, key):
    return _OBJECTS[key].op_fake(x, weight, bias)


def _hooked_backward(saved, g, key, input_grad):
    gx = _OBJECTS[key].op_backward(saved, g, input_grad)
    return gx if gx is not None else g.new_empty(0)


def _hooked_backward_fake(saved, g, key, input_grad):
    return _OBJECTS[key].op_input_grad_fake(saved, g) if input_grad else g.new_empty(0)


def _begin_forward(x, key, grad):
    _OBJECTS[key].begin_forward(x, grad)


class _HookedFn(torch.autograd.Function):
    """anadp::hooked's autograd: the op below autograd, and its backward the op anadp::hooked_backward. (The ops
    are defined with torch.library.Library, not torch.library.custom_op, whose Python dispatch layers cost
    ~20 us more a call: ~100 calls a step in a 12-layer model.)"""

    @staticmethod
    def forward(ctx, x, weight, bias, key):
        with torch._C._AutoDispatchBelowAutograd():
            y = torch.ops.anadp.hooked.default(x, weight, bias, key)
        ctx.key = key
        ctx.save_for_backward(*_OBJECTS[key].op_saved(x, weight, bias))
        return y

    @staticmethod
    def backward(ctx, g):
        gx = torch.ops.anadp.hooked_backward.default(list(ctx.saved_tensors), g, ctx.key, ctx.needs_input_grad[0])
        return (gx if ctx.needs_input_grad[0] else None), None, None, None


def _hooked_autograd(x, weight, bias, key):
    if torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad)):
        return _HookedFn.apply(x, weight, bias, key)
    with torch._C._AutoDispatchBelowAutograd():
        return torch.ops.anadp.hooked.default(x, weight, bias, key)


_EFFECTS = False
try:
    from torch._library.effects import EffectType
    _lib = torch.library.Library("anadp", "FRAGMENT")
    _lib.define("hooked(Tensor x, Tensor? weight, Tensor? bias, int key) -> Tensor")
    _lib.define("hooked_backward(Tensor[] saved, Tensor g, int key, bool input_grad) -> Tensor")
    _lib.define("begin_forward(Tensor x, int key, bool grad) -> ()")
    for _name, _fn in (("hooked", _hooked), ("hooked_backward", _hooked_backward), ("begin_forward", _begin_forward)):
        _lib.impl(_name, _fn, "CompositeExplicitAutograd")
    _lib.impl("hooked", _hooked_autograd, "Autograd")
    torch.library.register_fake("anadp::hooked", _hooked_fake, lib=_lib)
    torch.library.register_fake("anadp::hooked_backward", _hooked_backward_fake, lib=_lib)
    torch.library.register_fake("anadp::begin_forward", lambda x, key, grad: None, lib=_lib)
    # the backward op and the book-keeping op return nothing the graph needs: as ordered side effects the
    # compiler keeps them, in program order, instead of removing them as dead code
    _lib._register_effectful_op("anadp::hooked_backward", EffectType.ORDERED)
    _lib._register_effectful_op("anadp::begin_forward", EffectType.ORDERED)
    _EFFECTS = True
except (ImportError, AttributeError, RuntimeError, TypeError):  # a torch whose custom ops cannot declare effects
    pass


def call(layer, x, weight, bias) -> torch.Tensor:
    """``layer``'s forward as the op (inside torch.compile's tracing)."""
    if not _EFFECTS:
        raise RuntimeError(f"torch.compile of a private model needs torch.library custom ops with side effects "
                           f"(torch >= 2.13; this is {torch.__version__}): without them the compiler would drop "
                           "the backward's records. Run the model uncompiled, or upgrade torch")
    return torch.ops.anadp.hooked(x, weight, bias, layer.key)


def begin(engine, x: torch.Tensor) -> None:
    """The engine's forward pre-hook as the op (inside torch.compile's tracing)."""
    if not _EFFECTS:
        call(None, x, None, None)  # the error
    torch.ops.anadp.begin_forward(x, engine.key, torch.is_grad_enabled())
