"""The bundled diffusers configs describe the real models: built on the meta device (no memory), they
have the published parameter counts of SD1.5, SD2.1 and SDXL base 1.0; each folder is complete; and a
checkpoint's width picks the right folder and tokenizer vocabulary."""

from __future__ import annotations

import json

import pytest
import transformers
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel

from lycoft.checkpoints import bundled_config_dir, bundled_config_names, load_component_config
from lycoft.checkpoints.loading import _pick_bundled_config, _text_vocab_sizes


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _text_encoder(name: str, component: str):
    cfg = load_component_config(name, component)
    cls = getattr(transformers, cfg["architectures"][0])
    return cls(transformers.CLIPTextConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))


# Published sizes: UNet, VAE, text encoder(s).
PUBLISHED = {
    "sd15": (859_520_964, 83_653_863, [123_060_480]),
    "sd21": (865_910_724, 83_653_863, [340_387_840]),
    "sdxl-base-1.0": (2_567_463_684, 83_653_863, [123_060_480, 694_659_840]),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_real_configs_have_published_parameter_counts(name):
    unet_n, vae_n, te_n = PUBLISHED[name]
    components = ["text_encoder"] + (["text_encoder_2"] if len(te_n) == 2 else [])
    with init_empty_weights():
        assert _count(UNet2DConditionModel.from_config(load_component_config(name, "unet"))) == unet_n
        assert _count(AutoencoderKL.from_config(load_component_config(name, "vae"))) == vae_n
        assert [_count(_text_encoder(name, c)) for c in components] == te_n


def test_every_folder_is_complete():
    assert bundled_config_names() == ["sd15", "sd21", "sdxl-base-1.0", "tiny-sd1", "tiny-sd2", "tiny-sdxl"]
    for name in bundled_config_names():
        index = json.loads((bundled_config_dir(name) / "model_index.json").read_text())
        present = [c for c, v in index.items() if isinstance(v, list) and v[0] is not None]
        assert {"unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(present)
        for component in present:
            assert load_component_config(name, component), (name, component)
        # OpenCLIP-based tokenizers (SD2, SDXL's second) pad with "!", CLIP-L ones with <|endoftext|>.
        pad = "!" if name in ("sd21", "tiny-sd2") else "<|endoftext|>"
        assert load_component_config(name, "tokenizer")["pad_token"] == pad
        assert load_component_config(name, "tokenizer")["model_max_length"] == 77
        if "text_encoder_2" in present:
            assert load_component_config(name, "tokenizer_2")["pad_token"] == "!"
    assert load_component_config("sd21", "scheduler")["prediction_type"] == "v_prediction"
    assert load_component_config("sd15", "scheduler")["prediction_type"] == "epsilon"
    with pytest.raises(ValueError, match="available: sd15"):
        bundled_config_dir("sd3")


def test_checkpoint_width_picks_the_config_and_vocabulary():
    real_xl = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "conditioner.embedders.1.model.token_embedding.weight": (49408, 1280),
    }
    assert _pick_bundled_config("sdxl", real_xl).name == "sdxl-base-1.0"
    assert _text_vocab_sizes("sdxl", real_xl) == [49408, 49408]
    assert _pick_bundled_config(
        "sd1", {"model.diffusion_model.input_blocks.0.0.weight": (32, 4, 3, 3)}
    ).name == ("tiny-sd1")
    with pytest.raises(ValueError, match="128 base channels.*config="):
        _pick_bundled_config("sd2", {"model.diffusion_model.input_blocks.0.0.weight": (128, 4, 3, 3)})
