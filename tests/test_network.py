"""Network injection into real (tiny, random) diffusers/transformers models: targets, key names,
runtime multiplier, merge == forward, remove, gradients."""

import pytest
import torch
from conftest import randomise_network
from torch import nn

import lycoft
from lycoft import AdapterConfig


def unet_inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    kw = {}
    if unet.config.addition_embed_type == "text_time":
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, pooled, generator=g),
                                   "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2, dtype=torch.float32)}
    return (x, torch.tensor([10, 500]), ctx), kw


def run_unet(pipe, seed=0):
    args, kw = unet_inputs(pipe, seed)
    with torch.no_grad():
        return pipe.unet(*args, **kw).sample


def run_te(pipe, attr="text_encoder"):
    ids = torch.tensor([[49406, 320, 1125, 539, 49407] + [49407] * 10])
    ids = ids.clamp(max=getattr(pipe, attr).config.vocab_size - 1)
    with torch.no_grad():
        return getattr(pipe, attr)(ids)[0]


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


# Whole-model tolerance: per layer the forward equals the merged weight to ~1e-7 (tests/test_layers.py);
# through ~280 adapted layers, norms and attention float32 rounding accumulates to ~1e-5.
MODEL_TOL = 1e-4


# -- key names -------------------------------------------------------------------------------------------
SD1_EXPECTED = [
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2",
    "lora_unet_down_blocks_0_resnets_0_conv1",
    "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
    "lora_unet_down_blocks_2_resnets_0_conv_shortcut",
    "lora_unet_down_blocks_0_downsamplers_0_conv",
    "lora_unet_mid_block_attentions_0_proj_out",
    "lora_unet_mid_block_resnets_1_conv2",
    "lora_unet_up_blocks_1_attentions_2_transformer_blocks_0_attn2_to_v",
    "lora_unet_up_blocks_0_upsamplers_0_conv",
    "lora_unet_conv_in",
    "lora_unet_conv_out",
    "lora_unet_time_embedding_linear_1",
    "lora_unet_time_embedding_linear_2",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te_text_model_encoder_layers_1_self_attn_out_proj",
    "lora_te_text_model_encoder_layers_1_mlp_fc1",
    "lora_te_text_model_encoder_layers_1_mlp_fc2",
]
SDXL_EXPECTED = [
    "lora_unet_input_blocks_0_0",  # conv_in
    "lora_unet_input_blocks_1_0_in_layers_2",
    "lora_unet_input_blocks_1_0_emb_layers_1",
    "lora_unet_input_blocks_1_0_out_layers_3",
    "lora_unet_input_blocks_3_0_op",
    "lora_unet_input_blocks_4_0_skip_connection",
    "lora_unet_input_blocks_4_1_proj_in",
    "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
    "lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_out_0",
    "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
    "lora_unet_middle_block_2_out_layers_3",
    "lora_unet_output_blocks_2_2_conv",
    "lora_unet_output_blocks_5_2_conv",
    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_k",
    "lora_unet_out_2",  # conv_out
    "lora_unet_time_embed_0",
    "lora_unet_time_embed_2",
    "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    "lora_te2_text_model_encoder_layers_1_mlp_fc2",
]


@pytest.mark.parametrize("family,expected", [("sd1", SD1_EXPECTED), ("sd2", SD1_EXPECTED),
                                             ("sdxl", SDXL_EXPECTED)])
def test_key_names_follow_the_conventions(tiny_pipes, family, expected):
    pipe = tiny_pipes(family)
    net = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4))
    keys = set(net.adapters)
    missing = [k for k in expected if k not in keys]
    assert not missing, missing
    # no transformers-5 flattened names, no diffusers names for SDXL, no duplicates
    assert not any(k.startswith(("lora_te_encoder", "lora_te1_encoder", "lora_te2_encoder")) for k in keys)
    if family == "sdxl":
        assert not any("down_blocks" in k or "up_blocks" in k for k in keys)


def test_full_preset_covers_exactly_the_lycoris_module_kinds(tiny_pipes):
    """docs/spec.md, "LyCORIS": the LyCORIS `full` module list on an SD1.5-style model."""
    pipe = tiny_pipes("sd1")
    net = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4), preset="full")
    kinds = set()
    for key in net.adapters:
        for suffix in ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out_0", "ff_net_0_proj", "ff_net_2",
                       "conv1", "conv2", "conv_shortcut", "time_emb_proj", "downsamplers_0_conv",
                       "upsamplers_0_conv", "conv_in", "conv_out", "time_embedding_linear_1",
                       "time_embedding_linear_2", "q_proj", "k_proj", "v_proj", "out_proj", "mlp_fc1", "mlp_fc2"):
            if key.endswith(suffix):
                kinds.add(suffix)
                break
        else:
            raise AssertionError(f"unexpected target {key}")
    assert len(kinds) == 24
    # every Linear/Conv inside the UNet except the VAE-free norms and the add-embedding is adapted
    n_layers = sum(isinstance(m, (nn.Linear, nn.Conv2d)) for m in pipe.unet.modules())
    assert len([k for k in net.adapters if k.startswith("lora_unet_")]) == n_layers


def test_presets_and_regex_and_overrides(tiny_pipes):
    pipe = tiny_pipes("sd1")
    attn = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4), preset="attn-only")
    assert all(k.endswith(("to_q", "to_k", "to_v", "to_out_0", "q_proj", "k_proj", "v_proj", "out_proj"))
               for k in attn.adapters)
    attn.remove()
    net = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4), preset="attn-mlp",
                        exclude=r"attn2", include=r"conv_in$", overrides={r"ff_net": {"block_size": 8}})
    assert "lora_unet_conv_in" in net.adapters
    assert not any("attn2" in k for k in net.adapters)
    ff = net.adapters["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2"]
    assert ff.layout.block_size == 8
    net.remove()
    conv = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4), conv_block_size=8)
    assert conv.adapters["lora_unet_down_blocks_0_resnets_0_conv1"].layout.block_size == 8
    assert conv.adapters["lora_unet_down_blocks_0_attentions_0_proj_in"].layout.block_size == 4


def test_layers_that_cannot_take_the_size_are_skipped_with_one_line(tiny_pipes, caplog):
    pipe = tiny_pipes("sd1")
    with caplog.at_level("WARNING", logger="lycoft"):
        net = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=64))  # only 64-channel layers fit
    assert net.skipped and all("block_size 64 does not divide" in r for _, r in net.skipped)
    assert len([r for r in caplog.records if "skipped" in r.getMessage()]) == 1
    assert "lora_unet_conv_out" in caplog.records[-1].getMessage() or len(net.skipped) > 8
    with pytest.raises(ValueError, match="no layer matched"):
        lycoft.inject(pipe=tiny_pipes("sd1"), config=AdapterConfig(block_size=4), preset="attn-only",
                      exclude=".*")
    with pytest.raises(ValueError, match="preset 'everything' is not known"):
        lycoft.inject(pipe=pipe, preset="everything")


# -- behaviour -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("cfg", [AdapterConfig(block_size=4), AdapterConfig(algo="boft", block_size=4,
                                                                             butterfly_factors=2)],
                         ids=["oft", "boft"])
def test_identity_multiplier_merge_remove(tiny_pipes, family, cfg):
    pipe = tiny_pipes(family)
    base_u, base_t = run_unet(pipe), run_te(pipe)
    net = lycoft.inject(pipe=pipe, config=cfg)
    assert rel(run_unet(pipe), base_u) <= MODEL_TOL  # identity at init
    randomise_network(net, std=0.05)
    adapted_u, adapted_t = run_unet(pipe), run_te(pipe)
    assert rel(adapted_u, base_u) > 1e-3 and rel(adapted_t, base_t) > 1e-3
    net.set_multiplier(0.0)
    assert torch.equal(run_unet(pipe), base_u)
    net.set_multiplier(1.0)
    assert torch.equal(run_unet(pipe), adapted_u)
    net.remove()
    assert torch.equal(run_unet(pipe), base_u) and torch.equal(run_te(pipe), base_t)
    net.apply()
    net.merge()  # merge == forward: the baked model computes what the adapted one did
    assert not net.applied
    assert rel(run_unet(pipe), adapted_u) <= MODEL_TOL
    assert rel(run_te(pipe), adapted_t) <= MODEL_TOL


def test_only_adapter_parameters_train_and_base_is_bit_identical(tiny_pipes):
    pipe = tiny_pipes("sd1")
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    before_te = {k: v.clone() for k, v in pipe.text_encoder.state_dict().items()}
    pipe.unet.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    net = lycoft.inject(pipe=pipe, config=AdapterConfig(algo="boft", block_size=4, constraint=1e-3))
    opt = torch.optim.AdamW(net.trainable_parameters(), lr=1e-2)
    args, kw = unet_inputs(pipe)
    for _ in range(3):
        loss = pipe.unet(*args, **kw).sample.pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert all(p.grad is None for p in pipe.unet.parameters())
    moved = [k for k, layer in net.adapters.items() if layer.oft_blocks.abs().sum() > 0]
    assert len(moved) > len(net.adapters) // 2
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in pipe.text_encoder.state_dict().items():
        assert torch.equal(v, before_te[k]), k
    # the constraint holds on every module: ||Q|| <= constraint * dim
    for layer in net.adapters.values():
        assert float(torch.linalg.vector_norm(layer.skew_blocks().detach())) <= 1e-3 * layer.layout.dim * (1 + 1e-5)


def test_state_dict_of_the_model_is_unchanged_by_injection(tiny_pipes):
    pipe = tiny_pipes("sd1")
    keys = list(pipe.unet.state_dict())
    lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4))
    assert list(pipe.unet.state_dict()) == keys


def test_a_second_network_on_the_same_layers_is_refused_until_the_first_is_merged(tiny_pipes):
    pipe = tiny_pipes("sd1")
    first = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4), preset="attn-only")
    with pytest.raises(ValueError, match="already carries an adapter from another network"):
        lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4), preset="attn-only")
    first.merge()
    second = lycoft.inject(pipe=pipe, config=AdapterConfig(block_size=4), preset="attn-only")
    assert second.applied
