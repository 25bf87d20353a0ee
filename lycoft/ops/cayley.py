"""Cayley transform and the norm constraint: from a raw block `A` to an orthogonal rotation `R`.

Conventions (SPEC section 1-2): skew part `Q = A - A^T` (no 1/2), `R = C(Q) = (I + Q)(I - Q)^-1`,
always evaluated in float32 or float64 whatever dtype `A` is stored in.
"""

from __future__ import annotations

import contextlib
import functools
import math

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


# Newton-Schulz refinement of (I - Q)^-1 on CPU (see `_inverse_of_i_minus`).
_NS_TARGET = 1e-7  # bound on the final residual ||I - A X||_inf: float32 rounding level
_NS_START = 0.5  # a start with a larger residual needs > 5 steps: a fresh LU is cheaper
_NS_MIN_WORK = 2**17  # blocks * b^3 below which LAPACK's per-block LU is as fast (CPU, measured)


@functools.lru_cache(maxsize=32)
def _eye(b: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A shared identity (never written to): saves an allocation per call on the hot path."""
    return torch.eye(b, dtype=dtype, device=device)


def _newton_schulz(A: Tensor, X: Tensor) -> Tensor | None:
    """`A^-1` (`(B, b, b)`) refined from the start `X` by `X <- X + X (I - A X)`; None if LU is better.

    The residual squares at every step (`I - A X' = (I - A X)^2`), so with `r = ||I - A X||_inf` of the
    start (max row sum, a submultiplicative norm: measured once, one host sync) after k steps it is at most
    `r^(2^k)`. Exactly as many steps are taken as bring that bound below `_NS_TARGET` (float32 rounding):
    the result is as accurate as the LU inverse, by a bound, not by hope.
    Blocks whose start is poor (`r >= _NS_START`, e.g. the few layers of a network that rotate far) are
    inverted by LU on their own, so that one of them does not send a whole batched build to LU.
    """
    b = A.shape[-1]
    I = _eye(b, A.dtype, A.device).expand_as(A)
    E = torch.baddbmm(I, A, X, alpha=-1.0)
    rows = E.abs().sum(-1).amax(-1)  # (B,): each block's residual norm (matrix_norm is slower)
    r = float(rows.max())
    if r < _NS_START:
        return _refine(A, X, E, r)
    good = rows < _NS_START  # NaN compares False: such blocks go to LU, which reports them
    n_good = int(good.sum())
    if n_good * b**3 < _NS_MIN_WORK:
        return None
    ok, poor = good.nonzero().squeeze(1), (~good).nonzero().squeeze(1)
    N = torch.empty_like(X)
    N[ok] = _refine(A[ok], X[ok], E[ok], float(rows[ok].max()))
    N[poor] = _lu_inverse(A[poor])
    return N


def _lu_inverse(A: Tensor) -> Tensor:
    """Batched LU inverse that keeps a NaN/inf block non-finite (LAPACK may return finite garbage for it)."""
    return torch.linalg.inv_ex(A).inverse + A.sum((-2, -1), keepdim=True) * 0.0


def _refine(A: Tensor, X: Tensor, E: Tensor, r: float) -> Tensor:
    """Newton-Schulz steps from `X` with residual `E = I - A X`, `||E||_inf = r < 1`."""
    if r == 0.0:
        return X
    I = _eye(A.shape[-1], A.dtype, A.device).expand_as(A)
    steps = max(1, math.ceil(math.log2(math.log(_NS_TARGET) / math.log(r))))
    for k in range(steps):
        X = torch.baddbmm(X, X, E)
        if k + 1 < steps:
            E = torch.baddbmm(I, A, X, alpha=-1.0)
    return X


def _inverse_of_i_minus(Q: Tensor) -> Tensor:
    """`N = (I - Q)^-1` for skew `Q` `(..., b, b)`.

    LAPACK inverts small blocks one at a time (about 20-30 us per 32 x 32 block on CPU). For float32 on
    CPU with enough blocks the inverse is instead refined with batched matmuls (`_newton_schulz`) from
    `I + Q` (residual `Q^2`: good when `Q` is small); LU stays the fallback for the blocks whose start is
    poor. All agree to float32 rounding; `Q == 0` gives exactly `I` (a fresh adapter is exactly the base
    layer). No warm start from an earlier rotation: the result is a pure function of `Q`.
    GPUs keep the batched LU (no host synchronisation).
    """
    b = Q.shape[-1]
    I = _eye(b, Q.dtype, Q.device)
    A = I - Q
    if Q.device.type == "cpu" and Q.dtype == torch.float32 and Q.numel() * b >= _NS_MIN_WORK:
        N = _newton_schulz(A.reshape(-1, b, b), (Q + I).reshape(-1, b, b))
        if N is not None:
            return N.reshape(Q.shape)
    return _lu_inverse(A)


def _cayley_from_inverse(N: Tensor) -> Tensor:
    R = N * 2.0
    R.diagonal(dim1=-2, dim2=-1).sub_(1.0)
    return R


def _no_autocast(t: Tensor) -> contextlib.AbstractContextManager:
    """The rotation is float32 by contract: keep autocast from lowering the matmuls that build it."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.autocast(t.device.type, enabled=False)
    return contextlib.nullcontext()


class _ExactCayley(torch.autograd.Function):
    """`R = 2 N - I`, `N = (I - Q)^-1`, with the analytic backward `dQ = N^T (2 dR) N^T`.

    One autograd node instead of four (sub, inverse, mul, sub) and a backward of two batched matmuls.
    With `raw=True` the input is the raw block `A` and `Q = A - A^T` is formed inside (one node less).
    """

    @staticmethod
    def forward(ctx, Q: Tensor, raw: bool) -> Tensor:  # type: ignore[override]
        with _no_autocast(Q):
            if raw:
                Q = Q - Q.transpose(-1, -2)
            N = _inverse_of_i_minus(Q)
        ctx.raw = raw
        ctx.save_for_backward(N)
        return _cayley_from_inverse(N)

    @staticmethod
    def backward(ctx, dR: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (N,) = ctx.saved_tensors
        with _no_autocast(N):
            Nt = N.transpose(-1, -2)
            dQ = torch.matmul(torch.matmul(Nt, dR), Nt).mul_(2.0)
        if ctx.raw:
            dQ = dQ - dQ.transpose(-1, -2)
        return dQ, None


def _exact(Q: Tensor, raw: bool) -> Tensor:
    if torch.is_grad_enabled() and Q.requires_grad:
        return _ExactCayley.apply(Q, raw)
    with _no_autocast(Q):
        if raw:
            Q = Q - Q.transpose(-1, -2)
        return _cayley_from_inverse(_inverse_of_i_minus(Q))


def cayley(Q: Tensor, neumann_terms: int = 0) -> Tensor:
    """`(..., b, b) skew -> (..., b, b) orthogonal`: `R = (I + Q)(I - Q)^-1`, batched over leading dims.

    Exact path: `(I + Q)(I - Q)^-1 = 2 (I - Q)^-1 - I`, one batched inverse. `I - Q` with `Q` skew has
    all singular values >= 1, so the inverse is always well conditioned (see `_inverse_of_i_minus` for
    how it is computed).
    `neumann_terms = n > 0` replaces `(I - Q)^-1` by `I + Q + ... + Q^(n-1)`: an APPROXIMATION, only
    orthogonal to O(||Q||^n); kept for experiments, never the default.
    """
    Qc = Q.to(compute_dtype(Q))
    if neumann_terms <= 0:
        return _exact(Qc, raw=False)
    I = eye_like(Qc)
    acc = I.expand_as(Qc)
    term = I.expand_as(Qc)
    for _ in range(neumann_terms - 1):
        term = term @ Qc
        acc = acc + term
    return 2.0 * acc - I


def cayley_of_raw(A: Tensor) -> Tensor:
    """`cayley(skew(A))` (exact) as a single autograd node: the training hot path."""
    return _exact(A.to(compute_dtype(A)), raw=True)


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
