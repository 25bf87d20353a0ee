"""Family facts and detection: from single-file checkpoints the project writes itself, from UNets and
their configs (real layouts on the meta device), and the v-prediction guess; the family table agrees with
the bundled configs, the tiny pipelines, lycoft's key naming and presets, and kohya's metadata strings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lycoft.checkpoints import (
    BUILTINS,
    FAMILIES,
    FAMILY_INFO,
    UNET_PREFIX,
    build_tiny_pipeline,
    bundled_config_dir,
    bundled_config_names,
    detect_family_from_keys,
    detect_family_from_models,
    detect_family_from_unet,
    family_info,
    family_of_metadata,
    guess_v_prediction,
    load_component_config,
    modelspec_architecture,
    read_checkpoint_header,
    save_single_file,
    ss_base_model_version,
)
from lycoft.checkpoints.families import CLIP, OPEN_CLIP, TEXT_ENCODER_COMPONENTS, pipeline_text_encoders


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """One tiny single-file checkpoint per family: {family: path}."""
    root = tmp_path_factory.mktemp("tiny-ckpts")
    return {f: save_single_file(build_tiny_pipeline(f), root / f"{f}.safetensors", f) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detected_from_each_tiny_checkpoint(tiny_files, family):
    shapes, _ = read_checkpoint_header(tiny_files[family])
    assert detect_family_from_keys(shapes) == family
    # Without text encoders (a UNet-only file) the UNet alone still tells the family.
    unet_only = {k: v for k, v in shapes.items() if k.startswith(UNET_PREFIX)}
    assert detect_family_from_keys(unet_only) == family


def test_detection_errors_name_the_problem():
    with pytest.raises(ValueError, match="family='sd1'"):
        detect_family_from_keys({"encoder.conv_in.weight": (32, 3, 3, 3)})
    with pytest.raises(ValueError, match="refiner"):
        detect_family_from_keys({"conditioner.embedders.0.model.positional_embedding": (77, 1280)})
    with pytest.raises(ValueError, match="use one of sd1, sd2, sdxl"):
        family_info("sd3")


@pytest.mark.parametrize(
    "config, family",
    [("sd15", "sd1"), ("sd21", "sd2"), ("sdxl-base-1.0", "sdxl"), ("tiny-sd1", "sd1"), ("tiny-sd2", "sd2")],
)
def test_family_detected_from_unet_configs(config, family):
    assert detect_family_from_unet(load_component_config(config, "unet")) == family


@pytest.mark.parametrize("family", FAMILIES)
def test_family_detected_from_unet_models(family):
    assert detect_family_from_unet(build_tiny_pipeline(family).unet) == family


def test_v_prediction_guess(tiny_files):
    for family, expected in (("sd1", False), ("sd2", True), ("sdxl", False)):
        shapes, metadata = read_checkpoint_header(tiny_files[family])
        assert metadata["modelspec.prediction_type"] == ("v" if expected else "epsilon")
        assert guess_v_prediction(family, shapes, metadata) is expected
    # SD2 768-v and 512-base files have the same keys: without metadata the answer is "unknown".
    shapes, _ = read_checkpoint_header(tiny_files["sd2"])
    assert guess_v_prediction("sd2", shapes, {}) is None
    assert guess_v_prediction("sd2", {**shapes, "v_pred": ()}, {}) is True
    assert guess_v_prediction("sd1", shapes, {"modelspec.prediction_type": "v"}) is True


def test_metadata_strings():
    assert [ss_base_model_version(f) for f in FAMILIES] == ["sd_v1", "sd_v2", "sdxl_base_v1-0"]
    assert ss_base_model_version("sd2", v_prediction=True) == "sd_v2_v"
    assert modelspec_architecture("sd1") == "stable-diffusion-v1"
    assert modelspec_architecture("sd2", v_prediction=True) == "stable-diffusion-v2-768-v"
    assert modelspec_architecture("sd2") == "stable-diffusion-v2-512"
    assert modelspec_architecture("sdxl", adapter="lora") == "stable-diffusion-xl-v1-base/lora"
    assert family_info("sdxl").text_components == ("te1", "te2")
    assert family_info("sd2").text_prefixes == ("cond_stage_model.model.",)


# -- the family table -------------------------------------------------------------------------------------
# kohya sd-scripts' published strings (library/sai_model_spec.py `determine_architecture`,
# `determine_implementation` for adapters; library/model_util.py `get_model_version_str_for_sd1_sd2` and
# the SDXL constant "sdxl_base_v1-0"), for (family, v-prediction).
KOHYA_ARCHITECTURE = {
    ("sd1", False): "stable-diffusion-v1",
    ("sd1", True): "stable-diffusion-v1",
    ("sd2", False): "stable-diffusion-v2-512",
    ("sd2", True): "stable-diffusion-v2-768-v",
    ("sdxl", False): "stable-diffusion-xl-v1-base",
    ("sdxl", True): "stable-diffusion-xl-v1-base",
}
KOHYA_BASE_MODEL_VERSION = {
    ("sd1", False): "sd_v1",
    ("sd1", True): "sd_v1_v",
    ("sd2", False): "sd_v2",
    ("sd2", True): "sd_v2_v",
    ("sdxl", False): "sdxl_base_v1-0",
    ("sdxl", True): "sdxl_base_v1-0",
}
KOHYA_ADAPTER_IMPLEMENTATION = {
    "sd1": "diffusers",
    "sd2": "diffusers",
    "sdxl": "https://github.com/Stability-AI/generative-models",
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("v_prediction", [False, True])
def test_metadata_strings_are_kohyas(family, v_prediction):
    arch = KOHYA_ARCHITECTURE[family, v_prediction]
    assert modelspec_architecture(family, v_prediction) == arch
    assert modelspec_architecture(family, v_prediction, adapter="lora") == arch + "/lora"
    assert ss_base_model_version(family, v_prediction) == KOHYA_BASE_MODEL_VERSION[family, v_prediction]
    assert family_info(family).modelspec_implementation == KOHYA_ADAPTER_IMPLEMENTATION[family]
    assert family_info(family).ss_v2 == (family == "sd2")
    # ... and each of those strings names the family again when read back from a file.
    assert family_of_metadata(ss_base_model_version(family, v_prediction)) == family
    assert family_of_metadata("", arch + "/lora") == family


@pytest.mark.parametrize("family", FAMILIES)
def test_bundled_configs_describe_the_table(family):
    """Both bundled config folders exist and say what the table says: pipeline and denoiser classes, one
    text encoder (with its tokenizer) per entry, of the transformers class given, and the UNet traits
    detection and conditioning rely on."""
    info = family_info(family)
    assert info.config in bundled_config_names() and info.tiny_config in bundled_config_names()
    for name in (info.config, info.tiny_config):
        index = json.loads((bundled_config_dir(name) / "model_index.json").read_text())
        assert index["_class_name"] == info.pipeline_class
        assert index["unet"] == ["diffusers", info.denoiser_class]
        listed = sorted(k for k in index if k.startswith("text_encoder"))
        assert listed == sorted(te.component for te in info.text_encoders)
        for te in info.text_encoders:
            assert index[te.component] == ["transformers", te.model_class]
            assert load_component_config(name, te.component)["architectures"] == [te.model_class]
            assert te.tokenizer in index
        unet = load_component_config(name, "unet")
        assert (unet.get("addition_embed_type") == "text_time") == info.uses_time_ids
        assert bool(unet.get("use_linear_projection", False)) == info.linear_projection
        # pooled embeddings come from the last encoder's projection head
        assert (info.text_encoders[-1].model_class == "CLIPTextModelWithProjection") == info.pooled_text_embeds


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipelines_match_the_table_and_are_detected(family):
    """The builtin tiny pipeline has exactly the table's text encoders (by component name and class), and
    every detector (from the live models, the UNet, and lycoft.network's) names its family."""
    import transformers

    from lycoft.network import detect_family

    info = family_info(family)
    pipe = build_tiny_pipeline(family)
    assert type(pipe).__name__ == info.pipeline_class
    assert type(pipe.unet).__name__ == info.denoiser_class
    present = [c for c in TEXT_ENCODER_COMPONENTS if getattr(pipe, c, None) is not None]
    assert present == [te.component for te in info.text_encoders]
    for te in info.text_encoders:
        assert type(getattr(pipe, te.component)) is getattr(transformers, te.model_class)
    encoders, tokenizers = pipeline_text_encoders(pipe, family)
    assert len(encoders) == len(tokenizers) == len(info.text_encoders)
    assert detect_family_from_models(pipe.unet, encoders) == family
    assert detect_family(pipe.unet, encoders) == family
    assert detect_family_from_models(pipe.unet, []) == family  # the UNet alone
    assert BUILTINS[info.tiny_config] == family


@pytest.mark.parametrize("family", FAMILIES)
def test_table_agrees_with_naming_presets_and_training_defaults(family):
    from lycoft.naming import UNET_PREFIX as UNET_KEY_PREFIX
    from lycoft.naming import te_prefix
    from lycoft.targets import PRESETS
    from lycoft.training.flags import TrainConfig

    info = family_info(family)
    n = len(info.text_encoders)
    assert [te.key_prefix for te in info.text_encoders] == [te_prefix(i, n) for i in range(n)]
    assert [te.name for te in info.text_encoders] == [f"te{i + 1}" for i in range(n)]
    assert info.unet_key_prefix == UNET_KEY_PREFIX
    assert info.unet_key_names in ("diffusers", "ldm")
    assert info.text_hidden_state in ("last", "penultimate")
    assert all(te.kind in (CLIP, OPEN_CLIP) for te in info.text_encoders)
    assert info.presets and set(info.presets) <= set(PRESETS)
    assert TrainConfig().resolved_resolution(family) == (info.resolution, info.resolution)
    assert info.resolution == {"sd1": 512, "sd2": 512, "sdxl": 1024}[family]


def test_a_family_without_a_preset_refuses_it(monkeypatch):
    """`presets` is read: a family that lacks a preset (as a denoiser without convolutions would) gets a
    one-line error naming the ones it has; the others still work."""
    import lycoft

    pipe = build_tiny_pipeline("sd1")
    monkeypatch.setitem(FAMILY_INFO, "sd1", dataclasses.replace(family_info("sd1"), presets=("attn-only",)))
    with pytest.raises(ValueError, match="'full' is not available for sd1 models; use one of attn-only"):
        lycoft.inject(pipe=pipe, preset="full")
    lycoft.inject(pipe=pipe, preset="attn-only").remove()
