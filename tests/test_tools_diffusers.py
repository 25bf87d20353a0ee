"""lycoft adapters in diffusers pipelines (SD1 and SDXL, images generated): load, strength, unload, fuse and
an exact unfuse; and the docs' commands and example run as written."""

from __future__ import annotations

import copy
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_files import BOFT_RESCALE, model_outputs, rel, write_adapter

import lycoft
from lycoft.checkpoints import build_tiny_pipeline
from lycoft.diffusers_loading import fuse

REPO = Path(__file__).resolve().parents[1]
IMAGE_ATOL = 1e-3  # images in [0, 1]; on-the-fly and baked weights differ by float32 rounding only



def image(pipe) -> torch.Tensor:
    return pipe("a photo of sks toy", num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_load_strength_unload_fuse_unfuse(tmp_path, family):
    pipe = build_tiny_pipeline(family)
    adapter = str(write_adapter(family, BOFT_RESCALE, tmp_path / "b.safetensors", pipe=pipe))
    pristine = copy.deepcopy(pipe)
    originals = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    base = image(pipe)

    net = lycoft.load(adapter, pipe=pipe, multiplier=1.0)
    full = image(pipe)
    assert (full - base).abs().max() > 1e-2  # the adapter does something visible

    net.set_multiplier(0.0)  # strength 0 is the base model, exactly
    assert torch.equal(image(pipe), base)

    net.set_multiplier(0.5)  # on the fly at 0.5 == weights baked at 0.5
    half = image(pipe)
    lycoft.load(adapter, pipe=pristine).merge(0.5)
    baked = pristine
    assert torch.allclose(half, image(baked), atol=IMAGE_ATOL)

    net.remove()  # unload: the base model, exactly
    assert torch.equal(image(pipe), base)

    net.apply()
    net.set_multiplier(1.0)
    fused = fuse(net)  # baked into the weights: no adapter left in the forward
    assert not net.applied and torch.allclose(image(pipe), full, atol=IMAGE_ATOL)
    fused.unfuse()  # original weights back bit for bit, adapter on the fly again
    assert net.applied
    assert all(torch.equal(v, originals[k]) for k, v in pipe.unet.state_dict().items())
    assert torch.equal(image(pipe), full)
    with pytest.raises(RuntimeError, match="not fused"):
        fused.unfuse()


# -- the documentation runs as written -------------------------------------------------------------------
def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", REPO / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _doc_steps(doc: Path) -> list[tuple[str, object]]:
    """The doc's ```sh commands (``python tools/<x>.py ...``, as argv) and ```python blocks, in order."""
    steps: list[tuple[str, object]] = []
    for lang, body in re.findall(r"```(sh|python)\n(.*?)```", doc.read_text(), re.S):
        if lang == "python":
            steps.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            if line:
                assert line.startswith("python tools/"), line
                steps.append(("sh", shlex.split(line)))
    return steps


def test_tools_doc_runs_as_written(tmp_path, monkeypatch):
    """docs/tools.md, block by block in a fresh folder: tool commands in-process with the same argv, Python
    blocks in one namespace."""
    steps = _doc_steps(REPO / "docs" / "tools.md")
    assert sum(kind == "sh" for kind, _ in steps) >= 8 and steps[0][1][1] == "tools/tiny_model.py"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "lycoft").symlink_to(REPO / "lycoft")  # the doc stands in a checkout: it names shipped files
    namespace: dict = {"__name__": "__doc__"}
    for kind, step in steps:
        if kind == "python":
            exec(compile(step, "docs/tools.md", "exec"), namespace)
        else:
            assert _tool(Path(step[1]).stem).main(step[2:]) == 0, step
    assert (tmp_path / "style.png").is_file() and (tmp_path / "merged-sdxl" / "unet").is_dir()
    assert (tmp_path / "peft-again" / "adapter_config.json").is_file()


def test_tools_inspect_does_not_shadow_the_standard_library():
    """`python tools/<any>.py` puts tools/ first on sys.path, where tools/inspect.py is found by every
    `import inspect` (torch imports it): the file hands the standard library's module over."""
    code = "import sys; sys.path.insert(0, 'tools'); import torch, inspect; print(inspect.signature(len))"
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "(obj, /)" in res.stdout, res.stderr


def test_diffusers_doc_example_runs(tmp_path, monkeypatch):
    text = (REPO / "docs" / "diffusers.md").read_text()
    code = re.findall(r"```python\n(.*?)```", text, re.S)
    assert code
    monkeypatch.chdir(tmp_path)
    for block in code:
        exec(compile(block, "docs/diffusers.md", "exec"), {"__name__": "__doc__"})


def _half_precision_case(tmp_path, algo: str) -> None:
    """An fp16/bf16 pipeline takes the (float32) adapter on the fly; its UNet and text encoder match the
    float32 ones up to the half-precision rounding of the whole model."""
    base = build_tiny_pipeline("sd1")
    cfg = lycoft.AdapterConfig(algo=algo, block_size=4, rescale=True)
    adapter = str(write_adapter("sd1", cfg, tmp_path / "a.safetensors", std=0.03, pipe=base))
    full = copy.deepcopy(base)
    lycoft.load(adapter, pipe=full)
    reference = model_outputs(full, "sd1")
    for dtype, tol in ((torch.float16, 1e-2), (torch.bfloat16, 8e-2)):
        half = copy.deepcopy(base).to(dtype=dtype)
        lycoft.load(adapter, pipe=half)
        got = model_outputs(half, "sd1", dtype=dtype)
        for name in reference:
            assert rel(got[name], reference[name]) <= tol, (dtype, name, rel(got[name], reference[name]))


def test_half_precision_pipelines_oft(tmp_path):
    _half_precision_case(tmp_path, "oft")


def test_half_precision_pipelines_boft(tmp_path):
    _half_precision_case(tmp_path, "boft")
