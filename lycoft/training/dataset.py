"""The training dataset: images + captions from `DatasetConfig`s, as a torch Dataset of dicts.

Layout of one epoch: every training image appears ``num_repeats`` times (its *slots*);
regularization images are cycled until they fill as many slots as the training images (kohya's
rule), and all slots of a bucket are batched together by `BucketBatchSampler`. A sample is addressed
by ``(epoch, slot)``; its flip, crop and caption augmentation are drawn from a generator seeded by
``(seed, epoch, slot)``, so a run is reproducible whatever the worker or process count.
"""

from __future__ import annotations

import logging
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
from lycoft.training.caching import LatentCache, LatentRequest
from lycoft.training.captions import read_caption, split_tags, transform_caption
from lycoft.training.dataset_config import (
    IMAGE_EXTENSIONS,
    DatasetConfig,
    SubsetConfig,
    datasets_from_config,
)
from lycoft.training.errors import ConfigError
from lycoft.training.flags import TrainConfig
from lycoft.training.sampler import BucketBatchSampler, derive_seed

logger = logging.getLogger(__name__)

_ROTATING_EXIF = (5, 6, 7, 8)  # EXIF orientations that swap width and height


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


def load_pixels(path: Path, plan: CropPlan, flip: bool = False) -> torch.Tensor:
    """Decode, resize, crop and optionally mirror one image -> ``(3, H, W)`` float in [-1, 1]."""
    try:
        with Image.open(path) as raw:
            im = ImageOps.exif_transpose(raw).convert("RGB")
    except OSError as e:
        raise ConfigError(f"could not decode {path} ({e}); remove or re-save the image") from None
    if im.size != plan.resized:
        im = im.resize(plan.resized, resample=Image.Resampling.LANCZOS)
    left, top = plan.left_top
    im = im.crop((left, top, left + plan.target[0], top + plan.target[1]))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


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


class TrainingDataset(torch.utils.data.Dataset):
    """Images and captions of one or more `DatasetConfig`s.

    ``dataset[(epoch, slot)]`` (or ``dataset[slot]`` for epoch 0) returns a dict:

    - ``pixel_values``: ``(3, H, W)`` float in [-1, 1], or ``latents`` once `cache_latents` ran;
    - ``caption`` (str, augmented for this epoch), ``image_path`` (str), ``is_reg`` (bool tensor),
      ``flipped`` (bool tensor);
    - SDXL size conditioning as int64 tensors in SDXL's (height, width) / (top, left) order:
      ``original_size`` (the image before resizing), ``crop_top_left`` (in the resized image,
      mirrored when flipped), ``target_size`` (the bucket).

    torch's default collate stacks these; use `batch_sampler` so every batch has one size.

    Unreadable images are skipped with one warning line each and listed in ``skipped_images``.
    """

    def __init__(self, datasets: Sequence[DatasetConfig], *, seed: int = 0) -> None:
        self.datasets = list(datasets)
        self.seed = seed
        self.records: list[ImageRecord] = []
        self.skipped_images: list[tuple[Path, str]] = []
        self.slots: list[int] = []  # slot -> record index
        self._groups: dict[tuple[int, tuple[int, int]], list[int]] = {}  # (dataset, bucket) -> slots
        self._latent_cache: LatentCache | None = None
        self.num_train_slots = 0
        self.num_reg_slots = 0
        for index, ds in enumerate(self.datasets):
            self._add_dataset(index, ds)
        if not self.records:
            dirs = ", ".join(str(s.image_dir) for ds in self.datasets for s in ds.subsets)
            raise ConfigError(f"no usable images in {dirs} (looked for {', '.join(IMAGE_EXTENSIONS)})")

    # --- building ---

    def _scan_subset(self, subset: SubsetConfig, dataset_index: int, bucketer: Bucketer) -> list[ImageRecord]:
        if not subset.image_dir.is_dir():
            raise ConfigError(f"image folder {str(subset.image_dir)!r} does not exist")
        records, fallback = [], 0
        for path in list_images(subset.image_dir):
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
            records.append(ImageRecord(path, size, caption, subset, dataset_index, bucket))
        if fallback:
            self._warn_caption_fallback(subset, fallback, len(records))
        if not records:
            logger.warning("no usable images in %s; the subset is skipped", subset.image_dir)
        return records

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
        repeats += self._reg_repeats(reg_records, sum(n for _, n in repeats))
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
        if cache is not None:
            sample["latents"] = cache.get(LatentRequest(record.path, plan, flip), self._load)
        else:
            sample["pixel_values"] = load_pixels(record.path, plan, flip)
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

    def latent_requests(self) -> list[LatentRequest]:
        """Every latent training can ask for: each image at its bucket, center-cropped, plus its
        mirror image when its subset flips."""
        out = []
        for record in self.records:
            plan = plan_crop(record.size, record.bucket)
            flips = (False, True) if record.subset.flip_aug else (False,)
            out += [LatentRequest(record.path, plan, flip) for flip in flips]
        return out

    def cache_latents(self, cache: LatentCache, *, batch_size: int = 1,
                      progress: Callable[[int, int], None] | None = None) -> int:
        """Fill ``cache`` for the whole dataset and serve ``latents`` instead of ``pixel_values`` from
        now on. Returns how many images were encoded (0 when the disk cache was already warm)."""
        crops = sorted({str(s.image_dir) for ds in self.datasets for s in ds.subsets if s.random_crop})
        if crops:
            raise ConfigError(f"random_crop is set for {', '.join(crops)}, but cached latents have one "
                              "fixed crop; turn off random_crop or latent caching")
        encoded = cache.fill(self.latent_requests(), self._load, batch_size=batch_size, progress=progress)
        self._latent_cache = cache
        return encoded

    def fixed_captions(self) -> list[str]:
        """Every caption training will use, for a text-encoder cache; only defined when captions do
        not change between steps."""
        varying = sorted({str(r.subset.image_dir) for r in self.records if r.subset.captions_vary})
        if varying:
            raise ConfigError(f"captions of {', '.join(varying)} change every step (shuffle, dropout or wildcards), so "
                              "text encoder outputs cannot be cached; turn those off or the caching")
        # No randomness is left to draw; the generator is only there to satisfy the signature.
        rng = random.Random(0)
        return list(dict.fromkeys(
            transform_caption(r.caption, rng, **r.subset.caption_options())
            for r in self.records
        ))

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
        return "\n".join(lines)


def build_dataset(cfg: TrainConfig, *, family: str | None = None, seed: int | None = None) -> TrainingDataset:
    """The dataset a `TrainConfig` describes. ``family`` picks the default resolution when
    ``--resolution`` is unset; ``seed`` defaults to ``cfg.seed`` (0 when that is unset)."""
    seed = seed if seed is not None else (cfg.seed if cfg.seed is not None else 0)
    return TrainingDataset(datasets_from_config(cfg, family), seed=seed)
