"""A save that fails stops training with a clear message (exit code 4) and leaves what was saved before
intact and resumable. Real faults where the machine allows it: a tiny tmpfs that fills up, a read-only
tmpfs (root ignores chmod, so a read-only mount is the honest test); both need `mount` (root) and are
skipped otherwise. A simulated ENOSPC (the writer's fsync raising) runs everywhere."""

from __future__ import annotations

import contextlib
import errno
import re
import subprocess
from pathlib import Path

import pytest
from toy_images import make_toy_dataset

from lycoft.io import atomic
from lycoft.io.safe_io import read_safetensors
from lycoft.training import loop
from lycoft.training.saving import TrainState


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_toy_dataset(tmp_path_factory.mktemp("toy"), n=4, size=64)


@contextlib.contextmanager
def tmpfs(path: Path, size: str, readonly: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    except OSError:
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def flags(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd1", "--train_data_dir", str(data),
            "--caption_extension", ".txt", "--resolution", "64", "--max_data_loader_n_workers", "0",
            "--seed", "3", "--output_dir", str(out), "--output_name", "run", "--learning_rate", "1e-3",
            "--network_args", "preset=attn-only", "--save_every_n_steps", "1", "--save_state", *extra]


def check_stopped(err: str, out: Path) -> tuple[int, Path]:
    """The message names the file, the cause, the step and the state to resume from; everything visible
    in `out` is complete and no temporary file is left."""
    m = re.search(r"cannot write (\S+) \((.+?)\) at step (\d+); training stopped .* resume with --resume (\S+)\.",
                  err)
    assert m, err
    step, resume = int(m.group(3)), Path(m.group(4))
    assert TrainState.read(resume).global_step == step - 1
    for entry in out.iterdir():
        assert not entry.name.startswith("."), f"temporary {entry.name} left behind"
        if entry.suffix == ".safetensors":
            read_safetensors(entry, check_finite=True)
        elif entry.name.endswith("-state"):
            TrainState.read(entry)
            read_safetensors(entry / "model.safetensors")
    return step, resume


def test_full_tmpfs_stops_with_a_clear_message_and_the_last_state_resumes(data, tmp_path, capsys):
    with tmpfs(tmp_path / "small", "8m") as out:
        assert loop.main(flags(data, out, "--max_train_steps", "8")) == 4
        err = capsys.readouterr().err
        assert "No space left on device" in err or " bytes free there, the disk is probably full" in err
        step, resume = check_stopped(err, out)
        assert 2 <= step <= 4
        # the state before the failure continues elsewhere
        assert loop.main(flags(data, tmp_path / "big", "--max_train_steps", "4", "--resume", str(resume))) == 0
    read_safetensors(tmp_path / "big" / "run.safetensors", check_finite=True)


def test_readonly_output_dir_is_refused_before_training(data, tmp_path, capsys):
    with tmpfs(tmp_path / "ro", "1m", readonly=True) as out:
        assert loop.main(flags(data, out, "--max_train_steps", "2")) == 2
        err = capsys.readouterr().err
        assert f"cannot write to --output_dir {out}" in err and "Read-only file system" in err


def test_simulated_enospc_in_a_state_save_keeps_the_previous_saves(data, tmp_path, capsys, monkeypatch):
    real = atomic._fsync_file
    calls = {"n": 0}

    def fsync(path):  # the third adapter file hits a full disk
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path)

    monkeypatch.setattr(atomic, "_fsync_file", fsync)
    out = tmp_path / "out"
    assert loop.main(flags(data, out, "--max_train_steps", "6")) == 4
    step, resume = check_stopped(capsys.readouterr().err, out)
    assert step == 3 and resume == out / "run-step00000002-state"
    assert sorted(p.name for p in out.iterdir()) == [
        "run-config.toml", "run-step00000001-state", "run-step00000001.safetensors",
        "run-step00000002-state", "run-step00000002.safetensors"]
