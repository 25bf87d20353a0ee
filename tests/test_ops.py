"""Properties of the pure math (docs/spec.md), each against an obviously-correct float64 reference."""

import pytest
import torch
from conftest import randomise

import lycoft
from lycoft.ops import (
    blockdiag_apply,
    butterfly_apply,
    cayley,
    constrain,
    interpolate,
    inverse_cayley,
    merged_weight,
    orthogonality_error,
    rotate_weight,
    skew,
)


def dense_perm(C: int, k: int) -> torch.Tensor:
    """Explicit permutation matrix P with (P X) = X[idx], idx interleaving the halves of 2k-chunks."""
    idx = torch.arange(C).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
    P = torch.zeros(C, C, dtype=torch.float64)
    P[torch.arange(C), idx] = 1
    return P


def dense_butterfly(R: torch.Tensor) -> torch.Tensor:
    m, nb, b, _ = R.shape
    C = nb * b
    M = torch.eye(C, dtype=torch.float64)
    for i in range(m):
        P = dense_perm(C, 2**i * b // 2)
        M = P.T @ torch.block_diag(*R[i].to(torch.float64)) @ P @ M
    return M


def dense_cayley(Q: torch.Tensor) -> torch.Tensor:
    Q = Q.to(torch.float64)
    I = torch.eye(Q.shape[-1], dtype=torch.float64)
    return (I + Q) @ torch.linalg.inv(I - Q)


@pytest.mark.parametrize("std", [1e-3, 1e-2, 0.1])
@pytest.mark.parametrize("shape", [(40, 8, 8), (10, 32, 32), (2, 20, 16, 16)])
def test_cayley_is_orthogonal_in_float32(std, shape):
    torch.manual_seed(0)
    A = torch.randn(shape) * std
    R = cayley(skew(A))
    assert R.dtype == torch.float32
    assert orthogonality_error(R) <= 1e-5
    assert torch.allclose(R.double(), dense_cayley(skew(A.double())), atol=1e-5)


def test_cayley_of_zero_is_exact_identity():
    R = cayley(skew(torch.zeros(4, 8, 8)))
    assert torch.equal(R, torch.eye(8).expand(4, 8, 8))


def test_half_precision_blocks_are_lifted_to_float32():
    A = (torch.randn(4, 8, 8) * 0.1).to(torch.bfloat16)
    R = cayley(skew(A))
    assert R.dtype == torch.float32
    assert orthogonality_error(R) <= 1e-5


def test_neumann_is_an_approximation_that_converges():
    torch.manual_seed(0)
    Q = skew(torch.randn(4, 8, 8) * 0.01)
    exact = cayley(Q)
    errs = [float((cayley(Q, n) - exact).abs().max()) for n in (2, 4, 8)]
    assert errs[0] > errs[1] > errs[2]
    assert errs[2] < 1e-6
    big = skew(torch.randn(4, 8, 8) * 0.3)
    assert orthogonality_error(cayley(big, 5)) > 1e-3  # not orthogonal at large Q: documented as approximate


def test_inverse_cayley_round_trip():
    torch.manual_seed(1)
    A = torch.randn(6, 8, 8, dtype=torch.float64) * 0.2
    R = cayley(skew(A))
    A2 = inverse_cayley(R)
    assert torch.allclose(cayley(skew(A2)), R, atol=1e-12)
    assert torch.allclose(skew(A2), skew(A), atol=1e-12)


def test_constraint_matches_lycoris_rule():
    torch.manual_seed(0)
    Q = skew(torch.randn(3, 4, 4))
    n = float(torch.linalg.vector_norm(Q))
    c = n / 4
    Qc = constrain(Q, c)
    assert torch.allclose(Qc, Q * c / (n + 1e-8))
    assert torch.equal(constrain(Q, 10 * n), Q)  # inactive bound leaves Q untouched
    assert torch.equal(constrain(Q, 0.0), Q)  # 0 disables it
    Qg = Q.clone().requires_grad_()
    constrain(Qg, c).sum().backward()  # differentiable
    assert Qg.grad is not None


def test_interpolation_endpoints():
    R = cayley(skew(torch.randn(2, 4, 4) * 0.3))
    assert torch.equal(interpolate(R, 1.0), R)
    assert torch.allclose(interpolate(R, 0.0), torch.eye(4).expand(2, 4, 4))
    assert torch.allclose(interpolate(R, 0.5), 0.5 * R + 0.5 * torch.eye(4))


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_blockdiag_matches_dense_block_diag(dim):
    torch.manual_seed(0)
    R = cayley(skew(torch.randn(5, 4, 4, dtype=torch.float64) * 0.3))
    M = torch.block_diag(*[r.T for r in R])  # blockdiag(R_k^T)
    X = torch.randn(3, 20, 7, dtype=torch.float64) if dim == 1 else torch.randn(20, 6, dtype=torch.float64)
    if dim == -1:
        X = torch.randn(3, 2, 20, dtype=torch.float64)
    Y = blockdiag_apply(R, X, dim=dim)
    ref = torch.movedim(torch.tensordot(M, torch.movedim(X, dim, 0), dims=1), 0, dim)
    assert torch.allclose(Y, ref, atol=1e-12)
    YT = blockdiag_apply(R, X, dim=dim, transpose=True)
    refT = torch.movedim(torch.tensordot(M.T, torch.movedim(X, dim, 0), dims=1), 0, dim)
    assert torch.allclose(YT, refT, atol=1e-12)


BUTTERFLIES = [(1, 4, 2), (2, 4, 4), (3, 4, 8), (2, 6, 4), (4, 8, 2), (3, 40, 8), (6, 32, 10)]


@pytest.mark.parametrize("m,nb,b", BUTTERFLIES)
def test_butterfly_matches_dense_permutation_reference(m, nb, b):
    torch.manual_seed(m * 100 + nb)
    R = cayley(skew(torch.randn(m, nb, b, b, dtype=torch.float64) * 0.2))
    M = dense_butterfly(R)
    W = torch.randn(nb * b, 9, dtype=torch.float64)
    assert torch.allclose(butterfly_apply(R, W), M @ W, atol=1e-12)
    assert torch.allclose(butterfly_apply(R, W, transpose=True), M.T @ W, atol=1e-12)
    Z = torch.randn(2, 3, nb * b, dtype=torch.float64)
    assert torch.allclose(butterfly_apply(R, Z, dim=-1), Z @ M.T, atol=1e-12)
    # M is orthogonal: the butterfly of orthogonal stages keeps it so
    assert torch.allclose(M.T @ M, torch.eye(nb * b, dtype=torch.float64), atol=1e-10)


def test_one_stage_butterfly_is_not_diag_oft():
    """docs/spec.md: a 1-stage BOFT differs from diag-OFT with the same tensor (transpose and interleave)."""
    torch.manual_seed(0)
    R = cayley(skew(torch.randn(1, 4, 4, 4) * 0.3))
    W = torch.randn(16, 3)
    assert not torch.allclose(butterfly_apply(R, W), blockdiag_apply(R[0], W), atol=1e-3)


def test_rotate_weight_input_side_is_w_times_mT():
    torch.manual_seed(0)
    R = cayley(skew(torch.randn(3, 6, 6, dtype=torch.float64) * 0.2))
    W = torch.randn(5, 2, 3, 3, dtype=torch.float64)  # conv: fan_in 18 = 3 blocks of 6
    M = torch.block_diag(*[r.T for r in R])
    ref = (W.reshape(5, -1) @ M.T).reshape(W.shape)
    assert torch.allclose(rotate_weight(R, W, side="input"), ref, atol=1e-12)
    Wt = W.reshape(5, -1).T.contiguous()
    assert torch.allclose(rotate_weight(R, Wt, side="output"), M @ Wt)


def test_blocks_far_from_identity_are_inverted_apart_from_the_rest():
    """A batch where a few blocks rotate far (too many product factors) and most do not: every block still
    equals the float64 Cayley to float32 rounding (measured 4e-7), whether a product or an LU inverse."""
    torch.manual_seed(0)
    A = torch.randn(300, 32, 32) * 0.005
    A[::50] = torch.randn(6, 32, 32) * 0.5  # ||Q^2||_inf >> 0.5 for these
    R = cayley(skew(A))
    assert orthogonality_error(R) <= 1e-5
    assert torch.allclose(R.double(), dense_cayley(skew(A.double())), atol=1e-6)
    for bad in (torch.nan, torch.inf):
        B = A.clone()
        B[7, 0, 1] = bad
        assert not torch.isfinite(cayley(skew(B))[7]).all() and torch.isfinite(cayley(skew(B))[8]).all()


def dense_merged_weight(W, A, side, constraint, multiplier, rescale):
    """The merge formula in float64 with dense matrices: constrained skew, `(I + Q)(I - Q)^-1` per block,
    strength per block (per stage), `M = blockdiag(T_k^T)` or the product of permuted stages, rescale last."""
    W, A = W.double(), A.double()
    Q = skew(A)
    dim = A.shape[-3] * A.shape[-1]
    norm = float(torch.linalg.vector_norm(Q)) + 1e-8
    if constraint > 0 and norm > constraint * dim:
        Q = Q * (constraint * dim / norm)
    I = torch.eye(A.shape[-1], dtype=torch.float64)
    T = multiplier * dense_cayley(Q) + (1 - multiplier) * I
    M = torch.block_diag(*[t.T for t in T]) if A.dim() == 3 else dense_butterfly(T)
    flat = W.reshape(W.shape[0], -1)
    out = (M @ flat if side == "output" else flat @ M.T).reshape(W.shape)
    if rescale is not None:
        out = out * rescale.double().reshape((W.shape[0],) + (1,) * (W.dim() - 1))
    return out


MERGE_BLOCKS = {"oft": (4, 8, 8), "boft": (2, 4, 8, 8), "boft3": (3, 4, 4, 4)}


@pytest.mark.parametrize("multiplier", [0.5, 1.0, -1.0])
@pytest.mark.parametrize("constraint", [0.0, 1e-3])
@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("algo", sorted(MERGE_BLOCKS))
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_merged_weight_equals_dense_float64_reference(kind, algo, side, constraint, multiplier):
    """float32 merge within 1e-5 (relative to the largest entry; measured 6e-7) of the dense float64 formula;
    the 1e-3 constraint is active for these blocks (bound 0.016..0.032 against ||Q|| of 1.5..3)."""
    g = torch.Generator().manual_seed(len(algo) + len(side) + int(constraint * 1e4))
    A = torch.randn(MERGE_BLOCKS[algo], generator=g) * 0.1
    dim = A.shape[-3] * A.shape[-1]
    if kind == "linear":
        W = torch.randn((dim, 24) if side == "output" else (24, dim), generator=g)
    else:
        W = torch.randn((dim, 3, 3, 3) if side == "output" else (5, dim // 4, 2, 2), generator=g)
    rescale = 1 + 0.2 * torch.randn(W.shape[0], generator=g)
    for r in (None, rescale):
        got = merged_weight(W, A, side=side, constraint=constraint, multiplier=multiplier, rescale=r)
        ref = dense_merged_weight(W, A, side, constraint, multiplier, r)
        assert got.dtype == torch.float32 and got.shape == W.shape
        assert float((got.double() - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_merged_weight_keeps_the_weight_dtype_and_strength_zero_is_the_base_exactly():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(4, 8, 8, generator=g) * 0.1
    W = torch.randn(32, 16, generator=g).to(torch.bfloat16)
    assert merged_weight(W, A).dtype == torch.bfloat16
    for B in (A, torch.randn(2, 4, 8, 8, generator=g)):
        assert torch.equal(merged_weight(W.float(), B, multiplier=0.0, constraint=1e-3), W.float())


@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_strength_zero_is_the_base_layer_exactly_with_rescale(algo):
    """Strength 0 leaves a rescaled layer untouched in every path: the pure merge, the layer's merged
    weight and its forward (which runs the plain layer at 0) all give the base, not `rescale * W`."""
    torch.manual_seed(0)
    module = torch.nn.Linear(16, 32)
    layer = randomise(lycoft.wrap(module, lycoft.AdapterConfig(algo=algo, block_size=4, rescale=True)))
    W = module.weight.detach()
    assert torch.equal(merged_weight(W, layer.oft_blocks, rescale=layer.rescale, multiplier=0.0), W)
    assert torch.equal(merged_weight(W, layer.oft_blocks, rescale=layer.rescale, multiplier=0.0,
                                     rotation=layer.rotation(0.0)), W)
    layer.multiplier = 0.0
    assert torch.equal(layer.merged_weight(), W)
    x = torch.randn(3, 16)
    assert torch.equal(layer(x), module(x))
    layer.multiplier = 1e-4  # just off zero the rescale applies in full: strength scales the rotation only
    near = layer.merged_weight().detach()
    assert float((near - layer.rescale.detach() * W).norm() / W.norm()) <= 1e-3


@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("cfg", [dict(block_size=4), dict(block_size=4, constraint=1e-3, rescale=True),
                                 dict(algo="boft", block_size=4), dict(algo="boft", block_size=2, rescale=True,
                                                                       constraint=1e-2)])
@pytest.mark.parametrize("base", ["linear", "conv"])
def test_layer_merged_weight_is_the_pure_merge_exactly(base, cfg, side):
    """A standalone adapted layer's merged weight is `ops.merged_weight` of its parameters, bit for bit,
    at every strength (so `Network.merge`, the file merge and the exports agree)."""
    torch.manual_seed(0)
    module = torch.nn.Linear(16, 32) if base == "linear" else torch.nn.Conv2d(8, 32, 1 if side == "input" else 3)
    if side == "input" and base == "conv":
        module = torch.nn.Conv2d(4, 32, 2)
    layer = randomise(lycoft.wrap(module, lycoft.AdapterConfig(side=side, **cfg)))
    for m in (0.5, 1.0, -1.0):
        layer.multiplier = m
        expected = merged_weight(module.weight, layer.oft_blocks, side=side, constraint=layer.constraint,
                                 multiplier=m, rescale=layer.rescale)
        assert torch.equal(layer.merged_weight(), expected)
        assert torch.equal(layer.merged_weight(m), expected)
