"""What one layer call leaves behind for one parameter, and the per-sample
algebra on it: squared norms, inner products between two calls (tied
weights), and the clipped sum  sum_i c_i g_i  — all without keeping
per-sample gradients.

A parameter used by several calls in one forward (GPT-2's ``wte`` and
``lm_head``, a module applied twice) has per-sample gradient
``g_i = sum_k g_i^(k)``, so ``||g_i||^2 = sum_k ||g_i^(k)||^2 + 2 sum_{k<l} <g_i^(k), g_i^(l)>``.

All tensors are batch first. Norm arithmetic runs in at least float32.
"""
from __future__ import annotations

import torch

# Instantiating a (B, p, d) per-sample gradient is done in batch chunks of at
# most this many elements, to bound the transient memory.
_INSTANTIATE_CHUNK = 1 << 24


def ghost_is_cheaper(T: int, d: int, p: int, sharers: int = 1) -> bool:
    """Ghost norm costs ~2BT^2(p+d) (two Gram matrices), instantiation ~2BTpd (one per-sample
    gradient, bounded in memory by chunking): ghost when T(p + d/sharers) < pd, the input's Gram
    matrix being formed once for the ``sharers`` layers that read the same input (query, key and
    value). The same rule for every backend (kernel backends: sharers = 1). Measured on the CPU:
    the space-based rule (2T^2 < pd, mixed ghost clipping) picks ghost for T = 256 and widths
    256-1024, where it was 1.2-1.6x slower than instantiation."""
    return T * (p + d / sharers) < p * d


def gram_key(A: torch.Tensor) -> tuple:
    """Identifies an input tensor that several layers read (its Gram matrix is shared)."""
    return (A.data_ptr(), tuple(A.shape), tuple(A.stride()), A.dtype)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision for accumulation."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


class LinearRecord:
    """Weight of y_t = W a_t: per-sample gradient sum_t g_t a_t^T, shape (p, d);
    ``transposed`` for Hugging Face Conv1D, whose weight is stored (d, p)."""

    def __init__(self, A: torch.Tensor, G: torch.Tensor, transposed: bool = False):
        self.A, self.G, self.transposed = _acc(A), _acc(G), transposed  # (B,T,d), (B,T,p)

    @property
    def batch_size(self) -> int:
        return self.A.shape[0]

    def use_ghost(self, sharers: int = 1) -> bool:
        return ghost_is_cheaper(self.A.shape[1], self.A.shape[2], self.G.shape[2], sharers)

    def sq_norm(self, grams: dict | None = None, sharers: dict | None = None) -> torch.Tensor:
        """``grams``: A A^T of inputs already seen in this batch (query, key and value read the same
        hidden state: its Gram matrix is formed once); ``sharers``: gram_key -> how many layers read
        that input."""
        A, G = self.A, self.G
        if A.shape[1] == 1:
            return A.pow(2).sum((1, 2)) * G.pow(2).sum((1, 2))
        key = gram_key(A)
        if self.use_ghost(sharers.get(key, 1) if sharers else 1):
            gram = grams.get(key) if grams is not None else None
            if gram is None:
                gram = torch.bmm(A, A.transpose(1, 2))
                if grams is not None:
                    grams[key] = gram
            return (gram * torch.bmm(G, G.transpose(1, 2))).sum((1, 2))
        B, d, p = A.shape[0], A.shape[2], G.shape[2]
        step = max(1, _INSTANTIATE_CHUNK // (p * d))
        out = [torch.bmm(G[i:i + step].transpose(1, 2), A[i:i + step]).pow(2).sum((1, 2)) for i in range(0, B, step)]
        return torch.cat(out) if out else A.new_zeros(0)

    def dense(self) -> torch.Tensor:
        g = torch.bmm(self.G.transpose(1, 2), self.A)  # (B, p, d)
        return g.transpose(1, 2) if self.transposed else g

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        Gc = self.G * c.to(self.G.dtype)[:, None, None]
        g = Gc.flatten(0, 1).t() @ self.A.flatten(0, 1)  # A^T diag(c) G as one GEMM
        return g.t() if self.transposed else g

    def drop(self, bad: torch.Tensor) -> None:
        self.A = torch.where(bad[:, None, None], 0, self.A)
        self.G = torch.where(bad[:, None, None], 0, self.G)


class EmbeddingRecord:
    """Weight of an embedding lookup: per-sample gradient scatters g_t into row idx_t."""

    def __init__(self, idx: torch.Tensor, G: torch.Tensor, num_embeddings: int, padding_idx=None):
        G = _acc(G)
        if padding_idx is not None:  # the padding row gets no gradient
            G = torch.where((idx == padding_idx)[..., None], 0, G)
        self.idx, self.G, self.V = idx, G, num_embeddings  # (B,T), (B,T,d)

    @property
    def batch_size(self) -> int:
        return self.idx.shape[0]

    def rows(self):
        """Non-zero rows of the per-sample gradients: (sample of row, key b*V+v, row sums)."""
        B = self.idx.shape[0]
        keys = (torch.arange(B, device=self.idx.device)[:, None] * self.V + self.idx).flatten()
        uniq, inv = torch.unique(keys, return_inverse=True)
        R = self.G.new_zeros(uniq.numel(), self.G.shape[-1]).index_add_(0, inv, self.G.flatten(0, 1))
        return uniq, R

    def sq_norm(self) -> torch.Tensor:
        # O(BTd) via unique (sample, index) pairs; cheaper than the O(BT^2 d) ghost sum
        uniq, R = self.rows()
        return R.new_zeros(self.batch_size).index_add_(0, uniq // self.V, R.pow(2).sum(1))

    def dense(self) -> torch.Tensor:
        B, d = self.G.shape[0], self.G.shape[-1]
        out = self.G.new_zeros(B * self.V, d)
        keys = (torch.arange(B, device=self.idx.device)[:, None] * self.V + self.idx).flatten()
        return out.index_add_(0, keys, self.G.flatten(0, 1)).view(B, self.V, d)

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        Gc = self.G * c.to(self.G.dtype)[:, None, None]
        return Gc.new_zeros(self.V, Gc.shape[-1]).index_add_(0, self.idx.flatten(), Gc.flatten(0, 1))

    def drop(self, bad: torch.Tensor) -> None:
        self.G = torch.where(bad[:, None, None], 0, self.G)


class DenseRecord:
    """A per-sample gradient held as such (B, *shape): biases, norm weights."""

    def __init__(self, grad_sample: torch.Tensor, source: LinearRecord | None = None):
        self.gs = _acc(grad_sample)
        self.source = source  # the Linear weight record this bias gradient is the token sum of

    @property
    def batch_size(self) -> int:
        return self.gs.shape[0]

    def sq_norm(self) -> torch.Tensor:
        return self.gs.flatten(1).pow(2).sum(1)

    def dense(self) -> torch.Tensor:
        return self.gs

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        return torch.tensordot(c.to(self.gs.dtype), self.gs, dims=1)

    def drop(self, bad: torch.Tensor) -> None:
        self.gs = torch.where(bad.view(-1, *[1] * (self.gs.dim() - 1)), 0, self.gs)


def inner(r: object, s: object) -> torch.Tensor:
    """Per-sample <g_r, g_s> of two contributions to the same parameter, (B,)."""
    if isinstance(r, LinearRecord) and isinstance(s, LinearRecord) and r.transposed == s.transposed:
        return (torch.bmm(r.A, s.A.transpose(1, 2)) * torch.bmm(r.G, s.G.transpose(1, 2))).sum((1, 2))
    if isinstance(r, LinearRecord) and isinstance(s, EmbeddingRecord):
        r, s = s, r
    if isinstance(r, EmbeddingRecord) and isinstance(s, LinearRecord) and not s.transposed:
        # tied embedding / output layer, W (V, d): sum_{t,u} G_lin[t, idx_u] (a_t . g_emb_u)
        M = torch.bmm(s.A, r.G.transpose(1, 2))  # (B, T_lin, T_emb)
        Gsel = s.G.gather(2, r.idx[:, None, :].expand(-1, s.G.shape[1], -1))
        return (M * Gsel).sum((1, 2))
    if isinstance(r, EmbeddingRecord) and isinstance(s, EmbeddingRecord):
        ur, Rr = r.rows()
        us, Rs = s.rows()
        keys, inv = torch.unique(torch.cat([ur, us]), return_inverse=True)
        Sr = Rr.new_zeros(keys.numel(), Rr.shape[1]).index_add_(0, inv[:ur.numel()], Rr)
        Ss = Rs.new_zeros(keys.numel(), Rs.shape[1]).index_add_(0, inv[ur.numel():], Rs)
        return Sr.new_zeros(r.batch_size).index_add_(0, keys // r.V, (Sr * Ss).sum(1))
    return (r.dense() * s.dense()).flatten(1).sum(1)


def sq_norm(records: list, grams: dict | None = None, sharers: dict | None = None) -> torch.Tensor:
    """Per-sample squared norm of the sum of several contributions (``grams``, ``sharers``: see
    LinearRecord)."""
    def one(r):
        return r.sq_norm(grams, sharers) if isinstance(r, LinearRecord) else r.sq_norm()
    total = one(records[0])
    for k in range(1, len(records)):
        total = total + one(records[k])
        for j in range(k):
            total = total + 2 * inner(records[j], records[k])
    return total


def clipped_sum(records: list, c: torch.Tensor) -> torch.Tensor:
    total = records[0].clipped_sum(c)
    for r in records[1:]:
        total = total + r.clipped_sum(c)
    return total
