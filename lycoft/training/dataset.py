"""The training dataset: images + captions from `DatasetConfig`s, as a torch Dataset of dicts.

Layout of one epoch: every training image appears ``num_repeats`` times (its *slots*);
regularization images are cycled until they fill as many slots as the training images (kohya's
rule), and all slots of a bucket are batched together by `BucketBatchSampler`. A sample is addressed
by ``(epoch, slot)``; its flip, crop and caption augmentation are drawn from a generator seeded by
``(seed, epoch, slot)``, so a run is reproducible whatever the worker or process count.

kohya's validation split holds a fraction of each training subset's images out (`split_paths`); they
form the dataset's ``validation`` part (each image once, no regularization images). Images with a loss
mask (alpha channel or a mask image, see `SubsetConfig`) carry it as ``mask``, resized, cropped and
flipped like the image and averaged down to the latent grid.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from lycoft.training.buckets import Bucketer, CropPlan, plan_crop
from lycoft.training.caching import LatentCache, LatentRequest, MaskSource
from lycoft.training.captions import read_caption, split_tags, transform_caption
from lycoft.training.dataset_config import (
    IMAGE_EXTENSIONS,
    DatasetConfig,
    SubsetConfig,
    datasets_from_config,
)
from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig
from lycoft.training.losses import resize_mask
from lycoft.training.sampler import BucketBatchSampler, derive_seed

logger = logging.getLogger(__name__)

_ROTATING_EXIF = (5, 6, 7, 8)  # EXIF orientations that swap width and height
LATENT_FACTOR = 8  # pixels per latent cell along each side (the VAE's downsampling)


def list_images(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (not recursive), sorted by name for a stable order."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def probe_image(path: Path) -> tuple[int, int]:
    """(width, height) as the image will be seen (EXIF rotation applied). Reads headers and checks the
    file's structure without decoding all pixels; raises on unreadable or damaged files."""
    with Image.open(path) as im:
        im.verify()  # catches truncated/corrupt PNGs and the like, cheaply; must come first
    with Image.open(path) as im:  # verify() leaves the image unusable, so open it again
        w, h = im.size
        if im.getexif().get(0x0112) in _ROTATING_EXIF:
            w, h = h, w
    return w, h


def _decode(path: Path, mode: str) -> Image.Image:
    try:
        with Image.open(path) as raw:
            return ImageOps.exif_transpose(raw).convert(mode)
    except OSError as e:
        raise ConfigError(f"could not decode {path} ({e}); remove or re-save the image") from None


def _fit(im: Image.Image, plan: CropPlan, flip: bool) -> np.ndarray:
    """Resize, crop and optionally mirror as `plan` says -> uint8 array ``(H, W[, channels])``."""
    if im.size != plan.resized:
        im = im.resize(plan.resized, resample=Image.Resampling.LANCZOS)
    left, top = plan.left_top
    im = im.crop((left, top, left + plan.target[0], top + plan.target[1]))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(im, dtype=np.uint8).copy()


def load_pixels(path: Path, plan: CropPlan, flip: bool = False) -> torch.Tensor:
    """Decode, resize, crop and optionally mirror one image -> ``(3, H, W)`` float in [-1, 1]."""
    arr = _fit(_decode(path, "RGB"), plan, flip)
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def load_mask(source: MaskSource, plan: CropPlan, flip: bool = False) -> torch.Tensor:
    """The loss mask of `source` fitted like its image (`plan`, `flip`) and area-averaged to the latent grid
    -> ``(1, H/8, W/8)`` float in [0, 1] (kohya: alpha / 255, or a mask image's red channel / 255)."""
    im = _decode(source.path, "RGBA" if source.channel == "A" else "RGB").getchannel(source.channel)
    if im.size != plan.original:
        raise ConfigError(f"mask {source.path} is {im.size[0]}x{im.size[1]} but its image is {plan.original[0]}x"
                          f"{plan.original[1]}; a mask must have its image's size")
    pixels = torch.from_numpy(_fit(im, plan, flip)).float().div_(255.0)
    cells = (plan.target[1] // LATENT_FACTOR, plan.target[0] // LATENT_FACTOR)
    return resize_mask(pixels[None, None], cells)[0]


def split_paths(paths: Sequence[Path], fraction: float, seed: int) -> tuple[list[Path], list[Path]]:
    """kohya's validation split of one subset: the images shuffled by ``random.Random(seed)``, the first
    ``ceil(n * (1 - fraction))`` train and the rest are held out. Both lists keep `paths`' order."""
    if not fraction:
        return list(paths), []
    order = list(paths)
    random.Random(seed).shuffle(order)
    kept = set(order[:math.ceil(len(order) * (1 - fraction))])
    return [p for p in paths if p in kept], [p for p in paths if p not in kept]


# Beyond these an image is mostly made up or thrown away: enlarged 8x, its pixels are a blur; cropped
# to a fifth, most of what its caption describes is gone.
MAX_UPSCALE = 8.0
MIN_KEPT = 0.2


def _warn_if_degenerate(path: Path, size: tuple[int, int], bucket: tuple[int, int], bucketed: bool) -> None:
    """Warn about an image so elongated, or so small, that its training sample is mostly not the image."""
    (w, h), (bw, bh) = size, bucket
    scale = max(bw / w, bh / h)  # `plan_crop` covers the bucket, then crops
    kept = (bw * bh) / (w * h * scale * scale)
    if kept < MIN_KEPT:
        hint = "" if bucketed else " or enable buckets (--enable_bucket)"
        logger.warning("image %s has an extreme aspect ratio (%dx%d): training at %dx%d keeps only %.2g%% of it; "
                       "crop it yourself%s", path, w, h, bw, bh, 100 * kept, hint)
    elif scale > MAX_UPSCALE:
        logger.warning("image %s is only %dx%d pixels: it is enlarged %.0fx to train at %dx%d; remove it or use a "
                       "larger copy", path, w, h, scale, bw, bh)


@dataclass(frozen=True)
class ImageRecord:
    """One usable image: where it is, its size, caption and training size."""

    path: Path
    size: tuple[int, int]  # (width, height) after EXIF rotation
    caption: str
    subset: SubsetConfig
    dataset_index: int
    bucket: tuple[int, int]  # (width, height) it trains at
    mask: MaskSource | None = None  # where its loss mask comes from, if it has one


class TrainingDataset(torch.utils.data.Dataset):
    """Images and captions of one or more `DatasetConfig`s.

    ``dataset[(epoch, slot)]`` (or ``dataset[slot]`` for epoch 0) returns a dict:

    - ``pixel_values``: ``(3, H, W)`` float in [-1, 1], or ``latents`` once `cache_latents` ran;
    - ``caption`` (str, augmented for this epoch), ``image_path`` (str), ``is_reg`` (bool tensor),
      ``flipped`` (bool tensor);
    - SDXL size conditioning as int64 tensors in SDXL's (height, width) / (top, left) order:
      ``original_size`` (the image before resizing), ``crop_top_left`` (in the resized image,
      mirrored when flipped), ``target_size`` (the bucket);
    - ``mask``: ``(1, H/8, W/8)`` loss mask in [0, 1] when any subset has masks (all ones for images
      without one).

    torch's default collate stacks these; use `batch_sampler` so every batch has one size.

    Unreadable images are skipped with one warning line each and listed in ``skipped_images``.
    ``part="train"`` is what training uses (without the held-out images) and builds ``validation``, the
    held-out images (None without a validation split); ``part="validation"`` is that part alone.
    """

    def __init__(self, datasets: Sequence[DatasetConfig], *, seed: int = 0, part: str = "train") -> None:
        if part not in ("train", "validation"):
            raise ValueError(f"part must be 'train' or 'validation', got {part!r}")
        self.datasets = list(datasets)
        self.seed = seed
        self.part = part
        self.masked = any(s.alpha_mask or s.conditioning_data_dir is not None
                          for ds in self.datasets for s in ds.subsets)
        self.validation: TrainingDataset | None = None
        self.records: list[ImageRecord] = []
        self.skipped_images: list[tuple[Path, str]] = []
        self.slots: list[int] = []  # slot -> record index
        self._groups: dict[tuple[int, tuple[int, int]], list[int]] = {}  # (dataset, bucket) -> slots
        self._latent_cache: LatentCache | None = None
        self.num_train_slots = 0
        self.num_reg_slots = 0
        for index, ds in enumerate(self.datasets):
            self._add_dataset(index, ds)
        if part == "validation":
            return
        if not self.records:
            dirs = ", ".join(str(s.image_dir) for ds in self.datasets for s in ds.subsets)
            raise ConfigError(f"no usable images in {dirs} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if any(ds.validation_split for ds in self.datasets):
            held_out = TrainingDataset(self.datasets, seed=seed, part="validation")
            if held_out.records:
                self.validation = held_out
            else:
                logger.warning("validation_split holds out no image (each subset keeps ceil(n * (1 - split)) "
                               "images for training); raise validation_split to get a validation loss")

    # --- building ---

    def _scan_subset(self, subset: SubsetConfig, dataset_index: int, bucketer: Bucketer) -> list[ImageRecord]:
        if not subset.image_dir.is_dir():
            raise ConfigError(f"image folder {str(subset.image_dir)!r} does not exist")
        paths = list_images(subset.image_dir)
        masks = self._mask_sources(subset, paths)
        ds = self.datasets[dataset_index]
        if ds.validation_split and not subset.is_reg:  # kohya never splits regularization images
            seed = self.seed if ds.validation_seed is None else ds.validation_seed
            train, held_out = split_paths(paths, ds.validation_split, seed)
            paths = held_out if self.part == "validation" else train
        records, fallback = [], 0
        for path in paths:
            try:
                size = probe_image(path)
            except Exception as e:  # Pillow raises many types for bad files; any of them means skip
                reason = f"{type(e).__name__}: {e}".splitlines()[0]
                logger.warning("skipping unreadable image %s (%s)", path, reason)
                self.skipped_images.append((path, reason))
                continue
            caption = read_caption(path, subset.caption_extension, all_lines=subset.enable_wildcard)
            if caption is None:
                fallback += 1
                caption = subset.class_tokens or ""
            bucket = bucketer.bucket_for(size)
            _warn_if_degenerate(path, size, bucket, bucketer.enable)
            records.append(ImageRecord(path, size, caption, subset, dataset_index, bucket, masks.get(path)))
        if fallback and self.part == "train":
            self._warn_caption_fallback(subset, fallback, len(records))
        if not records and self.part == "train":
            logger.warning("no usable images in %s; the subset is skipped", subset.image_dir)
        self._check_mask_sizes(records)
        return records

    def _mask_sources(self, subset: SubsetConfig, paths: list[Path]) -> dict[Path, MaskSource]:
        """Each image's mask source: its own alpha channel (``alpha_mask``), or the image with its stem in
        ``conditioning_data_dir`` (kohya's pairing; a missing mask is an error, a mask without an image a
        warning)."""
        if subset.alpha_mask:
            return {p: MaskSource(p, "A") for p in paths}
        folder = subset.conditioning_data_dir
        if folder is None:
            return {}
        if not folder.is_dir():
            raise ConfigError(f"conditioning_data_dir {str(folder)!r} of {subset.image_dir} is not a folder")
        by_stem: dict[str, Path] = {}
        for mask in list_images(folder):
            by_stem.setdefault(mask.stem, mask)
        missing = [p.name for p in paths if p.stem not in by_stem]
        if missing:
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConfigError(f"{len(missing)} image(s) of {subset.image_dir} have no mask in {folder} ({shown}); "
                              "add a mask with the same file stem for each, or drop conditioning_data_dir")
        unused = sorted(set(by_stem) - {p.stem for p in paths})
        if unused and self.part == "train":
            logger.warning("%d mask(s) in %s belong to no image of %s and are unused (e.g. %s)", len(unused), folder,
                           subset.image_dir, by_stem[unused[0]].name)
        return {p: MaskSource(by_stem[p.stem], "R") for p in paths}

    @staticmethod
    def _check_mask_sizes(records: list[ImageRecord]) -> None:
        """A mask image must cover its image pixel for pixel (checked from the headers, before training)."""
        wrong = []
        for r in records:
            if r.mask is not None and r.mask.channel == "R":
                try:
                    size = probe_image(r.mask.path)
                except Exception as e:  # any Pillow error: the mask cannot be used
                    why = f"{type(e).__name__}: {e}".splitlines()[0]
                    raise ConfigError(f"could not read mask {r.mask.path} ({why}); re-save it") from None
                if size != r.size:
                    wrong.append(f"{r.mask.path.name} is {size[0]}x{size[1]}, "
                                 f"{r.path.name} is {r.size[0]}x{r.size[1]}")
        if wrong:
            raise ConfigError(f"masks must have their image's size: {'; '.join(wrong[:5])}"
                              + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""))

    @staticmethod
    def _warn_caption_fallback(subset: SubsetConfig, missing: int, total: int) -> None:
        others = [ext for ext in (".txt", ".caption") if ext != subset.caption_extension]
        found = {ext: sum(1 for _ in subset.image_dir.glob(f"*{ext}")) for ext in others}
        tokens = repr(subset.class_tokens) if subset.class_tokens else "an empty caption"
        hint = "".join(f"; {n} '{ext}' files are there: set caption_extension = '{ext}' to use them"
                       for ext, n in found.items() if n)
        logger.warning("%d of %d images in %s have no '%s' caption file and use %s%s",
                       missing, total, subset.image_dir, subset.caption_extension, tokens, hint)

    def _add_dataset(self, index: int, ds: DatasetConfig) -> None:
        bucketer = Bucketer(ds.resolution, enable=ds.enable_bucket, min_reso=ds.min_bucket_reso,
                            max_reso=ds.max_bucket_reso, steps=ds.bucket_reso_steps,
                            no_upscale=ds.bucket_no_upscale)
        if self.part == "validation":  # kohya: the held-out images once each, no regularization images
            if not ds.validation_split:
                return
            repeats = [(r, 1) for s in ds.subsets if not s.is_reg for r in self._scan_subset(s, index, bucketer)]
        else:
            repeats = self._training_repeats(index, ds, bucketer)
        for record, n in repeats:
            if n == 0:
                continue
            self.records.append(record)
            record_index = len(self.records) - 1
            group = self._groups.setdefault((index, record.bucket), [])
            for _ in range(n):
                group.append(len(self.slots))
                self.slots.append(record_index)
            if record.subset.is_reg:
                self.num_reg_slots += n
            else:
                self.num_train_slots += n

    def _training_repeats(self, index: int, ds: DatasetConfig, bucketer: Bucketer) -> list[tuple[ImageRecord, int]]:
        """Each training and regularization image of `ds` with its slots per epoch."""
        train, reg = [], []
        for subset in ds.subsets:
            (reg if subset.is_reg else train).append(self._scan_subset(subset, index, bucketer))
        train_records = [r for rs in train for r in rs]
        reg_records = [r for rs in reg for r in rs]
        if not train_records:
            dirs = ", ".join(repr(str(s.image_dir)) for s in ds.subsets if not s.is_reg) or "(none)"
            skipped = f" ({self.num_skipped} unreadable ones skipped)" if self.skipped_images else ""
            why = "; regularization images alone cannot train an adapter" if reg_records else ""
            raise ConfigError(f"no usable training images in {dirs}{skipped}; supported: "
                              f"{', '.join(IMAGE_EXTENSIONS)}{why}")
        repeats = [(r, r.subset.num_repeats) for r in train_records]
        return repeats + self._reg_repeats(reg_records, sum(n for _, n in repeats))

    @staticmethod
    def _reg_repeats(reg: list[ImageRecord], num_train: int) -> list[tuple[ImageRecord, int]]:
        """kohya's pairing: the first pass takes each reg image with its own repeats, later passes add
        one repeat at a time, until the reg slots reach the training slots."""
        counts = [0] * len(reg)
        filled, first = 0, True
        while reg and filled < num_train:
            for i, record in enumerate(reg):
                step = record.subset.num_repeats if first else 1
                counts[i] += step
                filled += step
                if filled >= num_train:
                    break
            first = False
        return list(zip(reg, counts))

    # --- torch Dataset ---

    def __len__(self) -> int:
        return len(self.slots)

    def _rng(self, epoch: int, slot: int) -> random.Random:
        return random.Random(derive_seed(self.seed, epoch, slot))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, slot = key if isinstance(key, tuple) else (0, key)
        record = self.records[self.slots[slot]]
        subset = record.subset
        rng = self._rng(epoch, slot)
        # Draw in a fixed order (flip, crop, caption) so each choice depends only on the key.
        flip = subset.flip_aug and rng.random() < 0.5
        cache = self._latent_cache
        plan = plan_crop(record.size, record.bucket, rng if subset.random_crop and cache is None else None)
        caption = transform_caption(record.caption, rng, drop=subset.drops_captions(epoch),
                                    **subset.caption_options())
        left, top = plan.left_top
        if flip:
            left = plan.resized[0] - left - plan.target[0]
        sample: dict[str, Any] = {
            "caption": caption,
            "image_path": str(record.path),
            "is_reg": torch.tensor(subset.is_reg),
            "flipped": torch.tensor(flip),
            "original_size": torch.tensor([record.size[1], record.size[0]]),
            "crop_top_left": torch.tensor([top, left]),
            "target_size": torch.tensor([plan.target[1], plan.target[0]]),
        }
        mask = None
        if cache is not None:
            sample["latents"], mask = cache.entry(LatentRequest(record.path, plan, flip, record.mask), self._load,
                                                  self._load_mask)
        else:
            sample["pixel_values"] = load_pixels(record.path, plan, flip)
            if record.mask is not None:
                mask = load_mask(record.mask, plan, flip)
        if self.masked:
            cells = (plan.target[1] // LATENT_FACTOR, plan.target[0] // LATENT_FACTOR)
            sample["mask"] = mask if mask is not None else torch.ones((1, *cells))
        return sample

    def batch_sampler(self, *, seed: int | None = None, shuffle: bool = True) -> BucketBatchSampler:
        """Batches of one (dataset, bucket) each, sized by that dataset's ``batch_size``; the order is a
        function of (seed, epoch). Pass it as ``DataLoader(dataset, batch_sampler=...)``."""
        groups = [(slots, self.datasets[d].batch_size) for (d, _), slots in sorted(self._groups.items())]
        return BucketBatchSampler(groups, seed=self.seed if seed is None else seed, shuffle=shuffle)

    # --- caching ---

    @staticmethod
    def _load(req: LatentRequest) -> torch.Tensor:
        return load_pixels(req.image_path, req.plan, req.flip)

    @staticmethod
    def _load_mask(req: LatentRequest) -> torch.Tensor:
        assert req.mask is not None
        return load_mask(req.mask, req.plan, req.flip)

    def latent_requests(self) -> list[LatentRequest]:
        """Every latent training (and validation) can ask for: each image at its bucket, center-cropped,
        plus its mirror image when its subset flips."""
        out = []
        for record in self.records:
            plan = plan_crop(record.size, record.bucket)
            flips = (False, True) if record.subset.flip_aug else (False,)
            out += [LatentRequest(record.path, plan, flip, record.mask) for flip in flips]
        return out + (self.validation.latent_requests() if self.validation is not None else [])

    def cache_latents(self, cache: LatentCache, *, batch_size: int = 1,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Fill ``cache`` for the whole dataset and serve ``latents`` instead of ``pixel_values`` from
        now on. Returns how many images were encoded (0 when the disk cache was already warm)."""
        crops = sorted({str(s.image_dir) for ds in self.datasets for s in ds.subsets if s.random_crop})
        if crops:
            raise ConfigError(f"random_crop is set for {', '.join(crops)}, but cached latents have one "
                              "fixed crop; turn off random_crop or latent caching")
        encoded = cache.fill(self.latent_requests(), self._load, batch_size=batch_size, progress=progress,
                             load_mask=self._load_mask)
        self._latent_cache = cache
        if self.validation is not None:
            self.validation._latent_cache = cache  # filled above: its requests are among ours
        return encoded

    def fixed_captions(self) -> list[str]:
        """Every caption training will use, for a text-encoder cache; only defined when captions do
        not change between steps."""
        return list(dict.fromkeys(caption for caption, _ in self.fixed_caption_images()))

    def fixed_caption_images(self) -> list[tuple[str, Path]]:
        """(caption, image) of every image, for a text-encoder cache kept beside the images; only defined
        when captions do not change between steps."""
        varying = sorted({str(r.subset.image_dir) for r in self.records if r.subset.captions_vary})
        if varying:
            raise ConfigError(f"captions of {', '.join(varying)} change every step (shuffle, dropout or wildcards), so "
                              "text encoder outputs cannot be cached; turn those off or the caching")
        # No randomness is left to draw; the generator is only there to satisfy the signature.
        rng = random.Random(0)
        records = self.records + (self.validation.records if self.validation is not None else [])
        return [(transform_caption(r.caption, rng, **r.subset.caption_options()), r.path) for r in records]

    # --- reporting ---

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_images)

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """(width, height) -> slots per epoch."""
        counts: Counter[tuple[int, int]] = Counter()
        for (_, bucket), slots in self._groups.items():
            counts[bucket] += len(slots)
        return dict(sorted(counts.items()))

    def dataset_dirs(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_dataset_dirs``: folder name -> repeats and image count."""
        out: dict[str, dict[str, int]] = {}
        for r in self.records:
            entry = out.setdefault(r.subset.name, {"n_repeats": r.subset.num_repeats, "img_count": 0})
            entry["img_count"] += 1
        return out

    def tag_frequency(self) -> dict[str, dict[str, int]]:
        """kohya's ``ss_tag_frequency``: folder name -> tag -> number of images carrying it."""
        out: dict[str, Counter[str]] = {}
        for r in self.records:
            out.setdefault(r.subset.name, Counter()).update(split_tags(r.caption.replace("\n", ","), ","))
        return {k: dict(v) for k, v in out.items()}

    def summary(self) -> str:
        """A few lines for the training log."""
        lines = [f"{len(self.records)} images, {self.num_train_slots} training + {self.num_reg_slots} "
                 f"regularization samples per epoch, {self.num_skipped} skipped"]
        lines += [f"  {name}: {d['img_count']} images x {d['n_repeats']} repeats"
                  for name, d in self.dataset_dirs().items()]
        lines += [f"  bucket {w}x{h}: {n}" for (w, h), n in self.bucket_counts().items()]
        if self.validation is not None:
            lines.append(f"  validation: {len(self.validation.records)} images held out")
        return "\n".join(lines)


def build_dataset(cfg: TrainConfig, *, family: str | None = None, seed: int | None = None) -> TrainingDataset:
    """The dataset a `TrainConfig` describes. ``family`` picks the default resolution when
    ``--resolution`` is unset; ``seed`` defaults to ``cfg.seed`` (0 when that is unset)."""
    seed = seed if seed is not None else (cfg.seed if cfg.seed is not None else 0)
    dataset = TrainingDataset(datasets_from_config(cfg, family), seed=seed)
    if dataset.validation is None:
        unused = [f"--{n}" for n in ("validation_seed", "validate_every_n_steps", "validate_every_n_epochs",
                                     "max_validation_steps") if getattr(cfg, n) is not None]
        if unused:
            logger.warning("%s: there are no validation images (set validation_split), so no validation loss is "
                           "computed", ", ".join(unused))
    return dataset
