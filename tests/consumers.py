"""Test oracles: the merge formulas of ComfyUI, A1111 and kohya, re-implemented from their published
behaviour (docs/spec.md, "Who reads what"), in float64 and independently of lycoft.ops.

Slow and obvious on purpose: explicit loops over blocks and explicit permutation indices.
"""

from __future__ import annotations

import torch


def cayley_plus(Q: torch.Tensor) -> torch.Tensor:
    I = torch.eye(Q.shape[-1], dtype=Q.dtype)
    return (I + Q) @ torch.linalg.inv(I - Q)


def clamp_lycoris(Q: torch.Tensor, c: float) -> torch.Tensor:
    n = torch.linalg.vector_norm(Q) + 1e-8
    return Q * c / n if (c > 0 and n > c) else Q


def clamp_kohya(Q: torch.Tensor, c: float) -> torch.Tensor:
    n = torch.linalg.vector_norm(Q)
    return Q * (torch.minimum(n, torch.tensor(c, dtype=Q.dtype)) + 1e-8) / (n + 1e-8)


def blockwise_rt(R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """group k of W's rows -> R_k^T W_k."""
    nb, bs, _ = R.shape
    rows = W.reshape(W.shape[0], -1)
    out = torch.empty_like(rows)
    for k in range(nb):
        out[k * bs:(k + 1) * bs] = R[k].T @ rows[k * bs:(k + 1) * bs]
    return out.reshape(W.shape)


def butterfly_rows(R: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """LyCORIS butterfly on output rows: per stage interleave halves of 2k-chunks, R (not R^T) per block."""
    m, nb, b, _ = R.shape
    X = W.reshape(W.shape[0], -1).clone()
    out = X.shape[0]
    for i in range(m):
        k = 2**i * b // 2
        idx = torch.arange(out).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
        Y = X[idx]
        for t in range(nb):
            Y[t * b:(t + 1) * b] = R[i, t] @ Y[t * b:(t + 1) * b]
        X = torch.empty_like(Y)
        X[idx] = Y
    return X.reshape(W.shape)


def _rescale_b(rescale, W):
    return rescale.to(W.dtype).reshape(-1, *[1] * (W.dim() - 1))


def lycoris_merge(W, A, alpha, rescale=None, m=1.0):
    """LyCORIS >= 2.1.0.post2 get_merged_weight (diag-oft for 3-D blocks, boft for 4-D)."""
    W, A = W.double(), A.double()
    R = cayley_plus(clamp_lycoris(A - A.transpose(-1, -2), alpha * W.shape[0]))
    I = torch.eye(R.shape[-1], dtype=R.dtype)
    if A.dim() == 3:
        out = blockwise_rt(m * (R - I) + I, W)
    else:
        out = butterfly_rows(m * R + (1 - m) * I if m != 1 else R, W)
    return out if rescale is None else _rescale_b(rescale, W) * out


def comfy_merge(W, A, alpha, rescale=None, s=1.0):
    """ComfyUI 0.30 OFTAdapter / BOFTAdapter.calculate_weight: bound = alpha (not alpha*out); oft ignores
    rescale and applies the strength twice."""
    W, A = W.double(), A.double()
    R = cayley_plus(clamp_lycoris(A - A.transpose(-1, -2), alpha or 0.0))
    I = torch.eye(R.shape[-1], dtype=R.dtype)
    if A.dim() == 3:
        return W + s * blockwise_rt(s * (R - I), W)
    if s != 1:
        R = s * R + (1 - s) * I
    out = butterfly_rows(R, W)
    if rescale is not None:
        out = _rescale_b(rescale, W) * out
    return W + s * (out - W)


def a1111_merge(W, A, alpha, rescale=None, m=1.0):
    """A1111 network_oft.py after PR #14973: kohya clamp with c = alpha*out when c != 0."""
    W, A = W.double(), A.double()
    c = (alpha or 0.0) * W.shape[0]
    Q = A - A.transpose(-1, -2)
    if c != 0:
        Q = clamp_kohya(Q, c)
    R = cayley_plus(Q)
    merged = blockwise_rt(R, W) if A.dim() == 3 else butterfly_rows(R, W)
    if rescale is not None:
        merged = _rescale_b(rescale, W) * merged
    return W + m * (merged - W)


def kohya_legacy_merge(W, A, alpha, m=1.0):
    """kohya networks/oft.py: c = alpha*out with the kohya clamp (always applied), R_w = m(R - I) + I."""
    W, A = W.double(), A.double()
    R = cayley_plus(clamp_kohya(A - A.transpose(-1, -2), alpha * W.shape[0]))
    I = torch.eye(R.shape[-1], dtype=R.dtype)
    return blockwise_rt(m * (R - I) + I, W)
