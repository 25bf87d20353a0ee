"""A linear/conv op run with an output-rotated weight, whose backward never forms the weight gradient.

`out = op(x, W') + bias` with `W' = M W`, `M = blockdiag(A_k)` orthogonal (`A = blocks^T` in the
block-diagonal convention of `blockdiag.py`). Autograd through `op(x, W')` would compute `dL/dW'`, a
`tokens x out x fan_in` product that a frozen layer never pays, only to contract it down to `b x b`
blocks. The same gradient comes from the output itself:

    y_k = A_k^T (out_k - bias_k)                 (A orthogonal: the base output, recovered exactly)
    dL/dA_k = sum_pos g_k y_k^T = (sum_pos g_k out_k^T - (sum_pos g_k) bias_k^T) A_k

one `tokens x out x b` reduction. The backward also rebuilds `W'` (cheap: `out x fan_in x b`) instead
of keeping it, so the only tensor held for backward beyond the frozen layer's own is `out`.

Valid only when `M` is orthogonal (multiplier 1, no rescale, output side); the layer checks that.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .blockdiag import _view, block_matmul, block_outer


class ConvSpec(NamedTuple):
    """Integer conv geometry (string paddings and non-zero padding modes are resolved by the caller)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def _rotated(A: Tensor, W: Tensor) -> Tensor:
    """`W' = blockdiag(A_k) W` on rows, computed in `A`'s dtype, returned in `W`'s."""
    nb, b, _ = A.shape
    Wv = W.to(A.dtype).reshape(1, nb, b, -1)
    return block_matmul(A, Wv).reshape(W.shape).to(W.dtype)


def _op(x: Tensor, W: Tensor, bias: Tensor | None, conv: ConvSpec | None) -> Tensor:
    if conv is None:
        return F.linear(x, W, bias)
    fn = (F.conv1d, F.conv2d, F.conv3d)[len(conv.stride) - 1]
    return fn(x, W, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


class _RotatedWeightOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, W: Tensor, bias: Tensor | None,  # type: ignore[override]
                conv: ConvSpec | None) -> Tensor:
        Wp = _rotated(A, W)
        out = _op(x, Wp, bias, conv)
        ctx.conv = conv
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(A, W, bias, out)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        A, W, bias, out = ctx.saved_tensors
        conv: ConvSpec | None = ctx.conv
        g = g.contiguous()
        nb, b, _ = A.shape
        dx = dA = dbias = None
        channel = -1 if conv is None else 1
        if ctx.needs_input_grad[0]:
            Wp = _rotated(A, W).to(g.dtype)
            if conv is None:
                dx = g.matmul(Wp)
            else:
                dummy = g.new_empty(1).expand(ctx.x_shape)
                dx = torch.ops.aten.convolution_backward(
                    g, dummy, Wp, None, conv.stride, conv.padding, conv.dilation, False,
                    [0] * len(conv.stride), conv.groups, [True, False, False])[0]
            dx = dx.to(ctx.x_dtype)
        need_sum = bias is not None or ctx.needs_input_grad[3]
        if need_sum:
            dims = [d for d in range(g.dim()) if d != channel % g.dim()]
            gsum = g.sum(dims, dtype=torch.float32)  # (C,)
        if ctx.needs_input_grad[1]:
            Gv, Ov = _view(g, channel, nb, b), _view(out, channel, nb, b)
            P = block_outer(Gv, Ov).to(A.dtype)  # sum_pos g_k out_k^T
            if bias is not None:
                P = P - gsum.view(nb, b, 1).to(A.dtype) * bias.view(nb, 1, b).to(A.dtype)
            dA = torch.bmm(P, A)
        if ctx.needs_input_grad[3]:
            dbias = gsum.to(bias.dtype)
        return dx, dA, None, dbias, None


def rotated_weight_op(x: Tensor, blocks: Tensor, W: Tensor, bias: Tensor | None,
                      conv: ConvSpec | None = None) -> Tensor:
    """`op(x, M W) + bias` with `M = blockdiag(blocks_k^T)` ORTHOGONAL; differentiable in `x`, `blocks`, `bias`.

    blocks `(nb, b, b)` with `nb * b = out`; W `(out, ...)` frozen (its gradient is not computed);
    `conv` None for a linear layer. The result equals `op(x, rotate_weight(blocks, W), bias)`.
    """
    if W.requires_grad and torch.is_grad_enabled():
        raise ValueError("rotated_weight_op never computes the base weight's gradient; freeze the base weight")
    return _RotatedWeightOp.apply(x, blocks.transpose(1, 2), W, bias, conv)
