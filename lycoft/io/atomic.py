"""Writing output files so that a crash, Ctrl-C or a full disk never leaves a half-written file behind.

A merge that dies while writing a 6 GB checkpoint must leave either the old file or the new one, never a
truncated mix that loads as garbage later. The recipe: write a temporary file next to the target (same
directory, hence same filesystem, so the final rename is atomic), fsync it, `os.replace` it onto the
target, fsync the directory so the rename itself survives a power cut. A folder output (a diffusers
model) is written the same way: `atomic_directory` fills a temporary folder next to the target and swaps
it into place when complete.

A writer killed with SIGKILL leaves its hidden temporary behind; the next write to the same target removes
it and says so (only temporaries no live process holds locked, so a concurrent writer is never disturbed).
A full disk is reported as such (`DiskFullError`: the folder, the space left, the space needed), after the
partial output is removed.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from lycoft.io.errors import DiskFullError

log = logging.getLogger("lycoft")

# Room for the `.` prefix and `.<random>.tmp` suffix inside the usual 255-byte file-name limit.
_MAX_NAME_STEM = 200


try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale temporaries are left for the user
    fcntl = None  # type: ignore[assignment]

# A writer locks its temporary right after creating it, and again right after a `write_fn` that replaced
# the file (safetensors' save_file renames a new file onto it): an unlocked temporary touched within the
# last seconds may be in one of those gaps and is kept. A killed writer's is older by the time anything
# runs again.
_STALE_AFTER_S = 2.0
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def _lock(fd: int) -> bool:
    """Take an exclusive advisory lock on `fd` without waiting; False if another process holds one."""
    if fcntl is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


_HEX12_TMP = re.compile(r"[0-9a-f]{12}\.tmp")  # the random part `_create_temp` writes, and the suffix


def _log_removed(entry: Path, target: Path, size: int) -> None:
    log.warning("lycoft: removed %s (%s), left in %s by an interrupted write of %s", entry.name, _size_text(size),
                entry.parent, target.name)


def _size_text(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n} bytes"


def _tree_size(folder: Path) -> int:
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def remove_stale_temps(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporaries of `path` that a killed writer left (``.<name>.<hex>.tmp``, unlocked, untouched
    for a few seconds), logging one line for each. SIGKILL or a power cut cannot run cleanup code, and a
    merge's temporary is as large as the checkpoint. A temporary still being written is locked by its writer
    and is left alone; files of any other name are never touched."""
    target = Path(path)
    prefix = f".{target.name[:_MAX_NAME_STEM]}."
    removed: list[Path] = []
    if fcntl is None or not target.parent.is_dir():
        return removed
    now = time.time()
    for entry in target.parent.iterdir():
        name = entry.name
        if not (name.startswith(prefix) and _HEX12_TMP.fullmatch(name[len(prefix):])):
            continue
        try:
            if not entry.is_file() or entry.is_symlink() or now - entry.stat().st_mtime < _STALE_AFTER_S:
                continue
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue
        try:
            if _lock(fd):
                size = os.fstat(fd).st_size
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry)
                removed.append(entry)
                _log_removed(entry, target, size)
        finally:
            os.close(fd)
    return removed


def remove_stale(path: str | os.PathLike[str]) -> list[Path]:
    """Every temporary a killed writer of `path` left: files (`remove_stale_temps`) and folders
    (`remove_stale_dirs`: a diffusers output, or the scratch copy of a ``.ckpt`` base)."""
    return remove_stale_temps(path) + remove_stale_dirs(path)


def ensure_free_space(folder: str | os.PathLike[str], needed: int) -> None:
    """Raise `DiskFullError` now if the disk holding `folder` has less than `needed` bytes free, rather than
    after writing most of a multi-GB output. Filesystems that cannot say are not checked."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < needed:
        raise DiskFullError(folder, free, needed)


def _disk_full(error: BaseException, folder: Path, needed: int | None, written: int | None) -> DiskFullError | None:
    """`error` as a `DiskFullError` (measured after the partial output is gone), or None if it is another."""
    if not isinstance(error, OSError) or isinstance(error, DiskFullError) or error.errno not in _DISK_FULL:
        return None
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = 0
    return DiskFullError(folder, free, needed, written, error.errno)


def _create_temp(target: Path) -> tuple[Path, int]:
    """Create an empty, new temporary file `.<name>.<random>.tmp` next to `target`; returns its path and an
    open descriptor holding its lock (see `remove_stale_temps`)."""
    directory = target.parent
    for _ in range(100):
        tmp = directory / f".{target.name[:_MAX_NAME_STEM]}.{secrets.token_hex(6)}.tmp"
        try:
            # 0o666 lets the umask decide the permissions, like any other file the user creates
            # (mkstemp would force 0o600 onto every output).
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
        except FileExistsError:
            continue
        except PermissionError as e:
            raise PermissionError(
                f"cannot write {target}: no permission to create files in {directory}; "
                "choose an output path in a directory you can write to"
            ) from e
        _lock(fd)
        return tmp, fd
    raise FileExistsError(f"cannot write {target}: could not find a free temporary name in {directory}")


def _fsync_file(path: Path) -> None:
    """Flush the file's data to disk (write_fn may have closed its handle without syncing)."""
    try:
        fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    except PermissionError:
        # write_fn may have made the file read-only; a read-only descriptor is enough for fsync on POSIX.
        fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    """Persist the rename; directories cannot be opened for fsync on Windows, and some filesystems refuse."""
    if os.name == "nt":
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike[str], write_fn: Callable[[Path], object], size_hint: int | None = None
                 ) -> Path:
    """Create or replace `path` atomically with whatever `write_fn(tmp_path)` writes to `tmp_path`.

    `write_fn` receives the path of an empty temporary file `.<name>.<random>.tmp` in the target's
    directory and writes the complete content there (e.g. ``lambda p: save_file(tensors, p)``). Only when
    it returns is the file flushed, fsynced and renamed onto the target. If it raises (or is
    interrupted), the temporary file is deleted and the previous target, if any, is untouched.

    A target that is a symlink is resolved first, so the link keeps pointing at the (new) file. An
    existing target's permission bits are kept. Temporaries of earlier, killed writes of `path` are
    removed first (`remove_stale`). `size_hint`: about how many bytes the file will take; a disk with
    less free space is reported before writing. A full disk raises `DiskFullError`. Returns the path
    written (symlinks resolved).
    """
    target = Path(os.path.realpath(os.fspath(path)))
    directory = target.parent
    if not directory.is_dir():
        raise FileNotFoundError(
            f"cannot write {path}: directory {directory} does not exist; create it or choose another path"
        )
    if target.is_dir():
        raise IsADirectoryError(
            f"cannot write {path}: it is a directory; give a file name, e.g. {target / 'adapter.safetensors'}"
        )
    with contextlib.suppress(OSError):
        remove_stale(target)
    if size_hint is not None:
        ensure_free_space(directory, size_hint)
    tmp, lock_fd = _create_temp(target)
    # The lock is held until the rename: it tells `remove_stale_temps` in other processes that this writer
    # is alive. Windows has no such locks and cannot rename a file that is open: the descriptor is closed.
    if fcntl is None:
        os.close(lock_fd)
        lock_fd = None
    fresh_mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 less the umask, as `_create_temp` made it
    written = None
    try:
        try:
            write_fn(tmp)
        finally:
            with contextlib.suppress(OSError):
                written = tmp.stat().st_size
        if lock_fd is not None and os.fstat(lock_fd).st_ino != tmp.stat().st_ino:
            # write_fn put a new file in place (safetensors' save_file does): lock that one instead.
            os.close(lock_fd)
            lock_fd = os.open(tmp, os.O_RDONLY)
            _lock(lock_fd)
        # Keep an existing target's permissions; a new one gets the umask's, even when write_fn replaced
        # the temporary by a file of its own (safetensors' save_file creates it 0o600).
        try:
            mode = stat.S_IMODE(target.stat().st_mode)
        except FileNotFoundError:
            mode = fresh_mode
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, mode)
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException as e:
        # BaseException: Ctrl-C during a long write must not leave a multi-GB temp file behind either.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        full = _disk_full(e, directory, size_hint, written)
        if full is not None:
            raise full from e
        raise
    finally:
        if lock_fd is not None:
            os.close(lock_fd)
    _fsync_dir(directory)
    return target


# The random part of a temporary folder's name: 8 characters of this alphabet (as tempfile.mkdtemp's)
_MKDTEMP_RANDOM = "[a-z0-9_]{8}"
_RANDOM_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789_"


def _dir_temp_prefix(target: Path) -> str:
    return f".{target.name[:_MAX_NAME_STEM]}."


def _locked_dir_temp(target: Path, suffix: str) -> tuple[Path, int | None]:
    """A new empty folder `.<name>.<random><suffix>` next to `target`, and a descriptor holding its lock.

    Made with mode 0o777 less the umask, like any folder the user creates (tempfile.mkdtemp makes 0o700,
    which a UI service running as another user cannot read once the folder is renamed into place)."""
    for _ in range(100):
        name = "".join(secrets.choice(_RANDOM_ALPHABET) for _ in range(8))
        tmp = target.parent / f"{_dir_temp_prefix(target)}{name}{suffix}"
        try:
            os.mkdir(tmp, 0o777)
        except FileExistsError:
            continue
        except PermissionError as e:
            raise PermissionError(
                f"cannot write {target}: no permission to create folders in {target.parent}; "
                "choose an output path in a directory you can write to"
            ) from e
        fd = os.open(tmp, os.O_RDONLY) if fcntl is not None else None
        if fd is not None:
            _lock(fd)
        return tmp, fd
    raise FileExistsError(f"cannot write {target}: could not find a free temporary name in {target.parent}")


def remove_stale_dirs(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary folders of output `path` that a killed writer left: ``.<name>.<random>.tmp``
    (the new folder being written, or the scratch copy of a base model) and ``.<name>.<random>.old`` (the
    replaced folder, for the moment between the two renames of `atomic_directory`), logging one line for
    each. Only unlocked ones untouched for a few seconds: a live writer holds its folders locked. An
    ``.old`` holding the only copy of the output (the writer died between the renames) is moved back to
    `path` rather than deleted. Returns the folders removed."""
    target = Path(path)
    pattern = re.compile(re.escape(_dir_temp_prefix(target)) + _MKDTEMP_RANDOM + r"\.(tmp|old)")
    removed: list[Path] = []
    if fcntl is None or not target.parent.is_dir():
        return removed
    now = time.time()
    for entry in sorted(target.parent.iterdir()):
        if not pattern.fullmatch(entry.name):
            continue
        try:
            if entry.is_symlink() or not entry.is_dir() or now - entry.stat().st_mtime < _STALE_AFTER_S:
                continue
            fd = os.open(entry, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _lock(fd):
                continue
            size = _tree_size(entry)
            if entry.name.endswith(".old") and (entry / "x").is_dir() and not os.path.lexists(target):
                os.replace(entry / "x", target)
                log.warning("lycoft: restored %s from %s, left by an interrupted write", target, entry.name)
            shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue
        finally:
            os.close(fd)
        removed.append(entry)
        _log_removed(entry, target, size)
    return removed


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], size_hint: int | None = None) -> Iterator[Path]:
    """Create or replace the folder `path` atomically with what the ``with`` body writes into the yielded one.

    The body fills an empty temporary folder ``.<name>.<random>.tmp`` next to `path`; when it returns, the
    folder is renamed onto `path` (an existing `path` is first moved aside to ``.<name>.<random>.old/x`` and
    deleted after the swap). If the body raises, the temporary folder is deleted and `path` is untouched.
    Both temporaries are locked while they exist, and the stale ones of killed writers are removed first
    (`remove_stale`). `size_hint` and a full disk: as in `atomic_write`. The folder gets the umask's
    permissions, as the files the body creates do."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):
        remove_stale(target)
    if size_hint is not None:
        ensure_free_space(target.parent, size_hint)
    tmp, tmp_fd = _locked_dir_temp(target, ".tmp")
    folder_mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o777 less the umask, as `_locked_dir_temp` made it
    try:
        try:
            yield tmp
            _set_modes(tmp, folder_mode)
        except BaseException as e:
            written = None
            with contextlib.suppress(OSError):
                written = _tree_size(tmp)
                shutil.rmtree(tmp)
            full = _disk_full(e, target.parent, size_hint, written)
            if full is not None:
                raise full from e
            raise
        if target.exists():
            old, old_fd = _locked_dir_temp(target, ".old")
            try:
                os.replace(target, old / "x")
                os.replace(tmp, target)
                shutil.rmtree(old)
            finally:
                if old_fd is not None:
                    os.close(old_fd)
        else:
            os.replace(tmp, target)
    finally:
        if tmp_fd is not None:
            os.close(tmp_fd)
        if tmp.exists():
            shutil.rmtree(tmp)
    _fsync_dir(target.parent)


def _set_modes(root: Path, folder_mode: int) -> None:
    """Give every folder under `root` `folder_mode` and every file the same without execute bits: what the
    umask gives new files. Libraries that write through their own temporaries (safetensors' save_file,
    hence diffusers' save_pretrained) leave 0o600 files, which a service running as another user cannot
    read."""
    file_mode = folder_mode & 0o666
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), folder_mode)
        for name in filenames:
            path = os.path.join(dirpath, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)


def _system_scratch_target() -> Path:
    """Where scratch folders without an output go: ``<system temp>/lycoft-<user id>/.scratch.<random>.tmp``.
    One fixed place per user, so that any later run finds (and removes) what a killed one left there."""
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    home = Path(tempfile.gettempdir()) / f"lycoft-{uid}"
    home.mkdir(mode=0o700, exist_ok=True)
    return home / "scratch"


@contextlib.contextmanager
def scratch_directory(next_to: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A locked, empty temporary folder ``.<name>.<random>.tmp`` beside the output `next_to` (which need not
    exist yet), deleted on exit: for intermediate files as large as the output, on the same disk. One that a
    killed run left is removed by the next write of `next_to` (`remove_stale`). Without `next_to` (a
    ``.ckpt`` converted for loading), the folder is in a lycoft folder of the system's temporary folder, and
    the next scratch folder made there removes what a killed run left."""
    target = Path(next_to) if next_to is not None else _system_scratch_target()
    with contextlib.suppress(OSError):
        remove_stale(target)
    tmp, fd = _locked_dir_temp(target, ".tmp")
    try:
        yield tmp
    finally:
        if fd is not None:
            os.close(fd)
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_overwrite(path: str | os.PathLike[str], force: bool) -> None:
    """Raise unless `path` is free to write: it must not exist, or `force` must be set.

    A directory is refused even with `force`: replacing a folder by a file is never what the user meant.
    """
    p = Path(path)
    if p.is_dir():
        raise IsADirectoryError(f"{p} is a directory; give the path of a file to write")
    if (p.exists() or p.is_symlink()) and not force:
        raise FileExistsError(f"{p} exists; pass --force to overwrite (force=True from Python)")


def same_file(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether `a` and `b` name the same file (symlinks resolved, hard links and `./x` vs `x` included).

    Tools check an output against their inputs with it: writing a merge onto the checkpoint being read
    would destroy the input if anything went wrong.
    """
    try:
        return os.path.samefile(a, b)
    except OSError:
        # At least one does not exist yet: compare the resolved paths instead.
        return os.path.normcase(os.path.realpath(a)) == os.path.normcase(os.path.realpath(b))
