"""Prior preservation: generate the missing class images with the base model.

With ``--class_prompt`` and ``--num_class_images N``, `--reg_data_dir` is filled up to N images
before training (the diffusers DreamBooth recipe, in kohya's folder layout): existing images in its
``<repeats>_<tokens>`` subfolders count; new ones go to ``<reg_data_dir>/1_<class prompt>/`` with a
caption file holding the class prompt. Each image has a seed derived from the run seed and its
number, and the ranks of a multi-process run split the work.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import torch

from lycoft.training.dataset import list_images
from lycoft.training.dataset_config import parse_dreambooth_folder_name
from lycoft.training.flags import TrainConfig
from lycoft.training.sampler import derive_seed

logger = logging.getLogger(__name__)

STEPS = 25
GUIDANCE = 7.5


def class_folder(reg_dir: Path, class_prompt: str) -> Path:
    """``<reg_dir>/1_<prompt>`` with characters that file systems reject replaced."""
    safe = re.sub(r'[\\/:*?"<>|\x00-\x1f]+', " ", class_prompt).strip()[:100] or "class"
    return reg_dir / f"1_{safe}"


def existing_class_images(reg_dir: Path) -> int:
    if not reg_dir.is_dir():
        return 0
    return sum(len(list_images(d)) for d in reg_dir.iterdir()
               if d.is_dir() and parse_dreambooth_folder_name(d.name) is not None)


def missing_class_images(cfg: TrainConfig) -> int:
    """How many class images `generate_class_images` will add. Images in other subfolders than this class
    prompt's count too (kohya's folder layout has no class names), which is reported: they may be of
    another class."""
    if not (cfg.num_class_images and cfg.class_prompt and cfg.reg_data_dir):
        return 0
    reg_dir = Path(cfg.reg_data_dir)
    have = existing_class_images(reg_dir)
    own = class_folder(reg_dir, cfg.class_prompt)
    others = have - (len(list_images(own)) if own.is_dir() else 0)
    if others:
        logger.warning("--num_class_images %d counts %d image(s) in other folders of %s than %s; if they show "
                       "another class than %r, give this class its own --reg_data_dir", cfg.num_class_images,
                       others, reg_dir, own.name, cfg.class_prompt)
    return max(0, cfg.num_class_images - have)


@torch.no_grad()
def generate_class_images(cfg: TrainConfig, pipe: Any, accelerator: Any, *, family: str, seed: int) -> int:
    """Render the missing class images (collective: call on every rank). Returns how many were written."""
    reg_dir = Path(cfg.reg_data_dir)
    have = existing_class_images(reg_dir)
    missing = max(0, cfg.num_class_images - have)
    accelerator.wait_for_everyone()  # every rank counted before any rank writes
    if not missing:
        return 0
    folder = class_folder(reg_dir, cfg.class_prompt)
    folder.mkdir(parents=True, exist_ok=True)
    width, height = cfg.resolved_resolution(family)
    rank, world = accelerator.process_index, accelerator.num_processes
    if accelerator.is_main_process:
        logger.info("generating %d class images for %r into %s", missing, cfg.class_prompt, folder)
    written = 0
    for i in range(have, have + missing):
        if i % world != rank:
            continue
        generator = torch.Generator("cpu").manual_seed(derive_seed(seed, 11, i) % 2**31)
        image = pipe(prompt=cfg.class_prompt, width=width, height=height, num_inference_steps=STEPS,
                     guidance_scale=GUIDANCE, generator=generator).images[0]
        path = folder / f"class_{i:05d}.png"
        image.save(path)
        path.with_suffix(cfg.caption_extension).write_text(cfg.class_prompt + "\n", encoding="utf-8")
        written += 1
    accelerator.wait_for_everyone()
    return written
