"""The hooked layers as custom ops, for torch.compile: where dynamo traces a private model, each hooked
layer's call is one opaque op (``anadp::hooked``) whose registered backward is another
(``anadp::hooked_backward``), and the engine's per-forward book-keeping a third (``anadp::begin_forward``).
Their bodies run eagerly at run time, so the engine's Python state (calls, readers, records, the
accumulator's clipping in the backward) is the eager path's; the compiler sees only tensors in, tensors
out, and traces the rest of the model whole (``fullgraph=True``).

The backward op and the book-keeping op return nothing the graph needs (the layers' parameters get no
gradient from autograd: the engine forms it), so they are registered as ordered side effects
(torch.library's ``register_effect``): the compiler keeps them, in program order, instead of removing
them as dead code.
"""
from __future__ import annotations

import itertools
from typing import Optional

import torch

_OBJECTS: dict = {}  # key -> the Layer or engine an op call stands for (ops take ints, not objects)
_next_key = itertools.count()


def available() -> bool:
    """Whether this torch can compile a private model: custom ops whose side effects the compiler keeps."""
    return _EFFECTS


def register(obj) -> int:
    key = next(_next_key)
    _OBJECTS[key] = obj
    return key


def unregister(key: int) -> None:
    _OBJECTS.pop(key, None)


_EFFECTS = hasattr(torch.library, "custom_op")
if _EFFECTS:
    @torch.library.custom_op("anadp::hooked", mutates_args=())
    def hooked(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
               key: int) -> torch.Tensor:
        """The layer ``key``'s forward (Layer.op_forward): book-keeping and its output."""
        return _OBJECTS[key].op_forward(x, weight, bias)

    @hooked.register_fake
    def _(x, weight, bias, key):
        return _OBJECTS[key].op_fake(x, weight, bias)

    @torch.library.custom_op("anadp::hooked_backward", mutates_args=())
    def hooked_backward(saved: list[torch.Tensor], g: torch.Tensor, key: int, input_grad: bool) -> torch.Tensor:
        """The layer ``key``'s backward (Layer.op_backward): records for the engine, and the input gradient
        (an empty tensor where the input needs none)."""
        gx = _OBJECTS[key].op_backward(saved, g, input_grad)
        return gx if gx is not None else g.new_empty(0)

    @hooked_backward.register_fake
    def _(saved, g, key, input_grad):
        return _OBJECTS[key].op_input_grad_fake(saved, g) if input_grad else g.new_empty(0)

    @torch.library.custom_op("anadp::begin_forward", mutates_args=())
    def begin_forward(x: torch.Tensor, key: int, grad: bool) -> None:
        """The engine ``key``'s forward pre-hook (GradSampleEngine.begin_forward) on the model input ``x``."""
        _OBJECTS[key].begin_forward(x, grad)

    @begin_forward.register_fake
    def _(x, key, grad):
        return None

    def _setup(ctx, inputs, output):
        x, weight, bias, key = inputs
        ctx.key = key
        ctx.save_for_backward(*_OBJECTS[key].op_saved(x, weight, bias))

    def _backward(ctx, g):
        gx = torch.ops.anadp.hooked_backward(list(ctx.saved_tensors), g, ctx.key, ctx.needs_input_grad[0])
        return (gx if ctx.needs_input_grad[0] else None), None, None, None

    hooked.register_autograd(_backward, setup_context=_setup)
    try:
        from torch._library.effects import EffectType
        hooked_backward.register_effect(EffectType.ORDERED)
        begin_forward.register_effect(EffectType.ORDERED)
    except (ImportError, AttributeError):  # a torch whose custom ops cannot declare side effects
        _EFFECTS = False


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
