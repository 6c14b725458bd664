"""A compiled model's physical batch in one compiled function: the per-sample squared norms of its records,
the whitened norms, the clip factors and the clipped sums, traced whole by torch.compile instead of a few
eager ops (and their Python) per record and stack.

It serves the batches of a private model whose forward ran through torch.compile (the engine marks them
``traced``), whitened or global clipping, float32 or float64 records of the four kinds a transformer makes
(ghost-norm Linear weights, their biases, per-sample gradients held as such, embeddings), and no kernel
backend, fused update, sharding or dropped samples: any other batch takes the eager path
(anadp.physical_batch), whose algebra this is. The records' tensors go in as lists; their grouping by
shape is decided in Python at trace time, so each group is one stacked product, as in anadp.stacks.
"""
from __future__ import annotations

import torch

from . import records as R

_FLOATS = (torch.float32, torch.float64)


class Layout:
    """Which records of a batch go in, in the order of their rows: Linear weights, their biases, dense
    per-sample gradients, embeddings; ``keys`` the parameters in that order."""

    def __init__(self):
        self.keys, self.A, self.G, self.a_of, self.transposed, self.bias_of = [], [], [], [], [], []
        self.dense, self.idx, self.EG, self.V = [], [], [], []

    def arguments(self) -> tuple:
        return (self.A, self.G, tuple(self.a_of), tuple(self.transposed), tuple(self.bias_of), self.dense,
                self.idx, self.EG, tuple(self.V))


def layout(batch) -> Layout | None:
    """The batch's Layout, or None where a record is not one this function forms."""
    out, linear, biases, dense, emb = Layout(), [], [], [], []
    for p, recs in batch.records.items():
        if len(recs) != 1:
            return None
        r, kind = recs[0], type(recs[0])
        if kind is R.LinearRecord:
            if r.A.dtype not in _FLOATS or r.G.dtype != r.A.dtype or not (r.A.shape[1] == 1 or r.use_ghost()):
                return None
            linear.append((p, r))
        elif kind is R.TokenSumRecord:
            biases.append((p, r))
        elif kind is R.DenseRecord:
            if r.gs.dtype not in _FLOATS:
                return None
            dense.append((p, r))
        elif kind is R.EmbeddingRecord:
            if r.G.dtype not in _FLOATS:
                return None
            emb.append((p, r))
        else:
            return None
    position, inputs = {}, {}
    for p, r in linear:
        position[id(r)] = len(out.keys)
        out.keys.append(p)
        out.a_of.append(inputs.setdefault(id(r.A), len(inputs)))  # q, k and v read one input: one Gram matrix
        if out.a_of[-1] == len(out.A):
            out.A.append(r.A)
        out.G.append(r.G)
        out.transposed.append(r.transposed)
    for p, r in biases:
        if id(r.source) not in position:
            return None
        out.keys.append(p)
        out.bias_of.append(position[id(r.source)])
    for p, r in dense:
        out.keys.append(p)
        out.dense.append(r.gs)
    for p, r in emb:
        out.keys.append(p)
        out.idx.append(r.idx)
        out.EG.append(r.G)
        out.V.append(r.V)
    return out


def _groups(shapes) -> dict:
    """{shape: [positions]} in first-seen order."""
    by: dict = {}
    for i, s in enumerate(shapes):
        by.setdefault(tuple(s), []).append(i)
    return by


def _grams(X: list) -> list:
    """Each (B, T, k) of ``X``'s (B, T*T) Gram matrix, one batched product per shape."""
    out = [None] * len(X)
    for shape, ix in _groups(x.shape for x in X).items():
        S = torch.stack([X[i] for i in ix]).flatten(0, 1)  # (n B, T, k)
        grams = torch.bmm(S, S.transpose(1, 2)).view(len(ix), shape[0], -1)
        for j, i in enumerate(ix):
            out[i] = grams[j]
    return out


def algebra(A, G, a_of, transposed, bias_of, dense, idx, EG, V, whiten, scale: float, factors):
    """(S, norms, c, sums): S (rows, B) the records' per-sample squared norms without the loss-reduction scale
    (the rows of Layout.keys), the whitened norms, the clip factors ``factors(norms)``, and each key's clipped
    sum with the clip factors times ``scale`` (anadp.physical_batch's sq_rows and clipped_sums)."""
    sq = [None] * len(G)
    ghost = [i for i in range(len(G)) if G[i].shape[1] > 1]
    ga = _grams([A[a_of[i]] for i in ghost])
    gg = _grams([G[i] for i in ghost])
    for j, i in enumerate(ghost):
        sq[i] = torch.linalg.vecdot(ga[j], gg[j])
    for i in range(len(G)):
        if sq[i] is None:  # one token: ||a|| ||g||
            sq[i] = A[a_of[i]].square().sum((1, 2)) * G[i].square().sum((1, 2))
    token_sums = [G[i].sum(1) for i in bias_of]
    sq += [t.square().sum(1) for t in token_sums]
    sq += [g.flatten(1).square().sum(1) for g in dense]
    sq += [R.embedding_sq_norm(i, g, v) for i, g, v in zip(idx, EG, V)]
    S = torch.stack(sq)
    norms = (whiten @ S).sqrt() * scale
    c = factors(norms)
    cs = c * scale
    sums = [None] * len(G)
    for _, ix in _groups((A[a_of[i]].shape, G[i].shape, transposed[i]) for i in range(len(G))).items():
        n, (B, T, d), p = len(ix), A[a_of[ix[0]]].shape, G[ix[0]].shape[2]
        Gc = (torch.stack([G[i] for i in ix]) * cs.to(G[ix[0]].dtype)[None, :, None, None]).view(n, B * T, p)
        As = torch.stack([A[a_of[i]] for i in ix]).view(n, B * T, d)
        out = torch.bmm(As.transpose(1, 2), Gc) if transposed[ix[0]] else torch.bmm(Gc.transpose(1, 2), As)
        for j, i in enumerate(ix):
            sums[i] = out[j]
    sums += [cs.to(t.dtype) @ t for t in token_sums]
    sums += [torch.tensordot(cs.to(g.dtype), g, dims=1) for g in dense]
    sums += [R.embedding_clipped_sum(i, g, v, cs) for i, g, v in zip(idx, EG, V)]
    return S, norms, c, sums


_compiled = None


def run(lay: Layout, whiten: torch.Tensor, scale: float, factors):
    """``algebra`` of the batch laid out by ``lay``, compiled (once per process; dynamo recompiles it for a
    new layout or shape)."""
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(algebra, fullgraph=True)
    return _compiled(*lay.arguments(), whiten, scale, factors)
