"""The parts of lycoft the UI extensions import run in the UIs' own environments: no training dependency.

ComfyUI, A1111, Forge and reForge bring torch and safetensors (and their own transformers); they need not
have diffusers, accelerate or lycoft's other dependencies. A fresh interpreter in which diffusers,
transformers, accelerate, toml, Pillow, tqdm and numpy cannot be imported at all must still import what the
extensions use.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
UI_MODULES = ["lycoft.formats", "lycoft.formats.lycoris", "lycoft.formats.peft", "lycoft.formats.patches",
              "lycoft.ops", "lycoft.io", "lycoft.config", "lycoft.ui.keys", "lycoft.ui.state",
              "lycoft.ui.comfy_adapter"]
BLOCKED = ["diffusers", "transformers", "accelerate", "toml", "PIL", "tqdm", "numpy"]


def test_ui_modules_import_without_training_dependencies():
    code = textwrap.dedent(f"""
        import sys
        for name in {BLOCKED!r}:
            sys.modules[name] = None  # `import name` now raises ImportError
        import importlib
        for module in {UI_MODULES!r}:
            importlib.import_module(module)
    """)
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
