"""Process-level memory settings for training that must fit a budget: glibc's malloc and
PyTorch's transparent huge pages. Nothing here runs on import; a training entry point (the
`swinkit train` command, the training benchmark's child) chooses them explicitly.

glibc's malloc keeps freed memory for reuse: below a threshold that grows up to 32 MB, freed
tensors stay in its heaps. On Swin training the resident peak then runs 1.5-2x above the peak of
live tensors and creeps up step after step, which no budget can plan for.
`returning_freed_memory()` serves every allocation above 1 MB from its own mapping, returned to
the OS when freed, so the resident peak tracks the live peak; the price is that every such
allocation gets fresh zero-filled pages (page faults plus zeroing on first touch). On leaving it
restores glibc's defaults.

Block recomputation (`recompute.py`) allocates and frees the same slice-sized tensors over and
over: inside its slice loops `reuse_freed_memory` lets glibc keep them in its heap (allocations up
to 64 MB, and a free heap top up to 256 MB), and on leaving returns the heap's free pages with
`malloc_trim` and restores the outer setting. The resident set then holds at most one slice's
working set more than the live tensors. Both are no-ops outside glibc, and `reuse_freed_memory`
is one unless `returning_freed_memory` is in effect.

`enable_huge_pages()` puts large CPU tensors on transparent huge pages (512x fewer page faults for
fresh activation memory); PyTorch reads the setting at its first CPU allocation, so it works only
when called before any tensor exists.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_LOOP_THRESHOLD = 64 << 20
_DEFAULT_TRIM = 128 << 10  # glibc's default trim threshold
_DEFAULT_MMAP = 128 << 10  # glibc's default (initial) mmap threshold

_libc = None
_threshold: int | None = None  # set inside returning_freed_memory


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            libc.mallopt, libc.malloc_trim  # noqa: B018 - both must exist (glibc)
            _libc = libc
        except (OSError, AttributeError):
            _libc = False
    return _libc or None


def enable_huge_pages() -> bool:
    """Ask PyTorch for transparent huge pages for large CPU tensors (`THP_MEM_ALLOC_ENABLE=1`,
    unless the environment already says otherwise). Returns whether it is on for this process:
    it cannot be turned on once PyTorch has allocated its first CPU tensor."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    import torch
    probe = torch.empty(4 << 20, dtype=torch.uint8)
    return probe.data_ptr() % 4096 == 0  # PyTorch page-aligns THP allocations (else 64-byte alignment)


def free_memory_returned() -> bool:
    """Whether `returning_freed_memory` is in effect."""
    return _threshold is not None


@contextmanager
def returning_freed_memory(threshold_bytes: int = 1 << 20):
    """Within the block, allocations above `threshold_bytes` get their own mappings, returned to the
    OS when freed, so the process's resident peak tracks its live-tensor peak. glibc's defaults are
    restored on leaving. A no-op where the C library is not glibc."""
    global _threshold
    libc = _glibc()
    if libc is None or _threshold is not None or not libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)):
        yield
        return
    _threshold = int(threshold_bytes)
    try:
        yield
    finally:
        _threshold = None
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP)
        libc.malloc_trim(0)


@contextmanager
def reuse_freed_memory():
    """Within the block, glibc reuses freed allocations up to 64 MB from its heap; on leaving, the
    heap's free pages go back to the OS. Only while `returning_freed_memory` is in effect."""
    libc = _glibc() if _threshold is not None else None
    if libc is None or _threshold >= _LOOP_THRESHOLD:
        yield
        return
    libc.mallopt(_M_MMAP_THRESHOLD, _LOOP_THRESHOLD)
    libc.mallopt(_M_TRIM_THRESHOLD, 4 * _LOOP_THRESHOLD)  # keep a freed heap top for the next slice
    try:
        yield
    finally:
        libc.mallopt(_M_MMAP_THRESHOLD, _threshold)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM)
        libc.malloc_trim(0)
