"""The trainer given what a careful but error-prone user gives it: a model file that is missing, cut short, of
another family or a pickle that could run code; a VAE that is not one; a warm start from another model or
from a file that is not an OFT adapter; a block size no layer can take; degenerate images; Ctrl-C.

The rule: a user error is one line naming the bad value or file and what to do, exit code 2, no traceback;
an internal error keeps its traceback, says it is a bug and exits 1; Ctrl-C says where the newest state is
and how to resume, and exits 130. The files the trainer only reads stay byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_files import OFT, write_adapter, write_base
from toy_images import make_toy_dataset

import lycoft
from lycoft.checkpoints import build_tiny_pipeline
from lycoft.training import loop, losses
from lycoft.training.config import parse_args
from lycoft.training.dataset import build_dataset
from lycoft.training.saving import TrainState


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=2, size=64)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Tiny SD1 and SDXL checkpoints and adapters, and the broken files made from them."""
    root = tmp_path_factory.mktemp("files")
    sd1, sdxl = build_tiny_pipeline("sd1"), build_tiny_pipeline("sdxl")
    out = {
        "sd1": write_base("sd1", "single-file", root / "sd1.safetensors", pipe=sd1),
        "sdxl": write_base("sdxl", "single-file", root / "sdxl.safetensors", pipe=sdxl),
        "sdxl-adapter": write_adapter("sdxl", OFT, root / "sdxl-oft.safetensors", pipe=sdxl),
        "full-adapter": write_adapter("sd1", lycoft.AdapterConfig(), root / "sd1-full.safetensors", pipe=sd1),
    }
    raw = out["sd1"].read_bytes()
    (root / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    out["cut"] = root / "cut.safetensors"
    # A training checkpoint that pickles its hyperparameters as an object: loading it could run code.
    torch.save({"state_dict": load_file(out["sd1"]), "hparams": argparse.Namespace(lr=1e-4)}, root / "pickled.ckpt")
    out["pickled"] = root / "pickled.ckpt"
    nan = load_file(out["full-adapter"])
    key = next(k for k in nan if k.endswith("oft_blocks"))
    nan[key] = torch.full_like(nan[key], float("nan"))
    save_file(nan, root / "nan.safetensors")
    out["nan"] = root / "nan.safetensors"
    save_file({"lora_unet_conv_in.lora_down.weight": torch.zeros(4, 36), "lora_unet_conv_in.lora_up.weight":
               torch.zeros(32, 4), "lora_unet_conv_in.alpha": torch.tensor(4.0)}, root / "lora.safetensors")
    out["lora"] = root / "lora.safetensors"
    (root / "empty").mkdir()
    out["empty"] = root / "empty"
    return out


def flags(data: Path, out: Path, *extra: str, model: str = "builtin:tiny-sd1") -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0",
            "--seed", "3", "--output_dir", str(out), "--output_name", "run", "--learning_rate", "1e-3",
            "--max_train_steps", "1", *extra]


def digest(paths: list[Path]) -> dict[Path, str]:
    out = {}
    for p in paths:
        for f in sorted([p] if p.is_file() else p.rglob("*")):
            if f.is_file():
                out[f] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def user_error(capsys, argv: list[str], inputs: list[Path] = ()) -> str:
    """Run the trainer; it must exit 2 with one ``error:`` line, no traceback, its inputs unchanged."""
    before = digest(list(inputs))
    code = loop.main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert digest(list(inputs)) == before
    return lines[0]


@pytest.mark.parametrize("case", ["missing", "cut", "empty", "hub", "sdxl as sd1", "sdxl with --v2", "pickle",
                                  "missing vae", "cut vae", "adapter as vae"])
def test_a_model_that_cannot_load_is_one_line_naming_it(data, files, tmp_path, capsys, case):
    model = str(files["sd1"])
    model, extra, says = {
        "missing": (str(tmp_path / "nope.safetensors"), [], "does not exist"),
        "cut": (str(files["cut"]), [], "the file is truncated or damaged"),
        "empty": (str(files["empty"]), [], "is an empty folder, not a diffusers model"),
        "hub": ("someone/no-such-model", [], "is not a local file or folder, and loading it from the model hub failed"),
        "sdxl as sd1": (str(files["sdxl"]), ["--model_family", "sd1"], "is an sdxl model, but --model_family sd1"),
        "sdxl with --v2": (str(files["sdxl"]), ["--v2"], "is an sdxl model, but --v2 says sd2; drop --v2"),
        "pickle": (str(files["pickled"]), [], "refused to load this pickle checkpoint"),
        "missing vae": (model, ["--vae", str(tmp_path / "vae.safetensors")], "--vae"),
        "cut vae": (model, ["--vae", str(files["cut"])], "--vae"),
        "adapter as vae": (model, ["--vae", str(files["sdxl-adapter"])], "holds no VAE weights"),
    }[case]
    inputs = [files["sd1"], files["sdxl"], files["cut"], files["pickled"], files["sdxl-adapter"]]
    line = user_error(capsys, flags(data, tmp_path / "out", *extra, model=model), inputs)
    assert says in line, line
    named = extra[-1] if case.endswith("vae") else model
    assert named in line, line
    assert not (tmp_path / "out" / "run.safetensors").exists()


@pytest.mark.parametrize("case", ["sdxl adapter", "mostly other layers", "nan blocks", "lora"])
def test_a_warm_start_from_another_model_or_kind_of_file_is_refused(data, files, tmp_path, capsys, case):
    file, extra, says = {
        "sdxl adapter": (files["sdxl-adapter"], [], "is an sdxl adapter, but builtin:tiny-sd1 is an sd1 model"),
        "mostly other layers": (files["full-adapter"], ["--network_args", "preset=attn-only"],
                                "only 136 of its 292 modules are layers this sd1 network adapts"),
        "nan blocks": (files["nan"], [], "contains NaN or inf"),
        "lora": (files["lora"], [], "not OFT/BOFT (a LoRA/LoHa/LoKr file, not OFT)"),
    }[case]
    line = user_error(capsys, flags(data, tmp_path / "out", "--network_weights", str(file), *extra), [file])
    assert str(file) in line and says in line, line


def test_a_warm_start_that_covers_part_of_the_network_warns_with_the_count(data, files, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    result = loop.train(parse_args(flags(data, tmp_path / "out", "--network_weights", str(files["full-adapter"]),
                                         "--network_args", "preset=full-lin")))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING and "started from adapter weights" in r.message]
    assert len(warned) == 1 and "of its 292 modules are not in this network and were ignored" in warned[0].message
    assert result.state.global_step == 1


@pytest.mark.parametrize("args, says", [
    (["block_size=7"], "block_size 7 divides none of their widths (4, 32, 64, 128"),
    (["algo=boft", "butterfly_factors=9"], "butterfly_factors 9 is impossible on"),
])
def test_a_block_size_no_layer_can_take_says_why(data, tmp_path, capsys, args, says):
    line = user_error(capsys, flags(data, tmp_path / "out", "--network_args", *args))
    assert "can take this adapter (all 293 it selects were skipped)" in line and says in line, line
    assert "check the regexes" not in line
    if args == ["block_size=7"]:
        assert line.endswith("use a block size that fits most of them: 2, 4, 8, 16, 32")


def test_degenerate_images_are_named_in_a_warning(tmp_path, caplog):
    from PIL import Image

    folder = make_toy_dataset(tmp_path / "data", n=2, size=64) / "1_sks toy"
    Image.new("RGB", (1, 1)).save(folder / "dot.png")
    Image.new("RGB", (2500, 1)).save(folder / "line.png")
    caplog.set_level(logging.WARNING)
    build_dataset(parse_args(flags(tmp_path / "data", tmp_path / "out")))
    warnings = [r.message for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"image {folder / 'dot.png'} is only 1x1 pixels: it is enlarged 64x" in w for w in warnings), warnings
    assert any(f"image {folder / 'line.png'} has an extreme aspect ratio (2500x1)" in w for w in warnings), warnings
    assert not any("toy_" in w for w in warnings)  # the ordinary images pass silently


def test_ctrl_c_says_where_the_newest_state_is_and_leaves_no_temporaries(data, tmp_path, capsys, monkeypatch):
    """SIGINT at the third step (after the save at step 2) and inside a state save: exit 130, one line naming
    the newest state and how to resume, no traceback, no half-written folder."""
    real, calls = losses.diffusion_loss, {"n": 0}

    def interrupt_at_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(losses, "diffusion_loss", interrupt_at_third)
    out = tmp_path / "out"
    argv = flags(data, out, "--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state")
    assert loop.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    newest = out / "run-step00000002-state"
    assert (f"interrupted: the newest training state is {newest} (step 2); continue with --resume auto "
            f"(or --resume {newest})") in err, err

    monkeypatch.setattr(losses, "diffusion_loss", real)

    def interrupted_write(self, folder):  # after accelerate wrote the state folder, before it is renamed
        raise KeyboardInterrupt

    monkeypatch.setattr(TrainState, "write", interrupted_write)
    assert loop.main([*argv, "--resume", "auto"]) == 130
    assert not [p for p in out.iterdir() if p.name.startswith(".")], sorted(out.iterdir())
    assert "interrupted: the newest training state is" in capsys.readouterr().err


def test_an_internal_error_keeps_its_traceback_and_says_it_is_a_bug(data, tmp_path, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("an impossible state")

    monkeypatch.setattr(loop, "check_before_model", broken)
    assert loop.main(flags(data, tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "RuntimeError: an impossible state" in err
    assert "internal error, a bug in lycoft" in err
