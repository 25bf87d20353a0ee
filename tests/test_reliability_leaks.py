"""Nothing temporary outlives a killed command: a writer killed with SIGKILL (which runs no cleanup code)
leaves its scratch files behind, and the next run removes them and says so.

Covered here: the safetensors copy of a ``.ckpt`` made for loading (in lycoft's folder of the system's
temporary folder), the library's own temporary file inside an atomic safetensors write, and a training
state save killed between its two renames (the previous state is moved back, not deleted).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lycoft.checkpoints import build_tiny_pipeline, pipeline_to_ldm_state_dict
from lycoft.io import atomic
from lycoft.io.safe_io import read_safetensors, save_safetensors_atomic

ROOT = Path(__file__).resolve().parents[1]
NAME = "run"

pytestmark = pytest.mark.skipif(atomic.fcntl is None, reason="stale temporaries are found by their locks")


def run_killed(script: str, cwd: Path, **env: str) -> None:
    """Run `script` in a fresh interpreter that kills itself with SIGKILL; check that it did."""
    environ = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
                   **env)
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == -9, done.stderr


def age(folder: Path) -> None:
    """Make everything under `folder` look untouched for a minute (stale temporaries must be a few seconds old)."""
    past = time.time() - 60
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            os.utime(os.path.join(root, name), (past, past), follow_symlinks=False)


def files_under(folder: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def test_killed_ckpt_load_leaves_a_folder_the_next_load_removes(tmp_path, monkeypatch, caplog):
    from lycoft.base_model import open_base

    sd = {k: v.clone() for k, v in pipeline_to_ldm_state_dict(build_tiny_pipeline("sd1", seed=1), "sd1").items()}
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": sd}, ckpt)
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    run_killed(f"""
        import os, signal
        from pathlib import Path
        from lycoft.checkpoints.loading import _as_safetensors
        with _as_safetensors(Path({str(ckpt)!r}), False) as (st, *_):
            assert Path(st).is_file()
            os.kill(os.getpid(), signal.SIGKILL)
        """, tmp_path, TMPDIR=str(system_temp))
    left = files_under(system_temp)
    assert any(name.endswith("model.safetensors") for name in left), left  # the kill left the copy
    age(system_temp)

    # The next run reading a .ckpt without an output beside it (`inspect --base x.ckpt`) removes it.
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    with caplog.at_level(logging.WARNING, logger="lycoft"), open_base(ckpt) as base:
        assert base.family == "sd1"
    assert files_under(system_temp) == []
    assert "removed" in caplog.text and "interrupted write" in caplog.text


def test_killed_safetensors_write_leaves_nothing_after_the_next_write(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "a.safetensors"
    # The library writes through a `.tmpXXXXXX` file of its own beside the path it is given: the writer
    # is killed while that exists.
    run_killed(f"""
        import os, signal
        import torch
        from lycoft.io import safe_io

        def save_file(tensors, path, metadata=None):
            with open(os.path.join(os.path.dirname(path), ".tmpAbC123"), "wb") as f:
                f.write(b"half a model")
            os.kill(os.getpid(), signal.SIGKILL)

        safe_io.save_file = save_file
        safe_io.save_safetensors_atomic({{"x": torch.ones(4)}}, {str(target)!r})
        """, tmp_path)
    assert files_under(out) != []
    age(out)
    save_safetensors_atomic({"x": torch.zeros(4)}, target)
    assert os.listdir(out) == ["a.safetensors"]
    assert torch.equal(read_safetensors(target)[0]["x"], torch.zeros(4))


def make_state(folder: Path, content: bytes) -> None:
    folder.mkdir()
    (folder / "optimizer.bin").write_bytes(content)


def test_state_save_killed_between_its_renames_is_restored(tmp_path, caplog):
    from lycoft.training.saving import Saver

    final = tmp_path / f"{NAME}-state"
    partial = tmp_path / f".{NAME}-state.partial"
    make_state(final, b"previous")
    make_state(partial, b"new")
    run_killed(f"""
        import os, signal
        from pathlib import Path
        from lycoft.training import saving

        real, calls = os.replace, []

        def replace(src, dst):
            calls.append(src)
            if len(calls) == 2:  # the previous state is aside, the new one not yet in place
                os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)

        os.replace = replace
        saving._replace_dir(Path({str(partial)!r}), Path({str(final)!r}))
        """, tmp_path)
    assert not final.exists() and (tmp_path / f".{NAME}-state.old").is_dir()

    saver = Saver(SimpleNamespace(is_main_process=True), tmp_path, NAME, metadata=lambda s, e: {})
    with caplog.at_level(logging.WARNING):
        saver.remove_stale()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{NAME}-state"]
    assert (final / "optimizer.bin").read_bytes() == b"previous"
    assert "restored training state" in caplog.text
