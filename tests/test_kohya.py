"""`--network_module lycoft.kohya`: the calls sd-scripts' train_network.py makes, in its order, on real
(tiny) models; files written through save_weights load back in lycoft and in create_network_from_weights."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lycoft
from lycoft import kohya


def train_like_kohya(net, te, unet, steps=2):
    """The sequence of train_network.py (commit 48d368fa) with a toy loss."""
    net.apply_to(te, unet, True, True)
    groups, descriptions = net.prepare_optimizer_params_with_multiple_te_lrs(None, 1e-3, 1e-2)
    net.prepare_grad_etc(te, unet)
    opt = torch.optim.AdamW(groups)
    for _epoch in range(1):
        net.on_epoch_start(te, unet)
        for _ in range(steps):
            net.on_step_start(te, unet)
            x = torch.randn(1, 4, 8, 8)
            ctx = torch.randn(1, 77, unet.config.cross_attention_dim)
            loss = unet(x, torch.tensor([3]), ctx).sample.pow(2).mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(net.get_trainable_params(), 1.0)
            opt.step()
            opt.zero_grad()
    return groups, descriptions


def test_create_apply_train_save_reload(tmp_path, tiny_pipes):
    pipe = tiny_pipes("sd1")
    te, unet = pipe.text_encoder, pipe.unet
    unet.requires_grad_(False)
    te.requires_grad_(False)
    net = kohya.create_network(1.0, 8, 1.0, None, te, unet, neuron_dropout=None,
                               algo="boft", block_size="4", constraint="1e-2", preset="attn-mlp")
    assert isinstance(net, nn.Module)
    groups, descriptions = train_like_kohya(net, te, unet)
    assert sorted(descriptions) == ["textencoder 1", "unet"]
    assert {g["lr"] for g in groups} == {1e-3, 1e-2}  # unet_lr for the UNet, default for the TE
    assert all(layer.layout.block_size == 4 and layer.is_boft for layer in net.adapters.values())
    path = str(tmp_path / "kohya.safetensors")
    meta = {"ss_network_module": "lycoft.kohya", "ss_network_args": json.dumps({"algo": "boft"}),
            "ss_output_name": "kohya"}
    net.save_weights(path, torch.float16, meta)
    sd = load_file(path)
    assert all(v.dtype == torch.float16 for k, v in sd.items() if k.endswith("oft_blocks"))
    net2, weights = kohya.create_network_from_weights(1.0, path, None, te, unet)
    assert set(net2.adapters) == set(net.adapters) and weights.keys() == sd.keys()
    for key, layer in net2.adapters.items():  # fp16 file: rotation equal to fp16 rounding of the blocks
        a, b = layer.merged_weight(), net.adapters[key].merged_weight()
        assert float((a - b).abs().max() / b.abs().max()) < 5e-3
    net.remove()
    loaded = lycoft.load(path, pipe=pipe)  # the same file through the public loader
    assert set(loaded.adapters) == set(net.adapters)


def test_network_dim_is_block_size_and_block_num_is_available(tiny_pipes):
    pipe = tiny_pipes("sd1")
    net = kohya.create_network(1.0, 8, None, None, pipe.text_encoder, pipe.unet, preset="attn-only")
    assert {layer.layout.block_size for layer in net.adapters.values()} == {8}
    legacy = kohya.create_network(1.0, None, None, None, pipe.text_encoder, pipe.unet, block_num="4",
                                  preset="attn-only")
    assert {layer.layout.block_num for layer in legacy.adapters.values()} == {4}


def test_unet_only_training_drops_text_encoder_adapters(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    tes = [pipe.text_encoder, pipe.text_encoder_2]
    net = kohya.create_network(1.0, 4, 1.0, None, tes, pipe.unet)
    assert any(k.startswith("lora_te2_") for k in net.adapters)
    net.apply_to(tes, pipe.unet, apply_text_encoder=False, apply_unet=True)
    assert all(k.startswith("lora_unet_") for k in net.adapters)
    groups = net.prepare_optimizer_params(None, 1e-4)
    assert len(groups) == 1 and groups[0]["lr"] == 1e-4


def test_sdxl_text_encoders_get_te1_te2_prefixes_and_separate_lrs(tiny_pipes):
    pipe = tiny_pipes("sdxl")
    tes = [pipe.text_encoder, pipe.text_encoder_2]
    net = kohya.create_network(1.0, 4, 1.0, None, tes, pipe.unet, preset="attn-only")
    net.apply_to(tes, pipe.unet)
    groups, desc = net.prepare_optimizer_params_with_multiple_te_lrs([1e-5, 2e-5], 1e-4, 1e-3)
    lrs = dict(zip(desc, [g["lr"] for g in groups]))
    assert lrs == {"textencoder 1": 1e-5, "textencoder 2": 2e-5, "unet": 1e-4}


class LdmNamedUNet(nn.Module):
    """A module tree with LDM names, as sd-scripts' own SDXL UNet has (its classes are not diffusers')."""

    def __init__(self):
        super().__init__()
        block = nn.Module()
        block.transformer_blocks = nn.ModuleList([nn.Module()])
        block.transformer_blocks[0].attn1 = nn.Module()
        block.transformer_blocks[0].attn1.to_q = nn.Linear(8, 8)
        res = nn.Module()
        res.in_layers = nn.Sequential(nn.GroupNorm(4, 8), nn.SiLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.input_blocks = nn.ModuleList([nn.Sequential(res, block)])


def test_ldm_named_unet_keeps_its_names():
    net = kohya.create_network(1.0, 4, None, None, None, LdmNamedUNet())
    assert set(net.adapters) == {"lora_unet_input_blocks_0_1_transformer_blocks_0_attn1_to_q",
                                 "lora_unet_input_blocks_0_0_in_layers_2"}


def test_merge_to_and_backup_restore(tmp_path, tiny_pipes):
    pipe = tiny_pipes("sd1")
    net = kohya.create_network(1.0, 4, None, None, pipe.text_encoder, pipe.unet, preset="attn-only")
    net.apply_to(pipe.text_encoder, pipe.unet)
    with torch.no_grad():
        for layer in net.adapters.values():
            layer.oft_blocks.normal_(0, 0.05)
    path = str(tmp_path / "a.safetensors")
    net.save_weights(path, None, {})
    expected = {k: layer.merged_weight().detach().clone() for k, layer in net.adapters.items()}
    originals = {k: layer.base.weight.detach().clone() for k, layer in net.adapters.items()}
    net.remove()
    inf, sd = kohya.create_network_from_weights(1.0, path, None, pipe.text_encoder, pipe.unet, for_inference=True)
    assert inf.is_mergeable()
    inf.backup_weights()
    inf.merge_to(pipe.text_encoder, pipe.unet, sd, torch.float32, "cpu")
    for k, layer in inf.adapters.items():
        assert torch.allclose(layer.base.weight, expected[k], atol=1e-6)
    inf.restore_weights()
    for k, layer in inf.adapters.items():
        assert torch.equal(layer.base.weight, originals[k])


def test_unknown_and_bad_network_args_are_clear_errors(tiny_pipes):
    pipe = tiny_pipes("sd1")
    with pytest.raises(ValueError, match=r"unknown network_args key 'blocksize'; did you mean 'block_size'"):
        kohya.create_network(1.0, 4, None, None, pipe.text_encoder, pipe.unet, blocksize="8")
    with pytest.raises(ValueError, match="network_args butterfly_factors must be an integer, got 'two'"):
        kohya.create_network(1.0, 4, None, None, pipe.text_encoder, pipe.unet, algo="boft", butterfly_factors="two")
    with pytest.raises(ValueError, match="network_args rescale must be true or false, got 'maybe'"):
        kohya.create_network(1.0, 4, None, None, pipe.text_encoder, pipe.unet, rescale="maybe")


def test_kohya_module_imports_without_diffusers_transformers_or_accelerate():
    """sd-scripts pins its own diffusers/transformers/accelerate: the entry point must not need them."""
    code = ("import sys\n"
            "for name in ('diffusers', 'transformers', 'accelerate'):\n"
            "    sys.modules[name] = None  # any import of them now fails\n"
            "import lycoft.kohya\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
