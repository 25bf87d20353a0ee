"""The command lines: every console script of pyproject.toml is a `main` in `lycoft.cli` that tools/<name>.py
runs unchanged, the tools' --family choices are the family table, and the README's console-script commands
run as written."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import toml
from tiny_files import write_adapter

import lycoft
from lycoft.checkpoints.families import FAMILIES

REPO = Path(__file__).resolve().parents[1]
TOOLS = {"lycoft-merge": "merge", "lycoft-convert": "convert", "lycoft-inspect": "inspect",
         "lycoft-tiny-model": "tiny_model"}


def console_scripts() -> dict[str, object]:
    """`[project.scripts]` of pyproject.toml, each target imported: what an installed console script calls."""
    found = {}
    for name, target in toml.load(REPO / "pyproject.toml")["project"]["scripts"].items():
        module, _, attr = target.partition(":")
        found[name] = getattr(importlib.import_module(module), attr)
    return found


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_console_script_is_the_main_its_tools_wrapper_runs():
    found = console_scripts()
    assert set(found) == set(TOOLS)
    for name, main in found.items():
        assert callable(main) and main.__module__ == f"lycoft.cli.{TOOLS[name]}"
        assert _tool(TOOLS[name]).main is main


@pytest.mark.parametrize("module", ["convert", "inspect", "tiny_model"])
def test_family_choices_are_the_family_table(module):
    parser = importlib.import_module(f"lycoft.cli.{module}").build_parser()
    (family,) = [a for a in parser._actions if a.dest == "family"]
    assert list(family.choices) == list(FAMILIES)


@pytest.mark.parametrize("tool", ["inspect", "merge"])
def test_tools_scripts_run_from_a_checkout(tool):
    """`python tools/<x>.py` (tools/ first on sys.path, where tools/inspect.py stands before the standard
    library's `inspect` that torch imports) parses its arguments."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    res = subprocess.run([sys.executable, str(REPO / "tools" / f"{tool}.py"), "--help"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "--base" in res.stdout, res.stderr


def test_readme_console_script_commands_run_as_written(tmp_path, monkeypatch):
    """The README block, after `make demo` (a random adapter for the tiny SD1 model stands in for the demo's)."""
    text = (REPO / "README.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if "lycoft-merge" in b)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo_out").mkdir()
    write_adapter("sd1", lycoft.AdapterConfig(block_size=4), tmp_path / "demo_out" / "demo-oft.safetensors")
    found = console_scripts()
    ran = set()
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line.split(" #")[0])
        if argv:
            name = Path(argv[0]).name
            assert found[name](argv[1:]) == 0, line
            ran.add(name)
    assert ran == set(found)
    assert (tmp_path / "merged-half.safetensors").is_file() and (tmp_path / "demo-oft-diff-half.safetensors").is_file()
