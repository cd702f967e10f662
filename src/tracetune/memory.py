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


class CompileFirst:
    """A jitted function that, for each new input signature, compiles before it runs
    and hands the compiler's freed memory back in between.

    Called plainly, a jitted function compiles and then runs inside one call: XLA
    frees what it compiled with, but glibc keeps those pages, and the program's
    first run takes its buffers elsewhere, so the first step of every new shape
    peaks with the compile's garbage under it. Measured on the 270M's SFT step at
    (1, 256), alone on the machine: peak RSS 3.17 GB when the first call compiled,
    2.78 GB with compile, ``release``, run (``bench/sft.py``; steps after the first
    peak at 2.78 GB either way). Later calls of a signature go straight through
    (the ahead-of-time compile fills the same cache a plain call reads).

    >>> step = CompileFirst(jax.jit(f))  # doctest: +SKIP
    >>> step(x)  # doctest: +SKIP
    """

    def __init__(self, jitted):
        self.jitted = jitted
        self.seen: set = set()

    def __call__(self, *args, **kwargs):
        key = _signature(args, kwargs)
        if key not in self.seen:
            self.jitted.lower(*args, **kwargs).compile()
            self.seen.add(key)
            release()
        return self.jitted(*args, **kwargs)


def _signature(args, kwargs):
    """What a jitted call compiles for: the pytree structure, each array's shape,
    dtype and sharding, and every other leaf (static arguments) by value."""
    import jax

    leaves, treedef = jax.tree.flatten((args, kwargs))
    return treedef, tuple(
        (leaf.shape, leaf.dtype, getattr(leaf, "sharding", None), getattr(leaf, "weak_type", False))
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype") else leaf
        for leaf in leaves
    )
