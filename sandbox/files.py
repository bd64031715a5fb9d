"""Atomic file writes and delimited rows: what the ESP puts on its SFTP site is never seen half-written."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any


def csv_field(value: str, delimiter: str = ",") -> str:
    """One field, quoted when it holds the delimiter, a quote, CR or LF.

    The csv module's writer does not quote a lone CR when the line end is LF, which RFC 4180
    requires, so response files are formatted here.
    """
    if delimiter not in value and '"' not in value and "\r" not in value and "\n" not in value:
        return value
    return '"' + value.replace('"', '""') + '"'


def csv_line(fields: Iterable[str], delimiter: str = ",") -> str:
    """One record with its LF line end (comma-delimited unless ``delimiter`` says otherwise)."""
    return delimiter.join(csv_field(f, delimiter) for f in fields) + "\n"


def temp_path(path: Path) -> Path:
    """The hidden name a file is written under before it is renamed into place."""
    return path.with_name(f".{path.name}.tmp")


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[str]]:
    """Write text to a hidden temporary file in the same folder, then rename it to ``path``.

    The data is flushed to disk before the rename so a crash leaves either the old file or the
    whole new one, never a truncated file under the final name.
    """
    with _replacing(path, binary=False) as out:
        yield out


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically (hidden temporary name, then rename)."""
    with _replacing(path, binary=True) as out:
        out.write(data)


@contextlib.contextmanager
def _replacing(path: Path, binary: bool) -> Iterator[IO[Any]]:
    tmp = temp_path(path)
    try:
        with tmp.open("wb") if binary else tmp.open("w", encoding="utf-8", newline="") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
