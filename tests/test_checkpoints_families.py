"""Family facts and detection: from single-file checkpoints the project writes itself, from UNets and
their configs (real layouts on the meta device), and the v-prediction guess."""

from __future__ import annotations

import pytest

from lycoft.checkpoints import (
    FAMILIES,
    UNET_PREFIX,
    build_tiny_pipeline,
    detect_family_from_keys,
    detect_family_from_unet,
    family_info,
    guess_v_prediction,
    load_component_config,
    modelspec_architecture,
    read_checkpoint_header,
    save_single_file,
    ss_base_model_version,
)


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
