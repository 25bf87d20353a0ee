"""Builders of the files the tools tests work on: tiny base models on disk and random adapters for them."""

from __future__ import annotations

import atexit
import shutil
import tempfile
from pathlib import Path

import torch
from conftest import randomise_network

import lycoft
from lycoft.checkpoints import build_tiny_pipeline, save_diffusers, save_single_file
from lycoft.network import candidate_index

# Two adapters that together cover both algorithms, rescale and a strength below 1.
OFT = lycoft.AdapterConfig(block_size=4)
BOFT_RESCALE = lycoft.AdapterConfig(algo="boft", block_size=4, rescale=True)


def write_base(family: str, kind: str, path: Path, seed: int = 0, pipe=None) -> Path:
    """The builtin tiny model as a single-file checkpoint or a diffusers folder."""
    pipe = pipe or build_tiny_pipeline(family, seed=seed)
    if kind == "single-file":
        save_single_file(pipe, path, family)
    else:
        save_diffusers(pipe, path)
    return path


def write_adapter(family: str, cfg: lycoft.AdapterConfig, path: Path, seed: int = 1, std: float = 0.05,
                  pipe=None, **inject_kw) -> Path:
    """A random adapter for the tiny model of `family` (every layer of the `full` preset by default).
    On a given `pipe` the adapter is removed again after saving."""
    pipe = pipe or build_tiny_pipeline(family)
    net = lycoft.inject(pipe=pipe, config=cfg, **inject_kw)
    randomise_network(net, std=std, seed=seed)
    net.save(str(path))
    net.remove()
    return path


def family_files(root: Path, family: str) -> dict:
    """Tiny base (single file and diffusers folder), two adapters (oft; boft with rescale) and the pristine
    pipeline (deep-copy it before changing it)."""
    root.mkdir(parents=True, exist_ok=True)
    pipe = build_tiny_pipeline(family)
    return {
        "pipe": pipe,
        "single-file": write_base(family, "single-file", root / "base.safetensors", pipe=pipe),
        "diffusers": write_base(family, "diffusers", root / "base_dir", pipe=pipe),
        "a": write_adapter(family, OFT, root / "a.safetensors", seed=1, pipe=pipe),
        "b": write_adapter(family, BOFT_RESCALE, root / "b.safetensors", seed=2, pipe=pipe),
    }


def text_encoders(pipe) -> list:
    return [t for t in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if t is not None]


def layer_of(pipe, family: str):
    """adapter key -> the pipeline's module (every spelling lycoft accepts)."""
    index = candidate_index(pipe.unet, text_encoders(pipe), family)
    return {k: module for k, (_, _, module) in index.items()}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def model_outputs(pipe, family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """UNet and text-encoder outputs of `pipe` on fixed random inputs (given to the UNet in `dtype`)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, pipe.tokenizer.vocab_size - 2, (1, 12), generator=g)
    out = {}
    with torch.no_grad():
        for i, te in enumerate(text_encoders(pipe)):
            out[f"te{i + 1}"] = te(ids, output_hidden_states=True).hidden_states[-2]
        cfg = pipe.unet.config
        x = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
        ctx = torch.randn(1, 12, cfg.cross_attention_dim, generator=g)
        kw = {}
        if family == "sdxl":
            emb = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, emb, generator=g),
                                       "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
        kw = {k: ({n: t.to(dtype) for n, t in v.items()} if isinstance(v, dict) else v) for k, v in kw.items()}
        out["unet"] = pipe.unet(x.to(dtype), 10, ctx.to(dtype), **kw).sample
    return out


def leftovers(folder: Path, expected: set[str]) -> set[str]:
    """Files in `folder` other than `expected` (temporary files a failed write must not leave)."""
    return {p.name for p in folder.iterdir()} - expected



_SHARED: dict[str, dict] = {}


def shared_files(family: str) -> dict:
    """`family_files` per family, built once per test session for all the tools tests (they only read the
    files and deep-copy the pipeline); removed when the session ends."""
    if family not in _SHARED:
        if not _SHARED:
            root = Path(tempfile.mkdtemp(prefix="lycoft-tool-files-"))
            atexit.register(shutil.rmtree, root, ignore_errors=True)
            _SHARED["_root"] = {"path": root}
        _SHARED[family] = family_files(_SHARED["_root"]["path"] / family, family)
    return _SHARED[family]
