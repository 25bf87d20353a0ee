"""The repository explains itself: nothing a user reads points outside it or talks about how it was made.

Every tracked text file (tests: their comments and docstrings) must not send the reader to files that are
not in the repository; the math and file format live in docs/spec.md. The README, docs and benchmark
reports speak of the product and its measurements.
"""

from __future__ import annotations

import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
THIS = Path(__file__).resolve().relative_to(ROOT).as_posix()

# Pointers to notes outside the repository: the parent folder, the old specification and its reference pages.
OUTSIDE = re.compile(
    r"\.\./shared|\bSPEC\b|SPEC\.md|\breference/[\w.-]+|\b(?:offline-feasibility|kohya-contract|peer-results|"
    r"trainer-features)\b|\bformats\.md\b|\b(?:DESIGN|STYLE)\.md\b"
)
# The kohya metadata key is a product fact, not a remark about development.
SESSION = re.compile(r"session", re.I)
KOHYA_SESSION_KEY = "ss_session_id"


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: no list of tracked files")
    return [f for f in out.splitlines() if f and f != THIS and (ROOT / f).is_file()]


def text_of(rel: str) -> str | None:
    data = (ROOT / rel).read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (e.g. the gzipped tokenizer vocabulary)
    return data.decode("utf-8", errors="replace")


def comments_and_docstrings(source: str) -> str:
    """A Python file's comments and docstrings: what a reader of a test reads as prose."""
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(source).readline)
             if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
    return "\n".join(parts)


def user_text(rel: str) -> str | None:
    """What a user reads of a tracked file. Tests may read data from anywhere; their prose may not point there."""
    text = text_of(rel)
    if text is None or not rel.startswith("tests/"):
        return text
    return comments_and_docstrings(text) if rel.endswith(".py") else text


def test_no_pointer_leaves_the_repository():
    hits = []
    for rel in tracked_files():
        text = user_text(rel)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            m = OUTSIDE.search(line)
            if m:
                hits.append(f"{rel}:{n}: {m.group(0)!r} in {line.strip()[:100]!r}")
    assert not hits, "point to docs/spec.md (or another file in the repository) instead:\n" + "\n".join(hits)


def test_readme_docs_and_bench_reports_speak_of_the_product():
    pages = [f for f in tracked_files()
             if f.endswith(".md") and (f == "README.md" or f.startswith(("docs/", "bench/")))]
    assert "docs/spec.md" in pages
    hits = []
    for rel in pages:
        for n, line in enumerate((ROOT / rel).read_text().splitlines(), 1):
            if SESSION.search(line.replace(KOHYA_SESSION_KEY, "")):
                hits.append(f"{rel}:{n}: {line.strip()[:100]!r}")
    assert not hits, "describe the product and its measurements, not how they were made:\n" + "\n".join(hits)


def test_readme_links_the_specification():
    readme = (ROOT / "README.md").read_text()
    assert "(docs/spec.md)" in readme
