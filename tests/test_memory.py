"""memory.release hands freed memory back to the system."""

import sys

import numpy as np
import psutil
import pytest

from tracetune import memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_returns_what_the_allocator_kept():
    rss = lambda: psutil.Process().memory_info().rss  # noqa: E731
    big = np.ones(2**21)  # 16 MB, mapped on its own; freeing it raises glibc's mapping threshold
    del big
    blocks = [np.ones(2**19) for _ in range(64)]  # 64 x 4 MB, now from the heap
    pin = np.ones(100_000)  # allocated above them: the heap's top cannot shrink past it
    before = rss()
    del blocks
    kept = rss()
    assert memory.release()
    after = rss()
    assert before - kept < 64 * 2**20, "glibc returned the blocks on its own: the test no longer shows anything"
    assert kept - after > 200 * 2**20, f"release() returned {(kept - after) / 2**20:.0f} MB of the 256 MB freed"
    del pin


def test_release_without_malloc_trim_is_a_no_op(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release() is False
