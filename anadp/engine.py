"""Per-sample book-keeping for one model: which layers are hooked and what each backward left
behind, handed as a physical batch (anadp.physical_batch) to the optimizer's accumulator.
"""
from __future__ import annotations

import operator
import weakref

from typing import Optional

import torch
from torch import nn

from . import attention, compiled, conv  # noqa: F401 - register nn.MultiheadAttention's and the convolutions' layers
from .chunks import ChunkProtocol
from .flat import FLAT_NUMBERS, FlatBatch, FlatBuffer, FlatLayout
from .generic import GenericLayer, shared_output_parents
from .layers import UnsupportedModuleError, layer_class
from .physical_batch import PhysicalBatch, reduction_scale
from .relative_bias import ADAPTERS
from .sharding import is_sharded



class BatchMismatchError(RuntimeError):
    pass


# Ops whose output row r depends only on their inputs' rows r (elementwise, casts, copies): they keep a
# flattened batch's row blocks (see GradSampleEngine.flat_rows)
_ROW_WISE = frozenset(f"{op}Backward0" for op in (
    "Gelu", "Relu", "Silu", "Tanh", "Sigmoid", "NativeDropout", "ToCopy", "Clone", "Alias", "Mul", "Add", "Sub",
    "Div", "Neg", "Exp", "Pow", "Hardtanh", "LeakyRelu", "Elu", "Mish", "Hardswish",
    "Erf", "Sqrt", "Rsqrt"))


def check_loss_reduction(loss_reduction: str) -> None:
    if loss_reduction not in ("mean", "sum"):
        raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")




# Counts the parameter and submodule registrations (torch's global registration hooks: setattr of a Parameter
# or Module, register_parameter, add_module) on the modules of private models: check_unchanged walks the model
# only when it moved since the walk before. Registrations elsewhere do not count: Llama's forward slices its
# ModuleList (a new list registering the layers), which would count every step, and inside torch.compile
# would make dynamo recompile the forward every step (it guards on this counter) until its recompile limit.
_registrations = 0
_watched: weakref.WeakSet = weakref.WeakSet()  # the modules of private models, as wrapped


def _count_registration(module, *args):
    global _registrations
    if compiled.compiling():  # a forward registers nothing on the model it runs (and tracing it must not guard)
        return
    if module in _watched:
        _registrations += 1


_hooks_on = hasattr(nn.modules.module, "register_module_parameter_registration_hook")
if _hooks_on:
    nn.modules.module.register_module_parameter_registration_hook(_count_registration)
    nn.modules.module.register_module_module_registration_hook(_count_registration)


def _first_tensor(args, kwargs):
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor):
            return v
    return None


class GradSampleEngine:
    """Hooks every module that owns a trainable parameter.

    Its ``accumulator`` (set by the DP optimizer: anadp.accumulator's or anadp.per_layer's) receives each
    finished :class:`PhysicalBatch` (``on_batch``: at the next forward of the model, or on ``flush()``)
    and, where it clips in the backward, each record as it arrives (``on_record``). The flow only goes
    down: the optimizer calls the engine, the engine calls the accumulator, which calls neither.
    """

    def __init__(self, model: nn.Module, *, batch_first: bool = True, loss_reduction: str = "mean"):
        check_loss_reduction(loss_reduction)
        self.model, self.batch_first, self.loss_reduction = model, batch_first, loss_reduction
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.names = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self.names.setdefault(p, n)
        self._check_devices()
        self.layers, covered = [], set()
        whole_generic = shared_output_parents(model)
        for name, module in model.named_modules(remove_duplicate=False):
            if module in covered:
                continue
            cls = GenericLayer if module in whole_generic else layer_class(module)
            if cls is None and any(p.requires_grad for p in module.parameters(recurse=False)):
                cls = GenericLayer  # its per-sample gradients from its per-sample forward (anadp.generic)
            whole = cls is not None and cls.whole
            own = [n for n, p in module.named_parameters(recurse=whole) if p.requires_grad]
            if not own:
                continue
            what = f"module '{name or '<root>'}' of type {type(module).__module__}.{type(module).__qualname__}"
            if type(module).__name__ == "FullyShardedDataParallel":
                raise UnsupportedModuleError(
                    f"{what}: FSDP1 (FullyShardedDataParallel) flattens the layers' parameters into one: shard with "
                    "FSDP2's torch.distributed.fsdp.fully_shard instead, which anadp supports.")
            why = cls.refusal(module)
            if why is not None:
                raise UnsupportedModuleError(f"{what}: {why}")
            if any(layer.module is module for layer in self.layers):
                continue  # the same module reached under two names
            if whole:
                inner = [layer.name for layer in self.layers if any(m is layer.module for m in module.modules())]
                if inner:
                    raise UnsupportedModuleError(
                        f"{what} contains module '{inner[0]}', which is also reached outside it: anadp computes the "
                        "per-sample gradients of its whole subtree, and cannot do both. Do not share the module")
                covered.update(module.modules())
            layer = cls(module, name, self)
            layer.slot = len(self.layers)
            self.layers.append(layer)
        # which layers record each parameter: every call of a layer records each of its trainable
        # parameters once, so a backward is complete for p after sum_layers calls[layer] records
        self.owners: dict = {}
        for layer in self.layers:
            for p in layer.module.parameters(recurse=layer.whole):
                if p.requires_grad:
                    self.owners.setdefault(p, []).append(layer.slot)
        self.calls = [0] * len(self.layers)  # calls of each layer in this forward (with grad)
        self.accumulator = None  # see the class docstring
        self._seen_batch: Optional[int] = None  # batch size of a backward whose records were taken by on_record
        # modules whose train-mode forward mixes the samples of a batch (batch statistics) or writes
        # running statistics of the private batch into buffers
        self._mixing = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._NormBase)]
        self._check_mixing()
        # every buffer, to see that a private forward/backward wrote none (in place or by replacement)
        self._buffers = [(f"{n}.{b}" if n else b, m, b) for n, m in model.named_modules() for b in m._buffers]
        self._buffer_state: list = []
        self._take_snapshot()
        self.batch_size: Optional[int] = None
        self._grad_forwards = 0  # forwards with gradients since the last backward (see check_batch)
        self.chunks = ChunkProtocol()  # which chunk of private data each forward runs on (anadp.chunks)
        self.chunk_id: Optional[int] = None  # the stamp of the last forward
        self.real_rows: Optional[int] = None  # a padded chunk's samples (its first rows; static shapes)
        self._padding: Optional[torch.Tensor] = None
        self._records: dict = {}
        # compiled forwards' flat path (anadp.flat): its columns where the optimizer allows it, and the buffer
        self.flat_layout: Optional[FlatLayout] = None
        self.flat: Optional[FlatBuffer] = None
        self.ends_logical = True  # whether the last forward's chunk ends its logical batch
        # Linear layers form their per-sample gradients at backward time where that is cheaper
        # (records.instantiate_at_backward); off when a kernel backend computes the norms from (A, G)
        self.instantiate_linear = True
        self._readers: dict = {}  # input -> Linear calls reading it
        self._copies: dict = {}  # see copy_of
        # this forward's hooked outputs that are flattened batches: autograd node -> tokens per sample,
        # and id -> (tensor, tokens per sample) for those without a node (integer indices)
        self._row_fns: dict = {}
        self._row_tensors: dict = {}
        # modules whose code is adapted so that per-sample gradients reach a hooked layer (anadp.relative_bias)
        self.adapters = [cls(m, n, self) for n, m in model.named_modules() for cls in ADAPTERS if cls.applies(m)]
        for layer in self.layers:
            layer.install()
        for adapter in self.adapters:
            adapter.install()
        self.key = compiled.register(self)
        self._hook = model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        # the hooked layers return no gradient for their parameters: autograd delivering one means a
        # use outside them, whose contribution the engine would never see
        self._grad_hooks = [p.register_hook(self._untracked_use(p)) for p in self.params]

    def _untracked_use(self, p):
        def refuse(grad):
            if grad is None:  # what the hooked layers return for their parameters
                return None
            raise RuntimeError(
                f"parameter '{self.names[p]}' got a gradient from a use outside its module's forward (for example "
                "F.linear(h, self.emb.weight) as a tied output head): anadp forms per-sample gradients only "
                "through the hooked module, so this use's gradient would be dropped. Call the module, or for a "
                "tied head use an nn.Linear sharing the Parameter (head.weight = emb.weight), which anadp "
                "supports.")
        return refuse

    def _take_snapshot(self) -> None:
        """Every module with its children and parameters as they are now, and the parameters not hooked
        (what check_unchanged compares)."""
        self._snapshot = [(m, tuple(m._modules.values()), tuple(m._parameters.values())) for m in self.model.modules()]
        # (parameter dict, name, parameter) of each trainable parameter: compared at every step
        self._slots = [(m._parameters, n, p) for m in self.model.modules() for n, p in m._parameters.items()
                       if p is not None and p.requires_grad]
        self._registrations_seen = _registrations
        _watched.update(m for m, _, _ in self._snapshot)
        hooked = set(self.params)
        self._frozen = [p for p in self.model.parameters() if p not in hooked]

    def _structure_unchanged(self) -> bool:
        """Whether no module gained, lost or replaced a child or a parameter since wrap time and the
        hooked parameters are all still trainable: the flat lists compared only when a parameter or
        module was registered anywhere since the last comparison (walking the module tree with
        model.parameters() each step cost ~1 ms of host time on BERT-base)."""
        if not all(p.requires_grad for p in self.params) or any(
                p is not None and p.requires_grad for p in self._frozen):
            return False
        if _hooks_on and _registrations == self._registrations_seen:
            # FSDP2's fully_shard (after make_private) replaces parameters without the registration hooks
            return all(d.get(n) is p for d, n, p in self._slots)
        self._registrations_seen = _registrations
        for m, children, params in self._snapshot:
            if (len(m._modules) != len(children) or len(m._parameters) != len(params)
                    or not all(map(operator.is_, m._modules.values(), children))
                    or not all(map(operator.is_, m._parameters.values(), params))):
                self._registrations_seen = -1  # compare again next time
                return False
        return True

    def check_unchanged(self) -> None:
        """The trainable parameters must still be the ones hooked at wrap time."""
        if self._structure_unchanged():
            return
        now = [p for p in self.model.parameters() if p.requires_grad]
        if len(now) != len(self.params) or any(a is not b for a, b in zip(now, self.params)):
            known = set(self.params)
            new = [n for n, p in self.model.named_parameters() if p.requires_grad and p not in known]
            gone = [self.names[p] for p in self.params if not p.requires_grad]
            raise RuntimeError("the model's trainable parameters changed after make_private "
                               f"(new or unfrozen: {new[:3]}, frozen or removed: {gone[:3]}); "
                               "their per-sample gradients are not tracked: wrap the model again"
                               + (" (sharded with fully_shard after make_private: shard first, then build the "
                                  "optimizer and call make_private)" if any(is_sharded(p) for p in now) else ""))
        self._take_snapshot()  # changed, but the same trainable parameters: the fast path again

    def _check_mixing(self) -> None:
        for name, m in self._mixing:
            if m.training and isinstance(m, nn.modules.instancenorm._InstanceNorm) and m.track_running_stats:
                raise UnsupportedModuleError(
                    f"module '{name}' ({type(m).__name__}(track_running_stats=True)) is in train mode: it writes "
                    "running_mean / running_var, averages of the private batch without noise, into the state_dict "
                    "and every checkpoint. Use track_running_stats=False (it then normalizes each sample by its own "
                    "statistics, in train and eval mode), or put it in eval mode.")
            if m.training and isinstance(m, nn.modules.batchnorm._BatchNorm):
                raise UnsupportedModuleError(
                    f"module '{name}' ({type(m).__name__}) is in train mode: it normalizes with the statistics of "
                    "the whole batch, so one sample changes every other sample's gradient (clipping no longer "
                    "bounds its influence), and its running_mean / running_var would enter the state_dict without "
                    "noise. Put it in eval mode (call module.eval() after every model.train()), or use GroupNorm / "
                    "LayerNorm instead. Freezing its parameters is not enough.")

    def _check_devices(self):
        devices = {p.device for p in self.params}
        if len(devices) > 1:
            raise ValueError(f"trainable parameters are on several devices ({sorted(map(str, devices))}); "
                             "anadp needs them on one device")

    # --- forward / backward side -------------------------------------------------
    def _pre_forward(self, module, args, kwargs):
        x = _first_tensor(args, kwargs)
        if compiled.compiling():  # the book-keeping as an op that runs it eagerly (anadp.compiled); the batch size
            if x is None:  # for the traced layers too
                raise ValueError("a compiled private model needs a tensor argument (its batch)")
            dim = 0 if self.batch_first else 1
            self.batch_size = x.shape[dim] if x.dim() > dim else None
            compiled.begin(self, x, self.flat is None and self._flat_fits())
            return
        self.begin_forward(x, torch.is_grad_enabled())

    def _flat_fits(self) -> bool:
        """While dynamo traces a forward: whether it could take the flat path (anadp.flat), a buffer aside: the
        optimizer allows it, gradients on, no autocast, a static batch size within the budget."""
        layout, B = self.flat_layout, self.batch_size
        return (layout is not None and torch.is_grad_enabled() and isinstance(B, int) and 0 < B
                and B * layout.numel <= FLAT_NUMBERS and not torch.is_autocast_enabled(layout.device.type))

    def flat_now(self) -> Optional[FlatBuffer]:
        """While dynamo traces a forward: the flat buffer its layers add their per-sample gradients into
        (anadp.flat), or None (the record ops)."""
        flat = self.flat
        return flat if flat is not None and self._flat_fits() and self.batch_size == flat.rows else None

    def begin_forward(self, x: Optional[torch.Tensor], grad: bool, make_flat: bool = False) -> None:
        """Before each forward of the model (``x``: its first tensor argument; ``grad``: whether it runs
        with gradients; ``make_flat``: a compiled forward that could take the flat path but for its buffer):
        the last backward's records go to the accumulator, and the counts start afresh."""
        if self.model.training:  # model.train() puts batch norms back into train mode
            self._check_mixing()
        self.flush()
        if make_flat and self.flat is None:  # the next forward's trace takes it (one recompile)
            self.flat = FlatBuffer(self.flat_layout, x.shape[0 if self.batch_first else 1])
        self._buffer_state = self._buffer_versions()
        self._readers.clear()
        if self._copies:
            self._copies = {}
        if self._row_fns or self._row_tensors:
            self._row_fns, self._row_tensors = {}, {}
        self.calls = [0] * len(self.layers)
        dim = 0 if self.batch_first else 1
        self.batch_size = x.shape[dim] if x is not None and x.dim() > dim else None
        if grad:
            self._grad_forwards += 1
        self.chunk_id, self.ends_logical = self.chunks.current, self.chunks.ends_logical
        self.real_rows, self._padding = self.chunks.real_rows, None

    def to_batch_first(self, name: str, *ts):
        """Move the batch dim first and check it against the model's batch size."""
        if not self.batch_first:
            ts = tuple(t.movedim(1, 0) if t.dim() > 1 else t for t in ts)
        return self.check_batch(name, *ts)

    def check_batch(self, name: str, *ts):
        """Check batch-first tensors against the model's batch size."""
        if self.batch_size is None:
            self.batch_size = ts[0].shape[0]
        if ts[0].shape[0] != self.batch_size and self._grad_forwards > 1 and not torch.is_grad_enabled():
            raise BatchMismatchError(
                f"layer '{name}' got the gradient of a batch of {ts[0].shape[0]} in this backward, but the private "
                f"model ran {self._grad_forwards} forwards with gradients enabled since the last backward (the last "
                f"on a batch of {self.batch_size}): a backward belongs to the forward just before it. Run each "
                "forward's backward before the next forward, and wrap evaluation forwards in torch.no_grad()")
        if ts[0].shape[0] != self.batch_size:
            raise BatchMismatchError(
                f"layer '{name}' saw a batch of {ts[0].shape[0]} (tensor shape {tuple(ts[0].shape)}) but the model "
                f"input has batch size {self.batch_size}; the engine expects batch_first={self.batch_first} "
                f"(pass batch_first={not self.batch_first} to make_private if your model takes the other layout)")
        return ts

    def broadcast_indices(self, name: str, idx: torch.Tensor) -> torch.Tensor:
        """Indices shared by the whole batch (BERT/GPT-2 position_ids of batch 1) are
        expanded to the batch, so each sample's gradient reaches the layer
        before autograd sums it over the broadcast."""
        B, dim = self.batch_size, 0 if self.batch_first else 1
        if B is None or B == 1 or idx.dim() <= dim or idx.shape[dim] != 1:
            return idx
        shape = list(idx.shape)
        shape[dim] = B
        return idx.expand(shape)

    def flat_rows(self, x: torch.Tensor) -> int:
        """k where ``x`` (B k, ...) provably holds the batch's samples as consecutive blocks of k rows (a
        model that flattens (B, T, d) into tokens, as OPT's feed-forward and mixture-of-experts layers do),
        else 0. Provably: ``x`` is a contiguous view of a contiguous batch-first tensor of as many numbers,
        or a hooked layer returned it (``mark_rows``), or row-wise ops (``_ROW_WISE``) made it from such
        tensors alone. Anything else (a gather, a sort, a permutation of rows) is not proved, and the
        layer then refuses the batch rather than guess."""
        B = self.batch_size
        if not self.batch_first or B is None or B < 1 or x.dim() < 1:
            return 0
        N = x.shape[0]
        if N == B or N % B:
            return 0
        base = x._base
        if (base is not None and base.dim() > 1 and base.shape[0] == B and base.numel() == x.numel()
                and x.data_ptr() == base.data_ptr() and base.is_contiguous() and x.is_contiguous()):
            return N // B
        hit = self._row_tensors.get(id(x))
        if hit is not None and hit[0] is x:
            return hit[1]
        return self._node_rows(x.grad_fn, N // B, 8)

    def _node_rows(self, fn, k: int, depth: int) -> int:
        if fn is None or depth == 0:
            return 0
        if self._row_fns.get(fn) == k:
            return k
        if type(fn).__name__ not in _ROW_WISE:
            return 0
        inputs = [f for f, _ in fn.next_functions if f is not None]
        return k if inputs and all(self._node_rows(f, k, depth - 1) == k for f in inputs) else 0

    def mark_rows(self, t: torch.Tensor, k: int) -> None:
        """A hooked layer returns ``t``, a flattened batch of k rows per sample (see flat_rows)."""
        if t.grad_fn is not None:
            self._row_fns[t.grad_fn] = k
        else:
            self._row_tensors[id(t)] = (t, k)

    def copy_of(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of ``t``, the same for every call with this tensor object until the next forward: the records
        of layers reading one input (q, k and v) share it, and with it its Gram matrix. Keyed by the object,
        held weakly: a compiled graph hands a new object for memory it reuses."""
        hit = self._copies.get(id(t))
        if hit is not None and hit[0]() is t:
            return hit[1]
        c = t.clone()
        self._copies[id(t)] = (weakref.ref(t), c)
        return c

    def count_reader(self, x: torch.Tensor) -> None:
        """A Linear call of this forward reads ``x`` (forward side, for ``readers``)."""
        key = (x.data_ptr(), x.shape, x.dtype)
        readers = self._readers
        readers[key] = readers.get(key, 0) + 1

    def readers(self, x: torch.Tensor) -> int:
        """How many Linear calls of this forward read ``x``: their ghost norms share its Gram matrix."""
        return max(1, self._readers.get((x.data_ptr(), x.shape, x.dtype), 0))

    def record(self, param, rec) -> None:
        self._grad_forwards = 0
        if self.real_rows is not None and rec.batch_size > self.real_rows:
            rec.drop(self._padded_rows(rec.batch_size, param.device))
        self._records.setdefault(param, []).append(rec)
        acc = self.accumulator
        if acc is not None and acc.clips_in_backward:
            self._seen_batch = rec.batch_size
            acc.on_record(param)

    def _padded_rows(self, batch: int, device) -> torch.Tensor:
        """(batch,) True on the padded rows of a static-shape chunk: their records are zeroed, so that they
        are absent from every norm, clipped sum and released statistic (a mask, not a slice: the shapes stay
        fixed)."""
        if self._padding is None or self._padding.device != device or self._padding.numel() != batch:
            self._padding = torch.arange(batch, device=device) >= self.real_rows
        return self._padding

    def pop_records(self, params) -> dict:
        """{param: its records} of ``params`` that have records, taken out of the pending batch (an
        accumulator that clips in the backward takes a group's records as soon as they are complete)."""
        return {p: self._records.pop(p) for p in params if p in self._records}

    @property
    def has_pending_records(self) -> bool:
        return bool(self._records) or (self.flat is not None and self.flat.written)

    def expected_records(self, param) -> int:
        """How many records ``param`` gets in this backward: one per call of each layer holding it."""
        calls = self.calls
        return sum(calls[k] for k in self.owners.get(param, ()))

    def use_flat(self, params: list) -> None:
        """Let compiled forwards take the flat path (anadp.flat) where it applies to ``params``: the whitened
        accumulator's choice, with the torch norms and no reducer."""
        found = None if self.adapters else FlatLayout.of(params, self.layers)
        if found is not None:
            self.flat_layout, blocks = found
            for layer, k in zip(self.layers, blocks):
                layer.flat_block = k

    # --- after backward -------------------------------------------------------------
    def _pending(self) -> Optional[PhysicalBatch]:
        if self.flat is not None and self.flat.written:
            if self._records:
                raise RuntimeError("a backward both recorded and wrote the flat buffer (anadp.flat): a forward "
                                   "changed its autocast or grad mode between its layers; run it uncompiled")
            return FlatBatch(self.flat, self.loss_reduction, self.ends_logical, self.chunk_id, self.real_rows)
        if not self._records:
            if self._seen_batch is None:
                return None
            B = self._seen_batch  # every record was taken in the backward (per_layer clipping)
        else:
            B = next(iter(self._records.values()))[0].batch_size
        return PhysicalBatch(self._records, B, reduction_scale(B, self.loss_reduction), self.ends_logical, self.chunk_id)

    def _buffer_versions(self) -> list:
        return [(t, None if t is None else t._version) for t in (m._buffers.get(b) for _, m, b in self._buffers)]

    def _check_buffers(self) -> None:
        """No buffer may hold what a private forward/backward computed from the batch: it would reach the
        state_dict and every checkpoint without noise."""
        if not self._buffer_state:
            return
        for (name, _, _), (t, version), now in zip(self._buffers, self._buffer_state, self._buffer_versions()):
            if now[0] is not t or now[1] != version:
                raise RuntimeError(
                    f"buffer '{name}' was written during a private forward/backward: it would carry the private "
                    "batch into the state_dict and every checkpoint without noise. Put the module that writes it in "
                    "eval mode, or make it compute the value without storing it.")

    def take(self) -> Optional[PhysicalBatch]:
        """The finished physical batch, or None if no backward ran since the last take (a flat batch: its
        buffer is cleared by flush, once the accumulator is done with it)."""
        batch = self._pending()
        if batch is not None:
            self._check_buffers()
            self._grad_forwards = 0
        self._records, self._seen_batch = {}, None
        return batch

    def flush(self) -> None:
        batch = self.take()
        if batch is not None and self.accumulator is not None:
            self.accumulator.on_batch(batch)
        if isinstance(batch, FlatBatch):
            self.flat.clear()

    def discard(self) -> None:
        self._records, self._seen_batch = {}, None
        if self.flat is not None and self.flat.written:
            self.flat.clear()

    def per_sample_sq_norms(self, kernels=None) -> dict:
        """param -> (B,) squared norms of the pending batch (does not consume it)."""
        batch = self._pending()
        if batch is None:
            raise RuntimeError("no backward pass through the hooked model since the last step")
        return batch.sq_norms(kernels)

    def remove(self) -> None:
        for layer in self.layers:
            layer.remove()
        for adapter in self.adapters:
            adapter.remove()
        self._hook.remove()
        compiled.unregister(self.key)
        for h in self._grad_hooks:
            h.remove()
        self._records = {}
