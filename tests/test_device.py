"""The numeric contract on every device: CPU always, CUDA where there is one (skipped without it).

On CPU these check the paths CI runs. On a GPU they check what differs there: the Cayley inverse is a
batched LU instead of the CPU's product, the products are cuBLAS/cuDNN kernels, autocast lowers to bf16 on
the device, and files are written from GPU tensors. TF32 is switched off for the float32 comparisons (it
would round inputs to 10 mantissa bits and say nothing about lycoft).
"""

import copy

import pytest
import torch
from conftest import randomise, randomise_network
from torch import nn

import lycoft
from lycoft import AdapterConfig, wrap
from lycoft.ops.cayley import cayley_of_raw, orthogonality_error

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]
CONFIGS = {
    "oft": AdapterConfig(block_size=8),
    "boft_m2": AdapterConfig(algo="boft", block_size=4, butterfly_factors=2),
    "oft_rescale_constrained": AdapterConfig(block_size=8, rescale=True, constraint=0.5),
}
LAYERS = {
    "linear": (lambda: nn.Linear(48, 32), (3, 7, 48)),
    "conv": (lambda: nn.Conv2d(16, 32, 3, padding=1), (2, 16, 6, 6)),
}


@pytest.fixture
def no_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def rel(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(10, 32, 32), (160, 8, 8), (2, 12, 4, 4)], ids=["oft32", "oft8", "boft"])
def test_cayley_and_its_gradient_match_float64(device, shape, no_tf32):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(shape, generator=g, dtype=torch.float64) * 0.1
    G = torch.randn(shape, generator=g, dtype=torch.float64)
    A64 = A.clone().requires_grad_(True)
    R64 = cayley_of_raw(A64)
    (R64 * G).sum().backward()
    A32 = A.float().to(device).requires_grad_(True)
    R32 = cayley_of_raw(A32)
    (R32 * G.float().to(device)).sum().backward()
    assert R32.device.type == device and R32.dtype == torch.float32
    assert float((R32.detach().cpu().double() - R64.detach()).abs().max()) <= 1e-6
    assert orthogonality_error(R32) <= 1e-5
    assert rel(A32.grad, A64.grad) <= 1e-5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg_name", CONFIGS)
@pytest.mark.parametrize("kind", LAYERS)
def test_layer_forward_and_gradients_match_float64_on_both_paths(device, cfg_name, kind, no_tf32):
    torch.manual_seed(0)
    make, xshape = LAYERS[kind]
    base = make().requires_grad_(False)
    ref = randomise(wrap(copy.deepcopy(base), CONFIGS[cfg_name])).double()
    x64 = torch.randn(xshape, dtype=torch.float64, requires_grad=True)
    g64 = torch.randn_like(ref(x64))
    ref(x64).backward(g64)
    layer = randomise(wrap(base.to(device), CONFIGS[cfg_name]))
    assert layer.oft_blocks.device.type == device
    for path in ("weight", "activation"):
        layer.path = path
        layer.oft_blocks.grad = None
        x = x64.detach().float().to(device).requires_grad_(True)
        y = layer(x)
        y.backward(g64.float().to(device))
        assert y.device.type == device and layer.last_path == path
        assert rel(y, ref(x64)) <= 1e-5, path
        assert rel(layer.oft_blocks.grad, ref.oft_blocks.grad) <= 1e-4, path
        assert rel(x.grad, x64.grad) <= 1e-5, path
        with torch.no_grad():  # merge == forward on the device
            assert rel(layer._run(x, layer.merged_weight(), layer.base.bias), y) <= 1e-5, path


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_keeps_the_rotation_in_float32(device):
    torch.manual_seed(0)
    layer = randomise(wrap(nn.Linear(64, 64).to(device), AdapterConfig(block_size=16)))
    x = torch.randn(4, 10, 64, device=device)
    with torch.no_grad():
        ref = layer._run(x, layer.merged_weight(), layer.base.bias)
    for path in ("weight", "activation"):
        layer.path = path
        with torch.autocast(device, dtype=torch.bfloat16):
            assert layer.rotation().dtype == torch.float32
            y = layer(x)
        assert y.dtype == torch.bfloat16
        assert rel(y.float(), ref) < 3e-2, path


@pytest.mark.parametrize("device", DEVICES)
def test_network_trains_and_saves_on_the_device_and_loads_on_cpu(device, tiny_pipes, tmp_path, no_tf32):
    pipe = tiny_pipes("sd1")
    cpu_pipe = copy.deepcopy(pipe)
    for m in (pipe.unet, pipe.text_encoder):
        m.requires_grad_(False).to(device)
    net = randomise_network(lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4)), std=0.05)
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g).to(device)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g).to(device)
    t = torch.tensor([10, 500], device=device)
    for _ in range(2):
        loss = pipe.unet(x, t, ctx).sample.pow(2).mean()
        loss.backward()
        grads = [p.grad for _, layer in net.items("unet") for p in layer.adapter_parameters()]
        assert grads and all(gr is not None and gr.device.type == device and torch.isfinite(gr).all() for gr in grads)
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        adapted = pipe.unet(x, t, ctx).sample
    net.save(str(tmp_path / "a.safetensors"))

    cpu_net = lycoft.inject(pipe=cpu_pipe, config=AdapterConfig(block_size=4))
    assert cpu_net.load_file(str(tmp_path / "a.safetensors")) == []
    with torch.no_grad():
        on_cpu = cpu_pipe.unet(x.cpu(), t.cpu(), ctx.cpu()).sample
    assert rel(on_cpu, adapted) <= 1e-4
    net.merge()  # baked on the device: the same function
    with torch.no_grad():
        assert rel(pipe.unet(x, t, ctx).sample, adapted) <= 1e-4
