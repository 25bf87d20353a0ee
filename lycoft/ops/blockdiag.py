"""Block-diagonal (oft) rotation of one dimension of a tensor.

`R`: `(nb, b, b)`. The operator is `M = blockdiag(R_1^T, ..., R_nb^T)` acting on a dimension of size
`nb * b` split into consecutive groups of `b` (docs/spec.md, "Block-diagonal OFT": group k of the rows becomes
`R_k^T W_k`). The same function rotates weight rows (`dim=0`) and activation channels (`dim=1` for conv
outputs, `dim=-1` for linear outputs).

Speed: a tensor is viewed as `(p, nb, b, q)` (`p` = size before `dim`, `q` = size after it; a view of
any contiguous tensor), and every product is one batched GEMM on such views:
- `q > 1` (weight rows, conv channels): block k of `(nb, b, q)` is a plain row-major matrix;
- `q == 1` (channels last, linear outputs): block k of `(p, nb, b)` is a `(p, b)` matrix with row
  stride `nb*b`, which BLAS reads where it lies (no permute copy of the input).
A custom autograd function supplies both gradients with the same two kernels, so autograd records one
node instead of the permutes, reshapes and copies of an einsum.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _view(X: Tensor, dim: int, nb: int, b: int) -> Tensor:
    """`X` as `(p, nb, b, q)`; raises when the size on `dim` is not `nb * b`."""
    dim = dim % X.dim()
    shape = X.shape
    if shape[dim] != nb * b:
        raise ValueError(f"{nb} blocks x {b} expect size {nb * b} on dim {dim}, got {shape[dim]}")
    pre = 1
    for s in shape[:dim]:
        pre *= s
    return X.reshape(pre, nb, b, -1)


def block_matmul(A: Tensor, Xv: Tensor) -> Tensor:
    """`Y[p, k] = A[k] @ Xv[p, k]` for `A` `(nb, b, b)`, `Xv` `(p, nb, b, q)` -> `(p, nb, b, q)` contiguous.

    `A` may be any strided view (e.g. a transpose): BLAS takes it as is.
    """
    p, nb, b, q = Xv.shape
    if A.dtype != Xv.dtype:
        A = A.to(Xv.dtype)
    if q > 1:
        if p == 1:
            return torch.bmm(A, Xv[0]).unsqueeze(0)
        return torch.matmul(A, Xv)
    rows = Xv.reshape(p, nb, b).transpose(0, 1)  # (nb, p, b), row stride nb*b
    # Into a contiguous (nb, p, b) result, torch makes one batched MKL call; into the strided (p, nb, b)
    # layout it would issue one GEMM per block. The copy back costs less than those calls (measured).
    Y = torch.bmm(rows, A.transpose(1, 2))
    return Y.transpose(0, 1).contiguous().unsqueeze(-1)


def block_outer(G: Tensor, Xv: Tensor) -> Tensor:
    """`S[k] = sum_{p, q} G[p, k] @ Xv[p, k]^T` for `(p, nb, b, q)` inputs -> `(nb, b, b)`."""
    p, nb, b, q = Xv.shape
    if q > 1:
        if p == 1:
            return torch.bmm(G[0], Xv[0].transpose(1, 2))
        return torch.matmul(G, Xv.transpose(-1, -2)).sum(0)
    g = G.reshape(p, nb, b).permute(1, 2, 0)  # (nb, b, p): column-major blocks, leading dim nb*b
    x = Xv.reshape(p, nb, b).transpose(0, 1)  # (nb, p, b)
    return torch.bmm(g, x)


class _BlockApply(torch.autograd.Function):
    """`Y[p, k] = A[k] @ X[p, k] (+ bias)`, `A = R^T` or `R`; backward: `dX = A^T dY`, `dA[k] = sum dY X^T`.

    Taking `R` and a flag (not a transposed view) and adding the bias in place keeps it one autograd node.
    """

    @staticmethod
    def forward(ctx, R: Tensor, Xv: Tensor, transpose_r: bool,  # type: ignore[override]
                bias: Tensor | None) -> Tensor:
        ctx.transpose_r = transpose_r
        ctx.save_for_backward(R, Xv)
        Y = block_matmul(R.transpose(1, 2) if transpose_r else R, Xv)
        if bias is not None:
            p, nb, b, q = Xv.shape
            Y.add_(bias.to(Y.dtype).view(1, nb, b, 1))
        return Y

    @staticmethod
    def backward(ctx, G: Tensor):  # type: ignore[override]
        R, Xv = ctx.saved_tensors
        A = R.transpose(1, 2) if ctx.transpose_r else R
        G = G.contiguous()
        dR = dX = dbias = None
        if ctx.needs_input_grad[0]:
            dA = block_outer(G, Xv).to(R.dtype)
            dR = dA.transpose(1, 2) if ctx.transpose_r else dA
        if ctx.needs_input_grad[1]:
            dX = block_matmul(A.transpose(1, 2), G)
        if ctx.needs_input_grad[3]:
            dbias = G.sum((0, 3)).reshape(-1)
        return dR, dX, None, dbias


def block_apply(A: Tensor, Xv: Tensor) -> Tensor:
    """Differentiable `Y[p, k] = A[k] @ Xv[p, k]` (`A` `(nb, b, b)`, `Xv` `(p, nb, b, q)`)."""
    if torch.is_grad_enabled() and (A.requires_grad or Xv.requires_grad):
        return _BlockApply.apply(A, Xv, False, None)
    return block_matmul(A, Xv)


def blockdiag_apply(R: Tensor, X: Tensor, dim: int = 0, transpose: bool = False) -> Tensor:
    """`M X` along `dim` with `M = blockdiag(R_k^T)`; `transpose=True` gives `M^T X = blockdiag(R_k) X`.

    R `(nb, b, b)`, X `(..., nb*b, ...)` -> same shape as X.
    """
    return blockdiag_apply_bias(R, X, dim, transpose, None)


def blockdiag_apply_bias(R: Tensor, X: Tensor, dim: int, transpose: bool, bias: Tensor | None) -> Tensor:
    """`blockdiag_apply(R, X, dim, transpose)` plus `bias` `(nb*b,)` broadcast along `dim`, fused."""
    nb, b, _ = R.shape
    Xv = _view(X, dim, nb, b)
    if torch.is_grad_enabled() and (R.requires_grad or Xv.requires_grad or (bias is not None and bias.requires_grad)):
        return _BlockApply.apply(R, Xv, not transpose, bias).reshape(X.shape)
    Y = block_matmul(R if transpose else R.transpose(1, 2), Xv)
    if bias is not None:
        Y.add_(bias.to(Y.dtype).view(1, nb, b, 1))
    return Y.reshape(X.shape)
