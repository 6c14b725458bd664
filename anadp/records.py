"""What one layer call leaves behind for one parameter, and the per-sample
algebra on it: squared norms, inner products between two calls (tied
weights), and the clipped sum  sum_i c_i g_i  — keeping per-sample
gradients only where they take less memory than the activation and output
gradient they are formed from (``instantiate_at_backward``).

A parameter used by several calls in one forward (GPT-2's ``wte`` and
``lm_head``, a module applied twice) has per-sample gradient
``g_i = sum_k g_i^(k)``, so ``||g_i||^2 = sum_k ||g_i^(k)||^2 + 2 sum_{k<l} <g_i^(k), g_i^(l)>``.

All tensors are batch first. Norm arithmetic runs in at least float32.
"""
from __future__ import annotations

import math

import torch

# Instantiating a (B, p, d) per-sample gradient is done in batch chunks of at
# most this many elements, to bound the transient memory.
_INSTANTIATE_CHUNK = 1 << 22


def ghost_is_cheaper(T: int, d: int, p: int, sharers: int = 1) -> bool:
    """Ghost norm costs ~2BT^2(p+d) (two Gram matrices), instantiation ~2BTpd (one per-sample
    gradient, bounded in memory by chunking): ghost when T(p + d/sharers) < pd, the input's Gram
    matrix being formed once for the ``sharers`` layers that read the same input (query, key and
    value). The same rule for every backend (kernel backends: sharers = 1). Measured on the CPU:
    the space-based rule (2T^2 < pd, mixed ghost clipping) picks ghost for T = 256 and widths
    256-1024, where it was 1.2-1.6x slower than instantiation.

    It is also the memory rule of the torch engine (see ``instantiate_at_backward``): keeping A
    and G for the ghost norm and the clipped-sum GEMM holds BT(p + d/sharers) numbers, the
    per-sample gradient Bpd."""
    return T * (p + d / sharers) < p * d


def instantiate_at_backward(T: int, d: int, p: int, sharers: int = 1) -> bool:
    """Whether the torch engine forms a Linear's per-sample gradients in its backward hook and
    keeps them instead of (A, G): where ghost is not cheaper, the per-sample gradient is one GEMM
    either way, and keeping it (Bpd numbers) takes less memory than A and G (BT(p + d/sharers));
    its norm and the clipped sum (a weighted sum over the batch) are then read off it, which saves
    the clipped-sum GEMM that keeping (A, G) costs: on the CPU the DP step of GPT-2-like models
    (T = 256, width 256, all layers instantiated) loses ~2BTpd per layer, about a fifth of a
    non-private step. T = 1 (no token axis) keeps (A, G): its norm is ||a||^2 ||g||^2."""
    return T > 1 and not ghost_is_cheaper(T, d, p, sharers)


def gram_key(A: torch.Tensor) -> tuple:
    """Identifies an input tensor that several layers read (its Gram matrix is shared)."""
    return (A.data_ptr(), tuple(A.shape), tuple(A.stride()), A.dtype)


HALF = (torch.float16, torch.bfloat16)


def _acc(t: torch.Tensor) -> torch.Tensor:
    """Upcast half precision for accumulation."""
    return t.float() if t.dtype in HALF else t


def token_sum(t: torch.Tensor) -> torch.Tensor:
    """(B, T, ...) -> (B, ...), summed in at least float32 (a bfloat16 sum over T tokens loses
    ~log2(T) bits)."""
    return t.sum(1, dtype=torch.float32 if t.dtype in HALF else None)


# Devices whose GEMMs take 16-bit inputs with float32 accumulation and output
# (torch.bmm / torch.mm(out_dtype=torch.float32): cuBLAS). There a Linear's 16-bit input and output
# gradient (autocast) are kept as they are and go into the GEMMs as they are; elsewhere they are
# upcast when recorded, which is the same arithmetic: a product of two 16-bit values is exact in float32.
NATIVE_16BIT_DEVICES = {"cuda"}


def _native_16bit(t: torch.Tensor) -> bool:
    return t.dtype in HALF and t.device.type in NATIVE_16BIT_DEVICES


def gemm32(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y (2-d or batched 3-d) in float32 arithmetic: 16-bit inputs on a native device go into the
    GEMM as they are (float32 accumulation and output), other inputs are upcast first."""
    global _OUT_DTYPE
    mm = torch.bmm if x.dim() == 3 else torch.mm
    if x.dtype == y.dtype and x.dtype in HALF:
        if x.device.type in NATIVE_16BIT_DEVICES and _OUT_DTYPE:
            try:
                return mm(x, y, out_dtype=torch.float32)
            except (TypeError, RuntimeError, NotImplementedError):  # a torch without the dtype overloads
                _OUT_DTYPE = False
        return mm(x.float(), y.float())  # the same arithmetic, where no such GEMM exists (and in the tests)
    return mm(_acc(x), _acc(y))


_OUT_DTYPE = True  # whether torch.bmm / torch.mm take out_dtype here (False after the first refusal)


U32 = 2.0 ** -24  # float32's unit roundoff


def rounding_gamma(dtype: torch.dtype, tokens: int) -> float:
    """Relative bound gamma of the one-GEMM clipped sum on a native 16-bit device: for a sample i with
    clip factor c, ||sum_t r(c g_t) a_t^T - c sum_t g_t a_t^T|| <= c gamma sum_t ||g_t|| ||a_t||, where
    r rounds c g_t (formed in float32) to ``dtype`` (bfloat16: unit roundoff u = 2^-8; a_t and g_t are the
    record's exact 16-bit values) and the GEMM accumulates the ``tokens`` products of an output element
    in float32: gamma = (u + u32 + u u32) + gamma_K (1 + u)(1 + u32), gamma_K = K u32 / (1 - K u32).
    docs/design.md ("16-bit clipped sums") has the argument."""
    if dtype != torch.bfloat16:
        raise ValueError(f"the one-GEMM clipped sum is bfloat16's (float16's range loses small values), not {dtype}")
    u, k = 2.0 ** -8, tokens * U32
    if k >= 0.5:
        raise ValueError(f"{tokens} tokens in one GEMM: too many for the float32 accumulation bound")
    return (u + U32 + u * U32) + k / (1 - k) * (1 + u) * (1 + U32)


def clipped_gemm(Gs: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """Gs^T A for the clipped sum (Gs (N, p) scaled by the clip factors, float32; A (N, d)): with a bfloat16 A
    on a native device, one bfloat16 GEMM of Gs rounded to bfloat16 with float32 accumulation (its
    rounding is absorbed by the clip factors: ``rounding_slack``); else one float32 GEMM (float16's range
    would lose the small values)."""
    if _native_16bit(A) and A.dtype == torch.bfloat16:
        return gemm32(Gs.to(A.dtype).t(), A)
    return _acc(Gs).t() @ _acc(A)


def rowdot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample <x_i, y_i> of two batch-first tensors, as one reduction (on the CPU 2x
    faster than pow + sum, 10x faster than a batched GEMV)."""
    def rows(t):
        return t.reshape(t.shape[0], math.prod(t.shape[1:]))  # also for an empty batch
    if x is y:
        return torch.linalg.vector_norm(rows(x), dim=1).square()
    return torch.linalg.vecdot(rows(x), rows(y))


def gram_strips(X: torch.Tensor, blocks: int = 4) -> list:
    """The upper block rows of the per-sample Gram matrices X X^T (X: (B, T, k)): strip a is
    X[:, rows a] @ X[:, rows a:]^T. A Gram matrix is symmetric, so the strips hold all of it in
    (blocks + 1) / (2 blocks) of the GEMM work (measured on the CPU: 25-30% less time for T = 128-256
    than the whole Gram matrix). One strip (the whole matrix) below T = 64, where the blocks get small,
    and for 16-bit records on a native device (a GPU), where each strip's launches cost more than the
    quarter of the flops they save: one GEMM and one dot per record."""
    T = X.shape[1]
    blocks = blocks if T >= 64 and not _native_16bit(X) else 1
    if blocks == 1:  # the whole matrix: no slices (each a dispatched op)
        return [gemm32(X, X.transpose(1, 2))]
    edges = [T * a // blocks for a in range(blocks + 1)]
    return [gemm32(X[:, edges[a]:edges[a + 1]], X[:, edges[a]:].transpose(1, 2)) for a in range(blocks)]


def strips_inner(SA: list, SG: list) -> torch.Tensor:
    """(B,) per-sample <A A^T, G G^T> from the gram_strips of A and G: the blocks right of the
    diagonal stand for themselves and their transposes."""
    if len(SA) == 1:
        return rowdot(SA[0], SG[0])
    total = 0
    for a, g in zip(SA, SG):
        n = a.shape[1]
        total = total + 2 * rowdot(a, g) - rowdot(a[:, :, :n], g[:, :, :n])
    return total


class BatchCache:
    """What the records of one physical batch share while their norms and clipped sums are
    formed: the Gram matrices of inputs that several layers read (query, key and value read one
    hidden state: its Gram matrix is formed once) and scratch buffers reused from layer to layer
    (on the CPU a fresh large temporary per layer costs page faults, ~7% of a GPT-2-like step).
    Lives as long as the batch, so the buffers never add to the forward/backward peak."""

    def __init__(self):
        self.grams: dict = {}
        self._bufs: dict = {}
        self._scaled = None

    def scaled(self, A: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """diag(c) A for clip factors ``c`` (B,), kept for the next call with the same A and the same factors
        tensor (query, key and value read one A: scaled once). The same tensor, not equal values: comparing
        values would read them back to the host (a device sync)."""
        key = gram_key(A)
        if self._scaled is None or self._scaled[0] != key or self._scaled[1] is not c:
            self._scaled = (key, c, A * c.to(A.dtype)[:, None, None])
        return self._scaled[2]

    def scratch(self, slot: int, shape, like: torch.Tensor) -> torch.Tensor:
        """An uninitialized tensor of ``shape`` in buffer ``slot``; valid until the slot's next use."""
        n = 1
        for s in shape:
            n *= s
        buf = self._bufs.get(slot)
        if buf is None or buf.numel() < n or buf.dtype != like.dtype or buf.device != like.device:
            buf = self._bufs[slot] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)


class LinearRecord:
    """Weight of y_t = W a_t: per-sample gradient sum_t g_t a_t^T, shape (p, d);
    ``transposed`` for Hugging Face Conv1D, whose weight is stored (d, p); ``sharers``: how many
    layer calls of the forward read the same input A (they share its Gram matrix)."""

    def __init__(self, A: torch.Tensor, G: torch.Tensor, transposed: bool = False, sharers: int = 1):
        if G.dtype in HALF and A.dtype == torch.float32:
            # autocast: a float32 input (after a LayerNorm) that the layer's GEMM read in G's 16 bits: its
            # weight gradient is G^T A16, as autocast's own weight-gradient GEMM forms it; on a native
            # device the record's GEMMs then run in 16 bits too
            A = A.to(G.dtype)
        if not (_native_16bit(A) and A.dtype == G.dtype):  # see NATIVE_16BIT_DEVICES
            A, G = _acc(A), _acc(G)
        self.A, self.G, self.transposed = A, G, transposed  # (B,T,d), (B,T,p)
        self.sharers = sharers

    @property
    def batch_size(self) -> int:
        return self.A.shape[0]

    def use_ghost(self) -> bool:
        return ghost_is_cheaper(self.A.shape[1], self.A.shape[2], self.G.shape[2], self.sharers)

    @torch.no_grad()
    def sq_norm(self, cache: BatchCache | None = None) -> torch.Tensor:
        """``cache``: the batch's shared Gram matrices and scratch (see BatchCache)."""
        A, G = self.A, self.G
        B, T, d, p = A.shape[0], A.shape[1], A.shape[2], G.shape[2]
        if T == 1:
            A, G = _acc(A), _acc(G)
            return rowdot(A, A) * rowdot(G, G)
        cache = cache if cache is not None else BatchCache()
        key = gram_key(A)
        if self.use_ghost():
            strips = cache.grams.get(key)
            if strips is None:
                strips = gram_strips(A)
                if self.sharers > 1:
                    cache.grams[key] = strips
            return strips_inner(strips, gram_strips(G))
        step = max(1, min(B, _INSTANTIATE_CHUNK // (p * d)))
        out = A.new_empty(B, dtype=torch.float32 if A.dtype in HALF else A.dtype)  # not 16-bit: its rounding
        # would understate a norm by up to 2^-9 and let a clipped sample past C
        for i in range(0, B, step):
            n = min(step, B - i)
            if _native_16bit(A):
                g = gemm32(G[i:i + n].transpose(1, 2), A[i:i + n])
            else:
                g = torch.bmm(G[i:i + n].transpose(1, 2), A[i:i + n], out=cache.scratch(0, (n, p, d), A))
            out[i:i + n] = rowdot(g, g)
        return out

    def rounding_slack(self) -> torch.Tensor | None:
        """(B,) per sample, what the one-GEMM clipped sum's rounding may add to its norm, per unit of
        clip factor: gamma sum_t ||g_t|| ||a_t|| (``rounding_gamma``); None where the sum is exact
        (float32 records, off a native 16-bit device)."""
        A, G = self.A, self.G
        if not (_native_16bit(A) and A.dtype == torch.bfloat16):
            return None
        tokens = A.shape[0] * A.shape[1]  # the GEMM sums the whole batch's tokens into each element
        per_token = (torch.linalg.vector_norm(A, dim=2, dtype=torch.float32)
                     * torch.linalg.vector_norm(G, dim=2, dtype=torch.float32))
        return rounding_gamma(A.dtype, tokens) * per_token.sum(1)

    def dense(self) -> torch.Tensor:
        """The per-sample gradients (B, *weight.shape), contiguous."""
        if self.transposed:  # Conv1D weight (d, p)
            return gemm32(self.A.transpose(1, 2), self.G)
        return gemm32(self.G.transpose(1, 2), self.A)  # (B, p, d)

    @torch.no_grad()
    def clipped_sum(self, c: torch.Tensor, cache: BatchCache | None = None) -> torch.Tensor:
        """A^T diag(c) G as one GEMM, c applied to the narrower of A and G (16-bit A and G: the scaled
        one in float32, through clipped_gemm)."""
        A, G = self.A, self.G
        if _native_16bit(A):  # the scaled operand rounded to 16 bits (bfloat16: covered by rounding_slack)
            c32 = c.float().view(-1, 1, 1)
            if A.shape[2] <= G.shape[2]:  # bf16 x float32: the product in float32, no separate upcast
                g = clipped_gemm((A * c32).flatten(0, 1), G.flatten(0, 1)).t()
            else:
                g = clipped_gemm((G * c32).flatten(0, 1), A.flatten(0, 1))
            return g.t() if self.transposed else g
        if A.shape[2] <= G.shape[2]:
            A = A * c.to(A.dtype)[:, None, None] if cache is None else cache.scaled(A, c)
        else:
            G = torch.mul(G, c.to(A.dtype)[:, None, None], out=None if cache is None else cache.scratch(0, G.shape, G))
        g = G.flatten(0, 1).t() @ A.flatten(0, 1)
        return g.t() if self.transposed else g

    def one_pass_applies(self) -> bool:
        """Whether ``one_pass`` serves this record: float32 / float64 on the CPU (elsewhere the GPU check
        decides between kernels and cuBLAS), a token axis, and one sample's gradient no larger than the
        record, so that a chunk's transient never exceeds what the record frees."""
        A, G = self.A, self.G
        return (A.device.type == "cpu" and A.dtype in (torch.float32, torch.float64) and G.dtype == A.dtype
                and A.shape[1] > 1 and A.shape[2] * G.shape[2] <= kept_numel(self))

    @torch.no_grad()
    def one_pass(self, factors, extra_sq: torch.Tensor | None = None,
                 cache: BatchCache | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Norms, clip factors and the clipped sum of a weight clipped on its own (per-layer clipping):
        per-sample gradients formed ONE_PASS_CHUNK numbers at a time, each chunk's norms and clip factors
        read off it and its clipped sum added, so the step computes the weight gradient's products once
        (no Gram matrices, no second product for the clipped sum). ``factors``: squared norms of a chunk's
        samples -> their clip factors; ``extra_sq``: what the group's other tensors (the bias) add to each
        squared norm. Returns (squared norms, clip factors, clipped sum) over the batch."""
        A, G = self.A, self.G
        B, d, p = A.shape[0], A.shape[2], G.shape[2]
        n = max(1, min(B, self.ONE_PASS_CHUNK // (p * d)))
        sq, cs, total = A.new_empty(B), A.new_empty(B), A.new_zeros(p * d)
        for i in range(0, B, n):
            k = min(n, B - i)
            P = torch.bmm(G[i:i + k].transpose(1, 2), A[i:i + k],
                          out=None if cache is None else cache.scratch(1, (k, p, d), A))
            sq[i:i + k] = rowdot(P, P) if extra_sq is None else rowdot(P, P) + extra_sq[i:i + k]
            cs[i:i + k] = factors(sq[i:i + k])
            total.addmv_(P.view(k, p * d).t(), cs[i:i + k])
        g = total.view(p, d)
        return sq, cs, (g.t() if self.transposed else g)

    # per-sample gradient numbers that ``one_pass`` forms at a time (4 MB in float32)
    ONE_PASS_CHUNK = 1 << 20

    def drop(self, bad: torch.Tensor) -> None:
        self.A = torch.where(bad[:, None, None], 0, self.A)
        self.G = torch.where(bad[:, None, None], 0, self.G)


def key_segments(keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(seg, seg_keys) for integer ``keys`` (N,): seg[r] is the rank of keys[r] among the distinct keys
    (torch.unique's inverse) and seg_keys[s] the s-th distinct key, in N slots (those past the number of
    distinct keys hold 0): torch.unique's answer in fixed shapes, without reading the count back to the
    host (a device sync; a wall against CUDA-graph capture)."""
    sorted_keys, perm = torch.sort(keys, stable=True)
    new = torch.ones_like(sorted_keys, dtype=torch.bool)
    new[1:] = sorted_keys[1:] != sorted_keys[:-1]
    rank = torch.cumsum(new, 0) - 1
    seg = torch.empty_like(rank).scatter_(0, perm, rank)
    return seg, torch.zeros_like(keys).scatter_(0, rank, sorted_keys)


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
        """The per-sample gradients' rows, (keys b V + v, row sums): one slot per token (B T), the distinct
        (sample, index) pairs first in key order, zero rows after them (``key_segments``)."""
        B = self.idx.shape[0]
        keys = (torch.arange(B, device=self.idx.device)[:, None] * self.V + self.idx).flatten()
        seg, seg_keys = key_segments(keys)
        R = self.G.new_zeros(keys.numel(), self.G.shape[-1]).index_add_(0, seg, self.G.flatten(0, 1))
        return seg_keys, R

    def sq_norm(self) -> torch.Tensor:
        # O(BTd) via the distinct (sample, index) pairs; cheaper than the O(BT^2 d) ghost sum
        keys, R = self.rows()
        return R.new_zeros(self.batch_size).index_add_(0, keys // self.V, R.pow(2).sum(1))

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
    """A per-sample gradient held as such (B, *shape): biases, norm weights, and Linear weights
    where that is smaller than their (A, G) (``instantiate_at_backward``)."""

    def __init__(self, grad_sample: torch.Tensor, source: LinearRecord | None = None):
        self.gs = _acc(grad_sample)
        self.source = source  # the Linear weight record this bias gradient is the token sum of

    @property
    def batch_size(self) -> int:
        return self.gs.shape[0]

    def sq_norm(self) -> torch.Tensor:
        return rowdot(self.gs, self.gs)

    def dense(self) -> torch.Tensor:
        return self.gs

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        gs = self.gs
        if gs.dim() == 2:  # (B, n): one GEMV, not tensordot's permutes and reshapes
            return c.to(gs.dtype) @ gs
        return torch.tensordot(c.to(gs.dtype), gs, dims=1)

    def drop(self, bad: torch.Tensor) -> None:
        self.gs = torch.where(bad.view(-1, *[1] * (self.gs.dim() - 1)), 0, self.gs)


class TokenSumRecord(DenseRecord):
    """A Linear bias whose weight keeps (A, G): its per-sample gradient is the token sum of G, formed
    when first read, so that the small Linear layers stacked together (LinearStack) form theirs in one
    sum (``fill_token_sums``) instead of one per layer in the backward."""

    def __init__(self, source: LinearRecord):
        self.source, self._gs = source, None

    @property
    def gs(self) -> torch.Tensor:
        if self._gs is None:
            self._gs = token_sum(self.source.G)
        return self._gs

    @gs.setter
    def gs(self, value: torch.Tensor) -> None:
        self._gs = value


class ConvRecord:
    """A convolution's weight (out, in, *kernel): the Linear record of its unfolded input (A: the B x L
    patches, G: the output gradient at the L positions), its clipped sum and per-sample gradients
    viewed in the weight's shape."""

    def __init__(self, rec: LinearRecord, shape: torch.Size):
        self.rec, self.shape = rec, shape

    @property
    def batch_size(self) -> int:
        return self.rec.batch_size

    def sq_norm(self) -> torch.Tensor:
        return self.rec.sq_norm()

    def dense(self) -> torch.Tensor:
        return self.rec.dense().view(-1, *self.shape)

    def clipped_sum(self, c: torch.Tensor) -> torch.Tensor:
        return self.rec.clipped_sum(c).view(self.shape)

    def drop(self, bad: torch.Tensor) -> None:
        self.rec.drop(bad)


def inner(r: object, s: object) -> torch.Tensor:
    """Per-sample <g_r, g_s> of two contributions to the same parameter, (B,)."""
    if isinstance(r, LinearRecord) and isinstance(s, LinearRecord) and r.transposed == s.transposed:
        return (gemm32(r.A, s.A.transpose(1, 2)) * gemm32(r.G, s.G.transpose(1, 2))).sum((1, 2))
    if isinstance(r, LinearRecord) and isinstance(s, EmbeddingRecord):
        r, s = s, r
    if isinstance(r, EmbeddingRecord) and isinstance(s, LinearRecord) and not s.transposed:
        # tied embedding / output layer, W (V, d): sum_{t,u} G_lin[t, idx_u] (a_t . g_emb_u)
        M = gemm32(s.A, r.G.transpose(1, 2))  # (B, T_lin, T_emb)
        Gsel = s.G.gather(2, r.idx[:, None, :].expand(-1, s.G.shape[1], -1))
        return (M * Gsel).sum((1, 2))
    if isinstance(r, EmbeddingRecord) and isinstance(s, EmbeddingRecord):
        ur, Rr = r.rows()
        us, Rs = s.rows()
        inv, keys = key_segments(torch.cat([ur, us]))
        Sr = Rr.new_zeros(keys.numel(), Rr.shape[1]).index_add_(0, inv[:ur.numel()], Rr)
        Ss = Rs.new_zeros(keys.numel(), Rs.shape[1]).index_add_(0, inv[ur.numel():], Rs)
        return Sr.new_zeros(r.batch_size).index_add_(0, keys // r.V, (Sr * Ss).sum(1))
    return (r.dense() * s.dense()).flatten(1).sum(1)


def kept_numel(r: object) -> int:
    """The numbers a record keeps (a token-sum bias none of its own until it is read)."""
    if isinstance(r, LinearRecord):
        return r.A.numel() + r.G.numel()
    if isinstance(r, EmbeddingRecord):
        return r.G.numel()
    if isinstance(r, TokenSumRecord):
        return 0 if r._gs is None else r._gs.numel()
    if isinstance(r, ConvRecord):
        return kept_numel(r.rec)
    return r.gs.numel()


def sq_norm(records: list, cache: BatchCache | None = None) -> torch.Tensor:
    """Per-sample squared norm of the sum of several contributions (``cache``: see BatchCache)."""
    def one(r):
        return r.sq_norm(cache) if isinstance(r, LinearRecord) else r.sq_norm()
    total = one(records[0])
    for k in range(1, len(records)):
        total = total + one(records[k])
        for j in range(k):
            total = total + 2 * inner(records[j], records[k])
    return total


def clipped_sum(records: list, c: torch.Tensor, cache: BatchCache | None = None) -> torch.Tensor:
    def one(r):
        return r.clipped_sum(c, cache) if isinstance(r, LinearRecord) else r.clipped_sum(c)
    total = one(records[0])
    for r in records[1:]:
        total = total + one(r)
    return total
