"""Single files read tensor by tensor onto a device (`load_pipeline(..., device=)`, the trainer's loader and
``--lowram``): the same pipeline as diffusers' ``from_single_file``, bit for bit, in every family and dtype;
tensors without a place skipped and missing ones named; and the peak memory of a fresh process, measured
against diffusers' reader on a half-precision file trained in bf16."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lycoft.checkpoints import build_tiny_pipeline, bundled_config_dir, load_pipeline, save_single_file
from lycoft.checkpoints.families import family_info
from lycoft.io import read_safetensors

REPO = Path(__file__).resolve().parents[1]


def components(family: str) -> list[str]:
    return ["unet", "vae", *(te.component for te in family_info(family).text_encoders)]


def config_of(module) -> dict:
    config = module.config
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def assert_same_pipeline(a, b, family: str) -> None:
    assert type(a) is type(b) and dict(a.config) == dict(b.config)
    assert dict(a.scheduler.config) == dict(b.scheduler.config)
    for name in components(family):
        ma, mb = getattr(a, name), getattr(b, name)
        assert config_of(ma) == config_of(mb), name
        assert ma.training == mb.training is False, name
        sa, sb = ma.state_dict(), mb.state_dict()
        assert sa.keys() == sb.keys(), name
        for k in sa:
            assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), f"{name}.{k}"
    for te in family_info(family).text_encoders:
        text = "a photo of sks dog"
        assert getattr(a, te.tokenizer)(text).input_ids == getattr(b, te.tokenizer)(text).input_ids


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize(("file_dtype", "dtype", "vae_dtype"), [
    (torch.float16, None, None),  # a released checkpoint loaded in float32
    (torch.float16, torch.bfloat16, torch.float32),  # ... trained in bf16 with --no_half_vae
    (torch.float32, torch.float16, None),
])
def test_streamed_loading_equals_diffusers_bit_for_bit(tmp_path, family, file_dtype, dtype, vae_dtype):
    path = tmp_path / f"{family}.safetensors"
    save_single_file(build_tiny_pipeline(family, seed=3), path, family, dtype=file_dtype)
    ref, ref_family, ref_v = load_pipeline(str(path), dtype=dtype, vae_dtype=vae_dtype)
    got, got_family, got_v = load_pipeline(str(path), dtype=dtype, vae_dtype=vae_dtype, device="cpu")
    assert (got_family, got_v) == (ref_family, ref_v) == (family, family == "sd2")
    assert_same_pipeline(got, ref, family)
    assert got.vae.dtype == (vae_dtype or dtype or torch.float32)
    assert got.unet.dtype == (dtype or torch.float32)


def test_vae_dtype_never_rounds_the_vae_through_dtype(tmp_path):
    # The VAE asked for in float32 beside a bf16 UNet holds the file's float32 values, on every path.
    path = tmp_path / "sd1.safetensors"
    pipe = build_tiny_pipeline("sd1", seed=1)
    save_single_file(pipe, path, "sd1")
    for source, device in ((str(path), "cpu"), (str(path), None), ("builtin:tiny-sd1", None)):
        got, _, _ = load_pipeline(source, dtype=torch.bfloat16, vae_dtype=torch.float32, device=device)
        want = build_tiny_pipeline("sd1", seed=1 if source != "builtin:tiny-sd1" else 0).vae.state_dict()
        assert all(torch.equal(v, want[k]) for k, v in got.vae.state_dict().items()), (source, device)
        assert got.unet.dtype == torch.bfloat16


def test_tensors_without_a_place_are_skipped_and_missing_ones_named(tmp_path):
    path = tmp_path / "sd1.safetensors"
    save_single_file(build_tiny_pipeline("sd1"), path, "sd1")
    tensors, meta = read_safetensors(path)
    extra = dict(tensors, **{"model_ema.decay": torch.tensor(0.999),
                             "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]})
    save_file(extra, tmp_path / "extra.safetensors", meta)
    ref, _, _ = load_pipeline(str(path))
    got, _, _ = load_pipeline(str(tmp_path / "extra.safetensors"), device="cpu")
    assert_same_pipeline(got, ref, "sd1")
    del tensors["first_stage_model.decoder.conv_out.bias"]
    save_file(tensors, tmp_path / "cut.safetensors", meta)
    with pytest.raises(ValueError, match=r"cut.safetensors lacks 1 weight\(s\).*first: vae.decoder.conv_out.bias"):
        load_pipeline(str(tmp_path / "cut.safetensors"), device="cpu")


# --- peak memory -------------------------------------------------------------------------------------
WIDEN = 8  # the tiny SD1 UNet's channels times 8: 153 M parameters, a 291 MiB half-precision file

PEAK_SCRIPT = """
import json, sys, torch
from lycoft.checkpoints.loading import load_pipeline
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
def load(path, config, mode):
    if mode == 'diffusers':  # the trainer's loading before: diffusers' reader in float32, cast after
        pipe, _, _ = load_pipeline(path, config=config)
        for module in (pipe.unet, pipe.vae, pipe.text_encoder):
            module.to(dtype=torch.bfloat16)
        return pipe
    # the trainer's call, --lowram or not: on a CPU-only machine both read onto the CPU
    return load_pipeline(path, config=config, dtype=torch.bfloat16, vae_dtype=torch.bfloat16, device='cpu')[0]
path, config, tiny, mode = sys.argv[1:5]
load(tiny, None, mode)  # the same code on tiny-sd1 first: what it imports is not counted below
before = status('VmRSS')
pipe = load(path, config, mode)
held = sum(p.numel() * p.element_size() for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
print(json.dumps({'added': status('VmHWM') - before, 'held': held}))
"""


@pytest.fixture(scope="module")
def wide_sd1(tmp_path_factory) -> tuple[Path, Path]:
    """A half-precision SD1 single file whose UNet is 8 times wider than tiny-sd1's, and its config folder."""
    import diffusers

    folder = tmp_path_factory.mktemp("wide")
    config = folder / "config"
    shutil.copytree(bundled_config_dir("tiny-sd1"), config)
    unet_config = json.loads((config / "unet" / "config.json").read_text())
    unet_config["block_out_channels"] = [c * WIDEN for c in unet_config["block_out_channels"]]
    (config / "unet" / "config.json").write_text(json.dumps(unet_config))
    pipe = build_tiny_pipeline("sd1")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.unet = diffusers.UNet2DConditionModel.from_config(unet_config)
    path = folder / "wide.safetensors"
    save_single_file(pipe, path, "sd1", dtype=torch.float16)
    save_single_file(build_tiny_pipeline("sd1"), folder / "tiny.safetensors", "sd1", dtype=torch.float16)
    return path, config


def peak(path: Path, config: Path, mode: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    tiny = path.parent / "tiny.safetensors"
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path), str(config), str(tiny), mode],
                         capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_peak_memory_holds_the_weights_once(wide_sd1):
    """The trainer's loader in a fresh process holds the bf16 weights and little more (measured 1.01x);
    diffusers' reader held the file, its float32 copy and the bf16 cast (measured 2.97x as much)."""
    path, config = wide_sd1
    size = path.stat().st_size
    streamed, diffusers = peak(path, config, "streamed"), peak(path, config, "diffusers")
    mib = 2**20
    print(f"\nloading a {size / mib:.0f} MiB fp16 SD1 file for bf16 training ({streamed['held'] / mib:.0f} MiB of "
          f"weights): peak +{streamed['added'] / mib:.0f} MiB read tensor by tensor (with or without --lowram), "
          f"+{diffusers['added'] / mib:.0f} MiB with diffusers' reader and a cast: "
          f"{diffusers['added'] / streamed['added']:.2f}x")
    assert streamed["held"] == diffusers["held"]
    assert streamed["added"] < 1.2 * streamed["held"]
    assert diffusers["added"] > 2.2 * streamed["added"]
