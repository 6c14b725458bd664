"""A compiled model's per-sample gradients written by the graph: where dynamo traces a private model under
whitened or global clipping and the whole model fits, each hooked layer's traced backward adds its
per-sample gradients into its block's buffer (B, numel of its weight and bias), in the graph, and no op
calls into Python per layer. The engine then hands the accumulator a ``FlatBatch``: the buffers side by
side, the squared norms of every tensor in one segment sum, the clipped sums in one product.

Why: a record op per layer call costs its dispatch and its Python body (~20-40 us on the CPU, ~100 calls a
step for a 12-layer BERT), and the batch's records then cost Python per record at the step; this path
costs the graph's own kernels and a handful of ops at the step (docs/design.md, "The flat path").

When: every hooked layer is a Linear, an embedding or a norm (``Layer.flat_backward``), the trainable
parameters are float32 or float64 on one device, no kernel backend forms the norms, no FSDP2 reducer, no
autocast, a static batch size, and B P numbers within ``FLAT_NUMBERS``. The buffers are made at run time
by the book-keeping op of the first compiled forward that could take the path (``make_flat``), which itself
runs the record ops; the next trace sees them (one recompile). Elsewhere the record ops (anadp.compiled)
serve, as before.

Memory: B P numbers, the per-sample gradients of every parameter (embeddings included: B V d), where the
record ops keep (A, G) for some Linears; hence the budget.
"""
from __future__ import annotations

import torch

from .physical_batch import reduction_scale

FLAT_NUMBERS = 1 << 25  # at most 32 Mi numbers in the buffers (128 MB in float32)


class FlatLayout:
    """The buffers' columns: one block per hooked layer, its trainable weight and bias side by side, each
    one's per-sample gradient flattened (a tied weight, which two layers hold alone, is one block); ``params``
    in block order, ``sizes`` their numbers of columns."""

    def __init__(self, blocks: list):
        self.blocks = blocks
        self.params = [p for block in blocks for p in block]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device
        # the key (row of the squared norms) of each column
        self.col_key = torch.repeat_interleave(torch.arange(len(self.params), device=self.device),
                                               torch.tensor(self.sizes, device=self.device))
        self.records = dict.fromkeys(self.params, ())  # the keys a batch holds (the accumulator iterates them)

    @staticmethod
    def of(params: list, layers: list) -> tuple[FlatLayout, list] | None:
        """(the layout, each layer's block index) where every trainable parameter in ``params``, of a model made
        of ``layers``, can take this path; None where one cannot."""
        dtypes = {p.dtype for p in params}
        if (not params or len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}
                or len({p.device for p in params}) != 1
                or any(getattr(type(layer), "flat_backward", None) is None for layer in layers)):
            return None
        blocks, index, which = [], {}, []
        for layer in layers:
            block = tuple(layer.trainable_params())
            ids = tuple(map(id, block))
            if ids not in index:
                index[ids] = len(blocks)
                blocks.append(block)
            which.append(index[ids])
        held = [p for block in blocks for p in block]
        if len({id(p) for p in held}) != len(held) or {id(p) for p in held} != {id(p) for p in params}:
            return None  # a parameter in two blocks, or one no block holds (a parametrization)
        return FlatLayout(blocks), which


class FlatBuffer:
    """The per-sample gradients of one batch size: ``bufs[k]`` (rows, numel) for the layout's k-th block, zero
    between batches. A tensor per block, not columns of one: a compiled backward's writes into slices of one
    input are functionalized into a copy of the whole input per write (measured: 100 writes of 800 numbers,
    4.6 ms against 0.14 ms into 100 tensors). ``tick``: a scalar leaf that every flat layer's backward gives a
    zero gradient, so that ``tick.grad`` tells on the host, without a device read, whether a backward wrote."""

    def __init__(self, layout: FlatLayout, rows: int):
        self.layout, self.rows = layout, rows
        self.bufs = [torch.zeros(rows, sum(p.numel() for p in block), dtype=layout.dtype, device=layout.device)
                     for block in layout.blocks]
        self.tick = torch.zeros((), dtype=layout.dtype, device=layout.device, requires_grad=True)

    @property
    def written(self) -> bool:
        return self.tick.grad is not None

    def clear(self) -> None:
        torch._foreach_zero_(self.bufs)
        self.tick.grad = None


class FlatBatch:
    """A physical batch held in a FlatBuffer, with PhysicalBatch's interface for the accumulator: its
    per-sample gradients side by side, X (B, P), in one concatenation."""

    def __init__(self, flat: FlatBuffer, loss_reduction: str, ends_logical: bool, chunk_id, real_rows):
        self.layout = flat.layout
        self.X = torch.cat(flat.bufs, 1)
        self.batch_size = flat.rows
        self.scale = reduction_scale(self.batch_size, loss_reduction)
        self.ends_logical, self.chunk_id = ends_logical, chunk_id
        self.records = self.layout.records
        if real_rows is not None and real_rows < self.batch_size:  # a static-shape chunk's padded rows
            self.X[real_rows:] = 0

    def sq_rows(self, kernels=None) -> tuple[list, torch.Tensor]:
        """(params, S), S (len(params), B): see PhysicalBatch.sq_rows; one segment sum over the columns."""
        S = self.X.new_zeros(self.batch_size, len(self.layout.params))
        S.index_add_(1, self.layout.col_key, self.X.square())
        return self.layout.params, S.t()

    def slack_rows(self, keys: list) -> None:
        return None  # float32 / float64 sums: exact

    def sq_norms(self, kernels=None, scaled: bool = True) -> dict:
        keys, S = self.sq_rows()
        if scaled:
            S = S * self.scale ** 2
        return dict(zip(keys, S.unbind(0)))

    def clipped_sums(self, c: torch.Tensor, params, rows: dict | None = None) -> dict:
        """param -> sum_i c_i g_i for ``params`` (``c``: the clip factors, scale included), one product for all."""
        if rows is not None:  # (the engine gives flat batches to the whitened accumulator only)
            raise NotImplementedError("a flat batch takes one clip factor per sample (whitened or global clipping), "
                                      "not one per group (per-layer clipping)")
        total = c.to(self.X.dtype) @ self.X
        parts = dict(zip(self.layout.params, total.split(self.layout.sizes)))  # one op, not a slice per tensor
        return {p: parts[p].view(p.shape) for p in params}

    def drop(self, bad: torch.Tensor) -> None:
        self.X.masked_fill_(bad[:, None], 0)
