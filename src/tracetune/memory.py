"""Freed memory handed back to the system between a run's phases.

XLA:CPU's buffers and numpy's arrays come from the C allocator. glibc keeps what a
program frees for later allocations instead of returning it, and past its first
large free it stops giving blocks of up to 32 MB their own mappings, so the
resident set of a GRPO step carries the update's temporaries into the next
rollout, and the rollout's into the update: each phase's peak sits on top of the
last one's. ``release`` (glibc's ``malloc_trim``) returns the free pages at the
boundaries, where nothing is being allocated.

Measured with ``bench/grpo_memory.py`` (cpu-demo, the embedded 270M, 3 steps,
2026-12-04, alone on the machine): peak RSS 7.44 -> 6.98 GB at
``grpo.rows_per_pass=0`` and 6.26 -> 5.62 GB at 1, for the same seconds per step
(78.7 vs 77.9 s at 0). glibc's ``MALLOC_MMAP_THRESHOLD_=1048576`` gave about the
same peaks, but it maps and faults in every large allocation afresh. The README's
"Where GRPO's peak memory is" has the table.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None


def release() -> bool:
    """Return the allocator's free pages to the system; False where it cannot.
    Cheap (milliseconds): call it between phases, not in inner loops."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
