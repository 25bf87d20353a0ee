"""Sample images during training: kohya's prompt files, its sampler names, PNGs and grids.

A prompt file has one prompt per line (blank lines and ``#`` comments skipped), with kohya's per-line
options after the prompt::

    a photo of sks toy on a beach --n blurry, lowres --w 512 --h 768 --d 42 --s 30 --l 7.5

``--n`` negative prompt, ``--w``/``--h`` size (rounded down to a multiple of 8), ``--d`` seed, ``--s``
steps, ``--l`` guidance (CFG) scale. A prompt without ``--d`` gets a seed derived from the run's seed
and its line, so the same prompt is rendered from the same noise at every sampling point.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from lycoft.checkpoints.families import detect_family_from_unet, pipeline_text_encoders
from lycoft.training.conditioning import TextConditioner, TextConditioning
from lycoft.training.errors import ConfigError
from lycoft.training.sampler import derive_seed

logger = logging.getLogger(__name__)

DEFAULT_STEPS = 30
DEFAULT_SCALE = 7.5

# kohya sample sampler name -> (diffusers scheduler class, extra config)
SAMPLER_CLASSES: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "k_lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "k_euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "k_euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm_2": ("KDPM2DiscreteScheduler", {}),
    "k_dpm_2": ("KDPM2DiscreteScheduler", {}),
    "dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "k_dpm_2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "dpmsingle": ("DPMSolverSinglestepScheduler", {}),
}

_OPTION = re.compile(r"^(?P<key>[a-zA-Z]+)\s+(?P<value>.*)$", re.S)


@dataclass(frozen=True)
class SamplePrompt:
    """One image to render. ``seed`` None = derived from the run seed and ``index``."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    index: int = 0


def parse_prompt_line(line: str, *, width: int = 512, height: int = 512, index: int = 0,
                      where: str = "prompt") -> SamplePrompt:
    """One prompt line with kohya's ``--n --w --h --d --s --l`` options -> `SamplePrompt`."""
    parts = (" " + line.strip()).split(" --")
    prompt = parts[0].strip()
    p = SamplePrompt(prompt=prompt, width=width, height=height, index=index)
    for part in parts[1:]:
        m = _OPTION.match(part.strip())
        if not m:
            logger.warning("%s: option '--%s' has no value; ignored", where, part.strip())
            continue
        key, value = m.group("key").lower(), m.group("value").strip()
        try:
            if key == "n":
                p = replace(p, negative_prompt=value)
            elif key == "w":
                p = replace(p, width=max(8, int(value) // 8 * 8))
            elif key == "h":
                p = replace(p, height=max(8, int(value) // 8 * 8))
            elif key == "d":
                p = replace(p, seed=int(value))
            elif key == "s":
                p = replace(p, steps=max(1, int(value)))
            elif key == "l":
                p = replace(p, scale=float(value))
            else:
                logger.warning("%s: unknown option '--%s' ignored (known: --n --w --h --d --s --l)", where, key)
        except ValueError:
            raise ConfigError(f"{where}: option --{key} needs a number, got {value!r}") from None
    if not p.prompt:
        raise ConfigError(f"{where}: the line has options but no prompt")
    return p


def read_prompt_file(path: str | Path, *, width: int = 512, height: int = 512) -> list[SamplePrompt]:
    """Every prompt of a kohya-style text prompt file (sizes default to `width` x `height`)."""
    path = Path(path)
    if path.suffix.lower() in (".toml", ".json"):
        raise ConfigError(f"--sample_prompts {path}: only text prompt files (one prompt per line, kohya "
                          "options --n --w --h --d --s --l) are supported")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"--sample_prompts {path} cannot be read: {e}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        prompts.append(parse_prompt_line(line, width=width, height=height, index=len(prompts),
                                         where=f"{path}:{number}"))
    if not prompts:
        raise ConfigError(f"--sample_prompts {path} has no prompts (blank lines and # comments only)")
    return prompts


def make_sampler(name: str, scheduler_config: Any):
    """The diffusers scheduler for a kohya sampler name, built from the pipeline's scheduler config."""
    import diffusers

    if name not in SAMPLER_CLASSES:
        raise ConfigError(f"unknown sampler {name!r}; use one of {', '.join(SAMPLER_CLASSES)}")
    cls_name, extra = SAMPLER_CLASSES[name]
    try:
        cls = getattr(diffusers, cls_name)
        return cls.from_config(dict(scheduler_config), **extra)
    except ImportError as e:
        raise ConfigError(f"sampler {name!r} needs a package that is missing ({e}); pick another "
                          "--sample_sampler, e.g. euler_a or ddim") from None


def default_conditioner(pipe: Any) -> TextConditioner:
    """The training-time text conditioning of `pipe` (family from its UNet)."""
    family = detect_family_from_unet(pipe.unet)
    return TextConditioner(family, *pipeline_text_encoders(pipe, family))


def _prompt_kwargs(pipe: Any, conditioner: TextConditioner, p: SamplePrompt) -> dict[str, Any]:
    """Prompt embeddings computed like in training (clip skip, long captions), for the pipeline call.

    diffusers' own encoding would differ from training for ``--clip_skip`` and ``--max_token_length``
    (and its clip-skip path breaks on transformers versions without CLIP's ``text_model`` wrapper).
    """
    dtype = pipe.unet.dtype
    pos = conditioner.encode([p.prompt])
    zeros_for_empty = pos.pooled is not None and getattr(pipe.config, "force_zeros_for_empty_prompt", False)
    if not p.negative_prompt and zeros_for_empty:
        neg = TextConditioning(torch.zeros_like(pos.hidden), torch.zeros_like(pos.pooled))
    else:
        neg = conditioner.encode([p.negative_prompt])
    kwargs = {"prompt_embeds": pos.hidden.to(dtype), "negative_prompt_embeds": neg.hidden.to(dtype)}
    if pos.pooled is not None:
        kwargs.update(pooled_prompt_embeds=pos.pooled.to(dtype), negative_pooled_prompt_embeds=neg.pooled.to(dtype))
    return kwargs


@torch.no_grad()
def render(pipe: Any, prompts: Sequence[SamplePrompt], *, sampler: str = "ddim", run_seed: int = 0,
           conditioner: TextConditioner | None = None) -> list[Image.Image]:
    """Render `prompts` with `pipe` as it is now (adapters applied or not). Prompts are encoded by
    `conditioner` (default: the pipeline's encoders as training uses them); the pipeline's scheduler is
    swapped for `sampler` during the call and restored after."""
    conditioner = conditioner or default_conditioner(pipe)
    original = pipe.scheduler
    pipe.scheduler = make_sampler(sampler, original.config)
    images = []
    try:
        for p in prompts:
            seed = p.seed if p.seed is not None else derive_seed(run_seed, 7, p.index) % 2**31
            generator = torch.Generator("cpu").manual_seed(seed)
            out = pipe(width=p.width, height=p.height, num_inference_steps=p.steps, guidance_scale=p.scale,
                       generator=generator, output_type="pil", **_prompt_kwargs(pipe, conditioner, p))
            images.append(out.images[0])
    finally:
        pipe.scheduler = original
    return images


def save_images(images: Sequence[Image.Image], prompts: Sequence[SamplePrompt], folder: str | Path,
                name: str, tag: str) -> list[Path]:
    """Write ``<name>_<tag>_<index>.png`` for each image; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, p in zip(images, prompts):
        path = folder / f"{name}_{tag}_{p.index:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def image_grid(rows: Sequence[Sequence[Image.Image]], pad: int = 2) -> Image.Image:
    """Images laid out row by row (all cells the size of the largest image), on a white background."""
    cell_w = max(im.width for row in rows for im in row)
    cell_h = max(im.height for row in rows for im in row)
    cols = max(len(row) for row in rows)
    grid = Image.new("RGB", (cols * cell_w + (cols + 1) * pad, len(rows) * cell_h + (len(rows) + 1) * pad),
                     "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            grid.paste(im, (pad + c * (cell_w + pad), pad + r * (cell_h + pad)))
    return grid
