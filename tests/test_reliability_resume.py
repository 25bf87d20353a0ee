"""Resuming from a state folder: nothing in it can run code, and ``--resume auto`` finds the newest one.

A state folder is a directory of pickles (accelerate's optimizer, RNG and custom-object files). One
downloaded from a stranger, or tampered with, must be refused with a clear message before any object in
it is built. ``--resume auto`` picks the state with the most steps done (by its counters, not its name),
ignores temporaries and damaged folders, and starts from scratch when there is none.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import Planted
from toy_images import make_toy_dataset

from lycoft.training import loop
from lycoft.training.config import parse_args
from lycoft.training.saving import weights_only_loads


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=4, size=64)


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0",
            "--seed", "3", "--output_dir", str(out), "--output_name", "run", "--learning_rate", "1e-3",
            "--network_args", "preset=attn-only", *extra]


@pytest.fixture(scope="module")
def state_folder(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("saved")
    assert loop.main(flags(data, out, "--max_train_steps", "1", "--save_state")) == 0
    return out / "run-state"


def test_forced_weights_only_overrides_an_explicit_weights_only_false(tmp_path, monkeypatch):
    """What `load_state` relies on: torch reads the variable at each call, and it wins over the caller's
    ``weights_only=False`` (accelerate's, for registered objects); the environment is restored after."""
    monkeypatch.delenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", raising=False)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.pt"
    torch.save({"x": Planted(marker)}, evil)
    plain = tmp_path / "plain.pt"
    torch.save({"lr": [1e-3], "last_epoch": 2, "lr_lambdas": [None], "t": torch.ones(2)}, plain)
    with weights_only_loads():
        with pytest.raises(Exception, match="Weights only load failed"):
            torch.load(evil, weights_only=False)
        assert torch.load(plain, weights_only=False)["last_epoch"] == 2
    assert not marker.exists()
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ
    assert os.environ["TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"] == "1"


@pytest.mark.parametrize("file", ["optimizer.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"])
def test_a_state_folder_with_code_in_a_pickle_is_refused(data, state_folder, tmp_path, capsys, file):
    tampered = tmp_path / "run-state"
    shutil.copytree(state_folder, tampered)
    marker = tmp_path / "code-ran"
    torch.save({"state": Planted(marker), "param_groups": []}, tampered / file)
    assert loop.main(flags(data, tmp_path / "out", "--max_train_steps", "2", "--resume", str(tampered))) == 2
    assert not marker.exists(), "resuming ran code from the state folder"
    err = capsys.readouterr().err
    assert f"refused to load {file} in it" in err, err
    assert "contains pickled objects that are not plain tensors or numbers" in err
    assert not (tmp_path / "out" / "run.safetensors").exists()


def test_resume_auto_continues_from_the_newest_state_or_starts_fresh(data, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="lycoft.train")
    out = tmp_path / "out"
    first = loop.train(parse_args(flags(data, out, "--max_train_steps", "4", "--save_every_n_steps", "2",
                                        "--save_state")))
    assert first.state.global_step == 4
    # By name `run-step00000002-state` sorts after `run-state` (step 4): the counters must decide.
    assert sorted(p.name for p in out.glob("*-state")) == ["run-state", "run-step00000002-state"]
    # An interrupted save's temporary with more steps, and a damaged folder: neither is a candidate.
    partial = out / ".run-step00000008-state.partial"
    shutil.copytree(out / "run-state", partial)
    (partial / "train_state.json").write_text(json.dumps({"global_step": 8, "epoch": 4}))
    damaged = {out / "run-step00000010-state": "{not json", out / "run-step00000012-state": '["global_step", 12]'}
    for folder, text in damaged.items():
        shutil.copytree(out / "run-state", folder)
        (folder / "train_state.json").write_text(text)

    resumed = loop.train(parse_args(flags(data, out, "--max_train_steps", "6", "--save_every_n_steps", "2",
                                          "--save_state", "--resume", "auto")))
    assert resumed.state.global_step == 6 and len(resumed.losses) == 2  # steps 5 and 6 only
    assert f"--resume auto: the newest training state is {out / 'run-state'} (step 4)" in caplog.text
    assert all(f"skipping {folder}, its train_state.json cannot be read" in caplog.text for folder in damaged)
    assert json.loads((out / "run-state" / "train_state.json").read_text())["global_step"] == 6
    assert not partial.exists()  # removed as a leftover of an interrupted run

    caplog.clear()
    fresh = loop.train(parse_args(flags(data, tmp_path / "empty", "--max_train_steps", "2", "--resume", "auto")))
    assert fresh.state.global_step == 2 and len(fresh.losses) == 2
    assert "--resume auto: no training state of 'run'" in caplog.text and "starting from scratch" in caplog.text


def _damage(folder: Path, how: str) -> str:
    """Damage a copied state folder as a full disk, a killed copy or an editor would; returns the file to blame."""
    if how == "cut weights":
        raw = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(raw[: len(raw) // 2])
        return "model.safetensors is truncated or damaged"
    if how == "cut optimizer":
        raw = (folder / "optimizer.bin").read_bytes()
        (folder / "optimizer.bin").write_bytes(raw[: len(raw) - 4096])
        return "optimizer.bin is truncated or damaged"
    if how == "no optimizer":
        (folder / "optimizer.bin").unlink()
        return "optimizer.bin (the optimizer state) is missing"
    (folder / "train_state.json").write_text('{"global_step": 1,')
    return "train_state.json is damaged"


@pytest.mark.parametrize("how", ["cut weights", "cut optimizer", "no optimizer", "bad json"])
def test_resuming_from_a_damaged_state_names_the_file(data, state_folder, tmp_path, capsys, how):
    damaged = tmp_path / "run-state"
    shutil.copytree(state_folder, damaged)
    blamed = _damage(damaged, how)
    before = {p: p.read_bytes() for p in damaged.iterdir()}
    assert loop.main(flags(data, tmp_path / "out", "--max_train_steps", "2", "--resume", str(damaged))) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert f"--resume {damaged}: {blamed}" in lines[0] and "resume from an older state (--resume auto" in lines[0]
    assert {p: p.read_bytes() for p in damaged.iterdir()} == before


@pytest.mark.parametrize("how", ["cut weights", "cut optimizer", "no optimizer"])
def test_resume_auto_passes_over_a_damaged_newest_state(data, state_folder, tmp_path, caplog, how):
    """The restart loop's promise: a state cut short by a full disk or a killed copy costs the steps since the
    older intact state, not the run."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(state_folder, out / "run-step00000001-state")
    newest = out / "run-step00000002-state"
    shutil.copytree(state_folder, newest)
    (newest / "train_state.json").write_text(json.dumps({**json.loads((newest / "train_state.json").read_text()),
                                                          "global_step": 2}))
    blamed = _damage(newest, how)
    caplog.set_level(logging.INFO)
    resumed = loop.train(parse_args(flags(data, out, "--max_train_steps", "2", "--resume", "auto")))
    assert resumed.state.global_step == 2 and len(resumed.losses) == 1  # step 2 again, from step 1
    assert f"--resume auto: skipping {newest} (step 2): {blamed}" in caplog.text
    assert f"--resume auto: the newest training state is {out / 'run-step00000001-state'} (step 1)" in caplog.text


@pytest.mark.parametrize("extra, says", [
    (["--network_args", "preset=attn-only", "block_size=16"], "block_size is 32 in the state and 16 here"),
    (["--network_args", "preset=attn-only", "algo=boft"], "algo is oft in the state and boft here"),
    (["--network_args", "preset=attn-only", "rescale=true"], "rescale is off in the state and on here"),
    (["--network_args", "preset=full"], "it adapts 136 layers and this run 292"),
    (["--optimizer_type", "torch.optim.SGD"], "was saved with another optimizer (with settings amsgrad, betas"),
])
def test_resuming_with_other_options_says_which_differs(data, state_folder, tmp_path, capsys, extra, says):
    assert loop.main([*flags(data, tmp_path / "out", "--max_train_steps", "2", "--resume", str(state_folder)),
                      *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert says in lines[0] and len(lines[0]) < 400, lines[0]
