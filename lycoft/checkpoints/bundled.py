"""Where the bundled diffusers configs live and how to read one (JSON only, no weights).

Folders under ``lycoft/checkpoints/configs/``: ``sd15``, ``sd21``, ``sdxl-base-1.0`` (the real models'
public configs) and ``tiny-sd1``, ``tiny-sd2``, ``tiny-sdxl`` (the builtin tiny models). Each has
``model_index.json`` and one sub-folder per component, like a diffusers folder without weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

CONFIGS_ROOT = Path(__file__).resolve().parent / "configs"

# Where each component keeps its config file inside a diffusers folder.
_CONFIG_FILE = {
    "scheduler": "scheduler_config.json",
    "tokenizer": "tokenizer_config.json",
    "tokenizer_2": "tokenizer_config.json",
}


def bundled_config_names() -> list[str]:
    """Names of the bundled config folders, sorted."""
    return sorted(p.name for p in CONFIGS_ROOT.iterdir() if (p / "model_index.json").is_file())


def bundled_config_dir(name: str) -> Path:
    """Path of bundled config folder `name` (e.g. ``"sd15"``, ``"tiny-sdxl"``)."""
    path = CONFIGS_ROOT / name
    if not (path / "model_index.json").is_file():
        raise ValueError(f"no bundled config {name!r}; available: {', '.join(bundled_config_names())}")
    return path


def load_component_config(name: str, component: str) -> dict[str, Any]:
    """The JSON config of `component` (``"unet"``, ``"vae"``, ``"text_encoder"``, ``"scheduler"``, ...)
    in bundled folder `name`, as a plain dict."""
    path = bundled_config_dir(name) / component / _CONFIG_FILE.get(component, "config.json")
    if not path.is_file():
        raise ValueError(f"bundled config {name!r} has no component {component!r} ({path} is missing)")
    return json.loads(path.read_text())
