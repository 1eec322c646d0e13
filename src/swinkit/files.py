"""Atomic file writes: a reader sees the old file or the whole new one, never a half-written one.

Every file swinkit writes (weights, training checkpoints, configs, logs, ONNX graphs, plots)
goes through `atomic_write`.
"""
from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import torch


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> Path:
    """Write `path` so that readers see the old file or the whole new one, never a mix.

    `write_fn(tmp_path)` writes a temporary file in the same folder; it is flushed to
    disk, renamed over `path` with `os.replace`, and the folder entry is synced. If
    `write_fn` (or anything after it) raises, the temporary file is removed and the
    previous `path`, if any, is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # mode follows the umask
    try:
        write_fn(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return path


def torch_save_atomic(obj: object, path: str | os.PathLike) -> Path:
    """`torch.save` that never leaves a half-written `.pth` (training checkpoints, resume state)."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))
