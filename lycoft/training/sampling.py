"""Sample images during training: kohya's prompt files, its sampler names, PNGs and grids.

A text prompt file has one prompt per line (blank lines and ``#`` comments skipped), with kohya's
per-line options after the prompt::

    a photo of sks toy on a beach --n blurry, lowres --w 512 --h 768 --d 42 --s 30 --l 7.5 --ss euler_a

``--n`` negative prompt, ``--w``/``--h`` size (rounded down to a multiple of 8), ``--d`` seed, ``--s``
steps, ``--l`` guidance (CFG) scale, ``--ss`` sampler for this prompt. kohya's ``.json`` (a list of
prompt lines or of objects) and ``.toml`` (``[prompt]`` defaults and ``[[prompt.subset]]`` entries)
files hold the same settings under kohya's keys: ``prompt``, ``negative_prompt``, ``width``, ``height``,
``seed``, ``sample_steps``, ``scale``, ``sample_sampler``. A prompt without a seed gets one derived from
the run's seed and its position, so the same prompt is rendered from the same noise at every sampling
point. Each PNG carries its settings in a text chunk (A1111's ``parameters`` form, read by its PNG Info).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lycoft.checkpoints.families import detect_family_from_unet, pipeline_text_encoders
from lycoft.training.conditioning import TextConditioner, TextConditioning
from lycoft.training.config_files import read_toml
from lycoft.training.errors import ConfigError
from lycoft.training.fp8_base import compute_dtype
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
    """One image to render. ``seed`` None = derived from the run seed and ``index``; ``sampler`` None =
    the run's ``--sample_sampler``."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    seed: int | None = None
    steps: int = DEFAULT_STEPS
    scale: float = DEFAULT_SCALE
    index: int = 0
    sampler: str | None = None

    def seed_for(self, run_seed: int) -> int:
        """The seed this prompt is rendered with."""
        return self.seed if self.seed is not None else derive_seed(run_seed, 7, self.index) % 2**31


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
            elif key == "ss":
                p = replace(p, sampler=_sampler_name(value, where))
            else:
                logger.warning("%s: unknown option '--%s' ignored (known: --n --w --h --d --s --l --ss)", where, key)
        except ConfigError:
            raise
        except ValueError:
            raise ConfigError(f"{where}: option --{key} needs a number, got {value!r}") from None
    if not p.prompt:
        raise ConfigError(f"{where}: the line has options but no prompt")
    return p


# kohya's keys of a prompt in a .json/.toml prompt file -> SamplePrompt field
_PROMPT_KEYS = {"prompt": "prompt", "negative_prompt": "negative_prompt", "width": "width", "height": "height",
                "seed": "seed", "sample_steps": "steps", "scale": "scale", "sample_sampler": "sampler"}


def _sampler_name(name: str, where: str) -> str:
    if name not in SAMPLER_CLASSES:
        raise ConfigError(f"{where}: unknown sampler {name!r}; use one of {', '.join(SAMPLER_CLASSES)}")
    return name


def _prompt_from_mapping(entry: Mapping[str, Any], *, width: int, height: int, index: int,
                         where: str) -> SamplePrompt:
    """One prompt object of a kohya .json/.toml prompt file."""
    unknown = sorted(set(entry) - set(_PROMPT_KEYS) - {"enum", "subset"})
    if unknown:
        logger.warning("%s: keys %s ignored (known: %s)", where, ", ".join(unknown), ", ".join(_PROMPT_KEYS))
    values: dict[str, Any] = {"width": width, "height": height, "index": index}
    for key, field_name in _PROMPT_KEYS.items():
        if key in entry:
            values[field_name] = entry[key]
    try:
        p = SamplePrompt(**values)
        p = replace(p, prompt=str(p.prompt).strip(), negative_prompt=str(p.negative_prompt),
                    width=max(8, int(p.width) // 8 * 8), height=max(8, int(p.height) // 8 * 8),
                    seed=None if p.seed is None else int(p.seed), steps=max(1, int(p.steps)), scale=float(p.scale),
                    sampler=None if p.sampler is None else _sampler_name(str(p.sampler), where))
    except TypeError:
        raise ConfigError(f"{where}: a prompt needs a 'prompt' key") from None
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if not p.prompt:
        raise ConfigError(f"{where}: the prompt is empty")
    return p


def _structured_entries(path: Path) -> list[Any]:
    """The prompt entries of a kohya .json (a list) or .toml (``[prompt]`` + ``[[prompt.subset]]``) file."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise ConfigError(f"--sample_prompts {path} cannot be read as JSON: {e}") from None
        if not isinstance(data, list):
            raise ConfigError(f"--sample_prompts {path}: kohya's JSON prompt file is a list of prompts")
        return data
    data = read_toml(path, "--sample_prompts file")
    section = data.get("prompt")
    if not isinstance(section, dict) or not isinstance(section.get("subset", []), list):
        raise ConfigError(f"--sample_prompts {path}: kohya's TOML prompt file has a [prompt] table with "
                          "[[prompt.subset]] entries")
    defaults = {k: v for k, v in section.items() if k != "subset"}
    return [{**defaults, **subset} for subset in section.get("subset", [])]


def read_prompt_file(path: str | Path, *, width: int = 512, height: int = 512) -> list[SamplePrompt]:
    """Every prompt of a kohya prompt file (.txt, .json or .toml; sizes default to `width` x `height`).
    A file without prompts gives none (and no sampling), with a note."""
    path = Path(path)
    prompts: list[SamplePrompt] = []
    if path.suffix.lower() in (".toml", ".json"):
        for number, entry in enumerate(_structured_entries(path), 1):
            where = f"{path}, prompt {number}"
            if isinstance(entry, str):
                prompts.append(parse_prompt_line(entry, width=width, height=height, index=len(prompts), where=where))
            elif isinstance(entry, Mapping):
                prompts.append(_prompt_from_mapping(entry, width=width, height=height, index=len(prompts),
                                                    where=where))
            else:
                raise ConfigError(f"{where}: a prompt is a string or a table, got {entry!r}")
    else:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ConfigError(f"--sample_prompts {path} cannot be read: {e}") from None
        for number, line in enumerate(lines, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            prompts.append(parse_prompt_line(line, width=width, height=height, index=len(prompts),
                                             where=f"{path}:{number}"))
    if not prompts:
        logger.info("--sample_prompts %s holds no prompts: no samples will be rendered", path)
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
    dtype = compute_dtype(pipe.unet)  # not unet.dtype: a float8 base reports float8
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
    swapped for `sampler` (or a prompt's own) during the call and restored after."""
    conditioner = conditioner or default_conditioner(pipe)
    original = pipe.scheduler
    images = []
    try:
        for p in prompts:
            pipe.scheduler = make_sampler(p.sampler or sampler, original.config)
            generator = torch.Generator("cpu").manual_seed(p.seed_for(run_seed))
            out = pipe(width=p.width, height=p.height, num_inference_steps=p.steps, guidance_scale=p.scale,
                       generator=generator, output_type="pil", **_prompt_kwargs(pipe, conditioner, p))
            images.append(out.images[0])
    finally:
        pipe.scheduler = original
    return images


def png_parameters(p: SamplePrompt, *, sampler: str, run_seed: int) -> str:
    """A prompt's settings in A1111's ``parameters`` text (its PNG Info tab reads it back)."""
    negative = f"\nNegative prompt: {p.negative_prompt}" if p.negative_prompt else ""
    return (f"{p.prompt}{negative}\nSteps: {p.steps}, Sampler: {p.sampler or sampler}, CFG scale: {p.scale}, "
            f"Seed: {p.seed_for(run_seed)}, Size: {p.width}x{p.height}")


def save_images(images: Sequence[Image.Image], prompts: Sequence[SamplePrompt], folder: str | Path,
                name: str, tag: str, *, sampler: str = "ddim", run_seed: int = 0) -> list[Path]:
    """Write ``<name>_<tag>_<index>.png`` for each image, its settings in PNG text chunks; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image, p in zip(images, prompts):
        info = PngInfo()
        info.add_text("parameters", png_parameters(p, sampler=sampler, run_seed=run_seed))
        for key, value in (("prompt", p.prompt), ("negative_prompt", p.negative_prompt),
                           ("seed", p.seed_for(run_seed)), ("steps", p.steps), ("scale", p.scale),
                           ("sampler", p.sampler or sampler)):
            info.add_text(key, str(value))
        path = folder / f"{name}_{tag}_{p.index:02d}.png"
        image.save(path, pnginfo=info)
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
