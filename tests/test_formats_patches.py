"""lycoft.formats.patches: one layer of any OFT layout, as the UI extensions apply it.

Properties: the patched weight is tools/merge.py's (`apply_spec`) for the LyCORIS family at every strength
(0 = the base exactly); PEFT layouts reproduce PEFT's own merge (`PeftModule.merged`, itself checked against
the real PEFT package in test_tools_convert.py) at strength 1; the activation path equals the layer run with
the patched weight and its own bias, in float32 and within rounding in half precision.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lycoft.formats.lycoris import ModuleSpec
from lycoft.formats.patches import layer_parts, layer_prefixes, read_layer
from lycoft.formats.peft import PeftModule
from lycoft.io import AdapterFileError
from lycoft.merge import apply_spec

STRENGTHS = (0.5, 1.0, 1.5, -1.0, 0.0)


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


def _weights(g):
    return {"linear": torch.randn(32, 16, generator=g), "conv": torch.randn(32, 8, 3, 3, generator=g)}


def _run(W, b, x):
    return F.linear(x, W, b) if W.dim() == 2 else F.conv2d(x, W, b, padding=1)


def _input(W, g, dtype=torch.float32):
    shape = (5, W.shape[1]) if W.dim() == 2 else (2, W.shape[1], 6, 6)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.mark.parametrize("rescale", [False, True])
@pytest.mark.parametrize("algo", ["oft", "boft"])
def test_lycoris_layer_is_tools_merge_at_every_strength(algo, rescale):
    g = torch.Generator().manual_seed(0)
    A = torch.randn((4, 8, 8) if algo == "oft" else (3, 4, 8, 8), generator=g) * 0.1
    parts = {"oft_blocks": A, "alpha": torch.tensor(5e-3)}
    if rescale:
        parts["rescale"] = 1 + 0.1 * torch.randn(32, 1, generator=g)
    patch = read_layer("lora_unet_x", parts)
    spec = ModuleSpec("lora_unet_x", algo, A, 5e-3, parts.get("rescale"), "output", "lycoris")
    for name, W in _weights(g).items():
        for m in STRENGTHS:
            got = patch.merged(W, m)
            if m == 0:
                assert torch.equal(got, W), name
            else:
                assert rel(got, apply_spec(W, spec, m)) <= 1e-6, (name, m)
            b = torch.randn(32, generator=g)
            x = _input(W, g)
            y = patch.forward(lambda t, W=W, b=b: _run(W, b, t), x, m, channel_dim=-1 if W.dim() == 2 else 1, bias=b)
            assert rel(y, _run(got, b, x)) <= 1e-5, (name, m)


@pytest.mark.parametrize("config", [{"use_cayley_neumann": False}, {"use_cayley_neumann": True},
                                    {"use_cayley_neumann": True, "num_cayley_neumann_terms": 3}])
def test_peft_oft_reads_the_parametrisation_the_file_records(config):
    g = torch.Generator().manual_seed(1)
    vec = torch.randn(4, 6, generator=g) * 0.2  # 4 blocks of 4x4
    md = {"lora_adapter_metadata": json.dumps({"peft_type": "OFT", **config})}
    patch = read_layer("down_blocks.0.attentions.0.proj_in", {"oft_R.weight": vec}, md)
    assert not patch.reading.assumed
    peft = PeftModule("unet", "x", "oft", {"oft_R.weight": vec}, config)
    W = torch.randn(32, 16, generator=g)
    assert rel(patch.merged(W, 1.0), peft.merged(W)) <= 1e-6
    x, b = _input(W, g), torch.randn(32, generator=g)
    for m in (0.5, 1.0, -1.0):
        assert rel(patch.forward(lambda t: F.linear(t, W, b), x, m, channel_dim=-1, bias=b),
                   F.linear(x, patch.merged(W, m), b)) <= 1e-5


def test_parametrisation_from_lycoft_and_kohya_metadata_and_the_default():
    vec = torch.zeros(2, 6)
    assert read_layer("k", {"oft_R.weight": vec}, {"lycoft.side": "input", "lycoft.cayley": "exact"}
                      ).reading.neumann_terms == 0
    assert read_layer("lora_unet_k", {"oft_R.weight": vec}, {"ss_network_module": "networks.oft_v2"}
                      ).reading.neumann_terms == 5
    default = read_layer("k", {"oft_R.weight": vec}, {})
    assert default.reading.neumann_terms == 5 and default.reading.assumed


@pytest.mark.parametrize("factors", [1, 2])
def test_peft_boft_is_peft_merge_and_scale_spares_the_bias(factors):
    g = torch.Generator().manual_seed(2)
    A = torch.randn(factors, 4, 4, 4, generator=g) * 0.2
    s = 1 + 0.1 * torch.randn(32, 1, generator=g)
    patch = read_layer("x", {"boft_R": A, "boft_s": s})
    W = torch.randn(32, 16, generator=g)
    assert rel(patch.merged(W, 1.0), PeftModule("unet", "x", "boft", {"boft_R": A, "boft_s": s}, {}).merged(W)) <= 1e-6
    assert patch.on_activations(1) == (factors == 1)
    if factors == 1:
        x, b = _input(W, g), torch.randn(32, generator=g)
        for m in (0.5, 1.0, -1.0):
            assert rel(patch.forward(lambda t: F.linear(t, W, b), x, m, channel_dim=-1, bias=b),
                       F.linear(x, patch.merged(W, m), b)) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_activations_are_rotated_in_float32(dtype):
    """A half-precision layer output keeps only its own rounding: the rotated output is within two roundings
    of the float32 result of the same half-precision inputs."""
    g = torch.Generator().manual_seed(3)
    patch = read_layer("k", {"oft_blocks": torch.randn(8, 4, 4, generator=g) * 0.1,
                             "rescale": 1 + 0.1 * torch.randn(32, 1, generator=g)})
    W, b = torch.randn(32, 16, generator=g).to(dtype), (10 * torch.randn(32, generator=g)).to(dtype)
    x = _input(W, g, dtype)
    y = patch.forward(lambda t: F.linear(t, W, b), x, 0.5, channel_dim=-1, bias=b)
    assert y.dtype == dtype
    ref = F.linear(x.float(), patch.merged(W.float(), 0.5), b.float())
    base_err = rel(F.linear(x, W, b).float(), F.linear(x.float(), W.float(), b.float()))
    assert rel(y.float(), ref) <= 2 * base_err + 2 * rel(ref.to(dtype).float(), ref)


def test_prefixes_and_parts_of_a_file():
    tensors = {"a.oft_blocks": torch.zeros(2, 2, 2), "a.alpha": torch.tensor(0.0), "b.oft_R.weight": torch.zeros(1, 1),
               "c.boft_R": torch.zeros(1, 1, 2, 2), "c.boft_s": torch.ones(2, 1), "d.lora_up.weight": torch.zeros(1)}
    assert layer_prefixes(tensors) == {"a", "b", "c"}
    assert set(layer_parts(tensors, "a")) == {"oft_blocks", "alpha"}
    assert read_layer("d", {"lora_up.weight": torch.zeros(1)}) is None


@pytest.mark.parametrize("parts, words", [
    ({"oft_blocks": torch.full((2, 2, 2), float("nan"))}, "NaN"),
    ({"oft_R.weight": torch.zeros(2, 5)}, "entries per block"),
    ({"boft_R": torch.zeros(1, 2, 2, 2)}, "boft_s"),
])
def test_damaged_layers_are_refused_naming_file_and_key(parts, words):
    with pytest.raises(AdapterFileError, match=words) as e:
        read_layer("lora_unet_x", parts, path="a.safetensors")
    assert "a.safetensors" in str(e.value) and "lora_unet_x" in str(e.value)
