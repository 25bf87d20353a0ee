"""Adapter files and training states on disk: names, atomic writes, keep-last-N pruning, resume.

Names follow kohya: ``<name>.safetensors`` (final), ``<name>-step00000100.safetensors`` (every N steps),
``<name>-000002.safetensors`` (after epoch 2); a training state sits next to its adapter as
``<same stem>-state/``: accelerate's checkpoint (adapter weights, optimizer, RNG) plus
``train_state.json`` with the step and epoch counters. The LR schedule is not in the checkpoint: it is
a function of the step count, rebuilt from ``train_state.json`` on resume.

Only the main process writes adapter files, but every rank calls `Saver.save_adapter` and
`Saver.save_state` at the same point: a state save is collective (every rank writes its RNG state), and
after each save the ranks agree on its success, so a write that fails on one rank stops every rank with
a `SaveError` instead of leaving the others waiting forever in the next collective call. Adapter files are
replaced atomically; a state folder is written under a temporary name and renamed when complete, so a
crash never leaves a half-written file or folder under a real name. Pruning runs only after the new file
is in place and never touches the one just written.

Resuming loads nothing that can run code: every pickle accelerate reads from a state folder is loaded
weights-only (tensors, numbers, strings and containers of them), and a folder holding anything else is
refused with a `ConfigError`. A folder is checked whole before anything is loaded from it
(`check_state_folder`: every file there, none truncated or damaged), so ``--resume auto`` can pass over a
damaged one and a plain ``--resume`` names the damaged file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from lycoft.training.errors import ConfigError, first_line

logger = logging.getLogger(__name__)

STATE_FILE = "train_state.json"
SAVE_DTYPES = {None: torch.float32, "float": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class StateFolderError(ConfigError):
    """A state folder with a missing or damaged file; ``damage`` says which file and what is wrong."""

    def __init__(self, folder: Path, damage: str) -> None:
        self.folder, self.damage = folder, damage
        super().__init__(f"--resume {folder}: {damage}; resume from an older state (--resume auto takes the "
                         "newest intact one) or start over")


@dataclass
class TrainState:
    """Counters that, with accelerate's checkpoint, let a run continue exactly.

    ``global_step``: optimizer steps done. ``epoch``: epochs completed. ``step_in_epoch``: optimizer
    steps done inside the epoch in progress. ``nonfinite_skipped``: steps skipped by
    ``--skip_nonfinite``. ``num_processes``/``seed``: the run's setup, checked on resume.
    """

    global_step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    nonfinite_skipped: int = 0
    seed: int = 0
    num_processes: int = 1

    def write(self, folder: Path) -> None:
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def read(cls, folder: str | Path) -> TrainState:
        path = Path(folder) / STATE_FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"--resume {folder}: no {STATE_FILE} in it; give a state folder written by "
                              "--save_state (named '<output_name>...-state')") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StateFolderError(Path(folder), f"{STATE_FILE} is damaged ({e})") from None
        known = {f.name for f in fields(cls)}
        try:
            return cls(**{k: int(v) for k, v in data.items() if k in known})
        except (AttributeError, TypeError, ValueError) as e:  # not an object of integers
            raise StateFolderError(Path(folder), f"{STATE_FILE} is damaged ({e})") from None


def adapter_stem(output_name: str, *, step: int | None = None, epoch: int | None = None) -> str:
    """kohya's file stems: final, per-step and per-epoch saves."""
    if step is not None:
        return f"{output_name}-step{step:08d}"
    if epoch is not None:
        return f"{output_name}-{epoch:06d}"
    return output_name


def state_name(stem: str) -> str:
    return f"{stem}-state"


def newest_state(output_dir: str | Path, output_name: str) -> tuple[Path, TrainState] | None:
    """The intact state folder of `output_name` in `output_dir` with the most steps done (``--resume auto``).

    Looks at ``<name>-state``, ``<name>-stepNNNNNNNN-state`` and ``<name>-NNNNNN-state`` and orders them by
    the step counter in their ``train_state.json``, not by name. Hidden temporaries of an interrupted save
    (``.<...>.partial``, ``.<...>.old``) are never candidates; a folder whose counters cannot be read, or
    with a missing or damaged file (`check_state_folder`), is skipped with a warning naming it, and the
    next older one is taken. None when there is no usable state folder."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return None
    pattern = re.compile(re.escape(output_name) + r"(-step\d{8}|-\d{6})?-state")
    candidates: list[tuple[int, str, Path, TrainState]] = []
    for entry in folder.iterdir():
        if not pattern.fullmatch(entry.name) or not entry.is_dir():
            continue
        try:
            state = TrainState.read(entry)
        except (ConfigError, OSError) as e:
            logger.warning("--resume auto: skipping %s, its %s cannot be read (%s)", entry, STATE_FILE,
                           getattr(e, "damage", e))
            continue
        candidates.append((state.global_step, entry.name, entry, state))
    for _, _, entry, state in sorted(candidates, key=lambda c: c[:2], reverse=True):
        try:
            check_state_folder(entry)
        except ConfigError as e:
            logger.warning("--resume auto: skipping %s (step %d): %s; trying the next older state", entry,
                           state.global_step, getattr(e, "damage", e))
            continue
        return entry, state
    return None


def check_state_folder(folder: str | Path) -> None:
    """Raise `StateFolderError` naming the file if `folder` lacks a file `load_state` needs or holds a truncated or
    damaged one: the counters, the adapter weights (safetensors header against the file size), the
    optimizer and every other torch file (zip structure and checksums). Reads each file once, loads none."""
    from lycoft.io.safe_io import read_safetensors_header

    folder = Path(folder)
    TrainState.read(folder)
    weights = [folder / "model.safetensors", folder / "pytorch_model.bin"]
    if not any(p.is_file() for p in weights):
        raise StateFolderError(folder, "model.safetensors (the adapter weights) is missing")
    if not (folder / "optimizer.bin").is_file():
        raise StateFolderError(folder, "optimizer.bin (the optimizer state) is missing")
    for path in sorted(folder.iterdir()):
        try:
            if path.suffix == ".safetensors":
                read_safetensors_header(path)
            elif path.suffix in (".bin", ".pkl"):
                _check_torch_file(path)
        except (ValueError, OSError, zipfile.BadZipFile) as e:
            why = getattr(e, "problem", None) or first_line(e)
            raise StateFolderError(folder, f"{path.name} is truncated or damaged ({why})") from None


def _check_torch_file(path: Path) -> None:
    """A `torch.save` file is a zip archive with a CRC-32 per record: check its structure and every checksum."""
    if not zipfile.is_zipfile(path):
        raise ValueError("not a complete torch file")
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    if bad is not None:
        raise ValueError(f"record {bad} fails its checksum")


class SaveError(RuntimeError):
    """Writing an adapter file or a training state failed (disk full, read-only, permissions); the message
    names the file, the cause, the step and the newest complete save to resume from."""


def _write_errors() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # pragma: no cover - very old safetensors
        return (OSError,)
    return (OSError, SafetensorError)


class Saver:
    """Writes the adapter and (with ``--save_state``) the training state of one run.

    Args:
        accelerator: the run's `accelerate.Accelerator`.
        output_dir, output_name: where and under which stem files go.
        metadata: ``(step, epoch) -> dict`` of extra safetensors metadata for an adapter save.
        save_precision: ``None``/``"float"``, ``"fp16"`` or ``"bf16"``.
        v_prediction: recorded in the file's metadata (``ss_base_model_version`` ``..._v``).
        keep_last_steps: delete step saves more than this many steps older than the newest.
        keep_last_epochs: keep only this many epoch saves.
        keep_last_steps_state, keep_last_epochs_state: the same for the training states, which are pruned apart
            from the adapters (kohya's ``--save_last_n_*_state``); None: as the adapters.
    """

    def __init__(self, accelerator: Any, output_dir: str | Path, output_name: str, *,
                 metadata: Callable[[int, int], Mapping[str, Any]], save_precision: str | None = None,
                 v_prediction: bool = False, keep_last_steps: int | None = None,
                 keep_last_epochs: int | None = None, keep_last_steps_state: int | None = None,
                 keep_last_epochs_state: int | None = None) -> None:
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.output_name = output_name
        self.metadata = metadata
        self.dtype = SAVE_DTYPES[save_precision]
        self.v_prediction = v_prediction
        self.keep_last_steps = keep_last_steps
        self.keep_last_epochs = keep_last_epochs
        self.keep_last_steps_state = keep_last_steps_state or keep_last_steps
        self.keep_last_epochs_state = keep_last_epochs_state or keep_last_epochs
        self.written: list[Path] = []
        self.last_state: Path | None = None

    def _failed(self, path: Path, step: int, error: BaseException) -> SaveError:
        cause = getattr(error, "strerror", None) or str(error)
        if not isinstance(error, OSError):  # torch.save reports a full disk as a bare RuntimeError
            with contextlib.suppress(OSError):
                free = shutil.disk_usage(self.output_dir).free
                cause = f"{free} bytes free there, the disk is probably full; {cause}"
        newest = self.last_state or (self.written[-1] if self.written else None)
        where = (f"the newest complete save is {newest}" + (f"; resume with --resume {newest}"
                                                            if newest is self.last_state else ""))
        if newest is None:
            where = "nothing was saved before it"
        return SaveError(f"cannot write {path} ({cause}) at step {step}; training stopped and the files "
                         f"written before are intact: {where}. Free space in {self.output_dir} or choose "
                         "another --output_dir")

    def _settle(self, error: BaseException | None, path: Path, step: int,
                cleanup: Callable[[], None] | None = None) -> None:
        """Raise on every rank if the save step just done failed on any rank; return if it worked everywhere.

        With several processes this is a collective call (one small gather, which also acts as the barrier
        between save steps); a single process pays nothing. The rank that failed raises its own error
        (a `SaveError` for a write failure); the others raise a `SaveError` naming that rank and `path`.
        `cleanup` runs on the main process before raising."""
        acc = self.accelerator
        failed = [0] if error is not None else []
        if getattr(acc, "num_processes", 1) > 1:
            flag = torch.tensor([0 if error is None else 1], dtype=torch.int64, device=acc.device)
            failed = [rank for rank, f in enumerate(acc.gather(flag).tolist()) if f]
        if not failed:
            return
        if cleanup is not None and acc.is_main_process:
            with contextlib.suppress(OSError):
                cleanup()
        if error is not None:
            if isinstance(error, (*_write_errors(), RuntimeError)) and not isinstance(error, SaveError):
                # torch.save reports a full disk as a bare RuntimeError
                raise self._failed(path, step, error) from error
            raise error
        ranks = ", ".join(str(r) for r in failed)
        raise SaveError(f"process {ranks} could not write {path} at step {step} (that process reports the cause); "
                        "training stopped on every process and the files written before are intact")

    # -- adapter files ---------------------------------------------------------------------------
    def save_adapter(self, network: Any, stem: str, *, step: int, epoch: int) -> Path | None:
        """Write ``<stem>.safetensors`` on the main process (every rank calls this; the others return None
        once the main process has written the file, or raise `SaveError` if it failed)."""
        from lycoft.network_files import save_network

        path = self.output_dir / f"{stem}.safetensors"
        error: BaseException | None = None
        if self.accelerator.is_main_process:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                save_network(network, str(path), metadata=dict(self.metadata(step, epoch)), dtype=self.dtype,
                             output_name=stem, v_prediction=self.v_prediction, warn_ui=not self.written)
            except Exception as e:  # any failure: the other ranks must hear of it (see `_settle`)
                error = e
        self._settle(error, path, step)
        if not self.accelerator.is_main_process:
            return None
        self.written.append(path)
        logger.info("saved adapter %s (step %d)", path, step)
        return path

    # -- training states ------------------------------------------------------------------------
    def save_state(self, stem: str, state: TrainState) -> Path:
        """Write ``<stem>-state/`` (collective: every rank must call this at the same point)."""
        acc = self.accelerator
        final = self.output_dir / state_name(stem)
        partial = self.output_dir / f".{final.name}.partial"
        step = state.global_step

        def give_back() -> None:  # the space of the partial folder; the previous states are untouched
            shutil.rmtree(partial, ignore_errors=True)

        error: BaseException | None = None
        if acc.is_main_process:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)
            except Exception as e:
                error = e
        self._settle(error, final, step)  # also the barrier: `partial` is clean before anyone writes to it
        try:
            try:
                acc.save_state(str(partial))
            except Exception as e:
                error = e
            self._settle(error, final, step, give_back)
            if acc.is_main_process:
                try:
                    state.write(partial)
                    _replace_dir(partial, final)
                except Exception as e:
                    error = e
            self._settle(error, final, step, give_back)
        except KeyboardInterrupt:  # Ctrl-C: the half-written folder goes (SIGKILL leaves it to `remove_stale`)
            if acc.is_main_process:
                give_back()
            raise
        if acc.is_main_process:
            logger.info("saved training state %s (step %d)", final, step)
        self.last_state = final
        return final

    # -- leftovers of a killed run ---------------------------------------------------------------
    def remove_stale(self) -> list[Path]:
        """Delete the hidden temporaries a killed run of this ``output_name`` left (``.<file>.<hex>.tmp``,
        ``.<stem>-state.partial``, ``.<stem>-state.old``): SIGKILL or a power cut leaves them, and a state
        folder weighs as much as the optimizer. An ``.old`` whose ``<stem>-state`` is missing is the previous
        state of a run killed between the two renames of a state save: it is moved back, not deleted. Call at
        the start of a run (main process), before any save; two runs writing the same output name into one
        folder at once are not supported anyway."""
        if not self.accelerator.is_main_process or not self.output_dir.is_dir():
            return []
        pattern = re.compile(r"\." + re.escape(self.output_name) + r"(-step\d{8}|-\d{6})?"
                             r"(\.safetensors\.[0-9a-f]{12}\.tmp|-state\.partial|-state\.old)$")
        removed = []
        for entry in sorted(self.output_dir.iterdir()):
            if not pattern.match(entry.name):
                continue
            final = entry.with_name(entry.name[1:-len(".old")])
            if entry.name.endswith("-state.old") and entry.is_dir() and not os.path.lexists(final):
                os.replace(entry, final)
                logger.warning("restored training state %s from %s, left by a run interrupted while saving",
                               final, entry.name)
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
            logger.info("removed %s, left by an interrupted run", entry)
        return removed

    # -- pruning --------------------------------------------------------------------------------
    def prune_steps(self, current_step: int) -> list[Path]:
        """Delete step adapters older than ``current_step - keep_last_steps`` and step states older than
        ``current_step - keep_last_steps_state``."""
        removed: list[Path] = []
        for kind, keep in ((r"\.safetensors", self.keep_last_steps), ("-state", self.keep_last_steps_state)):
            if keep and self.accelerator.is_main_process:
                pattern = re.compile(re.escape(self.output_name) + r"-step(\d{8})" + kind + "$")
                removed += self._prune(pattern, lambda n, keep=keep: n < current_step - keep and n != current_step)
        return removed

    def prune_epochs(self, current_epoch: int) -> list[Path]:
        """Keep only the newest ``keep_last_epochs`` epoch adapters and ``keep_last_epochs_state`` epoch
        states up to `current_epoch` (counting saves, so that saving every N epochs keeps as many)."""
        removed: list[Path] = []
        for kind, keep in ((r"\.safetensors", self.keep_last_epochs), ("-state", self.keep_last_epochs_state)):
            if keep and self.accelerator.is_main_process:
                pattern = re.compile(re.escape(self.output_name) + r"-(\d{6})" + kind + "$")
                numbers = (int(m.group(1)) for m in map(pattern.match, self._entries()) if m)
                saved = sorted(n for n in numbers if n <= current_epoch)
                kept = set(saved[-keep:]) | {current_epoch}
                removed += self._prune(pattern, lambda n, kept=kept: n <= current_epoch and n not in kept)
        return removed

    def _entries(self) -> list[str]:
        return sorted(entry.name for entry in self.output_dir.iterdir()) if self.output_dir.is_dir() else []

    def _prune(self, pattern: re.Pattern, old: Callable[[int], bool]) -> list[Path]:
        removed = []
        if not self.output_dir.is_dir():
            return removed
        for entry in sorted(self.output_dir.iterdir()):
            m = pattern.match(entry.name)
            if not m or not old(int(m.group(1))):
                continue
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
            removed.append(entry)
            logger.info("removed old save %s", entry)
        return removed


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished folder `src` onto `dst`; an existing `dst` is removed only after the move."""
    old = None
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(dst, old)
    os.replace(src, dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


_FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_FORCE_NO_WEIGHTS_ONLY = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_OLD_SCHEDULER_FILE = re.compile(r"custom_checkpoint_\d+\.pkl")


@contextlib.contextmanager
def weights_only_loads():
    """Make every `torch.load` in this block weights-only, whatever its caller passes.

    torch reads ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` at each call and lets it override an explicit
    ``weights_only=False`` (accelerate passes that for registered objects); the previous environment is
    restored afterwards."""
    saved = {k: os.environ.get(k) for k in (_FORCE_WEIGHTS_ONLY, _FORCE_NO_WEIGHTS_ONLY)}
    os.environ[_FORCE_WEIGHTS_ONLY] = "1"
    os.environ.pop(_FORCE_NO_WEIGHTS_ONLY, None)  # both set is an error in torch
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class _Discard:
    """Stands in for the LR scheduler that state folders of older lycoft versions carry as
    ``custom_checkpoint_0.pkl``: accelerate insists on one registered object per such file. Its content is
    loaded (weights-only) and dropped; the schedule is rebuilt from the step counter."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: Any) -> None:
        pass


def _refused(folder: Path, file: Path | None) -> ConfigError:
    what = f"{file.name} in it" if file is not None else "one of its files"
    return ConfigError(f"--resume {folder}: refused to load {what}: the state folder contains pickled objects "
                       "that are not plain tensors or numbers, and loading them could run code. Resume only from "
                       "state folders your own runs wrote, or start over")


def _weights_only_refuses(path: Path) -> bool:
    """Whether a weights-only load (accelerate's, with its numpy allowances) refuses `path`."""
    from accelerate.utils import load

    try:
        with weights_only_loads():
            load(str(path), map_location="cpu")
    except pickle.UnpicklingError:
        return True
    except Exception:  # damaged in another way: accelerate reports it (or skips it, as it does RNG states)
        return False
    return False


def load_state(accelerator: Any, folder: str | Path, *, num_processes: int,
               model: torch.nn.Module | None = None, optimizer: Any = None) -> TrainState:
    """Restore accelerate's checkpoint from `folder` and return its counters (collective).

    The folder is checked first (`check_state_folder`), and its adapter weights against `model` (the
    unwrapped module accelerate checkpoints), so that a state of another adapter is reported by the
    option that differs; so is one of another `optimizer` type (by its settings). Every pickle in the
    folder is loaded weights-only; one that needs arbitrary Python objects is refused with a `ConfigError`
    naming the file."""
    from lycoft.io.safe_io import read_safetensors_header

    folder = Path(folder)
    state = TrainState.read(folder)
    check_state_folder(folder)
    if model is not None and (folder / "model.safetensors").is_file():
        header, _ = read_safetensors_header(folder / "model.safetensors")
        differs = adapter_mismatch({k: tuple(v.shape) for k, v in header.items()},
                                   {k: tuple(v.shape) for k, v in model.state_dict().items()})
        if differs:
            raise ConfigError(f"--resume {folder} was saved for another adapter: {differs}; resume with the "
                              "--network_args and model of the run that saved it, or start a new run")
    if state.num_processes != num_processes:
        logger.warning("--resume %s was saved by %d processes, this run has %d: the data order of the "
                       "remaining steps differs from an uninterrupted run", folder, state.num_processes,
                       num_processes)
    # accelerate swallows any error loading the RNG state (and goes on without it): check it first, so that a
    # tampered file is reported rather than silently skipped. Every process checks every process's file, so
    # that all of them stop with the same error (not the others on a collective whose peer is gone).
    bad = next((f for f in sorted(folder.glob("random_states_*.pkl")) if _weights_only_refuses(f)), None)
    if bad is not None:
        raise _refused(folder, bad)
    sinks = [_Discard() for f in os.listdir(folder) if _OLD_SCHEDULER_FILE.fullmatch(f)]
    if sinks:
        accelerator.register_for_checkpointing(*sinks)
    settings = None if optimizer is None else _group_settings(optimizer)
    with weights_only_loads():
        try:
            accelerator.load_state(str(folder))
        except pickle.UnpicklingError:
            bad = next((f for f in sorted(folder.iterdir())
                        if f.suffix in (".bin", ".pkl") and f.is_file() and _weights_only_refuses(f)), None)
            raise _refused(folder, bad) from None
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(f"--resume {folder} does not fit this run's adapter or optimizer "
                              f"({first_line(e)}); resume with the same --network_args, --optimizer_type and "
                              "model") from None
        finally:
            registered = getattr(accelerator, "_custom_objects", [])
            for sink in sinks:  # later saves must not write them (a private list: accelerate has no API)
                with contextlib.suppress(ValueError):
                    registered.remove(sink)
    saved = settings if optimizer is None else _group_settings(optimizer)
    if settings is not None and saved - settings and settings - saved:  # (one-sided: another torch version)
        name = type(getattr(optimizer, "optimizer", optimizer)).__name__
        raise ConfigError(f"--resume {folder} was saved with another optimizer (with settings "
                          f"{', '.join(sorted(saved - settings))}, which {name} does not have); resume with the "
                          "--optimizer_type of the run that saved it")
    return state


def _group_settings(optimizer: Any) -> set[str]:
    """The names of an optimizer's per-group settings (``lr``, ``betas`` ...): they tell optimizer types apart.
    ``initial_lr`` is the LR schedule's, present or not depending on when the groups were read."""
    return {k for g in optimizer.param_groups for k in g if k not in ("params", "initial_lr")}


def adapter_mismatch(saved: Mapping[str, tuple[int, ...]], current: Mapping[str, tuple[int, ...]]) -> str | None:
    """How the adapter parameters of a state (name -> shape) differ from this run's, in option terms; None
    when they match. Parameters are ``<prefix>.<module key>.oft_blocks`` of shape ``(blocks, b, b)`` (oft)
    or ``(stages, blocks, b, b)`` (boft), and ``.rescale`` when rescale is on."""
    if dict(saved) == dict(current):
        return None

    def modules(params: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for name, shape in params.items():
            module, _, param = name.rpartition(".")
            out.setdefault(module, {})[param] = shape
        return out

    old, new = modules(saved), modules(current)
    for key in sorted(old.keys() & new.keys()):
        a, b = old[key], new[key]
        short = key.rpartition(".")[2]
        if ("rescale" in a) != ("rescale" in b):
            return f"rescale is {_on('rescale' in a)} in the state and {_on('rescale' in b)} here"
        blocks_a, blocks_b = a.get("oft_blocks"), b.get("oft_blocks")
        if blocks_a is None or blocks_b is None or blocks_a == blocks_b:
            continue
        algo = {3: "oft", 4: "boft"}
        if len(blocks_a) != len(blocks_b):
            return f"algo is {algo.get(len(blocks_a), '?')} in the state and {algo.get(len(blocks_b), '?')} here"
        if blocks_a[-1] != blocks_b[-1]:
            return f"block_size is {blocks_a[-1]} in the state and {blocks_b[-1]} here (layer {short})"
        if blocks_a[-3] != blocks_b[-3]:
            return (f"layer {short} is {blocks_a[-3] * blocks_a[-1]} channels wide in the state and "
                    f"{blocks_b[-3] * blocks_b[-1]} here: it was saved for another model or family")
        if len(blocks_a) == 4 and blocks_a[0] != blocks_b[0]:
            return f"butterfly_factors is {blocks_a[0]} in the state and {blocks_b[0]} here (layer {short})"
        return f"layer {short} has blocks {blocks_a} in the state and {blocks_b} here"
    only_old, only_new = len(old.keys() - new.keys()), len(new.keys() - old.keys())
    if only_old + only_new:
        other = ("another model or family" if len(old.keys() & new.keys()) < min(len(old), len(new)) / 2
                 else "another preset, include/exclude, conv_block_size or --network_train_*_only")
        return (f"it adapts {len(old)} layers and this run {len(new)} ({only_old} only in the state, {only_new} only "
                f"here): it was made with {other}")
    return "its parameters differ from this run's"


def _on(flag: bool) -> str:
    return "on" if flag else "off"
