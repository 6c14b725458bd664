"""The records of one forward/backward (a physical batch): their per-sample squared norms as one
matrix, the rounding slack of their 16-bit clipped sums, and their clipped sums, small records of
one shape stacked (anadp.stacks).
"""
from __future__ import annotations

import torch

from . import records as R
from . import stacks


def reduction_scale(batch_size: int, loss_reduction: str) -> float:
    """What a record's gradient (of the reduced loss) is multiplied by to be the sample's own: B for
    the mean, 1 for the sum."""
    return float(batch_size) if loss_reduction == "mean" else 1.0


class PhysicalBatch:
    """The records of one forward/backward, with the loss-reduction scale applied."""

    def __init__(self, records: dict, batch_size: int, scale: float, ends_logical: bool, chunk_id: int | None = None,
                 cache: R.BatchCache | None = None):
        self.records, self.batch_size, self.scale, self.ends_logical = records, batch_size, scale, ends_logical
        self.chunk_id = chunk_id  # which chunk of private data the forward ran on (None: not from the DP loader)
        # a caller's cache outlives the batch (per-layer clipping: Gram matrices shared by several batches)
        self._own_cache = cache is None
        self.cache = R.BatchCache() if cache is None else cache
        self._stacks = None  # see _dense_stacks
        self._linear_stacks = None

    def _dense_stacks(self, exclude=()) -> list:
        """The small per-sample gradients of one shape stacked (stacks.dense_stacks), formed once for
        the norms and the clipped sums."""
        if self._stacks is None:
            self._stacks = stacks.dense_stacks({p: recs[0] for p, recs in self.records.items() if len(recs) == 1
                                           and isinstance(recs[0], R.DenseRecord) and p not in exclude})
        return self._stacks

    def _small_linear_stacks(self) -> list:
        """The small ghost-norm Linear weights of one shape stacked (stacks.linear_stacks); formed
        by the torch norms (a kernel backend's norm kernel reads each (A, G) itself)."""
        if self._linear_stacks is None:
            self._linear_stacks = stacks.linear_stacks({p: recs[0] for p, recs in self.records.items() if len(recs) == 1
                                                   and type(recs[0]) is R.LinearRecord})
        return self._linear_stacks

    def sq_rows(self, kernels=None) -> tuple[list, torch.Tensor]:
        """(params, S): per-sample squared norms without the loss-reduction scale, S (len(params), B),
        row k that of params[k], the stacked records' rows first (one product per stack, one
        concatenation; the optimizer whitens them in one product). With a kernel backend a Linear
        weight and its bias come from one norm kernel, embeddings from another."""
        keys, parts, done = [], [], set()
        if kernels is not None:
            bias_norms, rows = {}, []
            for p, recs in self.records.items():
                r = recs[0]
                if len(recs) == 1 and isinstance(r, R.LinearRecord):
                    w, bias_norms[id(r)] = kernels.linear_sq_norms(r.A, r.G)
                elif len(recs) == 1 and isinstance(r, R.EmbeddingRecord):
                    w = kernels.embedding_sq_norms(r.idx, r.G)
                else:
                    continue
                keys.append(p)
                rows.append(w)
            for p, recs in self.records.items():
                src = getattr(recs[0], "source", None) if len(recs) == 1 else None
                if src is not None and id(src) in bias_norms:
                    keys.append(p)
                    rows.append(bias_norms[id(src)])
            done.update(keys)
            if rows:
                parts.append(torch.stack(rows))
        else:
            stacks = self._small_linear_stacks()
            if stacks:  # their biases' token sums, one per stack
                biases = {id(recs[0].source): recs[0] for recs in self.records.values()
                          if len(recs) == 1 and type(recs[0]) is R.TokenSumRecord and recs[0]._gs is None}
                for st in stacks:
                    st.fill_token_sums(biases)
            for st in stacks:
                keys.extend(st.keys)
                parts.append(st.sq_norms())
            done.update(keys)
        for stack_keys, X in self._dense_stacks(exclude=done):
            keys.extend(stack_keys)
            parts.append(torch.linalg.vector_norm(X, dim=2).square())
        done.update(keys)
        singles = [p for p in self.records if p not in done]
        if singles:
            parts.append(torch.stack([R.sq_norm(self.records[p], self.cache) for p in singles]))
            keys.extend(singles)
        if self._own_cache:
            self.cache.grams = {}  # the shared Gram matrices are done with
        S = torch.cat(parts) if parts else torch.zeros(0, self.batch_size)
        return keys, S

    def slack_rows(self, keys: list) -> torch.Tensor | None:
        """(len(keys), B), row k for keys[k] of sq_rows: what the 16-bit rounding of the clipped sums
        may add to each sample's contribution per unit of clip factor (records.LinearRecord.rounding_slack),
        zero where the sum is exact; None where every sum is (float32 records, the CPU)."""
        found: dict = {}
        for st in self._linear_stacks or ():
            s = st.rounding_slack()
            if s is not None:
                found.update(zip(st.keys, s.unbind(0)))
        for p in keys:
            if p in found:
                continue
            for r in self.records[p]:
                s = r.rounding_slack() if isinstance(r, R.LinearRecord) else None
                if s is not None:
                    found[p] = s if p not in found else found[p] + s
        if not found:
            return None
        zero = next(iter(found.values())).new_zeros(self.batch_size)
        return torch.stack([found.get(p, zero) for p in keys])  # one op, not a row copy per key

    def sq_norms(self, kernels=None, scaled: bool = True) -> dict:
        """param -> (B,) per-sample squared norms of its gradient, in record order (see sq_rows);
        ``scaled=False``: without the loss-reduction scale."""
        keys, S = self.sq_rows(kernels)
        if scaled:
            S = S * self.scale ** 2
        rows = dict(zip(keys, S.unbind(0)))
        return {p: rows[p] for p in self.records}

    def clipped_sum(self, p, c: torch.Tensor) -> torch.Tensor:
        return R.clipped_sum(self.records[p], c * self.scale, self.cache)

    def clipped_sums(self, c: torch.Tensor, params, rows: dict | None = None) -> dict:
        """param -> sum_i c_i g_i for ``params``, ``c`` the clip factors of the records (scale included):
        the stacked ones in one weighted sum per stack. ``rows``: each param's row of ``c`` (n, B)
        where each has its own factors (per-layer clipping), else ``c`` (B,) is every param's."""
        def factors(keys):
            return c if rows is None else c[torch.tensor([rows[k] for k in keys], device=c.device)]

        want, out = set(params), {}
        for keys, X in self._dense_stacks():
            if any(k in want for k in keys):
                f = factors(keys).to(X.dtype)
                sums = torch.matmul(f, X) if rows is None else torch.matmul(f[:, None, :], X).squeeze(1)
                shape = self.records[keys[0]][0].gs.shape[1:]  # sums: (n, numbers per sample)
                if len(shape) != 1:
                    sums = sums.view(len(keys), *shape)
                out.update(zip(keys, sums.unbind(0)))
        for st in self._linear_stacks or ():  # formed by sq_rows where the torch norms ran
            if any(k in want for k in st.keys):
                out.update(zip(st.keys, st.clipped_sums(factors(st.keys)).unbind(0)))
        if len(out) != len(want) or any(k not in want for k in out):
            out = {k: v for k, v in out.items() if k in want}
            for p in params:
                if p not in out:
                    out[p] = R.clipped_sum(self.records[p], c if rows is None else c[rows[p]], self.cache)
        return out

    def drop(self, bad: torch.Tensor) -> None:
        """Zero the contributions of the samples marked in ``bad``."""
        self._stacks = self._linear_stacks = None
        for recs in self.records.values():
            for r in recs:
                r.drop(bad)
