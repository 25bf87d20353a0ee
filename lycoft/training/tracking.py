"""What training reports: TensorBoard/wandb scalars (through accelerate's trackers) and the numbers
behind them.

Logged per optimizer step: ``loss`` (mean over processes and accumulated batches), ``loss/avg`` (mean
over the epoch so far), ``lr/<group>`` for each parameter group (``unet``, ``te1``, ``te2``) and the
rotation size ``||Q||_F`` per component (``rotation/<component>/mean`` and ``.../max``). Per-module
sizes (``rotation_module/<key>``) are logged at every epoch end and save, where they show which layers
the adapter actually moves. Sample images go to the trackers that take images (`log_samples`).

The trackers are set up as kohya's are (`log_dir`, `init_trackers`): ``--log_prefix`` gives each run a new
folder, ``--log_tracker_name`` names the project, ``--log_tracker_config`` and ``--wandb_run_name`` pass
keyword arguments, and ``--log_config`` sends the settings (`logged_config`, without paths).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from lycoft.training.config_files import read_tracker_config
from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig

logger = logging.getLogger(__name__)


def trackers(cfg: TrainConfig) -> list[str]:
    """accelerate tracker names for `cfg` (checked to be importable: fails before any model loads)."""
    if cfg.log_with is None and cfg.logging_dir is None:
        return []
    wanted = {"tensorboard": ["tensorboard"], "wandb": ["wandb"], "all": ["tensorboard", "wandb"],
              None: ["tensorboard"]}[cfg.log_with]
    for name in wanted:
        if importlib.util.find_spec(name) is None:
            raise ConfigError(f"--log_with {cfg.log_with or 'tensorboard'} needs the {name} package; "
                              f"pip install {name}, or drop --log_with/--logging_dir")
    return wanted


# Flags whose values are paths on this machine (they may name users and machines): never sent to trackers.
_PATH_FLAGS = frozenset((
    "pretrained_model_name_or_path", "vae", "train_data_dir", "reg_data_dir", "conditioning_data_dir", "dataset_config",
    "output_dir",
    "logging_dir", "resume", "network_weights", "base_weights", "sample_prompts", "metadata_thumbnail", "config",
    "log_tracker_config", "console_log_file",
))


def log_dir(cfg: TrainConfig) -> str | None:
    """Where the trackers write: ``--logging_dir``, or with ``--log_prefix`` a new folder in it for this run,
    ``<log_prefix><YYYYmmddHHMMSS>`` (kohya's naming)."""
    if cfg.logging_dir is None or cfg.log_prefix is None:
        return cfg.logging_dir
    return os.path.join(cfg.logging_dir, cfg.log_prefix + time.strftime("%Y%m%d%H%M%S", time.localtime()))


def logged_config(cfg: TrainConfig) -> dict[str, Any]:
    """The settings as trackers take them (numbers, strings, booleans), paths left out."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()
            if k not in _PATH_FLAGS}


def init_trackers(accelerator: Any, cfg: TrainConfig) -> None:
    """Start the run's trackers: project ``--log_tracker_name`` (default ``--output_name``), the keyword
    arguments of ``--log_tracker_config`` (``--wandb_run_name`` names the W&B run unless that file does),
    the settings with ``--log_config``."""
    kwargs = read_tracker_config(cfg.log_tracker_config) if cfg.log_tracker_config else {}
    if cfg.wandb_run_name:
        kwargs.setdefault("wandb", {}).setdefault("name", cfg.wandb_run_name)
    accelerator.init_trackers(cfg.log_tracker_name or cfg.output_name,
                              config=logged_config(cfg) if cfg.log_config else None, init_kwargs=kwargs)


@torch.no_grad()
def rotation_sizes(network: Any) -> dict[str, float]:
    """``||Q||_F`` (constraint applied) of every adapter, by file key."""
    return {key: float(torch.linalg.vector_norm(layer.skew_blocks())) for key, layer in network.items()}


def rotation_summary(network: Any, sizes: dict[str, float] | None = None) -> dict[str, float]:
    """Mean and max rotation size per component."""
    sizes = rotation_sizes(network) if sizes is None else sizes
    by_comp: dict[str, list[float]] = defaultdict(list)
    for key, value in sizes.items():
        by_comp[network.components[key]].append(value)
    out = {}
    for comp, values in sorted(by_comp.items()):
        out[f"rotation/{comp}/mean"] = sum(values) / len(values)
        out[f"rotation/{comp}/max"] = max(values)
    return out


def step_logs(loss: float, loss_avg: float, optimizer: Any, network: Any) -> dict[str, float]:
    logs = {"loss": loss, "loss/avg": loss_avg}
    for i, group in enumerate(optimizer.param_groups):
        lr = group["lr"]
        if "d" in group:  # Prodigy/D-Adaptation: the effective step size is d * lr
            lr = group["d"] * lr
        logs[f"lr/{group.get('name', i)}"] = float(lr)
    logs.update(rotation_summary(network))
    return logs


def module_logs(network: Any) -> dict[str, float]:
    return {f"rotation_module/{key}": value for key, value in rotation_sizes(network).items()}


def log_samples(accelerator: Any, images: Sequence[Image.Image], prompts: Sequence[Any], step: int) -> None:
    """The sample images into each tracker that takes images (TensorBoard, W&B), one entry per prompt
    index (``sample/00`` ...), so a prompt's images line up across steps."""
    for tracker in accelerator.trackers:
        for image, p in zip(images, prompts):
            name = f"sample/{p.index:02d}"
            pixels = np.asarray(image.convert("RGB"))
            if tracker.name == "tensorboard":
                tracker.writer.add_image(name, pixels, global_step=step, dataformats="HWC")
            elif hasattr(tracker, "log_images"):
                tracker.log_images({name: [pixels]}, step=step)
