"""The diffusers <-> LDM name maps: documented examples, completeness, inverses, and agreement with
diffusers' own LDM -> diffusers converters (an independent oracle) on the real SD1.5 / SD2.1 / SDXL
layouts (built on the meta device: no memory) and on the tiny models (real tensors)."""

from __future__ import annotations

import functools

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from lycoft.checkpoints import (
    FAMILY_INFO,
    UNET_PREFIX,
    VAE_PREFIX,
    ModuleTarget,
    UNetLayout,
    build_tiny_pipeline,
    clip_state_dict_to_ldm,
    ldm_key_to_modules,
    load_component_config,
    open_clip_state_dict_to_ldm,
    pipeline_to_ldm_state_dict,
    text_encoder_module_path,
    unet_ldm_module_path_to_diffusers,
    unet_module_path_to_ldm,
    unet_state_dict_to_ldm,
    vae_state_dict_to_ldm,
)

REAL = ("sd15", "sd21", "sdxl-base-1.0")


@functools.cache
def meta_unet(name: str) -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel.from_config(load_component_config(name, "unet"))


@functools.cache
def tiny(family: str):
    return build_tiny_pipeline(family, seed=1)


def modules_with_params(model: torch.nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if any(True for _ in m.parameters(recurse=False))]


# Examples from ComfyUI's SD1.5 table (comfy/utils.py, unet_to_diffusers) and the LDM layouts of the
# original checkpoints (docs/spec.md, "Key names"); module paths (no parameter suffix).
SD15_EXAMPLES = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "down_blocks.0.attentions.0.proj_in": "input_blocks.1.1.proj_in",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    ),
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.resnets.0.norm1": "input_blocks.1.0.in_layers.0",
    "down_blocks.0.resnets.0.time_emb_proj": "input_blocks.1.0.emb_layers.1",
    "down_blocks.0.resnets.1.conv2": "input_blocks.2.0.out_layers.3",
    "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.2.downsamplers.0.conv": "input_blocks.9.0.op",
    "down_blocks.3.resnets.1.conv1": "input_blocks.11.0.in_layers.2",
    "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": (
        "middle_block.1.transformer_blocks.0.attn2.to_k"
    ),
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.resnets.2.conv_shortcut": "output_blocks.2.0.skip_connection",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.1.conv",
    "up_blocks.1.attentions.2.proj_out": "output_blocks.5.1.proj_out",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.2.upsamplers.0.conv": "output_blocks.8.2.conv",
    "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj": (
        "output_blocks.11.1.transformer_blocks.0.ff.net.0.proj"
    ),
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
SDXL_EXAMPLES = {
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "down_blocks.0.resnets.0.conv1": "input_blocks.1.0.in_layers.2",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.attentions.1.transformer_blocks.1.attn2.to_k": (
        "input_blocks.5.1.transformer_blocks.1.attn2.to_k"
    ),
    "down_blocks.2.attentions.1.transformer_blocks.9.ff.net.2": (
        "input_blocks.8.1.transformer_blocks.9.ff.net.2"
    ),
    "mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0": (
        "middle_block.1.transformer_blocks.9.attn1.to_out.0"
    ),
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
    "up_blocks.1.attentions.2.proj_in": "output_blocks.5.1.proj_in",
    "up_blocks.2.resnets.2.conv1": "output_blocks.8.0.in_layers.2",
    "conv_out": "out.2",
}


@pytest.mark.parametrize("name, examples", [("sd15", SD15_EXAMPLES), ("sdxl-base-1.0", SDXL_EXAMPLES)])
def test_documented_examples_map_and_exist(name, examples):
    unet = meta_unet(name)
    layout = UNetLayout.from_config(unet.config)
    modules = dict(unet.named_modules())
    ldm_keys = set(unet_state_dict_to_ldm(unet.state_dict(), layout))
    for diffusers_path, ldm_path in examples.items():
        assert diffusers_path in modules, f"example {diffusers_path} is not a module of the real {name} UNet"
        assert unet_module_path_to_ldm(diffusers_path, layout) == ldm_path
        assert unet_ldm_module_path_to_diffusers(ldm_path, layout) == diffusers_path
        assert f"{ldm_path}.weight" in ldm_keys


@pytest.mark.parametrize("name", REAL)
def test_every_parameter_module_maps_into_the_ldm_state_dict(name):
    unet = meta_unet(name)
    layout = UNetLayout.from_config(unet.config)
    ldm_keys = set(unet_state_dict_to_ldm(unet.state_dict(), layout))
    covered = set()
    for path in modules_with_params(unet):
        ldm = unet_module_path_to_ldm(path, layout)
        for pname, _ in unet.get_submodule(path).named_parameters(recurse=False):
            assert f"{ldm}.{pname}" in ldm_keys, (path, ldm, pname)
            covered.add(f"{ldm}.{pname}")
    assert covered == ldm_keys  # the module map and the state-dict converter agree one to one


@pytest.mark.parametrize("name, n_keys", [("sd15", 686), ("sd21", 686), ("sdxl-base-1.0", 1680)])
def test_diffusers_converter_inverts_ours_on_real_layouts(name, n_keys):
    """diffusers' LDM -> diffusers UNet converter, applied to our output, gives back every key exactly
    (each tensor tagged with its index, so a swap of same-shaped tensors would be caught)."""
    unet = meta_unet(name)
    keys = list(unet.state_dict())
    assert len(keys) == n_keys  # the public tensor count of these UNets
    tagged = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    ldm = unet_state_dict_to_ldm(tagged, UNetLayout.from_config(unet.config))
    back = convert_ldm_unet_checkpoint({UNET_PREFIX + k: v for k, v in ldm.items()}, dict(unet.config))
    assert set(back) == set(keys)
    assert all(back[k].item() == i for i, k in enumerate(keys))


@pytest.mark.parametrize("name", REAL + ("tiny-sd1", "tiny-sdxl"))
def test_inverse_round_trip_over_all_modules(name):
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(load_component_config(name, "unet"))
    layout = UNetLayout.from_config(unet.config)
    param_modules = set(modules_with_params(unet))
    mapped = 0
    for path, _ in unet.named_modules():
        try:
            ldm = unet_module_path_to_ldm(path, layout)
        except ValueError:
            assert path not in param_modules, f"{path} owns parameters but has no LDM name"
            continue
        assert unet_ldm_module_path_to_diffusers(ldm, layout) == path
        mapped += 1
    assert mapped >= len(param_modules)


def test_layout_follows_config():
    sd15 = UNetLayout.for_family("sd1")
    assert (sd15.input_start(0), sd15.input_start(3), sd15.output_start(3)) == (1, 10, 9)
    sdxl = UNetLayout.for_family("sdxl")
    assert sdxl.down_attn == (False, True, True) and sdxl.up_attn == (True, True, False)
    per_level = UNetLayout.from_config(
        {
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D"] * 2,
            "layers_per_block": [1, 3],
        }
    )
    # level 0: 1 resnet + downsampler (1, 2); level 1 starts at 3; up levels get reversed(L) + 1 resnets
    assert per_level.input_start(1) == 3 and per_level.up_layers == (4, 2)
    assert unet_module_path_to_ldm("down_blocks.0.downsamplers.0.conv", per_level) == "input_blocks.2.0.op"
    assert unet_module_path_to_ldm("up_blocks.1.resnets.1", per_level) == "output_blocks.5.0"


@pytest.mark.parametrize(
    "path, message",
    [
        ("down_blocks.4.resnets.0", "level 4"),
        ("down_blocks.0", "container"),
        ("down_blocks.0.resnets.0.nonlinearity", "nonlinearity"),
        ("down_blocks.3.downsamplers.0.conv", "downsamplers.0"),
        ("up_blocks.0.attentions.0", "attentions.0"),  # SD1.5's first up level has no attention
        ("class_embedding.linear_1", "not a diffusers"),
    ],
)
def test_unmappable_paths_raise_with_the_path(path, message):
    with pytest.raises(ValueError, match=message):
        unet_module_path_to_ldm(path, UNetLayout.for_family("sd1"))


@pytest.mark.parametrize(
    "path", ["input_blocks.12.0", "output_blocks.0.1", "middle_block.3", "input_blocks.3.1"]
)
def test_unmappable_ldm_paths_raise(path):
    with pytest.raises(ValueError, match="input_blocks|output_blocks|middle"):
        unet_ldm_module_path_to_diffusers(path, UNetLayout.for_family("sd1"))


def test_vae_converter_matches_diffusers_on_tiny_weights():
    vae = tiny("sd1").vae
    sd = vae.state_dict()
    ldm = vae_state_dict_to_ldm(sd, len(vae.config.block_out_channels))
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)  # 1x1 conv in LDM files
    assert ldm["decoder.up.3.block.0.conv1.weight"] is not None  # decoder levels are reversed
    assert torch.equal(
        ldm["decoder.up.3.block.0.conv1.weight"], sd["decoder.up_blocks.0.resnets.0.conv1.weight"]
    )
    assert "encoder.down.0.downsample.conv.weight" in ldm and "decoder.up.1.upsample.conv.weight" in ldm
    back = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    assert set(back) == set(sd)
    assert all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("name", REAL)
def test_vae_converter_matches_diffusers_on_real_layout(name):
    cfg = load_component_config(name, "vae")
    with init_empty_weights():
        vae = AutoencoderKL.from_config(cfg)
    sd = vae.state_dict()
    ldm = vae_state_dict_to_ldm(sd, len(cfg["block_out_channels"]))
    assert len(ldm) == len(sd) == 248
    back = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in ldm.items()}, dict(vae.config))
    assert set(back) == set(sd) and all(back[k].shape == sd[k].shape for k in sd)


def test_text_encoder_module_path_normalises_both_transformers_layouts():
    assert (
        text_encoder_module_path("encoder.layers.3.self_attn.q_proj")
        == "text_model.encoder.layers.3.self_attn.q_proj"
    )
    assert (
        text_encoder_module_path("text_model.encoder.layers.3.mlp.fc1")
        == "text_model.encoder.layers.3.mlp.fc1"
    )
    assert text_encoder_module_path("final_layer_norm.weight") == "text_model.final_layer_norm.weight"
    assert text_encoder_module_path("text_projection") == "text_projection"
    te = tiny("sd1").text_encoder
    for name, _ in te.named_modules():
        if name:
            assert text_encoder_module_path(name).startswith(("text_model.", "text_projection")), name


def _te_param(model: torch.nn.Module, module: str, param: str) -> torch.Tensor:
    """A parameter by its wrapped (`text_model.`) path, whichever transformers layout `model` has."""
    if not hasattr(model, "text_model") and module.startswith("text_model."):
        module = module[len("text_model.") :]
    return model.get_parameter(f"{module}.{param}")


def test_clip_and_open_clip_converters_match_diffusers():
    pipe = tiny("sdxl")
    te1, te2 = pipe.text_encoder, pipe.text_encoder_2
    ldm1 = clip_state_dict_to_ldm(te1.state_dict())
    assert all(k.startswith("text_model.") for k in ldm1)
    ldm2 = open_clip_state_dict_to_ldm(te2.state_dict())
    h = te2.config.hidden_size
    assert ldm2["transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * h, h)
    assert torch.equal(ldm2["text_projection"], te2.text_projection.weight.T)
    prefix = FAMILY_INFO["sdxl"].text_prefixes[1]
    back = convert_open_clip_checkpoint(te2, {prefix + k: v for k, v in ldm2.items()}, prefix=prefix)
    expected = {
        text_encoder_module_path(k): v for k, v in te2.state_dict().items() if "position_ids" not in k
    }
    assert set(back) == set(expected)
    assert all(torch.equal(back[k], expected[k]) for k in expected)


def test_open_clip_converter_rejects_unknown_keys():
    with pytest.raises(ValueError, match="no OpenCLIP counterpart"):
        open_clip_state_dict_to_ldm({"text_model.encoder.layers.0.self_attn.rotary.weight": torch.zeros(1)})


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_ldm_key_to_modules_locates_every_tensor(family):
    """Every UNet / text-encoder tensor of a full checkpoint is found again through ldm_key_to_modules
    (rows and transposes included), each diffusers parameter exactly once; VAE tensors map to nothing."""
    pipe = tiny(family)
    components = {"unet": pipe.unet, "te1": pipe.text_encoder}
    if family == "sdxl":
        components["te2"] = pipe.text_encoder_2
    seen: dict[str, set[str]] = {name: set() for name in components}
    for key, tensor in pipeline_to_ldm_state_dict(pipe, family).items():
        targets = ldm_key_to_modules(key, family)
        if key.startswith(VAE_PREFIX):
            assert targets == []
            continue
        assert targets, key
        for t in targets:
            model = components[t.component]
            param = model.get_parameter(f"{t.module}.{t.param}") if t.component == "unet" else None
            param = param if param is not None else _te_param(model, t.module, t.param)
            part = tensor[t.rows(tensor.shape[0])]
            assert torch.equal(part.T if t.transposed else part, param), key
            seen[t.component].add(f"{t.module}.{t.param}")
    for name, model in components.items():
        expected = {text_encoder_module_path(k) if name != "unet" else k for k, _ in model.named_parameters()}
        assert seen[name] == expected


def test_ldm_key_to_modules_contract_examples():
    q, k, v = ldm_key_to_modules("cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight", "sd2")
    assert [t.module for t in (q, k, v)] == [
        f"text_model.encoder.layers.23.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")
    ]
    assert (k.chunk, k.chunks, k.rows(3 * 1024)) == (1, 3, slice(1024, 2048))
    assert ldm_key_to_modules("conditioner.embedders.1.model.text_projection", "sdxl") == [
        ModuleTarget("te2", "text_projection", "weight", transposed=True)
    ]
    (old_style,) = ldm_key_to_modules("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight", "sd1")
    assert old_style == ModuleTarget("te1", "text_model.encoder.layers.0.mlp.fc1", "weight")
    (unet,) = ldm_key_to_modules("model.diffusion_model.output_blocks.2.2.conv.bias", "sdxl")
    assert unet == ModuleTarget("unet", "up_blocks.0.upsamplers.0.conv", "bias")
    for ignored in (
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.model.logit_scale",
        "first_stage_model.encoder.conv_in.weight",
        "model_ema.decay",
    ):
        assert ldm_key_to_modules(ignored, "sd2" if ".model." in ignored else "sd1") == []
    with pytest.raises(ValueError, match="does not exist"):
        ldm_key_to_modules("model.diffusion_model.input_blocks.12.0.in_layers.2.weight", "sd1")
    with pytest.raises(ValueError, match="cannot be split"):
        ModuleTarget("te1", "m", "weight", chunk=0, chunks=3).rows(10)
