"""``--lowram``: a single-file checkpoint read tensor by tensor onto the training device. It trains the same
adapter as without, and as the builtin model the file was saved from; the loader's memory is measured in
tests/test_checkpoints_streamed.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from toy_images import make_toy_dataset

from lycoft.checkpoints import build_tiny_pipeline, loading, save_single_file
from lycoft.training import loop
from lycoft.training.config import parse_args


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=4, size=64)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory) -> Path:
    """builtin:tiny-sd1 saved as a single file."""
    path = tmp_path_factory.mktemp("model") / "tiny-sd1.safetensors"
    save_single_file(build_tiny_pipeline("sd1"), path, "sd1")
    return path


def train(data: Path, out: Path, model: str, *extra: str) -> tuple[dict[str, torch.Tensor], list[float]]:
    result = loop.train(parse_args([
        "--pretrained_model_name_or_path", model, "--train_data_dir", str(data), "--caption_extension", ".txt",
        "--resolution", "64", "--max_data_loader_n_workers", "0", "--seed", "3", "--output_dir", str(out),
        "--learning_rate", "1e-3", "--max_train_steps", "2", *extra]))
    return load_file(result.adapter), result.losses


def assert_same_adapter(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_lowram_trains_the_same_adapter_on_the_builtin_model(toy, tmp_path):
    # Tolerance: none. The builtin model is built in memory either way; --lowram changes nothing about it.
    ref, ref_losses = train(toy, tmp_path / "a", "builtin:tiny-sd1")
    got, losses = train(toy, tmp_path / "b", "builtin:tiny-sd1", "--lowram")
    assert_same_adapter(got, ref)
    assert losses == ref_losses


def test_lowram_reads_a_single_file_onto_the_device_and_trains_the_same_adapter(toy, tiny_file, tmp_path,
                                                                                monkeypatch):
    # Tolerance: none. The file holds tiny-sd1's float32 weights, which both loaders set bit for bit.
    builtin, builtin_losses = train(toy, tmp_path / "a", "builtin:tiny-sd1")
    calls: list[dict] = []
    real = loading.load_pipeline

    def recording(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading, "load_pipeline", recording)
    plain, plain_losses = train(toy, tmp_path / "b", str(tiny_file))
    low, low_losses = train(toy, tmp_path / "c", str(tiny_file), "--lowram")
    assert_same_adapter(plain, builtin)
    assert_same_adapter(low, builtin)
    assert plain_losses == low_losses == builtin_losses
    # both read the file tensor by tensor: without --lowram onto the CPU, with it onto the accelerator's
    # device, which is the CPU here
    assert [(str(c["device"]), c["dtype"]) for c in calls] == [("cpu", torch.float32)] * 2


def test_lowram_in_mixed_precision_loads_each_model_in_its_training_dtype(toy, tiny_file, tmp_path):
    extra = ("--mixed_precision", "bf16", "--no_half_vae", "--lowram")
    result = loop.train(parse_args([
        "--pretrained_model_name_or_path", str(tiny_file), "--train_data_dir", str(toy), "--caption_extension",
        ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0", "--seed", "3", "--output_dir",
        str(tmp_path), "--learning_rate", "1e-3", "--max_train_steps", "1", *extra]))
    models = result.models
    assert models.unet.dtype == models.text_encoders[0].dtype == torch.bfloat16
    assert models.vae.dtype == torch.float32
    want = build_tiny_pipeline("sd1").vae.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in models.vae.state_dict().items())  # never rounded to bf16
