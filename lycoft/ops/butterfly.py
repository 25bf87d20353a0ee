"""Butterfly (boft) rotation of one dimension of a tensor, with reshapes only (no permutation matrices).

`R`: `(m, nb, b, b)`, `b` even, dimension size `C = nb * b`, `2**(m-1)` divides `nb` (docs/spec.md, "Butterfly").
Stage `i` with `k = 2**i * b/2`: inside every chunk of `2k` entries interleave the two halves
(`[0, k, 1, k+1, ...]`), apply `R_{i,t}` (not transposed) to each consecutive group of `b`, undo the
interleave. The operator is `B = S_{m-1} ... S_0`.

Index algebra used instead of gathers: write an entry of the dimension as `(c, h, t, s)` with
`c` the chunk, `h` the half, `t` in `[0, 2**i)`, `s` in `[0, b/2)`; after the interleave the entry sits in
block `c * 2**i + t` at in-block position `2 s + h`. So one stage is a single einsum on the view
`(c, 2, 2**i, b/2)` with `R_i` viewed as `(c, 2**i, b/2, 2, b/2, 2)`.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from .cayley import _no_autocast


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


def butterfly_chunk(R: Tensor) -> int:
    """Size `b * 2**(m-1)` of the chunks a butterfly never mixes across: `B` is block-diagonal in them.

    Stage `i` only mixes entries inside chunks of `2**i * b`, so the product of all stages stays inside
    chunks of `2**(m-1) * b`.
    """
    m, _, b, _ = R.shape
    return b * 2 ** (m - 1)


@functools.lru_cache(maxsize=64)
def _stage_maps(s: int, b: int, stage: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Index maps between stage `stage`'s blocks of one chunk (flat `(G, b, b)`, `G = s / b`) and the
    dense chunk matrix `S` (flat `(s, s)`) of that stage.

    `P` interleaves the halves of every sub-chunk of `2k = 2**stage * b` entries (`u = v[idx]`), so
    `S = P^T blockdiag(R) P` reads `S[a, e] = BD[inv[a], inv[e]]` with `inv = argsort(idx)`.
    Returns `src` (entry of the flat blocks feeding each `S` entry), `mask` (1 where `S` is in a block)
    and `dst` (position in `S` of each block entry: `S` holds every block entry exactly once).
    """
    k = 2**stage * b // 2
    idx = torch.arange(s).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
    inv = torch.argsort(idx)
    J, L = inv[:, None].expand(s, s), inv[None, :].expand(s, s)
    inside = (J // b) == (L // b)
    src = torch.where(inside, (J // b) * b * b + (J % b) * b + (L % b), torch.zeros_like(J)).reshape(-1)
    dst = torch.empty((s // b) * b * b, dtype=torch.long)
    dst[src[inside.reshape(-1)]] = torch.arange(s * s)[inside.reshape(-1)]
    return src.to(device), inside.reshape(-1).to(device), dst.to(device)


def _stage_matrices(R: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Dense per-chunk stage matrices `S_i` `(chunks, s, s)` and their running products `S_i ... S_0`."""
    m, nb, b, _ = R.shape
    s = butterfly_chunk(R)
    chunks = nb * b // s
    stages: list[Tensor] = []
    prefix: list[Tensor] = []
    for i in range(m):
        src, inside, _ = _stage_maps(s, b, i, R.device)
        S = R[i].reshape(chunks, -1).index_select(1, src).mul_(inside).reshape(chunks, s, s)
        stages.append(S)
        prefix.append(S if i == 0 else torch.bmm(S, prefix[-1]))
    return stages, prefix


class _ButterflyBlocks(torch.autograd.Function):
    """`D_c = S_{m-1,c} ... S_{0,c}` per chunk, each `S_i` a gather of stage i's blocks; returns `D^T`."""

    @staticmethod
    def forward(ctx, R: Tensor) -> Tensor:  # type: ignore[override]
        with _no_autocast(R):  # float32 products even under autocast (the rotation is fp32 by contract)
            stages, prefix = _stage_matrices(R)
        ctx.shape = R.shape
        ctx.save_for_backward(*stages, *prefix[:-1])
        return prefix[-1].transpose(1, 2)

    @staticmethod
    def backward(ctx, gT: Tensor) -> Tensor:  # type: ignore[override]
        m, nb, b, _ = ctx.shape
        saved = ctx.saved_tensors
        stages, prefix = saved[:m], saved[m:]
        s = stages[0].shape[-1]
        # Under autocast the incoming gradient may be bf16/fp16; the rotation's algebra stays float32.
        G = gT.transpose(1, 2).to(stages[0].dtype)  # dL/dD
        grads: list[Tensor] = [G] * m
        with _no_autocast(G):
            for i in range(m - 1, -1, -1):
                dS = G if i == 0 else torch.bmm(G, prefix[i - 1].transpose(1, 2))
                _, _, dst = _stage_maps(s, b, i, gT.device)
                grads[i] = dS.reshape(dS.shape[0], -1).index_select(1, dst).reshape(nb, b, b)
                if i:
                    G = torch.bmm(stages[i].transpose(1, 2), G)
        return torch.stack(grads)


def butterfly_blocks(R: Tensor) -> Tensor:
    """The butterfly as dense chunk blocks: `(m, nb, b, b) -> (nb / 2**(m-1), s, s)`, `s = butterfly_chunk(R)`.

    Returned in the block-diagonal convention, so `blockdiag_apply(butterfly_blocks(R), X, dim)` equals
    `butterfly_apply(R, X, dim)`. Per chunk, stage i is the dense `P_i^T blockdiag(R_i blocks) P_i` (one
    gather from fixed index maps), and the chunk block is the product of the stages (`m - 1` batched
    matmuls of `s x s`); one autograd node. Worth it when `s` is small: one batched GEMM of width `s` then
    replaces `m` stages of width `b` and their interleaves.
    """
    if torch.is_grad_enabled() and R.requires_grad:
        return _ButterflyBlocks.apply(R)
    with _no_autocast(R):
        return _stage_matrices(R)[1][-1].transpose(1, 2)
