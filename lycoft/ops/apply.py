"""Dispatch by adapter rank: 3-D rotations are oft (block-diagonal), 4-D are boft (butterfly)."""

from __future__ import annotations

from torch import Tensor

from .blockdiag import blockdiag_apply
from .butterfly import butterfly_apply


def rotate(R: Tensor, X: Tensor, dim: int = 0, transpose: bool = False) -> Tensor:
    """Apply the adapter operator `M` (or `M^T`) along `dim` of `X`.

    `R` `(nb, b, b)` -> oft, `M = blockdiag(R_k^T)`; `R` `(m, nb, b, b)` -> boft, `M = S_{m-1}...S_0`.
    """
    if R.dim() == 3:
        return blockdiag_apply(R, X, dim=dim, transpose=transpose)
    if R.dim() == 4:
        return butterfly_apply(R, X, dim=dim, transpose=transpose)
    raise ValueError(f"rotation tensor must be 3-D (oft) or 4-D (boft), got shape {tuple(R.shape)}")


def rotate_weight(R: Tensor, W: Tensor, side: str = "output") -> Tensor:
    """The rotated weight (no rescale, no bias), in `R`'s dtype.

    output side: `W' = M W` on rows (conv weights as `out` rows of length `in*prod(k)`);
    input side: `W'_flat = W_flat M^T` on the flattened fan-in.
    """
    Wc = W.to(R.dtype)
    if side == "output":
        return rotate(R, Wc, dim=0)
    flat = Wc.reshape(W.shape[0], -1)
    # (W M^T)^T = M W^T: rotate each row's fan-in vector by M.
    return rotate(R, flat, dim=1).reshape(W.shape)
