"""Dispatch by adapter rank: 3-D rotations are oft (block-diagonal), 4-D are boft (butterfly)."""

from __future__ import annotations

from torch import Tensor

from .blockdiag import blockdiag_apply
from .butterfly import butterfly_apply, butterfly_blocks

# A butterfly is applied as dense chunk blocks of size s = b * 2**(m-1) when s is at most this many times
# its staged width m*b, or at most FUSE_ALWAYS: one GEMM of width s beats m stages of width b with their
# interleaves (measured on CPU: bench/README.md), and the chunk blocks cost only m*C*s*b to build.
FUSE_RATIO = 2
FUSE_ALWAYS = 64


def operator_width(stages: int, block_size: int, butterfly: bool) -> int:
    """Multiply-adds per rotated entry of the cheapest application: `b` (oft), `s` (fused boft), `m b`."""
    if not butterfly:
        return block_size
    s = block_size * 2 ** (stages - 1)
    return s if butterfly_fuses(stages, block_size) else stages * block_size


def butterfly_fuses(stages: int, block_size: int) -> bool:
    """Whether a butterfly of `stages` x `block_size` is applied as dense chunk blocks (see FUSE_RATIO)."""
    return block_size * 2 ** (stages - 1) <= max(FUSE_RATIO * stages * block_size, FUSE_ALWAYS)


def operator_blocks(R: Tensor) -> Tensor | None:
    """The operator as block-diagonal blocks `(n, s, s)` (`M = blockdiag(blocks_k^T)`), or None.

    oft: `R` itself. boft: the dense chunk blocks when the chunk is small enough to be cheaper than the
    stages (see FUSE_RATIO); None for wide butterflies, which are applied stage by stage.
    """
    if R.dim() == 3:
        return R
    if R.dim() != 4:
        raise ValueError(f"rotation tensor must be 3-D (oft) or 4-D (boft), got shape {tuple(R.shape)}")
    m, _, b, _ = R.shape
    return butterfly_blocks(R) if butterfly_fuses(m, b) else None


def rotate(R: Tensor, X: Tensor, dim: int = 0, transpose: bool = False) -> Tensor:
    """Apply the adapter operator `M` (or `M^T`) along `dim` of `X`.

    `R` `(nb, b, b)` -> oft, `M = blockdiag(R_k^T)`; `R` `(m, nb, b, b)` -> boft, `M = S_{m-1}...S_0`.
    """
    blocks = operator_blocks(R)
    if blocks is not None:
        return blockdiag_apply(blocks, X, dim=dim, transpose=transpose)
    return butterfly_apply(R, X, dim=dim, transpose=transpose)


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
