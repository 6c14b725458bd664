"""nn.MultiheadAttention (and so nn.TransformerEncoderLayer / TransformerDecoderLayer): its
forward rewritten around two hooked pieces, the input projection (``_InProjFn``) and the output
projection (a Linear), with the attention between them in torch ops as in
``F.multi_head_attention_forward`` (masks, ``is_causal``, ``need_weights``, dropout,
``add_zero_attn``, ``kdim`` / ``vdim``, ``batch_first``).

The packed ``in_proj_weight`` (3E, E) is one Linear whose rows q, k and v read different inputs
in cross-attention. Its per-sample gradient is sum over the tokens of each input of g_t a_t^T in
its row block, which is one Linear record over the inputs' tokens concatenated, with each input's
output gradient in its own row block and zeros elsewhere; self-attention (query is key is value)
is the plain case: one input, G = [g_q, g_k, g_v].
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Layer, _linear, _own, _trainable, record_linear, register
from .records import DenseRecord, token_sum


class _InProjFn(torch.autograd.Function):
    """q, k, v = x_q W_q^T + b_q, x_k W_k^T + b_k, x_v W_v^T + b_v; backward: input gradients only."""

    @staticmethod
    def forward(ctx, xq, xk, xv, wq, wk, wv, bias, on_backward):
        ctx.save_for_backward(xq, xk, xv, wq, wk, wv)
        ctx.on_backward = on_backward
        bq, bk, bv = bias.chunk(3) if bias is not None else (None, None, None)
        return _own(F.linear(xq, wq, bq)), _own(F.linear(xk, wk, bk)), _own(F.linear(xv, wv, bv))

    @staticmethod
    def backward(ctx, gq, gk, gv):
        xq, xk, xv, wq, wk, wv = ctx.saved_tensors
        gs = [torch.zeros(x.shape[:-1] + (w.shape[0],), dtype=x.dtype, device=x.device) if g is None else g
              for g, x, w in zip((gq, gk, gv), (xq, xk, xv), (wq, wk, wv))]
        # autograd sums these where query, key and value are one tensor
        dx = [g @ w.to(g.dtype) if ctx.needs_input_grad[i] else None for i, (g, w) in enumerate(zip(gs, (wq, wk, wv)))]
        ctx.on_backward(xq, xk, xv, *gs)
        return dx[0], dx[1], dx[2], None, None, None, None, None


def _block_rows(xs: list, gs: list, readers: list):
    """(A, G) of one Linear whose output blocks (q, k, v) are computed from the inputs ``xs``:
    ``readers[j]`` lists the blocks that read input j. A: the inputs' tokens concatenated; G: each
    token's output gradient in the blocks that read its input, zeros in the others."""
    A = torch.cat(xs, 1) if len(xs) > 1 else xs[0]
    rows = []
    for j, x in enumerate(xs):
        rows.append(torch.cat([gs[b] if b in readers[j] else gs[b].new_zeros(x.shape[:2] + gs[b].shape[2:])
                               for b in range(3)], -1))
    return A, torch.cat(rows, 1) if len(rows) > 1 else rows[0]


@register(nn.MultiheadAttention)
class MultiheadAttentionLayer(Layer):
    whole = True  # out_proj is hooked here, batch first whatever the model's layout

    @staticmethod
    def refusal(module):
        if module.bias_k is not None:
            return ("nn.MultiheadAttention(add_bias_kv=True) is not supported (its bias_k / bias_v are not "
                    "tracked per sample); use add_bias_kv=False")
        return None

    def forward(self, module, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if not torch.is_grad_enabled():
            return type(module).forward(module, query, key, value, key_padding_mask, need_weights, attn_mask,
                                        average_attn_weights, is_causal)
        self.engine.calls[self.slot] += 1
        if query.dim() != 3:
            raise ValueError(f"{self.name}: anadp trains nn.MultiheadAttention on batched inputs (3-D), got a "
                             f"{query.dim()}-D query: add the batch dimension")
        shared = "qkv" if (query is key and key is value) else ("kv" if key is value else "")
        if not module.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        key_padding_mask = F._canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                             other_type=F._none_or_dtype(attn_mask), other_name="attn_mask",
                                             target_type=query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint (as nn.MultiheadAttention)")
        if is_causal and key_padding_mask is None and not need_weights:
            attn_mask = None  # SDPA's causal kernel, as F.multi_head_attention_forward
        else:
            attn_mask = F._canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                          target_type=query.dtype, check_other=False)
            is_causal = False
        m = module
        if m._qkv_same_embed_dim:
            wq, wk, wv = m.in_proj_weight.chunk(3)
        else:
            wq, wk, wv = m.q_proj_weight, m.k_proj_weight, m.v_proj_weight
        q, k, v = _InProjFn.apply(query, key, value, wq, wk, wv, m.in_proj_bias,
                                  functools.partial(self.on_in_backward, shared))
        B, L, E = q.shape
        S, H = k.shape[1], m.num_heads
        q, k, v = (t.reshape(B, t.shape[1], H, E // H).transpose(1, 2) for t in (q, k, v))  # (B, H, T, E / H)
        if m.add_zero_attn:
            k, v = (torch.cat([t, t.new_zeros(B, H, 1, E // H)], 2) for t in (k, v))
            S += 1
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        mask = None
        if attn_mask is not None:  # (L, S) or (B * H, L, S)
            mask = attn_mask.view(1, 1, L, S) if attn_mask.dim() == 2 else attn_mask.view(B, H, L, S)
        if key_padding_mask is not None:
            kpm = key_padding_mask.view(B, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        dropout = m.dropout if m.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (E // H) ** -0.5) @ k.transpose(-2, -1)
            attn = torch.softmax(scores if mask is None else scores + mask, -1)
            if dropout > 0:
                attn = F.dropout(attn, dropout)
            out = attn @ v
            weights = attn.mean(1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal)
        out = out.transpose(1, 2).reshape(B, L, E)
        out = _linear(out, m.out_proj.weight, m.out_proj.bias, False, self.on_out_backward)
        return (out if m.batch_first else out.transpose(0, 1)), weights

    def on_in_backward(self, shared, xq, xk, xv, gq, gk, gv):
        xq, xk, xv, gq, gk, gv = self.engine.check_batch(self.name, xq, xk, xv, gq, gk, gv)
        m = self.module
        if m._qkv_same_embed_dim:
            xs, readers = {"qkv": ([xq], [(0, 1, 2)]), "kv": ([xq, xk], [(0,), (1, 2)])}.get(
                shared, ([xq, xk, xv], [(0,), (1,), (2,)]))
            A, G = _block_rows(xs, [gq, gk, gv], readers)
            record_linear(self.engine, self.param("in_proj_weight"), self.param("in_proj_bias"), A, G)
            return
        ws = (self.param("q_proj_weight"), self.param("k_proj_weight"), self.param("v_proj_weight"))
        for w, x, g in zip(ws, (xq, xk, xv), (gq, gk, gv)):
            record_linear(self.engine, w, None, x, g)
        if _trainable(self.param("in_proj_bias")):
            self.engine.record(self.param("in_proj_bias"), DenseRecord(torch.cat([token_sum(g) for g in (gq, gk, gv)], -1)))

    def on_out_backward(self, x, g):
        x, g = self.engine.check_batch(self.name, x, g)
        record_linear(self.engine, self.param("out_proj.weight"), self.param("out_proj.bias"), x, g)
