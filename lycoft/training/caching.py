"""Caches for frozen encoders: VAE latents per image crop, text-encoder outputs per caption.

The encoders live elsewhere; each cache takes a callable (``encode``) and only decides when to call
it and where results are kept: in memory, or in ``.npz`` files that survive the run. A cached value
is reused only while everything it was computed from is unchanged (the image file's size and mtime,
its bucket and crop, its loss mask's file; the caption text and a caller-given namespace for the text
encoder). An image's loss mask is cached with its latent, so masked training keeps the cache's speed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lycoft.training.buckets import CropPlan

logger = logging.getLogger(__name__)

_FORMAT = "lycoft-latent-1"
_TEMPORARY = re.compile(r".+\.lycoft\.npz\.(\d+)\.tmp")


def _save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    # Write then rename: a run killed mid-write, or two DDP processes caching the same image,
    # never leave a torn file that a later run would trust.
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
        os.replace(tmp, path)
    except BaseException:  # an error or Ctrl-C: no temporary stays in the image folder
        tmp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(folders: Iterable[Path]) -> list[Path]:
    """Delete the ``<image>.lycoft.npz.<pid>.tmp`` files a killed run left in `folders` (those of a process
    that is gone; a live one, another DDP rank, may be writing its own) and say so."""
    removed = []
    for folder in folders:
        try:
            entries = list(Path(folder).iterdir())
        except OSError:
            continue
        for entry in entries:
            m = _TEMPORARY.fullmatch(entry.name)
            if m is None or _alive(int(m.group(1))):
                continue
            entry.unlink(missing_ok=True)
            removed.append(entry)
            logger.info("removed %s, left by an interrupted run", entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError):  # missing, torn or foreign file: treat as not cached
        return None


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().to("cpu")
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()


@dataclass(frozen=True)
class MaskSource:
    """Where an image's loss mask comes from: one channel of an image file, ``"A"`` (the alpha of the
    image itself) or ``"R"`` (the red channel of a separate mask image)."""

    path: Path
    channel: str = "A"


@dataclass(frozen=True)
class LatentRequest:
    """One latent to cache: an image, its crop plan, whether it is mirrored, and its loss mask's source
    (cached with the latent) if it has one."""

    image_path: Path
    plan: CropPlan
    flip: bool = False
    mask: MaskSource | None = None


class LatentCache:
    """Latents of `encode(pixels)` for fixed image crops.

    Args:
        encode: ``(B, 3, H, W)`` float pixels in [-1, 1] on the CPU -> ``(B, C, H/8, W/8)`` latents
            (the caller moves them to the VAE's device and applies any scaling factor it wants cached).
        to_disk: keep latents in ``.npz`` files instead of memory: reused by later runs, light on RAM.
        cache_dir: where the files go; unset = next to each image as ``<image name>.lycoft.npz``.
        dtype: cast latents to this on the way out (e.g. ``torch.float16`` to halve memory).

    ``encode_calls`` / ``encoded_images`` count the work done, so callers (and tests) can see that a
    warm cache encodes nothing. Requests with a `MaskSource` also cache the mask that ``load_mask(request)``
    gives (`fill`, `entry`).
    """

    def __init__(self, encode: Callable[[torch.Tensor], torch.Tensor], *, to_disk: bool = False,
                 cache_dir: str | Path | None = None, dtype: torch.dtype | None = None) -> None:
        self.encode = encode
        self.to_disk = to_disk
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.dtype = dtype
        self.encode_calls = 0
        self.encoded_images = 0
        self._memory: dict[tuple[str, bool], tuple[str, torch.Tensor, torch.Tensor | None]] = {}

    def disk_path(self, image_path: Path) -> Path:
        image_path = Path(image_path).resolve()
        if self.cache_dir is None:
            return image_path.with_name(image_path.name + ".lycoft.npz")
        digest = hashlib.sha1(str(image_path).encode()).hexdigest()[:12]
        return self.cache_dir / f"{image_path.stem}-{digest}.lycoft.npz"

    @staticmethod
    def fingerprint(req: LatentRequest) -> str:
        """Everything a latent (and its mask) depends on except the flip (both orientations share one file)."""
        path = Path(req.image_path).resolve()
        st = path.stat()
        facts: dict[str, Any] = {
            "format": _FORMAT, "image": str(path), "mtime_ns": st.st_mtime_ns, "bytes": st.st_size,
            "resized": list(req.plan.resized), "left_top": list(req.plan.left_top),
            "target": list(req.plan.target),
        }
        if req.mask is not None:
            mask_path = Path(req.mask.path).resolve()
            mst = mask_path.stat()
            facts["mask"] = {"file": str(mask_path), "channel": req.mask.channel, "mtime_ns": mst.st_mtime_ns,
                             "bytes": mst.st_size}
        return json.dumps(facts, sort_keys=True)

    @staticmethod
    def _variant(flip: bool, what: str = "latents") -> str:
        return f"{what}_flipped" if flip else what

    def _out(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if self.dtype is not None else t

    def _lookup(self, req: LatentRequest, fingerprint: str) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        if self.to_disk:
            data = _load_npz(self.disk_path(req.image_path))
            if data is None or "meta" not in data or str(data["meta"]) != fingerprint:
                return None
            arr = data.get(self._variant(req.flip))
            mask = data.get(self._variant(req.flip, "mask")) if req.mask is not None else None
            if arr is None or (req.mask is not None and mask is None):
                return None
            return self._out(torch.from_numpy(arr)), None if mask is None else torch.from_numpy(mask)
        hit = self._memory.get((str(Path(req.image_path).resolve()), req.flip))
        if hit is None or hit[0] != fingerprint:
            return None
        return self._out(hit[1]), hit[2]

    def _store(self, req: LatentRequest, fingerprint: str, latent: torch.Tensor,
               mask: torch.Tensor | None = None) -> None:
        latent = latent.detach().to("cpu")
        if not self.to_disk:
            self._memory[(str(Path(req.image_path).resolve()), req.flip)] = (fingerprint, latent, mask)
            return
        path = self.disk_path(req.image_path)
        data = _load_npz(path)
        arrays = dict(data) if data is not None and str(data.get("meta", "")) == fingerprint else {}
        arrays["meta"] = np.array(fingerprint)
        arrays[self._variant(req.flip)] = _to_numpy(latent)
        if mask is not None:
            arrays[self._variant(req.flip, "mask")] = _to_numpy(mask)
        _save_npz_atomic(path, arrays)

    @staticmethod
    def _mask_for(req: LatentRequest, load_mask: Callable[[LatentRequest], torch.Tensor] | None,
                  ) -> torch.Tensor | None:
        if req.mask is None:
            return None
        if load_mask is None:
            raise ValueError(f"{req.image_path} has a loss mask ({req.mask.path}); pass load_mask to cache it")
        return load_mask(req).detach().to("cpu", torch.float32)

    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            latents = self.encode(pixels)
        if not isinstance(latents, torch.Tensor) or latents.shape[0] != pixels.shape[0]:
            got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise ValueError(f"encode must return a tensor with one latent per image: {pixels.shape[0]} "
                             f"images in, got {got}")
        self.encode_calls += 1
        self.encoded_images += pixels.shape[0]
        return latents

    def fill(self, requests: Iterable[LatentRequest], load: Callable[[LatentRequest], torch.Tensor], *,
             batch_size: int = 1, progress: Callable[[int, int], None] | None = None,
             load_mask: Callable[[LatentRequest], torch.Tensor] | None = None) -> int:
        """Encode every request not already cached, ``batch_size`` same-sized crops per `encode` call.
        ``load(request)`` gives the ``(3, H, W)`` pixels, ``load_mask(request)`` the mask of a request that
        has one. Returns how many images were encoded."""
        todo: dict[tuple[int, int], list[tuple[LatentRequest, str]]] = {}
        requests = list(requests)
        if self.to_disk:
            remove_stale_temporaries({self.disk_path(req.image_path).parent for req in requests})
        for req in requests:
            fp = self.fingerprint(req)
            if self._lookup(req, fp) is None:
                todo.setdefault(req.plan.target, []).append((req, fp))
        total = sum(len(v) for v in todo.values())
        done = 0
        for items in todo.values():  # one size per stack: torch.stack needs equal shapes
            for i in range(0, len(items), batch_size):
                chunk = items[i:i + batch_size]
                latents = self._encode(torch.stack([load(req) for req, _ in chunk]))
                for (req, fp), lat in zip(chunk, latents):
                    self._store(req, fp, lat, self._mask_for(req, load_mask))
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
        return total

    def get(
        self, req: LatentRequest, load: Callable[[LatentRequest], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The cached latent; on a miss (never filled, or the image changed) it is encoded now when
        ``load`` is given. Misses inside DataLoader workers would run `encode` there: fill first."""
        return self.entry(req, load)[0]

    def entry(self, req: LatentRequest, load: Callable[[LatentRequest], torch.Tensor] | None = None,
              load_mask: Callable[[LatentRequest], torch.Tensor] | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the cached latent, its cached mask or None when the request has no mask), as `get`."""
        fp = self.fingerprint(req)
        hit = self._lookup(req, fp)
        if hit is not None:
            return hit
        if load is None:
            raise KeyError(f"no cached latent for {req.image_path} (flip={req.flip}); call fill() first")
        latent = self._encode(load(req).unsqueeze(0))[0]
        mask = self._mask_for(req, load_mask)
        self._store(req, fp, latent, mask)
        return self._out(latent.detach().to("cpu")), mask


TextOutputs = torch.Tensor | tuple[torch.Tensor, ...] | Mapping[str, torch.Tensor]


def weights_fingerprint(modules: Iterable[torch.nn.Module]) -> str:
    """A short digest of the modules' parameters: names, shapes, dtypes and eight values spread over each
    tensor. Two different checkpoints (a fine-tune, a merge) differ in it; computing it reads a few hundred
    values, not the weights."""
    names, samples = [], []
    for module in modules:
        for name, p in module.named_parameters():
            flat = p.detach().reshape(-1)
            samples.append(flat[:: max(1, flat.numel() // 8)][:8].float())
            names.append(f"{name}:{tuple(p.shape)}:{p.dtype}")
    values = torch.cat(samples).cpu().numpy().tobytes() if samples else b""
    return hashlib.sha1("\n".join(names).encode() + values).hexdigest()[:16]


class TextEmbeddingCache:
    """Text-encoder outputs per caption, for a frozen text encoder.

    Args:
        encode: ``list[str]`` -> a batch-first tensor, a tuple of them (e.g. SDXL's two hidden states
            and the pooled output), or a dict of them. `get` returns the same shape of thing.
        to_disk: keep outputs as ``.npz`` files: in ``cache_dir`` when given, else beside the images that
            `fill` names (``<image name>.lycoft-te.npz``, one per image).
        namespace: identifies the encoder setup (model weights, clip_skip, max length ...); entries written
            under another namespace, or for another caption, are not reused.
    """

    def __init__(self, encode: Callable[[list[str]], TextOutputs], *, to_disk: bool = False,
                 cache_dir: str | Path | None = None, namespace: str = "") -> None:
        self.encode = encode
        self.to_disk = to_disk
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.namespace = namespace
        self.encode_calls = 0
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._files: dict[str, Path] = {}  # beside the images: caption -> a valid file holding it
        self._form: str | None = None  # "tensor" | "tuple" | "dict": what encode returned

    @property
    def beside_images(self) -> bool:
        return self.to_disk and self.cache_dir is None

    @staticmethod
    def beside_path(image_path: Path) -> Path:
        """The file that holds the outputs of `image_path`'s caption when they are kept beside the images."""
        image_path = Path(image_path).resolve()
        return image_path.with_name(image_path.name + ".lycoft-te.npz")

    def _path(self, caption: str) -> Path | None:
        if self.cache_dir is None:
            return self._files.get(caption)
        digest = hashlib.sha1(f"{self.namespace}\0{caption}".encode()).hexdigest()[:24]
        return self.cache_dir / f"te-{digest}.npz"

    def _read(self, path: Path, caption: str) -> dict[str, torch.Tensor] | None:
        data = _load_npz(path)
        if data is None:
            return None
        if (str(data.get("caption", "")), str(data.get("namespace", ""))) != (caption, self.namespace):
            return None  # another caption, a hash collision or another encoder setup
        self._form = self._form or str(data["form"])
        return {k[4:]: torch.from_numpy(v) for k, v in data.items() if k.startswith("out:")}

    def _write(self, path: Path, caption: str, row: dict[str, torch.Tensor]) -> None:
        arrays = {f"out:{k}": _to_numpy(v) for k, v in row.items()}
        arrays.update(caption=np.array(caption), namespace=np.array(self.namespace), form=np.array(self._form))
        _save_npz_atomic(path, arrays)

    def _lookup(self, caption: str) -> dict[str, torch.Tensor] | None:
        if caption in self._memory:
            return self._memory[caption]
        path = self._path(caption) if self.to_disk else None
        return None if path is None else self._read(path, caption)

    def _store(self, caption: str, row: dict[str, torch.Tensor]) -> None:
        path = self._path(caption) if self.to_disk else None
        if path is None:
            self._memory[caption] = row
        else:
            self._write(path, caption, row)

    def _encode(self, captions: list[str]) -> list[dict[str, torch.Tensor]]:
        with torch.no_grad():
            out = self.encode(captions)
        self.encode_calls += 1
        if isinstance(out, torch.Tensor):
            form, named = "tensor", {"0": out}
        elif isinstance(out, (tuple, list)):
            form, named = "tuple", {str(i): t for i, t in enumerate(out)}
        elif isinstance(out, Mapping):
            form, named = "dict", dict(out)
        else:
            raise ValueError(
                f"encode must return a tensor, a tuple or a dict of tensors, got {type(out).__name__}"
            )
        self._form = form
        return [{k: v[i].detach().to("cpu") for k, v in named.items()} for i in range(len(captions))]

    def fill(self, captions: Iterable[str], *, batch_size: int = 8,
             images: Sequence[str | Path] | None = None) -> int:
        """Encode every distinct caption not cached yet, ``batch_size`` per `encode` call; returns how many
        were encoded. ``images``: the image of each caption (same order), where the files go when they are
        kept beside the images."""
        if self.beside_images:
            return self._fill_beside(list(captions), images, batch_size)
        todo = [c for c in dict.fromkeys(captions) if self._lookup(c) is None]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for caption, row in zip(chunk, self._encode(chunk)):
                self._store(caption, row)
        return len(todo)

    def _fill_beside(self, captions: list[str], images: Sequence[str | Path] | None, batch_size: int) -> int:
        if images is None or len(images) != len(captions):
            raise ValueError("a text-encoder cache beside the images needs one image per caption: "
                             "fill(captions, images=...)")
        stale: dict[str, list[Path]] = {}  # caption -> its images' files that are missing or out of date
        for caption, image in zip(captions, images):
            path = self.beside_path(Path(image))
            if self._read(path, caption) is None:
                stale.setdefault(caption, []).append(path)
            else:
                self._files.setdefault(caption, path)
        todo = [c for c in stale if c not in self._files]
        for i in range(0, len(todo), batch_size):
            chunk = todo[i:i + batch_size]
            for caption, row in zip(chunk, self._encode(chunk)):
                for path in stale[caption]:
                    self._write(path, caption, row)
                self._files[caption] = stale[caption][0]
        for caption in stale.keys() - set(todo):  # the caption of another image too: copy its outputs
            row = self._read(self._files[caption], caption)
            for path in stale[caption]:
                self._write(path, caption, row)
        return len(todo)

    def get(self, captions: Sequence[str]) -> Any:
        """Outputs for a batch of captions, stacked batch-first; missing ones are encoded now."""
        rows: list[dict[str, torch.Tensor] | None] = [self._lookup(c) for c in captions]
        missing = list(dict.fromkeys(c for c, r in zip(captions, rows) if r is None))
        if missing:
            fresh = dict(zip(missing, self._encode(missing)))
            for caption, row in fresh.items():
                self._store(caption, row)
            rows = [r if r is not None else fresh[c] for c, r in zip(captions, rows)]
        keys = list(rows[0])  # type: ignore[index]
        stacked = {k: torch.stack([r[k] for r in rows]) for k in keys}  # type: ignore[index]
        if self._form == "tensor":
            return stacked["0"]
        if self._form == "tuple":
            return tuple(stacked[str(i)] for i in range(len(stacked)))
        return stacked
