"""How freed CPU memory goes back to the OS (glibc), for training that must fit a memory budget.

glibc's malloc keeps freed memory for reuse: below a threshold that grows up to 32 MB, freed
tensors stay in its heaps. On Swin training the resident peak then runs 1.5-2x above the peak of
live tensors and creeps up step after step, which no budget can plan for.
`return_freed_memory` serves every allocation above 1 MB from its own mapping, returned to the OS
when freed, so the resident peak tracks the live peak; the price is that every such allocation
gets fresh zero-filled pages (page faults plus zeroing on first touch).

Block recomputation (`models/recompute.py`) allocates and frees the same slice-sized tensors
over and over: inside its slice loops `reuse_freed_memory` lets glibc keep them in its heap
(allocations up to 64 MB, and a free heap top up to 256 MB), and on leaving returns the heap's
free pages with `malloc_trim` and restores glibc's default trim threshold (128 kB). The
resident set then holds at most one slice's working set more than the live tensors, and the
loop stops paying for fresh pages slice after slice. Both are no-ops outside glibc, and
`reuse_freed_memory` is one unless `return_freed_memory` is in effect.
"""
from __future__ import annotations

import ctypes
import ctypes.util
from contextlib import contextmanager

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc malloc.h)
_LOOP_THRESHOLD = 64 << 20
_DEFAULT_TRIM = 128 << 10  # glibc's default trim threshold

_libc = None
_threshold: int | None = None  # set by return_freed_memory


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


def return_freed_memory(threshold_bytes: int = 1 << 20) -> bool:
    """Serve allocations above `threshold_bytes` with their own mappings, returned to the OS when
    freed, so the process's resident peak tracks its live-tensor peak. Returns False where the C
    library is not glibc (nothing changed). Call it once, before training."""
    global _threshold
    libc = _glibc()
    if libc is None or not libc.mallopt(_M_MMAP_THRESHOLD, int(threshold_bytes)):
        return False
    _threshold = int(threshold_bytes)
    return True


@contextmanager
def reuse_freed_memory():
    """Within the block, glibc reuses freed allocations up to 64 MB from its heap; on leaving, the
    heap's free pages go back to the OS. Only while `return_freed_memory` is in effect."""
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
