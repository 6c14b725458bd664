"""nn.Conv1d and nn.Conv2d (patch embeddings, audio front ends): a convolution is a Linear layer
applied to its input's patches, y[:, :, l] = W_flat a_l + b with a_l the l-th unfolded patch, so its
per-sample gradient is sum_l g_l a_l^T, the Linear record of (unfold(x), g): ghost norms where they
are cheaper (the rule of records.ghost_is_cheaper, with the L output positions as tokens), else the
per-sample gradients formed in the backward. Non-overlapping patches (ViT's stride = kernel) unfold
without duplication. Grouped convolutions, padding modes other than zeros and string padding
take the generic path (anadp.generic).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Layer, _trainable, register
from .records import ConvRecord, DenseRecord, LinearRecord, instantiate_at_backward, token_sum


class _ConvFn(torch.autograd.Function):
    """y = conv(x, W) + b (2-d; Conv1d as a 2-d convolution of height 1); backward: input gradient only."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, on_backward):
        stride, padding, dilation = geometry
        ctx.save_for_backward(x, weight)
        ctx.geometry, ctx.on_backward = geometry, on_backward
        return F.conv2d(x, weight, bias, stride, padding, dilation)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.geometry
        gx = None
        if ctx.needs_input_grad[0]:
            gx = torch.nn.grad.conv2d_input(x.shape, weight.to(g.dtype), g, stride, padding, dilation)
        ctx.on_backward(x, g)
        return gx, None, None, None, None


def _pair(module, name, fill):
    v = tuple(getattr(module, name))
    return v if len(v) == 2 else (fill,) + v  # Conv1d: height 1


@register(nn.Conv2d)
class ConvLayer(Layer):
    @staticmethod
    def fits(module) -> bool:
        return module.groups == 1 and module.padding_mode == "zeros" and not isinstance(module.padding, str)

    def forward(self, module, x):
        if not torch.is_grad_enabled():
            return type(module).forward(module, x)
        one_d = isinstance(module, nn.Conv1d)
        unbatched = x.dim() == (2 if one_d else 3)
        if unbatched:
            raise ValueError(f"{self.name}: anadp trains convolutions on batched inputs, got a {x.dim()}-D input: "
                             "add the batch dimension")
        self.engine.calls[self.slot] += 1
        weight, bias = module.weight, module.bias
        geometry = (_pair(module, "stride", 1), _pair(module, "padding", 0), _pair(module, "dilation", 1))
        if one_d:
            y = _ConvFn.apply(x.unsqueeze(2), weight.unsqueeze(2), bias, geometry, self.on_backward)
            return y.squeeze(2)
        return _ConvFn.apply(x, weight, bias, geometry, self.on_backward)

    def on_backward(self, x, g):
        x, g = self.engine.to_batch_first(self.name, x, g)
        m, weight, bias = self.module, self.param("weight"), self.param("bias")
        stride, padding, dilation = (_pair(m, "stride", 1), _pair(m, "padding", 0), _pair(m, "dilation", 1))
        kernel = (1,) + tuple(m.kernel_size) if isinstance(m, nn.Conv1d) else tuple(m.kernel_size)
        G = g.flatten(2).transpose(1, 2)  # (B, L, out)
        if _trainable(weight):
            A = F.unfold(x, kernel, dilation, padding, stride).transpose(1, 2)  # (B, L, in * kernel)
            rec = LinearRecord(A, G)
            if instantiate_at_backward(A.shape[1], A.shape[2], G.shape[2]):
                with torch.no_grad():
                    self.engine.record(weight, DenseRecord(rec.dense().view(-1, *weight.shape)))
            else:
                self.engine.record(weight, ConvRecord(rec, weight.shape))
        if _trainable(bias):
            self.engine.record(bias, DenseRecord(token_sum(G)))


register(nn.Conv1d)(ConvLayer)
