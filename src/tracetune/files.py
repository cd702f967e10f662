"""Writing files so that readers never see half of one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary path beside ``path`` that replaces it when the block succeeds.

    A killed run or a full disk leaves the old file (or none), never a truncated
    one; a failed write removes its temporary file.

    >>> with atomic_path(Path("out.jsonl")) as tmp:  # doctest: +SKIP
    ...     tmp.write_text("...")
    """
    path = Path(path)
    tmp = path.with_name(path.name + suffix)
    try:
        yield tmp
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
