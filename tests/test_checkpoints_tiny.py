"""The builtin tiny pipelines: real diffusers pipelines of the right shape, deterministic from a seed,
quick to build, and able to generate 64x64 images."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from lycoft.checkpoints import FAMILIES, build_tiny_pipeline


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_generates_64px_images(family):
    pipe = build_tiny_pipeline(family)
    out = pipe(
        "a photo of sks dog",
        num_inference_steps=2,
        height=64,
        width=64,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 64, 64, 3)
    assert np.isfinite(out).all() and 0.0 <= out.min() and out.max() <= 1.0
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64  # 8x8 latents


def test_shapes_follow_the_recipe():
    sd1, sd2, sdxl = (build_tiny_pipeline(f) for f in FAMILIES)
    # The parameter counts the tiny recipes are designed to (text encoders: 552-token vocabulary).
    assert _params(sd1.unet) == _params(sd2.unet) == 2_446_788
    assert _params(sdxl.unet) == 3_124_868
    assert _params(sd1.vae) == 1_028_935
    assert _params(sd1.text_encoder) == 45_088 + 16 * 32
    assert _params(sdxl.text_encoder_2) == 141_376 + 16 * 64
    # SD1: conv proj_in, epsilon; SD2: linear proj_in, gelu text encoder, v-prediction.
    assert sd1.unet.down_blocks[0].attentions[0].proj_in.weight.dim() == 4
    assert sd2.unet.down_blocks[0].attentions[0].proj_in.weight.dim() == 2
    assert (sd1.scheduler.config.prediction_type, sd2.scheduler.config.prediction_type) == (
        "epsilon",
        "v_prediction",
    )
    assert sd2.text_encoder.config.hidden_act == "gelu"
    # SDXL: the two text encoders MUST differ in width (from_single_file tells them apart by it).
    assert (sdxl.text_encoder.config.hidden_size, sdxl.text_encoder_2.config.hidden_size) == (32, 64)
    assert sdxl.unet.config.cross_attention_dim == 96
    assert sdxl.tokenizer.pad_token == "<|endoftext|>" and sdxl.tokenizer_2.pad_token == "!"


def test_weights_are_a_function_of_the_seed():
    state = torch.random.get_rng_state()
    a, b, c = (
        build_tiny_pipeline("sdxl", seed=3),
        build_tiny_pipeline("sdxl", seed=3),
        build_tiny_pipeline("sdxl"),
    )
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert not all(torch.equal(sa[k], sc[k]) for k in sa), name


@pytest.mark.parametrize("family", FAMILIES)
def test_build_takes_under_a_second(family):
    build_tiny_pipeline(family)  # warm the imports
    times = []
    for _ in range(3):  # best of three: other processes may load the machine
        start = time.perf_counter()
        build_tiny_pipeline(family)
        times.append(time.perf_counter() - start)
    assert min(times) < 1.0


def test_dtype_is_honoured():
    pipe = build_tiny_pipeline("sd1", dtype=torch.bfloat16)
    assert {p.dtype for p in pipe.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in pipe.text_encoder.parameters()} == {torch.bfloat16}
