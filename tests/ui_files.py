"""The files the UI tests load: a tiny checkpoint per family and one lycoft adapter for it that mixes OFT
(rescale, constraint; attention, MLP and text-encoder layers) and BOFT (rescale; every other layer)."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from tiny_files import write_adapter, write_base

import lycoft
from lycoft.formats.lycoris import read_adapter

STRENGTHS = (0.5, 1.0, 1.5, -1.0)
OFT_PART = lycoft.AdapterConfig(block_size=4, rescale=True, constraint=1e-3)
BOFT_PART = lycoft.AdapterConfig(algo="boft", block_size=4, rescale=True)
OFT_LAYERS = r"attn|proj_in|proj_out|ff_net|self_attn|mlp"


def checkpoint(family: str, root: Path) -> Path:
    return write_base(family, "single-file", root / f"{family}.safetensors")


def mixed_adapter(family: str, root: Path, out: Path) -> tuple[Path, int]:
    """The adapter file at `out` and its number of layers."""
    oft = write_adapter(family, OFT_PART, root / f"{family}-oft.safetensors", seed=1, preset="attn-mlp")
    boft = write_adapter(family, BOFT_PART, root / f"{family}-boft.safetensors", seed=2, exclude=OFT_LAYERS)
    tensors = {**load_file(oft), **load_file(boft)}
    save_file(tensors, out, metadata={**read_adapter(str(oft))[1], "lycoft.algo": "oft,boft"})
    return out, len({k.rsplit(".", 1)[0] for k in tensors})
