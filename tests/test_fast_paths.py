"""The fast kernels against slow, obviously-correct float64 references: same values, same gradients."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lycoft import AdapterConfig, wrap
from lycoft.ops import blockdiag_apply, butterfly_apply, cayley, orthogonality_error, rotate, rotate_weight, skew
from lycoft.ops.apply import operator_blocks, operator_width
from lycoft.ops.butterfly import butterfly_blocks
from lycoft.ops.weight_path import ConvSpec, rotated_weight_op


def dense_butterfly(R: torch.Tensor) -> torch.Tensor:
    """docs/spec.md, "Butterfly", with explicit permutation matrices: interleave, block-diagonal R_i, undo."""
    m, nb, b, _ = R.shape
    C = nb * b
    M = torch.eye(C, dtype=torch.float64)
    for i in range(m):
        k = 2**i * b // 2
        idx = torch.arange(C).reshape(-1, 2, k).transpose(1, 2).reshape(-1)
        P = torch.zeros(C, C, dtype=torch.float64)
        P[torch.arange(C), idx] = 1
        M = P.T @ torch.block_diag(*R[i].to(torch.float64)) @ P @ M
    return M


def random_rotation(shape, std=0.2, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return cayley(skew(torch.randn(shape, generator=g, dtype=dtype) * std))


@pytest.mark.parametrize("m,nb,b", [(1, 4, 2), (2, 4, 4), (2, 40, 8), (3, 8, 8), (4, 8, 2)])
def test_butterfly_blocks_equal_the_dense_butterfly(m, nb, b):
    R = random_rotation((m, nb, b, b), seed=m + nb)
    blocks = butterfly_blocks(R)
    s = b * 2 ** (m - 1)
    assert blocks.shape == (nb * b // s, s, s)
    M = torch.block_diag(*[blk.T for blk in blocks])  # blockdiag convention: M = blockdiag(blocks_k^T)
    assert torch.allclose(M, dense_butterfly(R), atol=1e-12)


def test_wide_butterflies_stay_staged_and_rotate_agrees():
    narrow = random_rotation((2, 8, 4, 4))
    wide = random_rotation((6, 32, 10, 10), std=0.05)
    assert operator_blocks(narrow) is not None and operator_width(2, 4, True) == 8
    assert operator_blocks(wide) is None and operator_width(6, 10, True) == 60
    for R in (narrow, wide):
        X = torch.randn(R.shape[1] * R.shape[2], 5, dtype=torch.float64)
        assert torch.allclose(rotate(R, X), dense_butterfly(R) @ X, atol=1e-12)
        assert torch.allclose(rotate(R, X, transpose=True), dense_butterfly(R).T @ X, atol=1e-12)


@pytest.mark.parametrize("xshape,dim", [((6, 12), -1), ((2, 3, 12), -1), ((12, 5), 0), ((1, 12, 4, 3), 1),
                                        ((3, 12, 7), 1)])
@pytest.mark.parametrize("transpose", [False, True])
def test_blockdiag_gradients_match_autograd_reference(xshape, dim, transpose):
    torch.manual_seed(0)
    R = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    X = torch.randn(xshape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda R, X: blockdiag_apply(R, X, dim=dim, transpose=transpose), (R, X))
    # and against the dense block-diagonal operator
    M = torch.block_diag(*[r if transpose else r.T for r in R])
    ref = torch.movedim(torch.tensordot(M, torch.movedim(X, dim, 0), dims=1), 0, dim)
    assert torch.allclose(blockdiag_apply(R, X, dim=dim, transpose=transpose), ref, atol=1e-12)


def test_blockdiag_double_backward():
    R = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    X = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda R, X: blockdiag_apply(R, X, dim=-1), (R, X))


@pytest.mark.parametrize("std", [0.0, 1e-3, 0.02, 0.1, 0.5])
@pytest.mark.parametrize("shape", [(10, 32, 32), (1, 32, 32), (80, 8, 8), (3, 2, 16, 16), (5, 4, 4), (7, 2, 2)])
def test_float32_cayley_equals_float64_lapack(std, shape):
    """Whether a block is a product of factors or inverted by LU, it matches float64 LAPACK (worst measured:
    4.4e-7, at std 0.5 on 32 x 32 blocks)."""
    torch.manual_seed(0)
    A = torch.randn(shape, dtype=torch.float64) * std
    ref = cayley(skew(A))  # float64: LAPACK
    R = cayley(skew(A.float()))
    assert R.dtype == torch.float32
    assert torch.allclose(R.double(), ref, atol=1e-6)
    assert orthogonality_error(R) <= 1e-5


def test_zero_blocks_are_exactly_identity():
    Q = skew(torch.randn(6, 8, 8) * 0.05)
    Q[2] = 0
    assert torch.equal(cayley(Q)[2], torch.eye(8))


def test_float32_cayley_gradient_matches_float64_reference():
    torch.manual_seed(0)
    A = (torch.randn(5, 8, 8) * 0.1).requires_grad_()
    A64 = A.detach().double().requires_grad_()
    G = torch.randn(5, 8, 8)
    (cayley(skew(A)) * G).sum().backward()
    I = torch.eye(8, dtype=torch.float64)
    Q = skew(A64)
    ((I + Q) @ torch.linalg.inv(I - Q) * G.double()).sum().backward()
    assert torch.allclose(A.grad.double(), A64.grad, atol=1e-5)
    Ad = torch.randn(3, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: cayley(skew(a)), (Ad,))


CONVS = {
    "linear": (None, (4, 7, 24), lambda W, x, b: F.linear(x, W, b), (32, 24)),
    "conv2d": (ConvSpec((2, 1), (1, 0), (1, 2), 1), (2, 6, 9, 9), None, (32, 6, 3, 3)),
    "conv1d": (ConvSpec((1,), (2,), (2,), 1), (3, 6, 11), None, (32, 6, 3)),
}


@pytest.mark.parametrize("kind", CONVS)
@pytest.mark.parametrize("bias", [False, True])
def test_rotated_weight_op_equals_autograd_through_the_merged_weight(kind, bias):
    """The output-gradient trick: same output, same dL/dx, dL/dblocks and dL/dbias as plain autograd."""
    torch.manual_seed(0)
    spec, xshape, _, wshape = CONVS[kind]
    W = torch.randn(wshape, dtype=torch.float64)
    b = torch.randn(32, dtype=torch.float64, requires_grad=True) if bias else None
    blocks = random_rotation((4, 8, 8), std=0.3).requires_grad_()
    x = torch.randn(xshape, dtype=torch.float64, requires_grad=True)

    def op(x, Wp, b):
        if spec is None:
            return F.linear(x, Wp, b)
        fn = (F.conv1d, F.conv2d)[len(spec.stride) - 1]
        return fn(x, Wp, b, spec.stride, spec.padding, spec.dilation, spec.groups)

    ref = op(x, rotate_weight(blocks, W), b)
    out = rotated_weight_op(x, blocks, W, b, spec)
    assert torch.allclose(out, ref, atol=1e-12)
    G = torch.randn(ref.shape, dtype=torch.float64)
    inputs = [x, blocks] + ([b] if bias else [])
    g_ref = torch.autograd.grad(ref, inputs, G)
    g_out = torch.autograd.grad(out, inputs, G)
    for a, r in zip(g_out, g_ref):
        assert torch.allclose(a, r, atol=1e-10)


def test_rotated_weight_op_refuses_a_trainable_base_weight():
    W = torch.randn(8, 4, requires_grad=True)
    with pytest.raises(ValueError, match="freeze the base weight"):
        rotated_weight_op(torch.randn(2, 4), torch.eye(4).expand(2, 4, 4), W, None)


LAYER_CASES = {
    "conv_oft_bias": (lambda: nn.Conv2d(8, 32, 3, padding=1, stride=2), (2, 8, 9, 9), AdapterConfig(block_size=8)),
    "conv_reflect_boft": (lambda: nn.Conv2d(8, 32, 3, padding=1, padding_mode="reflect"), (1, 8, 6, 6),
                          AdapterConfig(algo="boft", block_size=4, butterfly_factors=2)),
    "linear_boft_m3": (lambda: nn.Linear(16, 64), (3, 5, 16), AdapterConfig(algo="boft", block_size=4,
                                                                            butterfly_factors=3)),
    "linear_constrained": (lambda: nn.Linear(16, 32), (7, 16), AdapterConfig(block_size=8, constraint=1e-2)),
    "linear_rescale": (lambda: nn.Linear(16, 32), (7, 16), AdapterConfig(block_size=8, rescale=True)),
}


@pytest.mark.parametrize("multiplier", [1.0, 0.6])
@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_paths_agree_on_all_gradients(case, multiplier):
    """Weight path (output-gradient trick or its autograd fallback) and activation path: same gradients."""
    make, xshape, cfg = LAYER_CASES[case]
    torch.manual_seed(0)
    base = make()
    for p in base.parameters():
        p.requires_grad_(False)
    layer = wrap(base, cfg)
    with torch.no_grad():
        layer.oft_blocks.normal_(0, 0.1)
        if layer.rescale is not None:
            layer.rescale.normal_(1, 0.2)
    layer.multiplier = multiplier
    x = torch.randn(xshape)
    grads = {}
    for path in ("weight", "activation"):
        layer.path = path
        xg = x.clone().requires_grad_()
        out = layer(xg)
        assert layer.last_path == path
        params = layer.adapter_parameters()
        gs = torch.autograd.grad(out.sin().sum(), [xg, *params])
        grads[path] = (out.detach(), gs)
    (ow, gw), (oa, ga) = grads["weight"], grads["activation"]
    assert torch.allclose(ow, oa, atol=1e-5, rtol=1e-5)
    for a, b in zip(gw, ga):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)


def test_training_steps_keep_rotation_exact_with_the_previous_rotation_as_start():
    torch.manual_seed(0)
    layer = wrap(nn.Linear(64, 64), AdapterConfig(block_size=16))
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=3e-2)
    for _ in range(5):
        layer(torch.randn(4, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        R = layer.rotation()
        A = layer.oft_blocks.detach().double()
        assert torch.allclose(R.double(), cayley(skew(A)), atol=2e-6)


@pytest.mark.parametrize("path", ["weight", "activation"])
def test_autocast_backward_runs_on_both_paths(path):
    torch.manual_seed(0)
    base = nn.Conv2d(8, 16, 3, padding=1)
    base.requires_grad_(False)
    layer = wrap(base, AdapterConfig(block_size=8))
    layer.path = path
    with torch.no_grad():
        layer.oft_blocks.normal_(0, 0.1)
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    y.float().square().mean().backward()
    assert layer.oft_blocks.grad.dtype == torch.float32 and torch.isfinite(layer.oft_blocks.grad).all()
    assert x.grad.dtype == torch.float32


def test_butterfly_apply_is_still_the_staged_reference():
    R = random_rotation((3, 8, 4, 4))
    X = torch.randn(32, 3, dtype=torch.float64)
    assert torch.allclose(butterfly_apply(R, X), dense_butterfly(R) @ X, atol=1e-12)


@pytest.mark.parametrize("xshape,dim", [((5, 12), -1), ((2, 12, 3), 1)])
def test_fused_bias_matches_rotate_then_add(xshape, dim):
    from lycoft.ops.blockdiag import blockdiag_apply_bias

    R = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    X = torch.randn(xshape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    shape = [1] * len(xshape)
    shape[dim] = -1
    ref = blockdiag_apply(R, X, dim=dim) + bias.view(shape)
    assert torch.allclose(blockdiag_apply_bias(R, X, dim, False, bias), ref, atol=1e-12)
    assert torch.autograd.gradcheck(lambda R, X, b: blockdiag_apply_bias(R, X, dim, False, b), (R, X, bias))


@pytest.mark.parametrize("m,nb,b", [(1, 4, 2), (2, 4, 4), (3, 8, 2)])
def test_butterfly_blocks_gradient(m, nb, b):
    R = torch.randn(m, nb, b, b, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(butterfly_blocks, (R,))


def test_wide_butterfly_stays_staged_on_both_paths_and_under_autocast():
    torch.manual_seed(0)
    base = nn.Linear(32, 128)
    base.requires_grad_(False)
    layer = wrap(base, AdapterConfig(algo="boft", block_size=2))  # m = 7: chunk 128, applied stage by stage
    assert operator_blocks(layer.rotation()) is None
    with torch.no_grad():
        layer.oft_blocks.normal_(0, 0.1)
    x = torch.randn(3, 32)
    grads = []
    for path in ("weight", "activation"):
        layer.path = path
        layer.oft_blocks.grad = None
        layer(x).sin().sum().backward()
        grads.append(layer.oft_blocks.grad.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert layer(x).dtype == torch.bfloat16
    assert torch.allclose(grads[0], grads[1], atol=1e-5, rtol=1e-4)
