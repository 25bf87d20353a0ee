"""merge, convert, inspect and tiny_model given what a careful but error-prone user gives them.

The rule every command follows: a user error ends with exit status 2 and one line naming the bad value or
file and what to do, never a traceback; an internal error keeps its traceback and says it is a bug (1);
Ctrl-C says nothing was written (130). Whatever happens, every input stays byte-identical, no NaN model is
written, and no temporary outlives the command, even one killed with SIGKILL (the next run removes it and
says so).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_reliability_tools import DRIVER, REPO, env
from tiny_files import OFT, write_adapter, write_base

import lycoft
from lycoft.checkpoints import build_tiny_pipeline
from lycoft.cli import convert, inspect, merge, runner, tiny_model
from lycoft.convert import convert_adapter
from lycoft.io.atomic import _STALE_AFTER_S, atomic_write
from lycoft.io.errors import DiskFullError

CLIS = {"merge": merge, "convert": convert, "inspect": inspect, "tiny_model": tiny_model}
# What lycoft names its temporaries: `.<output>.<hex>.tmp` files, `.<output>.<random>.tmp|old` folders, and
# the scratch folders of the system temporary directory.
TEMPORARY = re.compile(r"^\..+\.(tmp|old)$|^lycoft-")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD1 base (single file), a small adapter for it (the proj_in layers) and a full one."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("inputs")
    pipe = build_tiny_pipeline("sd1")
    return {
        "base": write_base("sd1", "single-file", root / "base.safetensors", pipe=pipe),
        "small": write_adapter("sd1", OFT, root / "small.safetensors", pipe=pipe, include="proj_in"),
        "adapter": write_adapter("sd1", OFT, root / "a.safetensors", pipe=pipe),
    }


@pytest.fixture(scope="module")
def diffusers_base(tmp_path_factory) -> Path:
    return write_base("sd1", "diffusers", tmp_path_factory.mktemp("diffusers") / "base")


def run_cli(name: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """`main(argv)` of a command line in this process: (exit status, stdout, stderr)."""
    try:
        code = CLIS[name].main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code if isinstance(e.code, int) else 2
    out, err = capsys.readouterr()
    return code, out, err


def error_line(err: str) -> str:
    """The one line a user error prints (other lines on stderr: warnings that came before it)."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def digests(paths) -> dict[str, str]:
    out = {}
    for p in paths:
        for f in ([p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())):
            out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


def temporaries(*folders: Path) -> list[str]:
    return [str(p) for folder in folders if folder.exists() for p in folder.rglob("*") if TEMPORARY.match(p.name)]


# ------------------------------------------------------------------------------------------ 1. strength
def test_a_non_finite_strength_is_refused_everywhere_and_writes_nothing(files, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    for bad in ("nan", "inf", "-inf"):
        code, _, err = run_cli("merge", ["--base", files["base"], "--adapter", f"{files['small']}:{bad}",
                                         "--out", out], capsys)
        line = error_line(err)
        assert code == 2 and f":{bad}" in line and "not a finite number" in line, err
        code, _, err = run_cli("convert", ["--in", files["small"], "--out", out, "--to", "diff", "--base",
                                           files["base"], f"--multiplier={bad}"], capsys)
        assert code == 2 and f"--multiplier: '{bad}' is not a finite number" in err, err
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="--multiplier nan is not a finite number"):
        convert_adapter(str(files["small"]), str(out), "diff", base=str(files["base"]), multiplier=math.nan)
    assert list(tmp_path.iterdir()) == []
    pipe = build_tiny_pipeline("sd1")
    with pytest.raises(ValueError, match="multiplier nan is not a finite number"):
        lycoft.load(str(files["small"]), pipe=pipe, multiplier=float("nan"))
    net = lycoft.load(str(files["small"]), pipe=pipe, multiplier=0.5)
    for bad in (math.inf, -math.inf, math.nan, "strong"):
        with pytest.raises(ValueError, match=f"multiplier {bad} is|multiplier '{bad}' is"):
            net.set_multiplier(bad)
    with pytest.raises(ValueError, match="multiplier inf is not a finite number"):
        net.merge(math.inf)
    assert {layer.multiplier for layer in net.adapters.values()} == {0.5}


def test_a_strength_that_overflows_the_weights_is_refused(files, tmp_path, capsys):
    """A finite but absurd strength makes the merged weights overflow: refused, not written as inf."""
    out = tmp_path / "merged.safetensors"
    code, _, err = run_cli("merge", ["--base", files["base"], "--adapter", f"{files['small']}:1e30", "--out", out,
                                     "--dtype", "fp16"], capsys)
    line = error_line(err)
    assert code == 2 and "not finite in F16" in line and "x1e+30" in line, err
    code, _, err = run_cli("convert", ["--in", files["small"], "--out", out, "--to", "diff", "--base",
                                       files["base"], "--multiplier", "1e30", "--dtype", "fp16"], capsys)
    assert code == 2 and "not finite in F16" in error_line(err), err
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------- 5. incomplete base
@pytest.mark.parametrize("remove", ["unet/diffusion_pytorch_model.safetensors", "text_encoder"])
def test_a_diffusers_base_missing_a_model_is_reported_as_an_incomplete_base(files, diffusers_base, tmp_path,
                                                                            capsys, remove):
    base = tmp_path / "base"
    shutil.copytree(diffusers_base, base)
    target = base / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    out = tmp_path / "merged"
    for extra in ([], ["--allow-partial"]):
        code, _, err = run_cli("merge", ["--base", base, "--adapter", files["adapter"], "--out", out, *extra], capsys)
        line = error_line(err)
        assert code == 2 and "incomplete" in line and remove.split("/")[0] in line, err
        assert "allow-partial" not in line and "adapter keys" not in line, err
        assert not out.exists() and temporaries(tmp_path) == []


def test_a_sharded_base_missing_a_shard_names_it(files, diffusers_base, tmp_path, capsys):
    base = tmp_path / "base"
    shutil.copytree(diffusers_base, base)
    (base / "unet" / "diffusion_pytorch_model.safetensors").rename(base / "unet" / "part-1.safetensors")
    index = {"metadata": {}, "weight_map": {"a": "part-1.safetensors", "b": "part-2.safetensors"}}
    (base / "unet" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    code, _, err = run_cli("merge", ["--base", base, "--adapter", files["adapter"], "--out", tmp_path / "m"], capsys)
    assert code == 2 and "part-2.safetensors" in error_line(err), err


# ------------------------------------------------------------------------------- 6. killed merges
def kill_merge_mid_write(cmd: list[str], cwd: Path, after_tensors: int) -> None:
    """Run tools/merge.py (each output tensor slowed down and announced) and SIGKILL it mid-write."""
    driver = cwd / "driver.py"
    driver.write_text(DRIVER)
    proc = subprocess.Popen([sys.executable, str(driver), str(REPO / "tools" / "merge.py"), *map(str, cmd)],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env(), cwd=cwd)
    assert proc.stderr is not None
    seen = 0
    for line in proc.stderr:
        seen += line.startswith("@@tensor")
        if seen == after_tensors:
            proc.send_signal(signal.SIGKILL)
            break
    proc.stderr.close()
    proc.wait(timeout=120)
    assert proc.returncode == -signal.SIGKILL, f"merge ended by itself after {seen} tensors"


def wait_out_grace(folder: Path) -> None:
    """A temporary touched in the last `_STALE_AFTER_S` seconds may belong to a live writer between two
    steps; a killed merge's is older than that by the time a user runs anything again."""
    newest = max(p.lstat().st_mtime for p in folder.rglob("*"))
    time.sleep(max(0.0, newest + _STALE_AFTER_S + 0.2 - time.time()))


@pytest.mark.parametrize("kind", ["ckpt", "diffusers"])
def test_what_a_killed_merge_leaves_is_removed_by_the_next_run_which_says_so(files, diffusers_base, tmp_path,
                                                                           capsys, caplog, kind):
    """SIGKILL during a merge leaves its hidden output temporary (a `.tmp` file, or a `.tmp/` folder for a
    diffusers output) and, for a `.ckpt` base, the scratch folder of its safetensors copy. The next merge
    to that output removes them, one line each, and only them."""
    if kind == "ckpt":
        base = tmp_path / "base.ckpt"
        torch.save({"state_dict": load_file(files["base"])}, base)
        out_name = "merged.safetensors"
    else:
        base = diffusers_base
        out_name = "merged"
    outs = tmp_path / "outs"
    outs.mkdir()
    # Not names lycoft makes (one differs only in its random part): never touched.
    unrelated = [outs / ".merged.safetensors.backup", outs / ".merged.safetensors.my-own-notes.tmp"]
    for path in unrelated:
        path.write_bytes(b"mine")
    before = digests([base, files["adapter"]])
    cmd = ["--base", base, "--adapter", files["adapter"], "--out", outs / out_name]
    kill_merge_mid_write(cmd, tmp_path, after_tensors=30)
    left = sorted(p.name for p in outs.iterdir() if p not in unrelated)
    expected = [rf"\.{re.escape(out_name)}\.[0-9a-f]{{12}}\.tmp"] if kind == "ckpt" else []
    expected.append(rf"\.{re.escape(out_name)}\.[a-z0-9_]{{8}}\.tmp")
    assert len(left) == len(expected) and all(any(re.fullmatch(e, n) for n in left) for e in expected), left
    wait_out_grace(outs)
    with caplog.at_level(logging.WARNING, logger="lycoft"):  # the command line prints these on stderr
        code, _, err = run_cli("merge", cmd, capsys)
    assert code == 0, err
    removed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("lycoft: removed ")]
    assert sorted(line.split()[2] for line in removed) == left, removed
    assert all(f"interrupted write of {out_name}" in line and "\n" not in line for line in removed), removed
    assert sorted(p.name for p in outs.iterdir()) == sorted([out_name, *(p.name for p in unrelated)])
    assert all(p.read_bytes() == b"mine" for p in unrelated)
    assert digests([base, files["adapter"]]) == before
    assert temporaries(tmp_path) == [str(unrelated[1])]


# ---------------------------------------------------------------------------------- 7. exit codes
def test_user_errors_exit_2_with_one_line_and_no_traceback(files, tmp_path, capsys):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["base"].read_bytes()[:100_000])
    empty = tmp_path / "empty"
    empty.mkdir()
    unsafe = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": load_file(files["base"]), "args": argparse.Namespace(lr=1)}, unsafe)
    cut_ckpt = tmp_path / "cut.ckpt"
    cut_ckpt.write_bytes(unsafe.read_bytes()[:5000])
    missing = tmp_path / "missing.safetensors"
    out = tmp_path / "out" / "m.safetensors"
    before = digests([files["base"], files["small"], truncated, unsafe, cut_ckpt])
    a = files["small"]
    base = files["base"]
    cases = {
        "merge": [(["--base", missing, "--adapter", a], missing), (["--base", truncated, "--adapter", a], truncated),
                  (["--base", empty, "--adapter", a], empty), (["--base", unsafe, "--adapter", a], unsafe),
                  (["--base", cut_ckpt, "--adapter", a], cut_ckpt), (["--base", base, "--adapter", missing], missing),
                  (["--base", base, "--adapter", truncated], truncated)],
        "convert": [(["--in", missing, "--to", "lycoris"], missing),
                    (["--in", truncated, "--to", "lycoris"], truncated),
                    (["--in", a, "--to", "diff", "--base", unsafe], unsafe),
                    (["--in", a, "--to", "diff", "--base", empty], empty)],
        "inspect": [([missing], missing), ([truncated], truncated), ([empty], empty),
                    ([a, "--base", truncated], truncated), ([a, "--base", cut_ckpt], cut_ckpt)],
    }
    for name, argvs in cases.items():
        for argv, culprit in argvs:
            if name != "inspect":
                argv = [*argv, "--out", out]
            code, _, err = run_cli(name, argv, capsys)
            assert code == 2 and str(culprit) in error_line(err), (name, argv, err)
    # The unsafe pickle: what to do, with no flag that does not exist.
    code, _, err = run_cli("merge", ["--base", unsafe, "--adapter", a, "--out", out], capsys)
    assert "argparse.Namespace" in err and "--allow-pickle" not in err and "convert it to .safetensors" in err
    code, _, err = run_cli("tiny_model", ["--family", "sd1", "--format", "single-file", "--out", files["base"]],
                           capsys)
    assert code == 2 and "exists" in error_line(err)
    assert digests([files["base"], files["small"], truncated, unsafe, cut_ckpt]) == before
    assert not out.parent.exists() and temporaries(tmp_path) == []


@pytest.mark.parametrize("name", list(CLIS))
def test_internal_errors_keep_their_traceback_and_say_they_are_a_bug(name, files, tmp_path, capsys, monkeypatch):
    module = CLIS[name]
    job = {"merge": "merge_adapters", "convert": "convert_adapter", "inspect": "inspect_adapter",
           "tiny_model": "build_tiny_pipeline"}[name]
    argv = {"merge": ["--base", files["base"], "--adapter", files["small"], "--out", tmp_path / "m.safetensors"],
            "convert": ["--in", files["small"], "--out", tmp_path / "c.safetensors", "--to", "lycoris"],
            "inspect": [files["small"]],
            "tiny_model": ["--family", "sd1", "--format", "single-file", "--out", tmp_path / "t.safetensors"]}[name]

    def boom(*args, **kwargs):
        raise KeyError("an internal inconsistency")

    monkeypatch.setattr(module, job, boom)
    code, _, err = run_cli(name, argv, capsys)
    assert code == runner.EXIT_BUG == 1
    assert "Traceback" in err and "KeyError" in err and "this is a bug in lycoft" in err.splitlines()[-1], err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, job, interrupted)
    code, _, err = run_cli(name, argv, capsys)
    assert code == runner.EXIT_INTERRUPTED == 130
    assert "Traceback" not in err and "interrupted; nothing was written" in err, err
    assert list(tmp_path.iterdir()) == []


def test_a_real_process_exits_2_for_a_strength_with_a_comma(files, tmp_path):
    """The status a shell sees, and item by item what the user reads: the value, and how to write it."""
    out = tmp_path / "m.safetensors"
    res = subprocess.run([sys.executable, str(REPO / "tools" / "merge.py"), "--base", str(files["base"]),
                          "--adapter", f"{files['small']}:0,7", "--out", str(out)], capture_output=True, text=True,
                         env=env(), timeout=300)
    assert res.returncode == 2, res.stderr
    line = error_line(res.stderr)
    assert "'0,7' is not a number" in line and f"{files['small']}:0.7" in line and "not found" not in line
    assert list(tmp_path.iterdir()) == []


def test_exit_codes_are_documented_once_as_the_runner_defines_them():
    doc = (REPO / "docs" / "tools.md").read_text()
    section = doc.split("## Exit codes", 1)[1].split("\n## ", 1)[0]
    rows = {int(m[1]) for m in re.finditer(r"^\| (\d+) \|", section, re.M)}
    assert rows == {runner.EXIT_OK, runner.EXIT_BUG, runner.EXIT_USER_ERROR, runner.EXIT_INTERRUPTED}
    assert "training.md" in section


# ------------------------------------------------------------------------------------ 8. messages
@contextlib.contextmanager
def small_disk(folder: Path, size: str = "3m"):
    """A real 3 MB tmpfs at `folder` when this process may mount one (root), else None."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and shutil.which("mount") is not None and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True).returncode == 0
    try:
        yield folder if mounted else None
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_says_how_full_and_leaves_nothing(files, tmp_path, capsys, monkeypatch):
    """Up front when the output cannot fit, and when the disk fills up during the write (the size estimate
    made too small here): the message names the folder, the space free and the space needed."""
    with small_disk(tmp_path / "disk") as disk:
        folder = disk if disk is not None else tmp_path / "disk"
        out = folder / "merged.safetensors"
        if disk is None:  # not root: the same two situations, simulated
            from lycoft.io import atomic

            monkeypatch.setattr(atomic.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(3e6, 0, 3_000_000))
        code, _, err = run_cli("merge", ["--base", files["base"], "--adapter", files["small"], "--out", out], capsys)
        line = error_line(err)
        size = files["base"].stat().st_size / 1e6
        assert code == 2 and re.search(rf"the disk holding {re.escape(str(folder))} is full: 3\.\d MB free, about "
                                       rf"{size:.0f} MB needed", line), line
        assert "Errno" not in line and list(folder.iterdir()) == []

        monkeypatch.setattr("lycoft.merge._output_bytes", lambda *a: 1)
        if disk is None:
            def no_space(self, key, out):
                raise OSError(errno.ENOSPC, "No space left on device")

            monkeypatch.setattr("lycoft.io.streaming.SafetensorsInput.copy_raw", no_space)
        code, _, err = run_cli("merge", ["--base", files["base"], "--adapter", files["small"], "--out", out], capsys)
        line = error_line(err)
        assert code == 2 and re.search(r"the disk holding .* is full: .* MB free, (about|more than) .* MB needed",
                                       line), line
        assert "Errno" not in line and list(folder.iterdir()) == []
        if disk is not None:  # and a plain atomic write of more than fits
            with pytest.raises(DiskFullError, match=r"is full: .* MB free, more than .* MB needed") as info:
                atomic_write(folder / "big.bin", lambda p: p.write_bytes(b"\0" * 4_000_000))
            assert info.value.errno == errno.ENOSPC and list(folder.iterdir()) == []


def test_a_bad_peft_config_names_the_file_and_the_problem(tmp_path, capsys):
    peft_file = tmp_path / "peft.safetensors"  # a PEFT adapter without its config
    save_file({"down_blocks.0.attentions.0.proj_in.oft_R.weight": torch.zeros(8, 6)}, peft_file)
    configs = {"missing.json": None, "broken.json": "{not json", "list.json": "[1, 2]"}
    for name, text in configs.items():
        config = tmp_path / name
        if text is not None:
            config.write_text(text)
        for cli, argv in (("convert", ["--in", peft_file, "--out", tmp_path / "c.safetensors", "--to", "lycoris"]),
                          ("inspect", [peft_file])):
            code, _, err = run_cli(cli, [*argv, "--peft-config", config], capsys)
            line = error_line(err)
            assert code == 2 and str(config) in line, err
            assert {"missing.json": "not found", "broken.json": "not valid JSON",
                    "list.json": "holds a JSON list"}[name] in line, err


# --------------------------------------------------------------------------------------- 9. small ones
def test_counts_below_their_minimum_are_refused(files, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    code, _, err = run_cli("merge", ["--base", files["base"], "--adapter", files["small"], "--out", out,
                                     "--verify", "-1"], capsys)
    assert code == 2 and "--verify: '-1' is negative" in err and not out.exists()
    for top in ("-3", "0"):
        code, _, err = run_cli("inspect", [files["small"], "--top", top], capsys)
        assert code == 2 and f"--top: '{top}' is less than 1" in err
    code, _, err = run_cli("tiny_model", ["--family", "sd1", "--format", "single-file", "--out", out,
                                          "--seed", "-1"], capsys)
    assert code == 2 and "--seed: '-1' is out of range" in err and not out.exists()


def test_folder_outputs_get_the_permissions_of_the_umask(files, diffusers_base, tmp_path, capsys):
    """diffusers' save_pretrained and mkdtemp make 0o600 files and a 0o700 folder; a UI service running as
    another user could not read the merged model."""
    umask = os.umask(0o022)
    try:
        out = tmp_path / "merged"
        code, _, err = run_cli("merge", ["--base", diffusers_base, "--adapter", files["small"], "--out", out], capsys)
        assert code == 0, err
        tiny = tmp_path / "tiny"
        code, _, err = run_cli("tiny_model", ["--family", "sd1", "--format", "diffusers", "--out", tiny], capsys)
        assert code == 0, err
    finally:
        os.umask(umask)
    for root in (out, tiny):
        modes = {p.relative_to(root): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}
        wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if (root / p).is_dir() else 0o644)}
        assert wrong == {}, wrong


def test_inspect_against_another_family_names_both(files, tmp_path, capsys):
    sdxl = write_base("sdxl", "single-file", tmp_path / "sdxl.safetensors")
    code, out, err = run_cli("inspect", [files["small"], "--base", sdxl, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert (result["family"], result["family_source"], result["base_family"]) == ("sd1", "metadata", "sdxl")
    code, out, err = run_cli("inspect", [files["small"], "--base", sdxl], capsys)
    assert "family: sd1 (from metadata)" in out and f"base {sdxl} (sdxl)" in out
    assert "the adapter is sd1 (from its metadata) but the base is sdxl" in out


# ------------------------------------------------------------------------------------------- fuzzing
BAD_VALUES = ["abc", "-1", "1e30", "99999999999999999999999", "nan", "inf", "-inf", ""]


def fuzz_cases(files: dict[str, Path], work: Path) -> list[tuple[str, list[str], str]]:
    """(command, argv, what was changed): every flag of every command line (from its parser) with each
    bad value, and a path that does not exist, over an argv that works."""
    missing = str(work / "no-such-folder" / "no-such-file.safetensors")
    out = str(work / "out")
    valid = {
        "merge": [("--base", str(files["base"])), ("--adapter", str(files["small"])),
                  ("--out", f"{out}/m.safetensors")],
        "convert": [("--in", str(files["small"])), ("--out", f"{out}/c.safetensors"), ("--to", "lycoris")],
        "inspect": [(None, str(files["small"]))],
        "tiny_model": [("--family", "sd1"), ("--format", "single-file"), ("--out", f"{out}/t.safetensors")],
    }
    cases = []
    for name, module in CLIS.items():
        for action in module.build_parser()._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = action.option_strings[0] if action.option_strings else None
            if action.nargs == 0:  # a switch: no value to get wrong
                cases.append((name, [v for pair in valid[name] for v in pair if v is not None] + [flag], flag))
                continue
            values = [*BAD_VALUES, missing]
            if flag == "--adapter":
                values += [f"{files['small']}:{v}" for v in BAD_VALUES]
            for value in values:
                argv = []
                for f, v in valid[name]:
                    if f != flag:
                        argv += [f, v] if f else [v]
                argv += [flag, value] if flag else [value]
                cases.append((name, argv, f"{flag or action.dest}={value!r}"))
    return cases


def test_every_flag_of_every_command_with_bad_values_follows_the_rule(files, tmp_path, capsys, monkeypatch):
    """Exit 0 or 2, never a traceback; inputs byte-identical; no temporary left, in the output folder, beside
    the inputs or in the system temporary folder."""
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    scratch = tmp_path / "system-tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.chdir(work)
    inputs = [files["base"], files["small"]]
    before = digests(inputs)
    stats = {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in inputs}
    cases = fuzz_cases(files, work)
    assert len(cases) > 150
    t0 = time.perf_counter()
    for name, argv, what in cases:
        code, _, err = run_cli(name, argv, capsys)
        assert code in (0, 2) and "Traceback" not in err, (name, what, err)
        if code == 2:  # argparse's usage and error, or the command's one line
            assert "usage:" in err or len([x for x in err.splitlines() if x.startswith("error: ")]) == 1, err
        assert {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in inputs} == stats, (name, what)
        left = temporaries(work, scratch, files["base"].parent)
        assert left == [], (name, what, left)
        assert list(scratch.iterdir()) == [], (name, what)
        for entry in work.iterdir():
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        (work / "out").mkdir()
    assert digests(inputs) == before
    print(f"{len(cases)} bad inputs in {time.perf_counter() - t0:.1f} s")
