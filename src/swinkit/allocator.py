"""Process-level memory settings: glibc's malloc and PyTorch's transparent huge pages. Nothing here
runs on import; a training entry point (the trainer, the training benchmark's child) or the optimized
inference path chooses them explicitly.

PyTorch's CPU allocator is glibc's malloc, which serves every allocation above 32 MB (and, until
its threshold has grown, above 128 kB) from a fresh mapping: zero-filled pages, faulted in on first
touch and unmapped when freed. A Swin forward allocates tens of such tensors (Swin-T at batch 8:
the qkv output is 58 MB, fc1's 77 MB); measured on a 2-core KVM Xeon, writing a fresh 58 MB
tensor took 21 ms against 4 ms for the same write to memory already mapped, and a linear layer
producing it 36 ms against 18. `keep_freed_memory()` (the optimized inference path turns it on
through `ensure_freed_memory_kept`) makes glibc serve every size from its heap and keep freed
memory there: the resident set then stays at the process's peak, as with a caching allocator.
Training keeps freed memory the same way (`keeping_freed_memory`) wherever no memory budget binds:
Swin-T fp32 at batch 16 on that Xeon took 3.4-3.9 s per step against 4.1-5.1 s with glibc's
defaults (which fault in ~11,000-70,000 fresh pages per step even on transparent huge pages), its
resident peak settling at 3.70 GB after eight steps (3.09 GB with the defaults after five, still
creeping), under the planner's estimate for glibc keeping memory (3.93 GB; batch 32: 5.92 vs 6.62).

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

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # mallopt parameters (glibc malloc.h)
_LOOP_THRESHOLD = 64 << 20
_DEFAULT_TRIM = 128 << 10  # glibc's default trim threshold
_DEFAULT_MMAP = 128 << 10  # glibc's default (initial) mmap threshold
_DEFAULT_MMAP_MAX = 65536  # glibc's default number of mappings it may use for large allocations
_KEEP_TRIM = (1 << 31) - 1  # mallopt takes a C int: "trim the heap top only above 2 GB"

_libc = None
_threshold: int | None = None  # set inside returning_freed_memory
_kept: bool | None = None      # what keep_freed_memory last set (None: never)


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


def _apply_keep(libc, keep: bool) -> bool:
    if keep:
        return bool(libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_TRIM))
    return bool(libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) and libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM))


def keep_freed_memory(enable: bool = True) -> bool:
    """glibc serves allocations of every size from its heap (no per-allocation mappings) and keeps
    freed memory there (the heap top is never trimmed), so a loop of forward passes reuses mapped
    memory instead of faulting in fresh zeroed pages; `enable=False` restores glibc's defaults.
    Process-wide. Returns whether the setting took effect (False outside glibc, or while a training
    budget has freed memory returned to the OS: `returning_freed_memory` wins until it ends)."""
    global _kept
    libc = _glibc()
    _kept = enable
    if libc is None or _threshold is not None:
        return False
    return _apply_keep(libc, enable)


@contextmanager
def keeping_freed_memory():
    """`keep_freed_memory()` within the block, then the setting before it (glibc's defaults, with the free
    heap handed back by `malloc_trim`, when nothing had set it): `swinkit train` trains so where no memory
    budget binds. An explicit `keep_freed_memory(False)` is respected (the block changes nothing)."""
    global _kept
    previous = _kept
    if previous is False:
        yield
        return
    keep_freed_memory(True)
    try:
        yield
    finally:
        if previous is None:
            keep_freed_memory(False)
            _kept = None
            libc = _glibc()
            if libc is not None and _threshold is None:
                libc.malloc_trim(0)


def freed_memory_kept() -> bool:
    """Whether `keep_freed_memory` last turned keeping on in this process."""
    return bool(_kept)


def ensure_freed_memory_kept() -> None:
    """`keep_freed_memory()` unless it already ran in this process; an explicit
    `keep_freed_memory(False)` is respected."""
    if _kept is None:
        keep_freed_memory(True)


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
    if _kept:
        _apply_keep(libc, False)  # mappings allowed again, so freed memory can go back
    try:
        yield
    finally:
        _threshold = None
        libc.mallopt(_M_MMAP_THRESHOLD, _DEFAULT_MMAP)
        libc.malloc_trim(0)
        if _kept:
            _apply_keep(libc, True)


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
