"""Batch order: batches that never mix buckets, in an order that is a function of (seed, epoch) only.

The sampler yields lists of ``(epoch, slot)`` keys; `TrainingDataset.__getitem__` derives each
sample's augmentation from the same key, so results do not depend on worker count, process count
or how accelerate shards the batches.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import numpy as np


def derive_seed(*parts: int) -> int:
    """A well-mixed 64-bit seed from integers (seed, epoch, slot, ...); stable across runs."""
    state = np.random.SeedSequence([int(p) & 0xFFFFFFFFFFFFFFFF for p in parts]).generate_state(2)
    return int(state[0]) << 32 | int(state[1])


class _EpochClock:
    """Holds the epoch. accelerate's prepared loaders call ``batch_sampler.sampler.set_epoch`` on the
    sampler they wrap (also after sharding for DDP), so the epoch is exposed under that name."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)


class BucketBatchSampler:
    """Batches drawn from one bucket at a time.

    ``groups`` holds one ``(slots, batch_size)`` per bucket. Each epoch, every group's slots are
    shuffled and cut into batches (the last one of a bucket may be smaller), and the batches of all
    buckets are shuffled together. Call ``set_epoch(epoch)`` before each epoch (accelerate's
    ``DataLoader.set_epoch`` reaches it too).
    """

    # None tells accelerate's BatchSamplerShard that batches have dynamic length. With a number it
    # would splice short batches from different buckets together to even them out.
    batch_size = None
    drop_last = False

    def __init__(
        self, groups: Sequence[tuple[Sequence[int], int]], *, seed: int = 0, shuffle: bool = True
    ) -> None:
        self.groups = [(list(slots), int(bs)) for slots, bs in groups if len(slots)]
        self.seed = seed
        self.shuffle = shuffle
        self.sampler = _EpochClock()

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        """The whole batch order of ``epoch``."""
        rng = random.Random(derive_seed(self.seed, epoch))
        out = []
        for slots, batch_size in self.groups:
            order = list(slots)
            if self.shuffle:
                rng.shuffle(order)
            out += [[(epoch, s) for s in order[i:i + batch_size]] for i in range(0, len(order), batch_size)]
        if self.shuffle:
            rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return iter(self.batches(self.epoch))

    def __len__(self) -> int:
        return sum(-(-len(slots) // bs) for slots, bs in self.groups)
