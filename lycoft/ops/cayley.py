"""Cayley transform and the norm constraint: from a raw block `A` to an orthogonal rotation `R`.

Conventions (SPEC section 1-2): skew part `Q = A - A^T` (no 1/2), `R = C(Q) = (I + Q)(I - Q)^-1`,
always evaluated in float32 or float64 whatever dtype `A` is stored in.
"""

from __future__ import annotations

import torch
from torch import Tensor

_EPS = 1e-8


def compute_dtype(t: Tensor) -> torch.dtype:
    """float64 stays float64 (reference computations); everything else is lifted to float32."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def skew(A: Tensor) -> Tensor:
    """`(..., b, b) -> (..., b, b)`: `Q = A - A^T` over the last two dims."""
    return A - A.transpose(-1, -2)


def eye_like(Q: Tensor) -> Tensor:
    """Identity with `Q`'s trailing `(b, b)` shape, dtype and device (broadcasts over the batch dims)."""
    return torch.eye(Q.shape[-1], dtype=Q.dtype, device=Q.device)


def constraint_scale(Q: Tensor, bound: float) -> Tensor:
    """Factor (0-d tensor, <= 1) that brings `||Q||_F` (whole tensor) within `bound`.

    The LyCORIS/ComfyUI rule `n = ||Q|| + 1e-8; if n > c: Q <- Q c / n`, written without a
    data-dependent branch so that it stays differentiable and never synchronises a GPU.
    `bound <= 0` means unconstrained (factor 1).
    """
    if bound <= 0:
        return torch.ones((), dtype=Q.dtype, device=Q.device)
    n = torch.linalg.vector_norm(Q) + _EPS
    return torch.clamp(bound / n, max=1.0)


def constrain(Q: Tensor, bound: float) -> Tensor:
    """`Q` scaled so that `||Q||_F <= bound` (whole tensor: all blocks, all butterfly stages)."""
    if bound <= 0:
        return Q
    return Q * constraint_scale(Q, bound)


def _inverse_of_i_minus(Q: Tensor) -> Tensor:
    """`N = (I - Q)^-1`, batched (LAPACK LU per block)."""
    A = -Q
    A.diagonal(dim1=-2, dim2=-1).add_(1.0)
    return torch.linalg.inv_ex(A).inverse


def _cayley_from_inverse(N: Tensor) -> Tensor:
    R = N * 2.0
    R.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return R


class _ExactCayley(torch.autograd.Function):
    """`R = 2 N - I`, `N = (I - Q)^-1`, with the analytic backward `dQ = N^T (2 dR) N^T`.

    One autograd node instead of four (sub, inverse, mul, sub) and a backward of two batched matmuls.
    """

    @staticmethod
    def forward(ctx, Q: Tensor) -> Tensor:  # type: ignore[override]
        N = _inverse_of_i_minus(Q)
        ctx.save_for_backward(N)
        return _cayley_from_inverse(N)

    @staticmethod
    def backward(ctx, dR: Tensor) -> Tensor:  # type: ignore[override]
        (N,) = ctx.saved_tensors
        Nt = N.transpose(-1, -2)
        return 2.0 * (Nt @ dR @ Nt)


def cayley(Q: Tensor, neumann_terms: int = 0) -> Tensor:
    """`(..., b, b) skew -> (..., b, b) orthogonal`: `R = (I + Q)(I - Q)^-1`, batched over leading dims.

    Exact path: `(I + Q)(I - Q)^-1 = 2 (I - Q)^-1 - I`, one batched inverse. `I - Q` with `Q` skew has
    all singular values >= 1, so the inverse is always well conditioned and `inv_ex` needs no check.
    `neumann_terms = n > 0` replaces `(I - Q)^-1` by `I + Q + ... + Q^(n-1)`: an APPROXIMATION, only
    orthogonal to O(||Q||^n); kept for experiments, never the default.
    """
    Qc = Q.to(compute_dtype(Q))
    if neumann_terms <= 0:
        if torch.is_grad_enabled() and Qc.requires_grad:
            return _ExactCayley.apply(Qc)
        return _cayley_from_inverse(_inverse_of_i_minus(Qc))
    I = eye_like(Qc)
    acc = I.expand_as(Qc)
    term = I.expand_as(Qc)
    for _ in range(neumann_terms - 1):
        term = term @ Qc
        acc = acc + term
    return 2.0 * acc - I


def inverse_cayley(R: Tensor) -> Tensor:
    """`(..., b, b) orthogonal -> raw block A` with `cayley(skew(A)) == R`.

    `Q = (R - I)(R + I)^-1` (exact for rotations without eigenvalue -1), and `A = Q / 2` so that
    `A - A^T = Q`. Used to read LyCORIS 2.0 `oft_diag` files, which stored `R` itself.
    """
    Rc = R.to(compute_dtype(R))
    I = eye_like(Rc)
    Q = torch.linalg.solve(Rc + I, Rc - I, left=False)
    Q = 0.5 * (Q - Q.transpose(-1, -2))  # project onto skew matrices: removes rounding asymmetry
    return 0.5 * Q


def interpolate(R: Tensor, multiplier: float) -> Tensor:
    """Strength: `m R + (1 - m) I` (= `m (R - I) + I`), blockwise; m = 1 is R, m = 0 the identity.

    For oft this is the LyCORIS `T = m(R - I) + I`; for boft it is applied to every stage.
    """
    if multiplier == 1.0:
        return R
    I = eye_like(R)
    return multiplier * R + (1.0 - multiplier) * I


def orthogonality_error(R: Tensor) -> float:
    """max over blocks of `||R^T R - I||_F` (float64 evaluation)."""
    R64 = R.detach().to(torch.float64)
    E = R64.transpose(-1, -2) @ R64 - eye_like(R64)
    return float(torch.linalg.matrix_norm(E).max()) if E.numel() else 0.0
