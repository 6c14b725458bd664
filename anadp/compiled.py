"""The hooked layers' backwards as custom ops, for torch.compile: where dynamo traces a private model, each
hooked layer's call is traced with the model (anadp.layers' ``_TracedFn``) and its backward's records are one
opaque op (``anadp::record_backward`` beside a Linear's traced input gradient, and alone for an embedding,
whose input has none; ``anadp::record_dense``, which files per-sample gradients the graph formed, beside a
norm's); the engine's per-forward book-keeping is another (``anadp::begin_forward``). Their bodies run eagerly
at run time, so the engine's Python state (records, the accumulator's clipping in the backward) is the eager
path's; the compiler sees only tensors in, tensors out, and traces the rest of the model whole
(``fullgraph=True``).

The ops return nothing the graph needs (the layers' parameters get no gradient from autograd: the engine
forms it), so they are registered as ordered side effects (torch.library's effect registry): the compiler
keeps them, in program order, instead of removing them as dead code.
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


def require() -> None:
    """Refuse to trace a private model where the compiler would drop the backward's records."""
    if not _EFFECTS:
        raise RuntimeError(f"torch.compile of a private model needs torch.library custom ops with side effects "
                           f"(torch >= 2.13; this is {torch.__version__}): without them the compiler would drop "
                           "the backward's records. Run the model uncompiled, or upgrade torch")


def register(obj) -> int:
    key = next(_next_key)
    _OBJECTS[key] = obj
    return key


def unregister(key: int) -> None:
    _OBJECTS.pop(key, None)


def _record_backward(saved, g, key):
    _OBJECTS[key].op_record(saved, g)


def _record_dense(parts, key):
    _OBJECTS[key].op_record_dense(parts)


def _begin_forward(x, key, grad, make_flat):
    _OBJECTS[key].begin_forward(x, grad, make_flat)


_EFFECTS = False
try:
    from torch._library.effects import EffectType
    # torch.library.Library, not torch.library.custom_op, whose Python dispatch layers cost ~20 us more a call
    _lib = torch.library.Library("anadp", "FRAGMENT")
    _lib.define("record_backward(Tensor[] saved, Tensor g, int key) -> ()")
    _lib.define("record_dense(Tensor[] parts, int key) -> ()")
    _lib.define("begin_forward(Tensor x, int key, bool grad, bool make_flat) -> ()")
    for _name, _fn in (("record_backward", _record_backward), ("record_dense", _record_dense),
                       ("begin_forward", _begin_forward)):
        _lib.impl(_name, _fn, "CompositeExplicitAutograd")
    torch.library.register_fake("anadp::record_backward", lambda saved, g, key: None, lib=_lib)
    torch.library.register_fake("anadp::record_dense", lambda parts, key: None, lib=_lib)
    torch.library.register_fake("anadp::begin_forward", lambda x, key, grad, make_flat: None, lib=_lib)
    # the record ops and the book-keeping op return nothing the graph needs: as ordered side effects the
    # compiler keeps them, in program order, instead of removing them as dead code
    for _name in ("record_backward", "record_dense", "begin_forward"):
        _lib._register_effectful_op(f"anadp::{_name}", EffectType.ORDERED)
    _EFFECTS = True
except (ImportError, AttributeError, RuntimeError, TypeError):  # a torch whose custom ops cannot declare effects
    pass


def begin(engine, x: torch.Tensor, make_flat: bool) -> None:
    """The engine's forward pre-hook as the op (inside torch.compile's tracing); ``make_flat``: the engine makes the
    flat path's buffer (anadp.flat) at run time."""
    require()
    torch.ops.anadp.begin_forward(x, engine.key, torch.is_grad_enabled(), make_flat)
