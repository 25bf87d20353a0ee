"""Every command in README.md and docs/*.md runs as written (one test per document).

A document's fenced code blocks run in document order, in a fresh folder that stands for the root of a
checkout: every tracked top-level entry of the repository (`tools/`, `configs/`, `train_network.py`,
`lycoft/` ...) is linked into it, and `.venv/bin/` holds the interpreter running the tests and its scripts,
with lycoft's console scripts (`lycoft-merge` ...) as `pip install -e .` writes them. Files a block writes
are there for the blocks after it. Commands run offline (`HF_HUB_OFFLINE=1`, an empty `HF_HOME`, so no
accelerate config or hub cache of the machine takes part), on one CPU thread, with lycoft from this checkout.

How each fence is treated, by its language:

- ```sh, ```bash, ```shell: the block runs in `bash -e -o pipefail` (a new shell per block: files carry
  over, shell variables and `cd` do not); any failing line fails the block.
- ```console: the lines that start with `$ ` (and their `\\` continuation lines) run as above; the other
  lines are the output they show.
- ```python, ```py: executed in this process with the folder as working directory, all of a document's
  Python blocks in one namespace (one Python session per page, as a reader pastes them).
- any other language (```text, ```toml, ```json ...): shown, never run (output, formulas, file contents).
- no language: an error; name one (```text for output or formulas).

A block that cannot run here (it needs a GPU, a download, a UI, the reader's own files, `make`, `pip
install`) carries a marker, an HTML comment (invisible on GitHub) on the last non-blank line before its
fence:

    <!-- snippet: skip (needs a GPU) -->     not run; the reason in parentheses is required and reported
    <!-- snippet: output -->                 shows output, not commands (a ```text fence needs none)

A runnable block without a marker that fails, fails the test with the document, the block's line and the
tail of its output. A marker with an unknown kind, a skip without a reason or a marker not followed by a
fence fails it too. Each test prints what it ran and skipped (`pytest -rP` shows it).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import toml

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

SHELL = {"sh", "bash", "shell", "console"}
PYTHON = {"python", "py"}
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")
MARKER_KIND = re.compile(r"(skip)\s*\((.+)\)|(output)(?:\s*\((.*)\))?")
BLOCK_TIMEOUT_S = 300
TAIL_CHARS = 3000


@dataclass
class Block:
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    marker: str | None  # "skip" or "output"
    reason: str


def blocks_of(text: str, rel: str) -> list[Block]:
    """The fenced blocks of a Markdown page with their markers; a malformed marker or fence is an error."""
    lines = text.splitlines()
    found: list[Block] = []
    pending: tuple[int, str, str] | None = None  # a marker waiting for its fence
    i = 0
    while i < len(lines):
        line = lines[i]
        m = MARKER.match(line)
        if m:
            kind = MARKER_KIND.fullmatch(m.group(1))
            if not kind:
                pytest.fail(f"{rel}:{i + 1}: unknown marker {line.strip()!r}; write "
                            "'<!-- snippet: skip (why) -->' or '<!-- snippet: output -->'")
            if pending:
                pytest.fail(f"{rel}:{pending[0]}: marker not followed by a fenced block")
            pending = (i + 1, kind.group(1) or kind.group(3), (kind.group(2) or kind.group(4) or "").strip())
            i += 1
            continue
        m = FENCE.match(line)
        if not m:
            if line.strip() and pending:
                pytest.fail(f"{rel}:{pending[0]}: marker not followed by a fenced block")
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        if not lang:
            pytest.fail(f"{rel}:{i + 1}: a fence without a language; name it (```text for output or formulas)")
        end = next((j for j in range(i + 1, len(lines))
                    if lines[j].strip().startswith(fence[0] * len(fence)) and not lines[j].strip(fence[0]).strip()),
                   None)
        if end is None:
            pytest.fail(f"{rel}:{i + 1}: the fenced block is never closed")
        marker, reason = (pending[1], pending[2]) if pending else (None, "")
        found.append(Block(i + 1, lang, "\n".join(lines[i + 1:end]) + "\n", marker, reason))
        pending = None
        i = end + 1
    if pending:
        pytest.fail(f"{rel}:{pending[0]}: marker not followed by a fenced block")
    return found


def console_commands(body: str) -> str:
    """The commands of a ```console block: `$ ` lines and their continuations; the rest is output."""
    commands, continued = [], False
    for line in body.splitlines():
        if continued or line.startswith("$ "):
            commands.append(line if continued else line[2:])
            continued = line.rstrip().endswith("\\")
    return "\n".join(commands) + "\n"


def checkout_folder(root: Path) -> Path:
    """A folder that looks like the repository's root to the commands: links to the tracked entries, and a
    `.venv/bin/` whose programs are those of the interpreter running the tests."""
    root.mkdir()
    try:
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True).stdout.splitlines()
    except OSError:
        tracked = []
    tops = {f.split("/")[0] for f in tracked} or {p.name for p in REPO.iterdir() if not p.name.startswith(".")}
    for name in sorted(tops):
        if (REPO / name).exists():
            (root / name).symlink_to(REPO / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    real_bin = Path(sys.executable).parent
    # Outside a virtual environment the interpreter's folder is a system one: stand in for the interpreter only.
    programs = list(real_bin.iterdir()) if sys.prefix != sys.base_prefix else [Path(sys.executable)]
    for program in programs + [real_bin / "python", real_bin / "python3"]:
        # A linked interpreter would lose its virtual environment (found next to the path it was started by).
        target = sys.executable if program.name.startswith("python") else str(program)
        write_program(bin_dir / program.name, f'#!/bin/sh\nexec {shlex.quote(target)} "$@"\n')
    scripts = toml.loads((REPO / "pyproject.toml").read_text())["project"].get("scripts", {})
    for name, entry in scripts.items():
        module, func = entry.split(":")
        write_program(bin_dir / name, f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\n"
                                      f"sys.exit({func}())\n")
    return root


def write_program(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def shell_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        PATH=os.pathsep.join([str(root / ".venv" / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")]),
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        HF_HOME=str(root.parent / "hf-home"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        # Tiny models gain nothing from a second thread, and on a shared machine it costs several times over.
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        MPLBACKEND="Agg",
    )
    return env


def tail(text: str) -> str:
    return text if len(text) <= TAIL_CHARS else "..." + text[-TAIL_CHARS:]


def run_shell(rel: str, block: Block, script: str, root: Path, env: dict[str, str]) -> None:
    try:
        res = subprocess.run(["bash", "--noprofile", "--norc", "-e", "-o", "pipefail", "-c", script], cwd=root,
                             env=env, capture_output=True, text=True, timeout=BLOCK_TIMEOUT_S)
    except subprocess.TimeoutExpired as e:
        out = (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        pytest.fail(f"{rel}:{block.line}: ```{block.lang} block still running after {BLOCK_TIMEOUT_S} s\n"
                    f"{tail(out)}", pytrace=False)
    if res.returncode != 0:
        pytest.fail(f"{rel}:{block.line}: ```{block.lang} block exited with {res.returncode}\n{script}\n"
                    f"--- output (tail) ---\n{tail(res.stderr or res.stdout)}", pytrace=False)


def run_python(rel: str, block: Block, namespace: dict) -> None:
    # Leading newlines put the block's lines at their line numbers in the page, for the traceback.
    code = compile("\n" * block.line + block.body, rel, "exec")
    try:
        exec(code, namespace)
    except Exception:
        pytest.fail(f"{rel}:{block.line}: ```python block raised\n--- traceback (tail) ---\n"
                    f"{tail(traceback.format_exc())}", pytrace=False)


@pytest.mark.parametrize("doc", DOCS, ids=[d.relative_to(REPO).as_posix() for d in DOCS])
def test_doc_snippets_run_as_written(doc, tmp_path, monkeypatch):
    rel = doc.relative_to(REPO).as_posix()
    blocks = blocks_of(doc.read_text(encoding="utf-8"), rel)
    root = checkout_folder(tmp_path / "checkout")
    env = shell_env(root)
    monkeypatch.chdir(root)
    namespace: dict = {"__name__": "__main__"}
    report = []
    for block in blocks:
        runnable = block.lang in SHELL | PYTHON
        if block.marker == "skip":
            report.append(f"  {rel}:{block.line} ```{block.lang} skipped: {block.reason}")
            continue
        if block.marker == "output" or not runnable:
            report.append(f"  {rel}:{block.line} ```{block.lang} shown, not run")
            continue
        start = time.perf_counter()
        if block.lang in PYTHON:
            run_python(rel, block, namespace)
        else:
            script = console_commands(block.body) if block.lang == "console" else block.body
            run_shell(rel, block, script, root, env)
        report.append(f"  {rel}:{block.line} ```{block.lang} ran in {time.perf_counter() - start:.1f} s")
    ran = sum(" ran in " in line for line in report)
    skipped = sum(" skipped: " in line for line in report)
    print(f"{rel}: {ran} ran, {skipped} skipped, {len(report) - ran - skipped} shown", *report, sep="\n")


def test_markers_and_fences_are_read_and_checked():
    """What the page tests rely on: markers attach to the next fence, console blocks keep only commands,
    and a malformed page is an error rather than a silently skipped block."""
    page = ("text\n\n<!-- snippet: skip (needs a GPU) -->\n\n```bash\nnvidia-smi\n```\n"
            "<!-- snippet: output -->\n```sh\nwrote x\n```\n~~~python\nx = 1\n~~~\n")
    blocks = blocks_of(page, "page.md")
    assert [(b.line, b.lang, b.marker, b.reason) for b in blocks] == [
        (5, "bash", "skip", "needs a GPU"), (9, "sh", "output", ""), (12, "python", None, "")]
    assert console_commands("$ echo a \\\n  b\na b\n$ ls\n") == "echo a \\\n  b\nls\n"
    for bad in ["<!-- snippet: skip -->\n```sh\nx\n```\n",             # a skip needs its reason
                "<!-- snippet: maybe (x) -->\n```sh\nx\n```\n",        # unknown kind
                "<!-- snippet: output -->\ntext\n```sh\nx\n```\n",     # not followed by the fence
                "```\nx\n```\n",                                      # no language
                "```sh\nx\n"]:                                         # never closed
        with pytest.raises(pytest.fail.Exception):
            blocks_of(bad, "page.md")
