"""Butterfly (boft) rotation of one dimension of a tensor, with reshapes only (no permutation matrices).

`R`: `(m, nb, b, b)`, `b` even, dimension size `C = nb * b`, `2**(m-1)` divides `nb` (SPEC section 2).
Stage `i` with `k = 2**i * b/2`: inside every chunk of `2k` entries interleave the two halves
(`[0, k, 1, k+1, ...]`), apply `R_{i,t}` (not transposed) to each consecutive group of `b`, undo the
interleave. The operator is `B = S_{m-1} ... S_0`.

Index algebra used instead of gathers: write an entry of the dimension as `(c, h, t, s)` with
`c` the chunk, `h` the half, `t` in `[0, 2**i)`, `s` in `[0, b/2)`; after the interleave the entry sits in
block `c * 2**i + t` at in-block position `2 s + h`. So one stage is a single einsum on the view
`(c, 2, 2**i, b/2)` with `R_i` viewed as `(c, 2**i, b/2, 2, b/2, 2)`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def butterfly_stage(R_i: Tensor, X: Tensor, stage: int, dim: int = 0, transpose: bool = False) -> Tensor:
    """Apply stage `S_stage` (or its transpose) along `dim`. `R_i` `(nb, b, b)`."""
    nb, b, _ = R_i.shape
    h = b // 2
    nt = 2**stage
    dim = dim % X.dim()
    shape = X.shape
    C = shape[dim]
    if C != nb * b or nb % nt:
        raise ValueError(f"butterfly stage {stage} of {nb} blocks x {b} cannot act on size {C}")
    chunks = nb // nt
    pre = 1
    for s in shape[:dim]:
        pre *= s
    Xv = X.reshape(pre, chunks, 2, nt, h, -1)  # p c H t S q
    Rv = R_i.reshape(chunks, nt, h, 2, h, 2)  # c t s h S H (out index (s,h), in index (S,H))
    if transpose:
        Y = torch.einsum("ctSHsh,pcHtSq->pchtsq", Rv, Xv)
    else:
        Y = torch.einsum("ctshSH,pcHtSq->pchtsq", Rv, Xv)
    return Y.reshape(shape)


def butterfly_apply(R: Tensor, X: Tensor, dim: int = 0, transpose: bool = False) -> Tensor:
    """`B X` along `dim` (stage 0 first); `transpose=True` gives `B^T X` (last stage first, each R^T).

    R `(m, nb, b, b)`, X `(..., nb*b, ...)` -> same shape as X.
    """
    m = R.shape[0]
    order = range(m - 1, -1, -1) if transpose else range(m)
    for i in order:
        X = butterfly_stage(R[i], X, i, dim=dim, transpose=transpose)
    return X
