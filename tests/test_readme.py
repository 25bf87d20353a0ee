"""The README's Python example runs as written."""

import re
from pathlib import Path


def test_readme_python_api_example_runs(tmp_path, monkeypatch):
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S)
    assert block, "README lost its Python API example"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    assert (tmp_path / "adapter.safetensors").exists()
    assert not scope["net"].applied  # merge() detached the adapters after baking them
