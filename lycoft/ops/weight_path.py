"""Linear/conv ops with a frozen weight: the backward never forms the weight gradient, and what it keeps of
the weight is the frozen tensor as stored, not a computed copy.

`stored_weight_op`: `op(x, W) + bias` with `W` stored in float8 and upcast for the call only.

`rotated_weight_op`: `out = op(x, W') + bias` with `W' = M W`, `M = blockdiag(A_k)` orthogonal (`A = blocks^T` in the
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


def is_float8(dtype: torch.dtype) -> bool:
    """Whether `dtype` is a float8 storage format (a weight that must be upcast before it computes)."""
    return dtype.is_floating_point and dtype.itemsize == 1


class ConvSpec(NamedTuple):
    """Integer conv geometry (string paddings and non-zero padding modes are resolved by the caller)."""

    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int


def _rotated(A: Tensor, W: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """`W' = blockdiag(A_k) W` on rows, computed in `A`'s dtype, returned in `dtype` (default `W`'s; a weight
    stored in float8 names its compute dtype, so that `W'` is not rounded back to float8)."""
    nb, b, _ = A.shape
    Wv = W.to(A.dtype).reshape(1, nb, b, -1)
    return block_matmul(A, Wv).reshape(W.shape).to(dtype or W.dtype)


def _op(x: Tensor, W: Tensor, bias: Tensor | None, conv: ConvSpec | None) -> Tensor:
    if conv is None:
        return F.linear(x, W, bias)
    fn = (F.conv1d, F.conv2d, F.conv3d)[len(conv.stride) - 1]
    return fn(x, W, bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def op_input_grad(g: Tensor, W: Tensor, x_shape: torch.Size, conv: ConvSpec | None) -> Tensor:
    """`dL/dx` of `op(x, W)` from the output gradient `g` (in `g`'s dtype; `W` already in it)."""
    if conv is None:
        return g.matmul(W)
    dummy = g.new_empty(1).expand(x_shape)
    return torch.ops.aten.convolution_backward(
        g, dummy, W, None, conv.stride, conv.padding, conv.dilation, False,
        [0] * len(conv.stride), conv.groups, [True, False, False])[0]


class _RotatedWeightOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, A: Tensor, W: Tensor, bias: Tensor | None,  # type: ignore[override]
                conv: ConvSpec | None) -> Tensor:
        Wp = _rotated(A, W, x.dtype if is_float8(W.dtype) else None)
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
            Wp = _rotated(A, W, g.dtype if is_float8(W.dtype) else None).to(g.dtype)
            dx = op_input_grad(g, Wp, ctx.x_shape, conv).to(ctx.x_dtype)
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


class _StoredWeightOp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, W: Tensor, bias: Tensor | None,  # type: ignore[override]
                conv: ConvSpec | None) -> Tensor:
        ctx.conv = conv
        ctx.x_shape = x.shape
        ctx.x_dtype = x.dtype
        ctx.save_for_backward(W, bias)
        return _op(x, W.to(x.dtype), bias, conv)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        W, bias = ctx.saved_tensors
        g = g.contiguous()
        dx = dbias = None
        if ctx.needs_input_grad[0]:
            dx = op_input_grad(g, W.to(g.dtype), ctx.x_shape, ctx.conv).to(ctx.x_dtype)
        if ctx.needs_input_grad[2]:
            channel = -1 if ctx.conv is None else 1
            dims = [d for d in range(g.dim()) if d != channel % g.dim()]
            dbias = g.sum(dims, dtype=torch.float32).to(bias.dtype)
        return dx, None, dbias, None


def stored_weight_op(x: Tensor, W: Tensor, bias: Tensor | None, conv: ConvSpec | None = None) -> Tensor:
    """`op(x, W.to(x.dtype), bias)` for a frozen `W` stored narrower than it computes (float8).

    The upcast copy lives for this call only: backward upcasts `W` again, so autograd holds the stored
    tensor (1 byte per weight) instead of a compute-dtype copy of every layer. Differentiable in `x` and
    `bias`; `conv` None for a linear layer. Equals `op(x, W.to(x.dtype), bias)` exactly.
    """
    if W.requires_grad and torch.is_grad_enabled():
        raise ValueError("stored_weight_op never computes the weight's gradient; freeze the weight")
    return _StoredWeightOp.apply(x, W, bias, conv)
