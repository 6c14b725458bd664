"""Per-sample gradients of any module that no registered layer covers, exactly, by running its
forward once per sample (``torch.func.vmap``; a loop over samples where vmap cannot run the
forward, e.g. data-dependent routing).

Every trainable parameter of the module's subtree enters the forward as B per-sample copies
(``_Tap``: one expanded view per parameter, no copy): sample i's computation reads only copy i,
so the gradient autograd delivers to the copies is the per-sample gradient, (B, *shape), whatever
the forward does with the parameters (raw ``nn.Parameter`` uses, subclasses with their own
forward, convolutions, custom norms, experts). The forward that runs is the per-sample one, so
dropout and other randomness are those of the gradients.

It is exact only where the module treats the samples of a batch independently. That is checked
on the module's first call: its forward on the batch (the module's own code, eval mode, no
gradient) must equal its forward on each sample alone; a module that reads batch statistics or
mixes samples fails and is refused with the fix (docs/design.md, "The generic per-sample gradient").

Cost: B x the subtree's trainable parameters in memory at the backward, and a per-sample forward.
The registered layers (Linear, Embedding, norms, convolutions) avoid both and are used wherever
a module is one of them.
"""
from __future__ import annotations

import inspect
import itertools
import math
import warnings
from typing import NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .layers import Layer, UnsupportedModuleError
from .records import DenseRecord
from .relative_bias import ADAPTERS
from .sharding import is_sharded

try:
    from torch.nn.utils.stateless import _reparametrize_module
except ImportError:  # pragma: no cover - every torch >= 2.0 has it
    _reparametrize_module = None

# Above this many per-sample numbers (B x the subtree's trainable parameters) the first call warns.
_WARN_NUMBERS = 1 << 27

_RECURRENT = (nn.RNNBase,)


def _takes_no_input(module: nn.Module) -> bool:
    try:
        params = inspect.signature(type(module).forward).parameters
    except (TypeError, ValueError):
        return False
    return list(params) == ["self"]


def shared_output_parents(model: nn.Module) -> set:
    """Modules to take whole on the generic path because a trainable child's output is shared by the batch:
    a child whose forward takes no input (Swin's relative position bias table), or an attention whose
    relative-bias embedding is indexed by a bucket matrix of a form no adapter knows (LongT5's local
    attention). Alone, such a child's per-sample gradients cannot be formed (the batch's gradients meet where
    its output is broadcast); within its parent's per-sample forward they can."""
    out = set()
    for _, parent in model.named_modules():
        for child in parent.children():
            trainable = any(p.requires_grad for p in child.parameters())
            if trainable and _takes_no_input(child):
                out.add(parent)
        emb = getattr(parent, "relative_attention_bias", None)
        if (isinstance(emb, nn.Embedding) and emb.weight.requires_grad and callable(getattr(parent, "compute_bias", None))
                and not any(a.applies(parent) for a in ADAPTERS)):
            out.add(parent)
    return out


class _Tap(torch.autograd.Function):
    """(p_1, ..., p_n) -> their B per-sample copies (expanded views); backward: hands the copies'
    gradients, the per-sample gradients, to ``on_backward`` and returns none to the parameters."""

    @staticmethod
    def forward(ctx, batch, on_backward, *params):
        ctx.on_backward = on_backward
        return tuple(p.unsqueeze(0).expand(batch, *p.shape) for p in params)

    @staticmethod
    def backward(ctx, *grads):
        ctx.on_backward(grads)
        return (None, None) + (None,) * len(grads)


def _tolerance(dtype: torch.dtype) -> float:
    """How far the batched and per-sample forwards may differ by rounding alone (different kernels and
    reduction orders: Mamba-2's chunked scan differs by 1e-9 in float64); a module that mixes samples
    differs by orders of magnitude more."""
    return {torch.float64: 1e-7, torch.float32: 1e-4}.get(dtype, 3e-2)


class Inputs(NamedTuple):
    """One call's inputs, flattened (tree_flatten): which leaves carry the batch dimension, which are
    flattened batches of k rows per sample (engine.flat_rows), the rest shared by the batch."""
    leaves: list
    spec: object
    batched: list
    rows: list
    k: int
    B: int
    dim: int


class GenericLayer(Layer):
    """A module (with its whole subtree) whose per-sample gradients come from its per-sample forward."""
    whole = True

    def __init__(self, module: nn.Module, name: str, engine):
        super().__init__(module, name, engine)
        self.names = [n for n, p in self.params.items() if p is not None and p.requires_grad]
        # (input structure, leaves read as batched, as flattened) -> (the leaves taken as batched, as flattened,
        # "vmap" or "loop"): chosen, and the module checked, at the first call with that reading (_new_reading)
        self.readings: dict = {}
        # outputs that the batched forward returns flattened, (B k, ...), from inputs it flattens itself
        # (a router's (B T, experts) logits): the per-sample outputs (B, k, ...) are flattened alike
        self.flatten_outputs: set = set()
        self._warned = False

    @staticmethod
    def refusal(module: nn.Module) -> str | None:
        if isinstance(module, _RECURRENT):
            return (f"{type(module).__name__} is a recurrent layer, which anadp does not train privately; freeze it "
                    "(p.requires_grad_(False)), or use Opacus's DPLSTM / DPGRU, whose per-sample gradients are "
                    "computed step by step")
        if _reparametrize_module is None:
            return "this torch has no torch.nn.utils.stateless; upgrade torch to train this module privately"
        if any(is_sharded(p) for p in module.parameters()):
            return ("its parameters are sharded (FSDP2) and its per-sample gradients need the generic path, which "
                    "runs on whole parameters; do not shard this module, or freeze its parameters")
        return None

    # --- the forward -------------------------------------------------------------
    def forward(self, module, *args, **kwargs):
        if not torch.is_grad_enabled():
            return type(module).forward(module, *args, **kwargs)
        engine = self.engine
        engine.calls[self.slot] += 1
        B, dim = engine.batch_size, (0 if engine.batch_first else 1)
        leaves, spec = tree_flatten((args, kwargs))
        if B is None:
            raise UnsupportedModuleError(f"module '{self.name}': the model's input has no batch dimension, so the "
                                         "samples of this module's input are unknown; pass batched tensors")
        batched, rows, k = [], [], 0  # leaves with the batch dimension; flattened batches (B k rows)
        for j, t in enumerate(leaves):
            if not isinstance(t, torch.Tensor) or t.dim() <= dim:
                continue
            if t.shape[dim] == B:
                batched.append(j)
            elif dim == 0 and (r := engine.flat_rows(t)) and k in (0, r):
                rows.append(j)
                k = r
        if not batched and not rows:
            raise UnsupportedModuleError(
                f"module '{self.name or '<root>'}' ({type(module).__name__}) is called without any input that carries "
                f"the batch ({B} samples): its output is shared by the batch (a bias table, Swin's relative position "
                "bias) and autograd sums the samples' gradients where it is broadcast, so its per-sample gradients "
                "cannot be formed here. Freeze its parameters (requires_grad_(False))")
        params = [self.param(n) for n in self.names]
        inputs = Inputs(leaves, spec, batched, rows, k, B, dim)
        key = (repr(spec), tuple(batched), tuple(rows))
        chosen = self.readings.get(key)
        if chosen is None:
            chosen = self.readings[key] = self._new_reading(module, inputs, params, key)
        use_batched, use_rows, mode = chosen
        if (use_batched, use_rows) != key[1:]:
            inputs = inputs._replace(batched=list(use_batched), rows=list(use_rows), k=k if use_rows else 0)
        copies = _Tap.apply(B, self.on_backward, *[p.detach().requires_grad_() for p in params])
        out, flat = self._per_sample(module, inputs, copies, mode)
        for o, rows_per_sample in flat:
            engine.mark_rows(o, rows_per_sample)
        return out

    def _new_reading(self, module, inputs, params, key) -> tuple:
        """(leaves with the batch, flattened leaves, "vmap" / "loop") for a reading of the inputs not seen before.
        Which inputs carry the batch is read off their shapes, so a shared tensor whose first size happens to be
        B (positions when T = B) reads as batched: the readings kept before for this input structure are tried
        first (those whose batched inputs still have B rows), then the new one, then the new one with fewer
        batched inputs; each is checked as the first call was (``_first_call``), the first to
        pass is kept, and if none does the module is refused: never a guess that was not checked."""
        B, dim = inputs.B, inputs.dim
        tried = set()
        for (structure, _, _), (batched, rows, _) in list(self.readings.items()):
            if structure != key[0] or rows or (batched, rows) == key[1:] or batched in tried:
                continue
            tried.add(batched)
            if not all(inputs.leaves[j].shape[dim] == B for j in batched):
                continue
            try:
                mode = self._first_call(module, inputs._replace(batched=list(batched), rows=[], k=0), params)
            except UnsupportedModuleError:
                continue
            return batched, (), mode
        try:
            return key[1], key[2], self._first_call(module, inputs, params)
        except UnsupportedModuleError as refusal:
            # a shared input whose first size happens to be B (positions when T = B, Funnel's pooled masks): the
            # readings with fewer batched inputs, most batched first, each checked (a truly batched input taken
            # as shared broadcasts against one sample and fails the check)
            for n in range(len(key[1]) - 1, 0, -1):
                for batched in itertools.combinations(key[1], n):
                    try:
                        return batched, key[2], self._first_call(module, inputs._replace(batched=list(batched)), params)
                    except UnsupportedModuleError:
                        continue
            raise refusal

    def _per_sample(self, module, inputs, copies, mode):
        """(outputs, the outputs that are flattened batches): the module's outputs on each sample alone
        (parameters: ``copies`` (B, *shape) each), stacked on the batch dimension as the batched forward
        returns them; flattened batches (B k rows) flattened back."""
        names, out_spec, x = self.names, [], inputs
        B, dim, k = x.B, x.dim, x.k

        def one(ps, *xs):
            vals = list(x.leaves)
            for j, v in zip(x.batched, xs):
                vals[j] = v.unsqueeze(dim)
            for j, v in zip(x.rows, xs[len(x.batched):]):
                vals[j] = v  # this sample's k rows
            args, kwargs = tree_unflatten(vals, x.spec)
            with _reparametrize_module(module, dict(zip(names, ps)), strict=False):
                out = type(module).forward(module, *args, **kwargs)
            flat, s = tree_flatten(out)
            kinds = ["rows" if k and o.dim() > 0 and o.shape[0] == k else
                     "batch" if o.dim() > dim and o.shape[dim] == 1 else "shared"
                     for o in flat if isinstance(o, torch.Tensor)]
            if not out_spec:
                out_spec.append((s, [None if isinstance(o, torch.Tensor) else o for o in flat], kinds))
            tensors = [o for o in flat if isinstance(o, torch.Tensor)]
            return tuple(o.squeeze(dim) if kind == "batch" else o for o, kind in zip(tensors, kinds))

        xs = [x.leaves[j] for j in x.batched] + [x.leaves[j].view(B, k, *x.leaves[j].shape[1:]) for j in x.rows]
        dims = (dim,) * len(x.batched) + (0,) * len(x.rows)
        if mode == "vmap":
            outs = tuple(torch.func.vmap(one, in_dims=(0,) + dims, out_dims=dim, randomness="different")(
                tuple(copies), *xs))
        else:
            per = [one(tuple(c[i] for c in copies), *(v.select(d, i) for v, d in zip(xs, dims))) for i in range(B)]
            outs = tuple(torch.stack(o, dim) for o in zip(*per)) if per else ()
        s, fixed, kinds = out_spec[0]
        flat = []  # (output, its rows per sample): flattened batches
        for j, kind in enumerate(kinds):
            if kind == "rows" or j in self.flatten_outputs:  # (B, k, ...) -> (B k, ...), as the batched forward
                flat.append((outs[j].flatten(0, 1), outs[j].shape[1]))
                outs = outs[:j] + (flat[-1][0],) + outs[j + 1:]
        it = iter(outs)
        return tree_unflatten([next(it) if f is None else f for f in fixed], s), flat

    def _first_call(self, module, x, params) -> str:
        """Choose vmap or the loop ("vmap" / "loop"), and check that the module treats samples independently."""
        B = x.B
        numbers = B * sum(p.numel() for p in params)
        if numbers > _WARN_NUMBERS and not self._warned:
            self._warned = True
            warnings.warn(f"anadp: module '{self.name}' ({type(self.module).__name__}) gets its per-sample gradients "
                          f"from the generic path: {numbers:,} numbers (B x its trainable parameters) at every "
                          "backward. A registered layer type would avoid this (README, supported layers)",
                          stacklevel=4)
        training = [(m, m.training) for m in module.modules()]
        for m, _ in training:
            m.training = False  # no dropout: the two forwards must be comparable
        try:
            with torch.no_grad():
                args, kwargs = tree_unflatten(x.leaves, x.spec)
                ref = [o for o in tree_flatten(type(module).forward(module, *args, **kwargs))[0]
                       if isinstance(o, torch.Tensor)]
                copies = [p.detach().unsqueeze(0).expand(B, *p.shape) for p in params]
                try:
                    out, mode = self._per_sample(module, x, copies, "vmap")[0], "vmap"
                except Exception:  # an op vmap cannot batch (data-dependent shapes, .item()): one sample at a time
                    out, mode = self._per_sample(module, x, copies, "loop")[0], "loop"
                out = [o for o in tree_flatten(out)[0] if isinstance(o, torch.Tensor)]
        finally:
            for m, t in training:
                m.training = t
        self._check_same(ref, out, x.dim)
        return mode

    def _check_same(self, ref: list, out: list, dim: int) -> None:
        what = f"module '{self.name or '<root>'}' ({type(self.module).__module__}.{type(self.module).__qualname__})"
        for k, (r, o) in enumerate(zip(ref, out)):
            if dim == 0 and o.dim() >= 2 and r.dim() == o.dim() - 1 and r.shape[0] == o.shape[0] * o.shape[1] \
                    and r.shape[1:] == o.shape[2:]:
                self.flatten_outputs.add(k)  # the module flattened its samples' rows itself
                o = o.flatten(0, 1)
            elif r.dim() == o.dim() > dim and r.shape[dim] == 1 and o.shape[dim] > 1:
                # an output shared by the batch (positions of batch 1): returned per sample, so that each
                # sample's gradient reaches the module before the broadcast sums them
                r = r.expand_as(o)
            if r.shape != o.shape:
                raise UnsupportedModuleError(
                    f"{what}: its output {k} has shape {tuple(r.shape)} on the batch but {tuple(o.shape)} from its "
                    "samples one at a time: it is not a function of each sample alone (an output without the batch "
                    "dimension?). Freeze its parameters, or compute them per sample")
            r64, o64 = r.double(), o.double()
            gap = float((r64 - o64).norm() / r64.norm().clamp_min(1e-30)) if r.numel() else 0.0
            if not math.isfinite(gap) and torch.equal(r.isnan(), o.isnan()):
                gap = 0.0 if torch.equal(r64.nan_to_num(), o64.nan_to_num()) else gap
            if not gap <= _tolerance(r.dtype):
                raise UnsupportedModuleError(
                    f"{what} mixes the samples of a batch: its output on the batch differs from its output on each "
                    f"sample alone (relative difference {gap:.1e}; eval mode, no dropout). Per-sample gradients do "
                    "not exist for it and clipping could not bound one sample's influence. Use a per-sample "
                    "operation (LayerNorm / GroupNorm instead of batch statistics), or freeze its parameters")

    # --- the backward ------------------------------------------------------------
    def on_backward(self, grads):
        engine = self.engine
        for n, g in zip(self.names, grads):
            (g,) = engine.check_batch(self.name, g)
            engine.record(self.param(n), DenseRecord(g))
