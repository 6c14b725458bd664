"""Records of one shape stacked, so that a physical batch's many small tensors take one product per
stack instead of a few small ops each: the per-sample gradients of biases and norm weights
(``dense_stacks``), and small ghost-norm Linear layers (``LinearStack``: batched Gram products for
their norms, one batched GEMM for their clipped sums, their biases' token sums in one reduction).
"""
from __future__ import annotations

import math

import torch

from .records import HALF, _native_16bit, gemm32, gram_key, rounding_gamma

# Per-sample gradients of one shape are stacked (one norm reduction, one weighted sum for all of
# them instead of one each: BERT-base has ~200 small tensors, biases and norm weights, whose per-tensor
# ops are most of the host time of a step) while the stack holds at most this many numbers.
_STACK_MAX = 1 << 20
# On a device whose GEMMs take 16-bit inputs (a GPU) each op is a launch that costs more than the copy
# into a stack: Linear records of one shape are stacked in chunks of up to this many numbers (A, G and
# their Gram matrices), ~0.5 GB in bfloat16, instead of each taking ~25 launches of its own.
_STACK_MAX_NATIVE = 1 << 27


def dense_stacks(records: dict) -> list:
    """[(keys, X)]: the DenseRecords of ``records`` (key -> record) grouped by shape, dtype and device,
    two or more and small (``_STACK_MAX``), each stacked as X (n, B, numbers per sample)."""
    by: dict = {}
    for key, r in records.items():
        gs = r.gs
        by.setdefault((gs.shape, gs.dtype, gs.device), []).append(key)
    out = []
    for (shape, _, _), keys in by.items():
        if len(keys) >= 2 and math.prod(shape) * len(keys) <= _STACK_MAX:
            X = torch.stack([records[k].gs for k in keys])
            # reshape: the generic path's per-sample gradients may come in a permuted memory format, kept by stack
            out.append((keys, X if X.dim() == 3 else X.reshape(len(keys), shape[0], math.prod(shape[1:]))))
    return out


class LinearStack:
    """Small ghost-norm Linear records of one shape, stacked: their per-sample norms in two batched
    Gram products and their clipped sums in one batched GEMM, instead of ~5 ops each. Inputs that
    several of them read (query, key and value) are stacked once."""

    def __init__(self, keys: list, records: list):
        self.keys, self.records, self.transposed = keys, records, records[0].transposed
        uniq: dict = {}  # gram_key -> (position in the A stack, A)
        index = [uniq.setdefault(gram_key(r.A), (len(uniq), r.A))[0] for r in records]
        self.A = torch.stack([A for _, A in uniq.values()])  # (u, B, T, d)
        self.G = torch.stack([r.G for r in records])  # (n, B, T, p)
        self.index = None if len(uniq) == len(records) else torch.tensor(index, device=self.A.device)

    def sq_norms(self) -> torch.Tensor:
        """(n, B) per-sample squared norms: <A_i A_i^T, G_i G_i^T> per record and sample."""
        u, B, T, d = self.A.shape
        n, p = self.G.shape[0], self.G.shape[3]
        A, G = self.A.view(u * B, T, d), self.G.view(n * B, T, p)
        GA = gemm32(A, A.transpose(1, 2)).view(u, B, T * T)  # 16-bit stacks: float32 accumulation and output
        if self.index is not None:
            GA = GA.index_select(0, self.index)
        GG = gemm32(G, G.transpose(1, 2)).view(n, B, T * T)
        return torch.linalg.vecdot(GA, GG)

    def rounding_slack(self) -> torch.Tensor | None:
        """(n, B): LinearRecord.rounding_slack of each stacked record (None off a native 16-bit device)."""
        if not (_native_16bit(self.G) and self.G.dtype == torch.bfloat16):
            return None
        u, B, T, d = self.A.shape
        na = torch.linalg.vector_norm(self.A, dim=3, dtype=torch.float32)  # (u, B, T)
        if self.index is not None:
            na = na.index_select(0, self.index)
        ng = torch.linalg.vector_norm(self.G, dim=3, dtype=torch.float32)  # (n, B, T)
        return rounding_gamma(self.G.dtype, B * T) * (na * ng).sum(2)

    def fill_token_sums(self, biases: dict) -> None:
        """Form the per-sample gradients of the TokenSumRecords in ``biases`` (id of a weight record ->
        its bias's record) whose weights are in this stack, in one sum over the tokens."""
        want = [(k, biases[id(r)]) for k, r in enumerate(self.records) if id(r) in biases]
        if want:
            sums = self.G.sum(2, dtype=torch.float32 if self.G.dtype in HALF else None)  # (n, B, p)
            for k, b in want:
                b.gs = sums[k]

    def clipped_sums(self, c: torch.Tensor) -> torch.Tensor:
        """(n, *weight shape): sum_i c_i G_i^T A_i per record; ``c`` (B,) shared or (n, B) per record."""
        u, B, T, d = self.A.shape
        n, p = self.G.shape[0], self.G.shape[3]
        A = self.A if self.index is None else self.A.index_select(0, self.index)
        A = A.reshape(n, B * T, d)
        c = c[None, :, None, None] if c.dim() == 1 else c[:, :, None, None]
        if _native_16bit(self.G):  # the scaled operand rounded to 16 bits, one GEMM (rounding_slack)
            if self.G.dtype != torch.bfloat16:
                raise ValueError("16-bit stacks on a native device are bfloat16's (float16: see clipped_gemm)")
            Gc = (self.G * c.float()).to(self.G.dtype).view(n, B * T, p)  # the product in float32
            return gemm32(A.transpose(1, 2), Gc) if self.transposed else gemm32(Gc.transpose(1, 2), A)
        Gc = (self.G * c.to(self.G.dtype)).view(n, B * T, p)
        if self.transposed:  # Conv1D weight (d, p)
            return torch.bmm(A.transpose(1, 2), Gc)
        return torch.bmm(Gc.transpose(1, 2), A)


def linear_stacks(records: dict) -> list:
    """[LinearStack]: the ghost-norm LinearRecords of ``records`` (key -> record) grouped by shapes,
    dtype, device and layout, two or more and small (``_STACK_MAX`` numbers with their Gram
    matrices: large layers keep their own, blocked, products)."""
    by: dict = {}
    for key, r in records.items():  # (float16 records on a native device keep their own float32 GEMMs)
        if r.A.shape[1] > 1 and r.use_ghost() and not (_native_16bit(r.A) and r.A.dtype != torch.bfloat16):
            by.setdefault((tuple(r.A.shape), tuple(r.G.shape), r.A.dtype, r.A.device, r.transposed), []).append(key)
    out = []
    for (a, g, _, _, _), keys in by.items():
        B, T = a[0], a[1]
        each = B * T * (a[2] + g[2] + 2 * T)
        if _native_16bit(records[keys[0]].A):  # chunks of at most _STACK_MAX_NATIVE numbers, of near-equal sizes
            per = max(1, _STACK_MAX_NATIVE // each)
            n = -(-len(keys) // per)
            groups = [keys[len(keys) * i // n:len(keys) * (i + 1) // n] for i in range(n)]
        else:  # the CPU: a group that fits the cache-sized limit, or none
            groups = [keys] if len(keys) * each <= _STACK_MAX else []
        out += [LinearStack(ks, [records[k] for k in ks]) for ks in groups if len(ks) >= 2]
    return out
