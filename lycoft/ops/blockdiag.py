"""Block-diagonal (oft) rotation of one dimension of a tensor.

`R`: `(nb, b, b)`. The operator is `M = blockdiag(R_1^T, ..., R_nb^T)` acting on a dimension of size
`nb * b` split into consecutive groups of `b` (SPEC section 2: group k of the weight rows becomes
`R_k^T W_k`). The same function rotates weight rows (`dim=0`) and activation channels (`dim=1` for conv
outputs, `dim=-1` for linear outputs).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _split(X: Tensor, dim: int, nb: int, b: int) -> tuple[Tensor, torch.Size]:
    dim = dim % X.dim()
    shape = X.shape
    if shape[dim] != nb * b:
        raise ValueError(f"{nb} blocks x {b} expect size {nb * b} on dim {dim}, got {shape[dim]}")
    pre = 1
    for s in shape[:dim]:
        pre *= s
    return X.reshape(pre, nb, b, -1), shape


def blockdiag_apply(R: Tensor, X: Tensor, dim: int = 0, transpose: bool = False) -> Tensor:
    """`M X` along `dim` with `M = blockdiag(R_k^T)`; `transpose=True` gives `M^T X = blockdiag(R_k) X`.

    R `(nb, b, b)`, X `(..., nb*b, ...)` -> same shape as X.
    """
    nb, b, _ = R.shape
    Xv, shape = _split(X, dim, nb, b)
    if transpose:
        Y = torch.einsum("kji,pkiq->pkjq", R, Xv)
    else:
        Y = torch.einsum("kij,pkiq->pkjq", R, Xv)
    return Y.reshape(shape)
