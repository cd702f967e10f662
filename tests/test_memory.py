"""memory.release hands freed memory back to the system."""

import os
import subprocess
import sys

import numpy as np
import psutil
import pytest

from tracetune import memory


# The allocator's state decides what this test can show, so it runs in a fresh
# interpreter: inside a pytest worker that has trained models, glibc's heap and its
# mapping threshold are whatever earlier tests left (CI saw it return the blocks on
# its own there, and the test showed nothing).
_RELEASE_PROBE = """
import numpy as np, psutil
from tracetune import memory
rss = lambda: psutil.Process().memory_info().rss
big = np.ones(2**21)  # 16 MB, mapped on its own; freeing it raises glibc's mapping threshold
del big
blocks = [np.ones(2**19) for _ in range(64)]  # 64 x 4 MB, now from the heap
pin = np.ones(100_000)  # allocated above them: the heap's top cannot shrink past it
before = rss()
del blocks
kept = rss()
released = memory.release()
after = rss()
print(released, before - kept, kept - after)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_release_returns_what_the_allocator_kept():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _RELEASE_PROBE], env=env, capture_output=True, text=True, check=True)
    released, freed_alone, returned = out.stdout.split()
    assert released == "True"
    assert int(freed_alone) < 64 * 2**20, "glibc returned the blocks on its own: the test no longer shows anything"
    assert int(returned) > 200 * 2**20, f"release() returned {int(returned) / 2**20:.0f} MB of the 256 MB freed"


def test_release_without_malloc_trim_is_a_no_op(monkeypatch):
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)
    assert memory.release() is False


class _Recording:
    """A stand-in for a jitted function that records what is done with it."""

    def __init__(self, events):
        self.events = events

    def lower(self, *args, **kwargs):
        self.events.append(("lower", np.shape(args[0]), kwargs.get("mode")))
        return self

    def compile(self):
        self.events.append("compile")
        return self

    def __call__(self, *args, **kwargs):
        self.events.append("run")
        return args[0]


def test_compile_first_compiles_each_new_signature_then_releases_then_runs(monkeypatch):
    events = []
    monkeypatch.setattr(memory, "release", lambda: events.append("release") or True)
    step = memory.CompileFirst(_Recording(events))
    step(np.zeros((2, 3)), mode="greedy")
    assert events == [("lower", (2, 3), "greedy"), "compile", "release", "run"]
    events.clear()
    step(np.ones((2, 3)), mode="greedy")  # same shape, dtype and static value: straight through
    assert events == ["run"]
    events.clear()
    step(np.zeros((2, 4)), mode="greedy")  # a new shape
    step(np.zeros((2, 3), np.int32), mode="greedy")  # a new dtype
    step(np.zeros((2, 3)), mode="sample")  # a new static value
    assert events.count("compile") == 3 and events.count("run") == 3


def test_compile_first_reuses_its_compile_for_the_run():
    """The ahead-of-time compile must fill the cache the call reads, or every new
    shape would compile twice (a JAX upgrade that changes this fails here)."""
    import jax
    import jax.numpy as jnp

    from tracetune.runs import CompileClock

    x = jnp.arange(12.0).reshape(3, 4)
    y = x + 1  # made before counting: their own programs do not count
    step = memory.CompileFirst(jax.jit(lambda a, scale: jnp.tanh(a * scale).sum(), static_argnames="scale"))
    with CompileClock() as clock:
        first, second = step(x, scale=2.0), step(y, scale=2.0)
        same = clock.take()["count"]
        step(x, scale=3.0)
        other = clock.take()["count"]
    assert (same, other) == (1, 1), f"{same} compiles for one signature, {other} for a second"
    assert float(first) == pytest.approx(float(jnp.tanh(x * 2.0).sum()))
    assert float(second) == pytest.approx(float(jnp.tanh(y * 2.0).sum()))
