"""Memory and speed options of the trainer: a float8 base (``--fp8_base``/``--fp8_base_unet``), the GPU cache
release of latent caching (``--highvram``), text-encoder outputs cached beside the images
(``--cache_text_encoder_outputs_to_disk``, ``--text_encoder_batch_size``) and a compiled UNet
(``--torch_compile``/``--dynamo_backend``)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn
from toy_images import make_toy_dataset

import lycoft
from lycoft import AdapterConfig
from lycoft.checkpoints.loading import load_pipeline
from lycoft.training import loop
from lycoft.training import models as base_model
from lycoft.training.caching import TextEmbeddingCache, weights_fingerprint
from lycoft.training.config import parse_args
from lycoft.training.errors import ConfigError
from lycoft.training.fp8_base import FP8, compute_dtype, parameter_bytes, store_base_in_float8, store_in_float8


def rounded_to_fp8(module: nn.Module) -> nn.Module:
    """A float32 copy of `module` whose Linear/Conv weights hold their float8 values."""
    ref = copy.deepcopy(module)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                m.weight.copy_(m.weight.to(FP8).float())
    return ref


def weight_dtypes(module: nn.Module, kind: type) -> set[torch.dtype]:
    return {m.weight.dtype for m in module.modules() if isinstance(m, kind)}


# --- float8 base: exactness -----------------------------------------------------------------------
LAYERS = {"linear": (lambda: nn.Linear(32, 64), (3, 5, 32)), "conv": (lambda: nn.Conv2d(16, 32, 3, padding=1),
                                                                        (2, 16, 6, 6))}


@pytest.mark.parametrize("kind", sorted(LAYERS))
@pytest.mark.parametrize("side", ["output", "input"])
@pytest.mark.parametrize("path", ["activation", "weight"])
def test_adapted_layer_on_a_float8_base_equals_the_rounded_float32_base(kind, side, path):
    # Tolerance: none. The float8 weight upcast to float32 is the rounded weight, bit for bit, and both
    # layers run the same float32 ops on it: outputs and every gradient are torch.equal.
    make, shape = LAYERS[kind]
    torch.manual_seed(0)
    base = make().requires_grad_(False)
    ref_base = rounded_to_fp8(base)
    assert store_in_float8(base) == 1 and base.weight.dtype == FP8 and base.bias.dtype == torch.float32
    cfg = AdapterConfig(block_size=8, side=side, path=path)
    layer, ref = lycoft.wrap(base, cfg), lycoft.wrap(ref_base, cfg)
    with torch.no_grad():
        layer.oft_blocks.normal_(0, 0.1)
        ref.oft_blocks.copy_(layer.oft_blocks)
    x = torch.randn(shape, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    y.sin().sum().backward()
    y_ref.sin().sum().backward()
    assert layer.last_path == ref.last_path
    assert torch.equal(y, y_ref)
    assert torch.equal(x.grad, x_ref.grad)
    assert torch.equal(layer.oft_blocks.grad, ref.oft_blocks.grad)
    assert torch.equal(layer.merged_weight(), ref.merged_weight())


def test_backward_keeps_the_float8_weight_not_an_upcast_copy():
    layer = nn.Linear(64, 64).requires_grad_(False)
    store_in_float8(layer)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(4, 64, requires_grad=True)).sum().backward()
    assert [t.dtype for t in saved if t.shape == (64, 64)] == [FP8]


def test_float8_base_of_tiny_sdxl_matches_the_rounded_base_and_halves_its_bytes():
    pipe, family, _ = load_pipeline("builtin:tiny-sdxl")
    unet, tes = pipe.unet.requires_grad_(False), [te.requires_grad_(False) for te in (pipe.text_encoder,
                                                                                      pipe.text_encoder_2)]
    ref_unet = rounded_to_fp8(unet)
    network = lycoft.inject(unet=unet, text_encoders=tes, family=family, config=AdapterConfig(block_size=8))
    ref_net = lycoft.inject(unet=ref_unet, text_encoders=[], family=family, config=AdapterConfig(block_size=8))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for key, layer in ref_net.adapters.items():
            layer.oft_blocks.copy_(torch.randn(layer.oft_blocks.shape, generator=g) * 0.05)
            network.adapters[key].oft_blocks.copy_(layer.oft_blocks)
    before = {"unet": parameter_bytes([unet]), "te": parameter_bytes(tes)}
    store_base_in_float8(unet, tes, network)
    after = {"unet": parameter_bytes([unet]), "te": parameter_bytes(tes)}
    print(f"tiny-sdxl base parameter bytes (float32 -> float8): UNet {before['unet']} -> {after['unet']}, "
          f"text encoders {before['te']} -> {after['te']}")
    assert after["unet"] < 0.3 * before["unet"]  # measured 12_499_472 -> 3_215_120
    assert after["te"] < 0.6 * before["te"]  # measured 753_232 -> 378_448: the embeddings are most of what stays
    assert network.applied and compute_dtype(unet) == torch.float32 and unet.dtype == FP8
    # only the Linear/Conv weights: norms, biases and embeddings keep their dtype
    assert unet.conv_norm_out.weight.dtype == torch.float32 and unet.conv_in.bias.dtype == torch.float32
    assert {m.weight.dtype for te in tes for m in te.modules() if isinstance(m, (nn.Embedding, nn.LayerNorm))} == {
        torch.float32}
    assert weight_dtypes(tes[1], nn.Linear) == {FP8}

    x = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    hidden = torch.randn(2, 77, 96, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.tensor([[64, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        out = unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
        ref = ref_unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample
    assert torch.equal(out, ref)  # tolerance: none, for the reason of the layer test
    network.remove()  # the float8 forwards stay under the adapters
    with torch.no_grad():
        assert torch.isfinite(unet(x, t, encoder_hidden_states=hidden, added_cond_kwargs=added).sample).all()


# --- training runs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=4, size=64)


def flags(data: Path, out: Path, model: str = "builtin:tiny-sd1", *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--train_data_dir", str(data), "--caption_extension", ".txt",
            "--resolution", "64", "--max_data_loader_n_workers", "0", "--seed", "3", "--output_dir", str(out),
            "--learning_rate", "1e-3", "--max_train_steps", "2", *extra]


def test_fp8_base_trains_samples_and_records_itself(toy, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks toy --s 2\n")
    result = loop.train(parse_args(flags(toy, tmp_path / "a", "builtin:tiny-sdxl", "--fp8_base",
                                         "--sample_prompts", str(prompts), "--sample_every_n_steps", "2")))
    models = result.models
    assert models.unet.down_blocks[0].resnets[0].conv1.weight.dtype == FP8
    assert all(weight_dtypes(te, nn.Linear) == {FP8} for te in models.text_encoders)
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert (tmp_path / "a" / "sample").is_dir()
    with safe_open(str(result.adapter), "pt") as f:
        assert f.metadata()["ss_fp8_base"] == "True"
    unet_only = loop.train(parse_args(flags(toy, tmp_path / "b", "builtin:tiny-sdxl", "--fp8_base_unet")))
    assert unet_only.models.unet.conv_in.weight.dtype == FP8
    assert all(weight_dtypes(te, nn.Linear) == {torch.float32} for te in unet_only.models.text_encoders)


def test_latent_caching_releases_gpu_memory_per_batch_unless_highvram(toy, tmp_path, monkeypatch):
    released: list[torch.device] = []
    monkeypatch.setattr(base_model, "release_cached_memory", released.append)
    loop.train(parse_args(flags(toy, tmp_path / "a", "builtin:tiny-sd1", "--cache_latents",
                                "--vae_batch_size", "2")))
    assert len(released) == 2  # 4 images, 2 per VAE batch
    released.clear()
    loop.train(parse_args(flags(toy, tmp_path / "b", "builtin:tiny-sd1", "--cache_latents", "--highvram")))
    assert released == []


def test_text_encoder_outputs_cached_beside_the_images_and_reused(tmp_path, caplog):
    data = make_toy_dataset(tmp_path / "data", n=3, size=64)
    folder = next(data.iterdir())
    (folder / "toy_002.txt").write_text("a photo of sks toy, smiling\n")
    argv = ["--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--text_encoder_batch_size", "1"]
    calls: list[int] = []
    original = TextEmbeddingCache._encode

    def counting(self, captions):
        calls.append(len(captions))
        return original(self, captions)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextEmbeddingCache, "_encode", counting)
        first = loop.train(parse_args(flags(data, tmp_path / "a", "builtin:tiny-sdxl", *argv)))
        files = sorted(p.name for p in folder.glob("*.lycoft-te.npz"))
        assert files == [f"toy_00{i}.png.lycoft-te.npz" for i in range(3)]
        assert calls == [1, 1]  # two distinct captions, one per text-encoder call
        calls.clear()
        with caplog.at_level(logging.INFO):
            loop.train(parse_args(flags(data, tmp_path / "b", "builtin:tiny-sdxl", *argv)))
        assert calls == [] and "text-encoder cache: 0 caption(s) encoded, 2 reused" in caplog.text
        (folder / "toy_000.txt").write_text("a photo of sks toy, waving\n")  # a changed caption is encoded again
        second = loop.train(parse_args(flags(data, tmp_path / "c", "builtin:tiny-sdxl", *argv[:-2])))
        assert calls == [1]
    assert len(first.losses) == len(second.losses) == 2


def test_text_cache_files_follow_caption_and_encoder_weights(tmp_path):
    images = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]

    def encode(captions):
        return torch.stack([torch.full((2, 3), float(len(c))) for c in captions])

    cache = TextEmbeddingCache(encode, to_disk=True, namespace="n1")
    assert cache.fill(["x", "yy", "x"], images=images, batch_size=2) == 2 and cache.encode_calls == 1
    assert cache.get(["yy", "x"])[:, 0, 0].tolist() == [2.0, 1.0]
    # another image with a cached caption copies it; a caption or namespace change invalidates a file
    again = TextEmbeddingCache(encode, to_disk=True, namespace="n1")
    assert again.fill(["x", "yy", "zzz"], images=images) == 1  # only c.png's new caption
    assert TextEmbeddingCache(encode, to_disk=True, namespace="n2").fill(["x"], images=images[:1]) == 1
    # the namespace the trainer uses changes with the text encoder's weights
    te = nn.Linear(4, 4)
    before = weights_fingerprint([te])
    with torch.no_grad():
        te.weight[0, 0] += 1
    assert weights_fingerprint([te]) != before


# --- torch.compile -----------------------------------------------------------------------------------
def test_compiled_unet_trains_like_the_eager_one(toy, tmp_path):
    import torch._dynamo
    from torch._dynamo.utils import counters

    # One adapted layer keeps the trace short (the UNet alone compiles in ~10 s on one CPU thread).
    layer = r"down_blocks[._]0[._]attentions[._]0[._]transformer_blocks[._]0[._]attn1[._]to_q$"
    one = ["--network_train_unet_only", "--network_args", "preset=attn-only", f"exclude=^(?!.*{layer})",
           "--max_train_steps", "1"]
    eager = loop.train(parse_args(flags(toy, tmp_path / "a", "builtin:tiny-sd1", *one)))
    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = loop.train(parse_args(flags(toy, tmp_path / "b", "builtin:tiny-sd1", *one, "--torch_compile",
                                               "--dynamo_backend", "eager")))
        assert dict(counters["graph_break"]) == {}  # the adapted layer traces without a break
    finally:
        torch._dynamo.reset()
    assert len(compiled.network.adapters) == 1
    # tolerance: the compiled rotation inverts by LU where eager mode uses a product form on the CPU (about
    # 1e-7 apart); measured loss difference below 1e-6
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)


def test_compile_and_memory_flags_are_checked(toy, tmp_path, caplog):
    base = flags(toy, tmp_path, "builtin:tiny-sd1")
    with pytest.raises(ConfigError, match="--dynamo_backend 'indcutor' is not a torch.compile backend.*did you "
                                          "mean 'inductor'"):
        parse_args([*base, "--torch_compile", "--dynamo_backend", "indcutor"])
    with pytest.raises(ConfigError, match="--torch_compile with --dynamo_backend no"):
        parse_args([*base, "--torch_compile", "--dynamo_backend", "no"])
    with pytest.raises(ConfigError, match="--text_encoder_batch_size must be a positive integer"):
        parse_args([*base, "--cache_text_encoder_outputs", "--network_train_unet_only", "--text_encoder_batch_size",
                    "0"])
    with caplog.at_level(logging.WARNING):
        parse_args([*base, "--dynamo_backend", "no"])  # what the kohya_ss GUI writes: nothing to say
        assert not caplog.records
        parse_args([*base, "--dynamo_backend", "eager", "--highvram"])
    assert "--dynamo_backend eager has no effect with --torch_compile unset" in caplog.text
    assert "--highvram True has no effect with --cache_latents unset" in caplog.text
