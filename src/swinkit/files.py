"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Every file swinkit writes (weights, training checkpoints, configs, logs, ONNX graphs, plots)
goes through `atomic_write`. `remove_stale_temps` clears what a killed writer left behind, and
`FolderLock` keeps a second process out of a folder one is writing (a training run's).
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import SwinkitError


CACHE_ENV = "SWINKIT_CACHE_DIR"


def cache_folder() -> Path:
    """Where swinkit keeps what it measured or built for this machine (GEMM engine choices, compiled
    kernels): `$SWINKIT_CACHE_DIR`, else `$XDG_CACHE_HOME/swinkit`, else `~/.cache/swinkit`."""
    folder = os.environ.get(CACHE_ENV)
    if folder:
        return Path(folder)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "swinkit"


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object], *,
                 verify: Callable[[Path], object] | None = None, keep_previous: str | os.PathLike | None = None
                 ) -> Path:
    """Write `path` so that readers see the old file or the whole new one, never a mix.

    `write_fn(tmp_path)` writes a temporary file in the same folder (named `.{name}.{8 hex}.tmp`,
    see `remove_stale_temps`); it is flushed to disk, checked with `verify(tmp_path)` when given
    (which raises if the file is not what was meant), renamed over `path` with `os.replace`, and
    the folder entry is synced. With `keep_previous`, the file `path` held until then is renamed
    to `keep_previous` just before the new one takes its place. If anything raises, the temporary
    file is removed and `path` is untouched; a failure to write (disk full, no permission) is an
    `OSError` that names `path`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode follows the umask
    except OSError as error:
        raise _write_failure(error, path) from error
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        if verify is not None:
            verify(tmp)
        if keep_previous is not None and path.exists():
            os.replace(path, keep_previous)
        os.replace(tmp, path)
    except BaseException as error:
        tmp.unlink(missing_ok=True)
        failure = _write_failure(error, path)
        if failure is not None:
            raise failure from error
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def _write_failure(error: BaseException, path: Path) -> OSError | None:
    """The OSError behind a failed write, naming `path` (not the temporary file): Python's own, or one
    that a native writer reports in its own exception type as '(os error N)' (safetensors does)."""
    if isinstance(error, OSError):
        code, reason = error.errno, error.strerror
    else:
        match = re.search(r"\(os error (\d+)\)", str(error)) if isinstance(error, Exception) else None
        code = int(match[1]) if match else None
        reason = os.strerror(code) if code is not None else None
    if code is None:
        return None
    return OSError(code, f"cannot write: {reason}", os.fspath(path))


def torch_save_atomic(obj: object, path: str | os.PathLike, *, verify: Callable[[Path], object] | None = None,
                      keep_previous: str | os.PathLike | None = None) -> Path:
    """`torch.save` that never leaves a half-written `.pth` (training checkpoints, resume state);
    `verify` and `keep_previous` as for `atomic_write`."""
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # through a Python file, a full disk is an OSError (torch's own writer
            torch.save(obj, f)      # reports it as an opaque RuntimeError)
    return atomic_write(path, write, verify=verify, keep_previous=keep_previous)


_TEMP_NAME = re.compile(r"\..+\.[0-9a-f]{8}\.tmp")  # what `atomic_write` names its temporary files


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files that `atomic_write`s killed mid-write left in `folder` (not below it);
    returns them. Call it only while no one else writes there (`FolderLock`)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [entry for entry in folder.iterdir() if _TEMP_NAME.fullmatch(entry.name) and entry.is_file()]
    for entry in stale:
        entry.unlink(missing_ok=True)
    return stale


class FolderInUseError(SwinkitError):
    """Another process holds the lock on a folder; the message names the folder and the holder."""


class FolderLock:
    """An exclusive lock on `folder` for as long as this process holds it (`release`, or exit).

    The lock is `fcntl.flock` on `folder/.lock`, which then names the holder (pid, host, start
    time) for the error a second taker gets. The kernel drops the lock when the process ends, even
    by SIGKILL, so a crashed run never leaves its folder locked. The file itself stays: deleting
    it would let a third process lock a fresh file while the second still holds the old one.
    Where `fcntl` does not exist (Windows), nothing is locked.
    """

    NAME = ".lock"

    def __init__(self, folder: str | os.PathLike, what: str = "run"):
        self.path = Path(folder) / self.NAME
        self._file = None
        try:
            import fcntl
        except ImportError:
            logging.getLogger("swinkit").debug("no fcntl on this platform: %s is not locked", folder)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+", encoding="utf-8", errors="backslashreplace")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            handle.seek(0)
            holder = " ".join(handle.read(400).split()) or "unknown"
            handle.close()
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise FolderInUseError(f"'{os.fsdecode(self.path.parent)}' is in use by another {what} ({holder}); "
                                   "wait for it to end or choose another folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()} since "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the only descriptor drops the flock
            self._file = None

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()
