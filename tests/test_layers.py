"""The adapted layer: exact forward on both paths, identity at init, gradients only on adapter parameters."""

import pytest
import torch
from conftest import randomise
from torch import nn

from lycoft import AdapterConfig, wrap
from lycoft.layers import UnsupportedLayerError

LAYERS = {
    "linear": (lambda: nn.Linear(64, 32), (3, 5, 64)),
    "linear2d": (lambda: nn.Linear(32, 64, bias=False), (4, 32)),
    "conv2d_3x3_s2": (lambda: nn.Conv2d(16, 32, 3, padding=1, stride=2), (2, 16, 9, 9)),
    "conv2d_1x1": (lambda: nn.Conv2d(16, 32, 1), (2, 16, 5, 5)),
    "conv1d_dil": (lambda: nn.Conv1d(8, 32, 3, dilation=2), (2, 8, 20)),
    "conv2d_rect": (lambda: nn.Conv2d(8, 32, (3, 1), padding=(1, 0), padding_mode="reflect"), (1, 8, 6, 6)),
}
CONFIGS = {
    "oft": AdapterConfig(block_size=8),
    "oft_constrained": AdapterConfig(block_size=8, constraint=1e-3),
    "boft_m2": AdapterConfig(algo="boft", block_size=4, butterfly_factors=2),
    "boft_full": AdapterConfig(algo="boft", block_size=4),
    "oft_input_rescale": AdapterConfig(block_size=8, side="input", rescale=True),
    "boft_rescale": AdapterConfig(algo="boft", block_size=4, butterfly_factors=3, rescale=True),
}


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("layer_name", LAYERS)
def test_forward_equals_merged_weight_on_both_paths(layer_name, cfg_name):
    torch.manual_seed(0)
    make, xshape = LAYERS[layer_name]
    base = make()
    layer = randomise(wrap(base, CONFIGS[cfg_name]))
    x = torch.randn(xshape)
    ref = layer._run(x, layer.merged_weight(), base.bias)  # the layer evaluated with W', bias untouched
    for path in ("weight", "activation"):
        layer.path = path
        y = layer(x)
        assert rel(y, ref) <= 1e-5, (path, layer.last_path)


@pytest.mark.parametrize("cfg_name", CONFIGS)
def test_identity_at_init_and_multiplier_zero(cfg_name):
    torch.manual_seed(0)
    base = nn.Conv2d(16, 32, 3, padding=1)
    layer = wrap(base, CONFIGS[cfg_name])
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(layer.merged_weight(), base.weight)  # R == I exactly, not approximately
    layer.path = "weight"
    assert torch.equal(layer(x), base(x))
    layer.path = "activation"  # same math; only the bias is added after the conv instead of inside it
    assert rel(layer(x), base(x)) <= 1e-6
    randomise(layer)
    layer.multiplier = 0.0
    assert torch.equal(layer(x), base(x))


def test_merged_weight_keeps_row_norms_for_output_side():
    """OFT rotates: the norms between neurons are preserved (no rescale)."""
    base = nn.Linear(48, 32)
    layer = randomise(wrap(base, AdapterConfig(algo="boft", block_size=8)), std=0.3)
    Wp = layer.merged_weight().double()
    W = base.weight.double()
    assert torch.allclose(W.T @ W, Wp.T @ Wp, atol=1e-5)  # columns' Gram matrix kept: W' = M W, M orthogonal


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_is_sane_and_rotation_stays_fp32(dtype):
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    layer = randomise(wrap(base, AdapterConfig(block_size=16)))
    x = torch.randn(4, 10, 64)
    ref = layer._run(x, layer.merged_weight(), base.bias)
    assert layer.rotation().dtype == torch.float32
    for path in ("weight", "activation"):
        layer.path = path
        with torch.autocast("cpu", dtype=dtype):
            y = layer(x)
        assert y.dtype == dtype
        assert rel(y.float(), ref) < 3e-2


def test_only_adapter_parameters_get_gradients_and_base_is_untouched():
    torch.manual_seed(0)
    base = nn.Conv2d(8, 16, 3, padding=1)
    before = {k: v.clone() for k, v in base.state_dict().items()}
    for p in base.parameters():
        p.requires_grad_(False)
    layer = wrap(base, AdapterConfig(algo="boft", block_size=4, rescale=True, constraint=1e-2))
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=1e-2)
    for step in range(3):
        layer.path = ("weight", "activation", "auto")[step]
        loss = layer(torch.randn(2, 8, 6, 6)).pow(2).mean()
        loss.backward()
        assert layer.oft_blocks.grad is not None and layer.oft_blocks.grad.abs().sum() > 0
        assert all(p.grad is None for p in base.parameters())
        opt.step()
        opt.zero_grad()
    for k, v in base.state_dict().items():
        assert torch.equal(v, before[k])
    assert layer.oft_blocks.abs().sum() > 0


def test_paths_agree_on_gradients():
    torch.manual_seed(0)
    base = nn.Linear(32, 32)
    layer = randomise(wrap(base, AdapterConfig(algo="boft", block_size=4, butterfly_factors=2)))
    x = torch.randn(5, 32)
    grads = []
    for path in ("weight", "activation"):
        layer.path = path
        layer.oft_blocks.grad = None
        layer(x).sin().sum().backward()
        grads.append(layer.oft_blocks.grad.clone())
    assert rel(grads[0], grads[1]) < 1e-4


def test_module_dropout_replaces_blocks_by_identity_only_in_training():
    torch.manual_seed(0)
    layer = randomise(wrap(nn.Linear(32, 32), AdapterConfig(block_size=4, dropout=0.5)))
    layer.train()
    R = layer.rotation()
    eye = torch.eye(4)
    dropped = [bool(torch.equal(r, eye)) for r in R]
    assert any(dropped) and not all(dropped)
    layer.eval()
    assert not any(torch.equal(r, eye) for r in layer.rotation())


def test_auto_path_picks_the_cheaper_exact_path():
    torch.manual_seed(0)
    xattn = wrap(nn.Linear(768, 320), AdapterConfig(block_size=32))
    xattn(torch.randn(1, 77, 768))
    assert xattn.last_path == "activation"  # 77 tokens << 768 fan-in
    with torch.no_grad():
        big = wrap(nn.Linear(32, 32), AdapterConfig(block_size=8))
        big(torch.randn(1, 4096, 32))
        assert big.last_path == "weight"  # inference over many tokens: building W' once is cheaper


def test_bad_sizes_give_clear_errors():
    with pytest.raises(ValueError, match=r"block_size 48 does not divide 320 channels of to_q; use one of"):
        wrap(nn.Linear(320, 320), AdapterConfig(block_size=48), name="to_q")
    msg = r"butterfly_factors 5 is impossible on to_k: 320 channels in 40 blocks.*<= 4"
    with pytest.raises(ValueError, match=msg):
        wrap(nn.Linear(320, 320), AdapterConfig(algo="boft", block_size=8, butterfly_factors=5), name="to_k")
    with pytest.raises(ValueError, match="even block_size"):
        AdapterConfig(algo="boft", block_size=5)
    with pytest.raises(ValueError, match="not both"):
        AdapterConfig(block_size=4, block_num=4)
    with pytest.raises(ValueError, match="algo 'lora' is not known"):
        AdapterConfig(algo="lora")
    with pytest.raises(UnsupportedLayerError, match="grouped convolution"):
        wrap(nn.Conv2d(32, 32, 3, groups=4), AdapterConfig(block_size=8))
    with pytest.raises(UnsupportedLayerError, match="not supported"):
        wrap(nn.Embedding(10, 32), AdapterConfig(block_size=8))


def test_block_num_and_boft_default_factors():
    layer = wrap(nn.Linear(320, 320), AdapterConfig(block_num=4))
    assert tuple(layer.oft_blocks.shape) == (4, 80, 80)
    full = wrap(nn.Linear(64, 64), AdapterConfig(algo="boft", block_size=4))
    assert tuple(full.oft_blocks.shape) == (5, 16, 4, 4)  # full butterfly: 1 + log2(16)
    partial = wrap(nn.Linear(320, 320), AdapterConfig(algo="boft", block_size=8))
    assert tuple(partial.oft_blocks.shape) == (4, 40, 8, 8)  # largest m with 2^(m-1) | 40
