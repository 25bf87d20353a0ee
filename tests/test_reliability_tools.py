"""tools/merge.py under faults: killed with SIGKILL while it writes (no output under the real name, inputs
byte-identical), and two merges racing onto the same output (the survivor is one complete merge)."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from tiny_files import OFT, write_adapter, write_base

from lycoft.io.safe_io import read_safetensors
from lycoft.merge import merge_adapters

REPO = Path(__file__).resolve().parents[1]

# The real CLI, with each output tensor slowed a little and announced on stderr, so that kills land
# inside the write.
DRIVER = textwrap.dedent("""
    import os, runpy, sys, time
    from lycoft.io import streaming
    real = streaming.tensor_bytes
    def tensor_bytes(t):
        os.write(2, b"\\n@@tensor\\n")
        time.sleep(0.004)
        return real(t)
    streaming.tensor_bytes = tensor_bytes
    sys.argv = [sys.argv[1], *sys.argv[2:]]
    runpy.run_path(sys.argv[0], run_name="__main__")
""")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("merge-inputs")
    return {"base": write_base("sd1", "single-file", root / "base.safetensors"),
            "adapter": write_adapter("sd1", OFT, root / "a.safetensors")}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def env() -> dict[str, str]:
    # PYTHONPATH: the checkout under test, whatever `lycoft` the environment's (editable) install points at
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
                PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))


def merge_cmd(inputs, out: Path, multiplier: float = 1.0) -> list[str]:
    return [str(REPO / "tools" / "merge.py"), "--base", str(inputs["base"]),
            "--adapter", f"{inputs['adapter']}:{multiplier}", "--out", str(out), "--force"]


def test_merge_killed_while_writing_leaves_no_output_and_untouched_inputs(inputs, tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    before = {k: digest(p) for k, p in inputs.items()}
    rng = random.Random(int(os.environ.get("LYCOFT_CRASH_SEED", "1")))
    trials = 20 if os.environ.get("LYCOFT_SOAK") == "1" else 2
    out_dir = tmp_path / "outs"
    out_dir.mkdir()
    kills = []
    for trial in range(trials):
        out = out_dir / f"merged{trial}.safetensors"
        target = rng.randrange(1, 200)
        proc = subprocess.Popen([sys.executable, str(driver), *merge_cmd(inputs, out)], stderr=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, text=True, env=env(), cwd=tmp_path)
        seen = 0
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith("@@tensor"):
                seen += 1
                if seen == target:
                    time.sleep(rng.uniform(0, 0.004))
                    proc.send_signal(signal.SIGKILL)
                    break
        proc.stderr.close()
        proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL, f"merge ended by itself after {seen} tensors"
        kills.append(seen)
        assert not out.exists(), "a killed merge left a file under the output name"
        visible = [p.name for p in out_dir.iterdir() if not p.name.startswith(".")]
        assert visible == [], visible
        assert {k: digest(p) for k, p in inputs.items()} == before
    # SIGKILL cannot be caught: the temporary file stays, hidden, next to the output
    hidden = [p.name for p in out_dir.iterdir()]
    assert all(n.startswith(".merged") and n.endswith(".tmp") for n in hidden), hidden
    print(f"merge kills after tensors {kills}; hidden temporaries left: {len(hidden)}")


def test_two_merges_onto_one_output_leave_one_complete_merge(inputs, tmp_path):
    expected = {}
    for m in (1.0, 0.5):
        ref = tmp_path / f"ref{m}.safetensors"
        merge_adapters(inputs["base"], [f"{inputs['adapter']}:{m}"], ref)
        expected[digest(ref)] = m
    assert len(expected) == 2
    out = tmp_path / "race" / "merged.safetensors"
    out.parent.mkdir()
    for _ in range(2 if os.environ.get("LYCOFT_SOAK") == "1" else 1):
        procs = [subprocess.Popen([sys.executable, *merge_cmd(inputs, out, m)], env=env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for m in (1.0, 0.5)]
        errs = [p.communicate(timeout=180)[1] for p in procs]
        assert all(p.returncode == 0 for p in procs), errs
        read_safetensors(out, check_finite=True)
        assert digest(out) in expected
        assert [p.name for p in out.parent.iterdir()] == ["merged.safetensors"]


def test_stale_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    """What SIGKILL leaves (an unlocked `.<name>.<hex>.tmp` untouched for a few seconds) goes at the next write of
    that name; a temporary a live writer holds locked, a fresh one, or another name's are kept."""
    import fcntl

    from lycoft.io.atomic import atomic_write

    target = tmp_path / "merged.safetensors"
    old = time.time() - 3600
    stale = tmp_path / ".merged.safetensors.0123456789ab.tmp"
    locked = tmp_path / ".merged.safetensors.ba9876543210.tmp"
    fresh = tmp_path / ".merged.safetensors.aaaaaaaaaaaa.tmp"
    other = tmp_path / ".other.safetensors.0123456789ab.tmp"
    for p in (stale, locked, fresh, other):
        p.write_bytes(b"partial")
    for p in (stale, locked, other):
        os.utime(p, (old, old))
    fd = os.open(locked, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        atomic_write(target, lambda tmp: tmp.write_bytes(b"complete"))
    finally:
        os.close(fd)
    assert target.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (target, locked, fresh, other))
    umask = os.umask(0)
    os.umask(umask)
    assert (target.stat().st_mode & 0o777) == 0o666 & ~umask


def test_a_killed_diffusers_merge_leaves_a_temporary_folder_that_the_next_merge_removes(inputs, tmp_path):
    """SIGKILL during a merge into a diffusers folder leaves `.<out>.<random>.tmp/`, as large as the model.
    The next merge (or `save_diffusers`) to that output removes it, once no live process holds it locked;
    a folder a live writer holds, and another output's, are kept."""
    import fcntl

    from lycoft.io.atomic import remove_stale_dirs

    base = write_base("sd1", "diffusers", tmp_path / "base")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    outs = tmp_path / "outs"
    outs.mkdir()
    out = outs / "merged"
    cmd = [str(REPO / "tools" / "merge.py"), "--base", str(base), "--adapter", str(inputs["adapter"]),
           "--out", str(out)]
    proc = subprocess.Popen([sys.executable, str(driver), *cmd], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True, env=env(), cwd=tmp_path)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        seen += line.startswith("@@tensor")
        if seen == 20:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stderr.close()
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"merge ended by itself after {seen} tensors"
    [left] = list(outs.iterdir())
    assert left.is_dir() and left.name.startswith(".merged.") and left.name.endswith(".tmp"), left.name
    assert any(left.rglob("*.safetensors")), "the killed merge had not written anything yet"
    # Another writer's folder in progress (locked), and another output's leftover: not ours to remove.
    held = outs / ".merged.abcd1234.tmp"
    other = outs / ".other.abcd1234.tmp"
    for folder in (held, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    hour_ago = time.time() - 3600
    for folder in (left, held, other):
        os.utime(folder, (hour_ago, hour_ago))
    fd = os.open(held, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        report = merge_adapters(base, [str(inputs["adapter"])], out)
    finally:
        os.close(fd)
    assert report.patched_tensors > 0
    assert sorted(p.name for p in outs.iterdir()) == sorted([".merged.abcd1234.tmp", ".other.abcd1234.tmp", "merged"])
    expected = tmp_path / "reference"
    merge_adapters(base, [str(inputs["adapter"])], expected)
    files = sorted(p.relative_to(expected) for p in expected.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    for rel in files:
        if rel.suffix == ".safetensors":
            assert digest(out / rel) == digest(expected / rel), rel
    # Killed between its two renames, a writer leaves the previous output only in `.old/x`: it is put back.
    # (`held`, no longer locked, goes too.)
    aside = outs / ".merged.zzzz9999.old"
    (outs / "merged").rename(outs / "moved")
    aside.mkdir()
    (outs / "moved").rename(aside / "x")
    os.utime(aside, (hour_ago, hour_ago))
    assert remove_stale_dirs(out) == [held, aside]
    assert digest(out / files[-1]) == digest(expected / files[-1]) and not aside.exists()
