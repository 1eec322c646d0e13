"""`swinkit.allocator.keep_freed_memory`: freed large tensors stay mapped and are reused (no fresh
zeroed pages per forward), a training budget's `returning_freed_memory` still wins inside its block,
and the fast path turns keeping on unless told not to. Each case runs in its own process (malloc
settings are process-wide)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from swinkit import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None or not os.path.exists("/proc/self/status"),
                                reason="glibc malloc and /proc are needed")

_CYCLE = """
import torch
from swinkit import allocator
from swinkit.sysinfo import process_rss

def cycle():
    '''Allocate, touch and free 96 MB (above glibc's largest mmap threshold): (bytes given back, address).'''
    tensor = torch.ones(24 << 20)
    address = tensor.data_ptr()
    before = process_rss()
    del tensor
    return before - process_rss(), address
"""


def _python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", _CYCLE + textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_kept_memory_stays_mapped_and_is_reused():
    printed = _python("""
        given_back_default, _ = cycle()
        assert allocator.keep_freed_memory(True) and allocator.freed_memory_kept()
        cycle()
        given_back_kept, _ = cycle()
        allocator.keep_freed_memory(False)
        print(given_back_default > 64 << 20, given_back_kept < 16 << 20, allocator.freed_memory_kept())
    """)
    assert printed == "True True False"


def test_a_training_budget_returns_memory_inside_its_block_and_keeping_resumes_after():
    printed = _python("""
        allocator.keep_freed_memory(True)
        with allocator.returning_freed_memory():
            cycle()
            inside, _ = cycle()
            refused = allocator.keep_freed_memory(True)  # the budget's setting wins while it lasts
        cycle()
        after, _ = cycle()
        print(inside > 64 << 20, refused, after < 16 << 20)
    """)
    assert printed == "True False True"


@pytest.mark.parametrize("explicit_off", [False, True])
def test_the_fast_path_keeps_freed_memory_unless_turned_off(explicit_off):
    printed = _python(f"""
        import swinkit
        if {explicit_off}:
            allocator.keep_freed_memory(False)
        before = allocator.freed_memory_kept()
        fast = swinkit.optimize_for_inference(swinkit.create_model("swin_nano_patch2_window4_32"))
        with torch.inference_mode():
            fast(torch.randn(1, 3, 32, 32))
        print(before, allocator.freed_memory_kept())
    """)
    assert printed == ("False False" if explicit_off else "False True")


def test_keeping_freed_memory_for_a_block_then_glibcs_defaults_again():
    """What the trainer does where no budget binds: kept inside, given back after (and the fast path may
    still turn keeping on later: the block leaves no explicit choice behind); an explicit off is respected."""
    # After the block the heap may still hold the freed 96 MB (glibc reuses it, by design); a larger
    # tensor than any free chunk shows whether large allocations get their own mappings again.
    printed = _python("""
        def big_cycle():
            tensor = torch.ones(64 << 20)  # 256 MB
            before = process_rss()
            del tensor
            return before - process_rss()

        with allocator.keeping_freed_memory():
            cycle()
            inside, _ = cycle()
            kept_inside = allocator.freed_memory_kept()
        after = big_cycle()
        allocator.ensure_freed_memory_kept()
        later = allocator.freed_memory_kept()
        allocator.keep_freed_memory(False)
        with allocator.keeping_freed_memory():
            refused = big_cycle()
            refused_again = big_cycle()
        print(inside < 16 << 20, kept_inside, after > 192 << 20, later, min(refused, refused_again) > 192 << 20)
    """)
    assert printed == "True True True True True"
