"""What to train on: a kohya dataset TOML or DreamBooth folders -> `DatasetConfig`s.

Only folders and options are resolved here; images are opened by `dataset.py`. kohya's rules:
values fall back subset -> dataset -> [general] -> trainer flags -> built-in defaults, and DreamBooth
folders are named ``<repeats>_<class tokens>``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lycoft.training.config_files import read_toml
from lycoft.training.errors import ConfigError, did_you_mean
from lycoft.training.flag_values import parse_resolution
from lycoft.training.flags import TrainConfig

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class SubsetConfig:
    """One folder of images and how its samples are made.

    Fields:
        image_dir: the folder (not searched recursively).
        num_repeats: times each image appears per epoch; balances small subsets against big ones.
        class_tokens: caption for images without a caption file (a DreamBooth folder's tokens).
        caption_extension: caption file next to each image, ``<stem><extension>``.
        is_reg: regularization images: cycled to match the training images, loss-weighted by
            ``prior_loss_weight``.
        shuffle_caption, keep_tokens, keep_tokens_separator, caption_dropout_rate,
        caption_tag_dropout_rate, caption_prefix, caption_suffix, enable_wildcard, caption_separator,
        secondary_separator: caption augmentation (see `captions.transform_caption`).
        caption_dropout_every_n_epochs: every N-th epoch (1-based, as kohya counts) trains with empty
            captions only.
        flip_aug: random horizontal flips.
        random_crop: random instead of center crops (not with latent caching).
        alpha_mask: the image's alpha channel is its loss mask (opaque = trained, transparent = ignored;
            an image without alpha trains everywhere).
        conditioning_data_dir: a folder of loss masks, one per image with the image's file stem and size
            (white = trained, black = ignored, the red channel counts); read with ``--masked_loss``.
    """

    image_dir: Path
    num_repeats: int = 1
    class_tokens: str | None = None
    caption_extension: str = ".caption"
    is_reg: bool = False
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_dropout_every_n_epochs: int = 0
    caption_prefix: str = ""
    caption_suffix: str = ""
    enable_wildcard: bool = False
    caption_separator: str = ","
    secondary_separator: str = ""
    flip_aug: bool = False
    random_crop: bool = False
    alpha_mask: bool = False
    conditioning_data_dir: Path | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_dir", Path(self.image_dir))
        if self.conditioning_data_dir is not None:
            object.__setattr__(self, "conditioning_data_dir", Path(self.conditioning_data_dir))
        if self.caption_extension and not self.caption_extension.startswith("."):
            object.__setattr__(self, "caption_extension", "." + self.caption_extension)
        if self.num_repeats < 1:
            raise ValueError(f"num_repeats must be >= 1, got {self.num_repeats}")
        if self.keep_tokens < 0:
            raise ValueError(f"keep_tokens must be >= 0, got {self.keep_tokens}")
        for name in ("caption_dropout_rate", "caption_tag_dropout_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.caption_dropout_every_n_epochs < 0:
            raise ValueError(f"caption_dropout_every_n_epochs must be >= 0 (0 = off), got "
                             f"{self.caption_dropout_every_n_epochs}")
        if self.alpha_mask and self.conditioning_data_dir is not None:
            raise ValueError(f"alpha_mask and conditioning_data_dir {str(self.conditioning_data_dir)!r} both give "
                             "loss masks; keep one")
        if not self.caption_separator.strip():
            raise ValueError(f"caption_separator must be a visible character such as ',', got "
                             f"{self.caption_separator!r}")

    @property
    def name(self) -> str:
        return self.image_dir.name

    @property
    def captions_vary(self) -> bool:
        """True when the same image gets different captions on different steps."""
        return (self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_tag_dropout_rate > 0
                or self.caption_dropout_every_n_epochs > 0 or self.enable_wildcard)

    def drops_captions(self, epoch: int) -> bool:
        """Whether 0-based `epoch` is one of the every-N-th epochs that train without captions."""
        n = self.caption_dropout_every_n_epochs
        return n > 0 and (epoch + 1) % n == 0

    def caption_options(self) -> dict[str, Any]:
        """This subset's keyword arguments of `captions.transform_caption` (all but ``drop``)."""
        return {"shuffle": self.shuffle_caption, "keep_tokens": self.keep_tokens,
                "keep_tokens_separator": self.keep_tokens_separator, "dropout_rate": self.caption_dropout_rate,
                "tag_dropout_rate": self.caption_tag_dropout_rate, "prefix": self.caption_prefix,
                "suffix": self.caption_suffix, "wildcard": self.enable_wildcard,
                "separator": self.caption_separator, "secondary_separator": self.secondary_separator}


@dataclass(frozen=True)
class DatasetConfig:
    """A group of subsets sharing a size policy and batch size (a kohya ``[[datasets]]`` entry).

    ``resolution`` is (width, height); bucket options as in `TrainConfig`. ``validation_split`` holds that
    fraction of each training subset's images out for the validation loss, chosen by ``validation_seed``
    (unset = the run's seed); regularization subsets are never split.
    """

    subsets: tuple[SubsetConfig, ...]
    resolution: tuple[int, int] = (512, 512)
    batch_size: int = 1
    enable_bucket: bool = False
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_reso_steps: int = 64
    bucket_no_upscale: bool = False
    validation_split: float = 0.0
    validation_seed: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "subsets", tuple(self.subsets))
        object.__setattr__(self, "resolution", parse_resolution(self.resolution))
        if not self.subsets:
            raise ValueError("a dataset needs at least one subset ([[datasets.subsets]] with an image_dir)")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if any(s % 8 for s in self.resolution):
            raise ValueError(f"resolution {self.resolution} must have sides that are multiples of 8")
        if not 0.0 <= self.validation_split < 1.0:
            raise ValueError(f"validation_split must be in [0, 1) (the fraction of images held out), got "
                             f"{self.validation_split}")
        steps = self.bucket_reso_steps
        if steps < 8 or steps % 8:
            raise ValueError(f"bucket_reso_steps must be a positive multiple of 8, got {steps}")
        if self.enable_bucket:
            for name in ("min_bucket_reso", "max_bucket_reso"):
                if getattr(self, name) % steps:
                    raise ValueError(f"{name} {getattr(self, name)} is not a multiple of bucket_reso_steps {steps}")
            if self.min_bucket_reso > self.max_bucket_reso:
                raise ValueError(
                    f"min_bucket_reso {self.min_bucket_reso} > max_bucket_reso {self.max_bucket_reso}"
                )
            if not self.bucket_no_upscale and self.min_bucket_reso > min(self.resolution):
                raise ValueError(f"min_bucket_reso {self.min_bucket_reso} is larger than the resolution "
                                 f"{self.resolution}: no bucket fits; lower min_bucket_reso")


_SUBSET_KEYS: dict[str, str] = {
    "image_dir": "str", "num_repeats": "int", "class_tokens": "str", "caption_extension": "str",
    "is_reg": "bool", "shuffle_caption": "bool", "keep_tokens": "int", "keep_tokens_separator": "str",
    "caption_dropout_rate": "float", "caption_tag_dropout_rate": "float", "flip_aug": "bool",
    "random_crop": "bool", "caption_dropout_every_n_epochs": "int", "caption_prefix": "str",
    "caption_suffix": "str", "enable_wildcard": "bool", "caption_separator": "str", "secondary_separator": "str",
    "alpha_mask": "bool", "conditioning_data_dir": "str",
}
_DATASET_KEYS: dict[str, str] = {
    "resolution": "resolution", "batch_size": "int", "enable_bucket": "bool", "min_bucket_reso": "int",
    "max_bucket_reso": "int", "bucket_reso_steps": "int", "bucket_no_upscale": "bool",
    "validation_split": "float", "validation_seed": "int",
}
# Subset keys that name one subset's own folders, so [general] and [[datasets]] cannot set them (kohya's rule).
_PER_SUBSET: dict[str, str] = {
    "image_dir": "image_dir belongs in a [[datasets.subsets]] entry",
    "conditioning_data_dir": "conditioning_data_dir belongs in a [[datasets.subsets]] entry (each subset names "
                             "its own mask folder)",
}
# kohya options lycoft does not implement: named as such, so the user is not told they made a typo.
_KOHYA_ONLY = {
    "color_aug", "face_crop_aug_range", "metadata_file",
    "token_warmup_min", "token_warmup_step",
    "network_multiplier", "cache_info", "custom_attributes",
    "debug_dataset", "resize_interpolation",
}
_EXPECTED = {"str": "a string", "int": "an integer", "float": "a number", "bool": "true or false"}


def _check_value(key: str, kind: str, value: Any, where: str) -> Any:
    if kind == "resolution":
        return parse_resolution(value, f"{key} in {where}")
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {
        "str": isinstance(value, str),
        "int": is_number and isinstance(value, int),
        "float": is_number,
        "bool": isinstance(value, bool),
    }[kind]
    if not ok:
        raise ConfigError(f"key {key!r} in {where} must be {_EXPECTED[kind]}, got {value!r} "
                          f"({type(value).__name__})")
    return float(value) if kind == "float" else value


def _check_table(table: Any, allowed: Mapping[str, str], where: str, *, extra: tuple[str, ...] = (),
                 misplaced: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Keys of one TOML table: unknown ones are errors with a suggestion; values get type-checked."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table, got {type(table).__name__}")
    out: dict[str, Any] = {}
    problems = []
    for key, value in table.items():
        if key in extra:
            out[key] = value
        elif key in allowed:
            out[key] = _check_value(key, allowed[key], value, where)
        elif misplaced and key in misplaced:
            problems.append(f"key {key!r} cannot go in {where}; {misplaced[key]}")
        elif key in _KOHYA_ONLY:
            problems.append(f"key {key!r} in {where} is a kohya option lycoft does not support; remove it")
        else:
            problems.append(f"unknown key {key!r} in {where}{did_you_mean(key, list(allowed) + list(extra))}")
    if problems:
        raise ConfigError("\n".join(problems))
    return out


def _subset(values: Mapping[str, Any], where: str) -> SubsetConfig:
    known = {f.name for f in fields(SubsetConfig)}
    try:
        return SubsetConfig(**{k: v for k, v in values.items() if k in known})
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def _dataset(values: Mapping[str, Any], subsets: list[SubsetConfig], where: str) -> DatasetConfig:
    try:
        options = {k: v for k, v in values.items() if k in _DATASET_KEYS}
        return DatasetConfig(subsets=tuple(subsets), **options)
    except (ValueError, ConfigError) as e:
        raise ConfigError(f"{where}: {e}") from None


def _require_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        hint = "" if path.is_absolute() else f" (relative paths are resolved from {Path.cwd()})"
        raise ConfigError(f"{what} {str(path)!r} is not a folder{hint}")


def load_dataset_config(path: str | Path, defaults: Mapping[str, Any] | None = None) -> list[DatasetConfig]:
    """A kohya dataset TOML -> one `DatasetConfig` per ``[[datasets]]``.

    ``defaults`` are the lowest-priority values (from the trainer flags, see `dataset_defaults`).
    Every ``image_dir`` must exist; images are not opened yet.
    """
    path = Path(path)
    doc = read_toml(path, "dataset config")
    name = str(path)
    top = _check_table(doc, {}, f"the top level of {name}", extra=("general", "datasets"))
    both = {**_DATASET_KEYS, **{k: v for k, v in _SUBSET_KEYS.items() if k not in _PER_SUBSET}}
    general = _check_table(top.get("general", {}), both, f"[general] of {name}", misplaced=_PER_SUBSET)
    datasets_doc = top.get("datasets")
    if not isinstance(datasets_doc, list) or not datasets_doc:
        raise ConfigError(f"{name} has no [[datasets]]; add at least one [[datasets]] with a "
                          "[[datasets.subsets]] that names an image_dir")
    base = {**(defaults or {}), **general}
    moved = {k: "it is a [[datasets]] option; move it up to [[datasets]] or [general]" for k in _DATASET_KEYS}
    out = []
    for i, ds_doc in enumerate(datasets_doc, 1):
        ds_where = f"[[datasets]] #{i} of {name}"
        ds = _check_table(ds_doc, both, ds_where, extra=("subsets",), misplaced=_PER_SUBSET)
        subsets_doc = ds.pop("subsets", None)
        if not isinstance(subsets_doc, list) or not subsets_doc:
            raise ConfigError(f"{ds_where} has no [[datasets.subsets]]; add one with an image_dir")
        ds_values = {**base, **ds}
        subsets = []
        for j, sub_doc in enumerate(subsets_doc, 1):
            sub_where = f"[[datasets.subsets]] #{j} of [[datasets]] #{i} in {name}"
            sub = _check_table(sub_doc, _SUBSET_KEYS, sub_where, misplaced=moved)
            if "image_dir" not in sub:
                raise ConfigError(f"{sub_where} has no image_dir; every subset names its image folder")
            _require_dir(Path(sub["image_dir"]), f"image_dir of {sub_where}")
            if "conditioning_data_dir" in sub:
                _require_dir(Path(sub["conditioning_data_dir"]), f"conditioning_data_dir of {sub_where}")
            subsets.append(_subset({**ds_values, **sub}, sub_where))
        out.append(_dataset(ds_values, subsets, ds_where))
    return out


def parse_dreambooth_folder_name(name: str) -> tuple[int, str] | None:
    """'10_sks dog' -> (10, 'sks dog'); None when the name has no '<repeats>_' prefix (kohya's rule:
    everything after the first underscore is the class tokens, underscores included)."""
    head, sep, tokens = name.partition("_")
    if not sep or not head.isdigit():
        return None
    return int(head), tokens


def dreambooth_subsets(parent: str | Path, *, is_reg: bool, defaults: Mapping[str, Any] | None = None,
                       flag: str = "--train_data_dir") -> list[SubsetConfig]:
    """One subset per ``<repeats>_<class tokens>`` subfolder of ``parent``; other folders and loose
    images are skipped with a warning each."""
    parent = Path(parent)
    _require_dir(parent, flag)
    subsets = []
    for child in sorted(parent.iterdir()):
        if child.is_dir():
            parsed = parse_dreambooth_folder_name(child.name)
            if parsed is None or parsed[0] < 1:
                reason = "0 repeats" if parsed else "no '<repeats>_' prefix"
                logger.warning("skipping folder %s (%s); name it like '10_sks dog' to train on it",
                               child, reason)
                continue
            repeats, tokens = parsed
            values = {k: v for k, v in (defaults or {}).items() if k in _SUBSET_KEYS}
            if is_reg:  # --conditioning_data_dir holds masks of the training images only
                values.pop("conditioning_data_dir", None)
            values.update(image_dir=child, num_repeats=repeats, class_tokens=tokens, is_reg=is_reg)
            subsets.append(_subset(values, f"folder {child}"))
    loose = [p for p in parent.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if loose:
        logger.warning("%d images directly inside %s are ignored; move them into a subfolder named "
                       "'<repeats>_<class tokens>', e.g. '%s'", len(loose), parent, parent / "10_sks dog")
    if not subsets:
        raise ConfigError(f"{flag} {str(parent)!r} has no '<repeats>_<class tokens>' subfolders; put the "
                          f"images in a folder like {str(parent / '10_sks dog')!r}")
    return subsets


def dataset_defaults(cfg: TrainConfig, family: str | None = None) -> dict[str, Any]:
    """Trainer flags as the lowest-priority dataset/subset values (kohya's argparse fallback)."""
    d: dict[str, Any] = {k: getattr(cfg, k) for k in (*_DATASET_KEYS, *_SUBSET_KEYS)
                         if k not in ("batch_size", "resolution") and hasattr(cfg, k)}
    d["batch_size"] = cfg.train_batch_size
    d["resolution"] = cfg.resolved_resolution(family)
    return d


def datasets_from_config(cfg: TrainConfig, family: str | None = None) -> list[DatasetConfig]:
    """The datasets a `TrainConfig` asks for: its ``dataset_config`` TOML, or DreamBooth folders
    under ``train_data_dir`` (and ``reg_data_dir``). ``family`` picks the default resolution."""
    defaults = dataset_defaults(cfg, family)
    if cfg.dataset_config:
        datasets = load_dataset_config(cfg.dataset_config, defaults)
    elif not cfg.train_data_dir:
        raise ConfigError("no training data: give --train_data_dir or --dataset_config")
    else:
        subsets = dreambooth_subsets(cfg.train_data_dir, is_reg=False, defaults=defaults)
        if cfg.reg_data_dir:
            subsets += dreambooth_subsets(cfg.reg_data_dir, is_reg=True, defaults=defaults, flag="--reg_data_dir")
        datasets = [_dataset(defaults, subsets, "the trainer flags")]
    _check_mask_sources(cfg, datasets)
    return datasets


def _check_mask_sources(cfg: TrainConfig, datasets: list[DatasetConfig]) -> None:
    """kohya's pairing of --masked_loss and mask folders: mask folders are read only with --masked_loss,
    and --masked_loss needs masks from somewhere (alpha masks work with or without it)."""
    subsets = [s for ds in datasets for s in ds.subsets]
    folders = sorted({str(s.conditioning_data_dir) for s in subsets if s.conditioning_data_dir is not None})
    if folders and not cfg.masked_loss:
        raise ConfigError(f"conditioning_data_dir {', '.join(folders)} holds loss masks, which are used with "
                          "--masked_loss only; add --masked_loss or remove conditioning_data_dir")
    if cfg.masked_loss and not folders and not any(s.alpha_mask for s in subsets):
        raise ConfigError("--masked_loss has no masks to use: give conditioning_data_dir (mask images named like "
                          "the training images) or alpha_mask = true (each image's alpha channel)")
