"""Writing files so that readers never see half of one, and reading back the
append-only ones (metrics, samples, caches) after a kill or a full disk.

Every write of a run goes through ``writing`` (directly, or through ``atomic_path``
and ``append_jsonl``): a full disk becomes one ``DiskFull`` naming the file, not an
``OSError`` without a path from deep inside ``write``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tracetune.errors import DamagedFile, DiskFull

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(error: BaseException) -> bool:
    """ENOSPC / EDQUOT from Python, or the same from tensorstore inside orbax (a
    ``ValueError('RESOURCE_EXHAUSTED: ... No space left on device')``)."""
    if isinstance(error, DiskFull):
        return True
    if isinstance(error, OSError) and error.errno in _NO_SPACE:
        return True
    text = str(error)
    return "No space left on device" in text or "Disk quota exceeded" in text


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Turn a full disk inside the block into ``DiskFull(path)``."""
    try:
        yield
    except DiskFull:
        raise
    except (OSError, ValueError) as error:
        if is_disk_full(error):
            raise DiskFull(path) from None
        raise


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
        with writing(path):
            yield tmp
            tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def json_safe(value: Any) -> Any:
    """``value`` with every NaN or infinity as None: bare ``NaN`` is not JSON, and a
    reader other than Python's would refuse the whole file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def append_jsonl(path: Path, *records: dict) -> None:
    """Append whole lines, one write and a flush: a kill or a full disk leaves at
    most one torn last line, which ``read_appended`` cuts on the next start."""
    text = "".join(json.dumps(json_safe(r), ensure_ascii=False, allow_nan=False) + "\n" for r in records)
    with writing(path), path.open("a", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    """Replace an append-only JSONL file with ``records``, atomically (a kill leaves
    the old file or the new one)."""
    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def read_appended(path: Path, *, repair: bool = True) -> list[Any]:
    """The records of an append-only JSONL file written by ``append_jsonl``.

    A torn last line (no newline, or bytes that do not decode or parse: what a kill
    or a full disk leaves) is cut from the file with a note, and the records before it
    are kept; with ``repair=False`` (a reader that must not write) it is only skipped.
    Damage anywhere else is a ``DamagedFile`` naming the line.

    >>> read_appended(Path("metrics.jsonl"))  # doctest: +SKIP
    [{'step': 1, 'loss': 2.3}, ...]
    """
    path = Path(path)
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    whole, tail = lines[:-1], lines[-1]  # tail: bytes after the last newline (torn if not empty)
    records: list[Any] = []
    for number, line in enumerate(whole, start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line.decode("utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            if number == len(whole) and not tail.strip():
                tail = line + b"\n" + tail  # the last line itself is the torn one
                break
            raise DamagedFile(f"{path}:{number}: not a JSON record ({error}); the file is damaged before its last "
                              "line: move it away to start that part over") from None
    if tail:
        keep = len(raw) - len(tail)
        if repair:
            with writing(path), path.open("r+b") as handle:
                handle.truncate(keep)
        print(f"note: {path}: {'cut' if repair else 'skipped'} a torn last line ({len(tail)} bytes, left by a killed run "
              f"or a full disk); the {len(records)} records before it are kept", file=sys.stderr)
    return records

