"""Import a list file: validate it row by row as a stream and keep the valid recipients.

The ESP keeps its own copy of the imported recipients (``.sandbox-lists/<import_id>.csv`` in the
account folder, always comma-delimited whatever the flavor) because the client may remove the
dropped file once the import is done.
"""

from __future__ import annotations

import _csv
import contextlib
import csv
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sandbox.files import atomic_writer, csv_line
from sandbox.protocol import COMMUNICATION_KEY, EMAIL, MAX_LISTED_ERRORS

# Between two checks of the stop flag: often enough to stop promptly, rarely enough to cost nothing.
_STOP_CHECK_ROWS = 1000


class ImportInterruptedError(Exception):
    """The sandbox is stopping; the import is redone from the start when it restarts."""


@dataclass
class ImportResult:
    """What reading a list file found: counts, the first errors, and whether it failed as a whole."""

    failed: bool = False
    rows_total: int = 0
    rows_valid: int = 0
    rows_invalid: int = 0
    errors: list[dict[str, int | str]] = field(default_factory=list)

    def error(self, line: int, message: str) -> None:
        """Record an error; only the first ones are listed."""
        if len(self.errors) < MAX_LISTED_ERRORS:
            self.errors.append({"line": line, "error": message})


ListReader = Callable[[Path, Path, threading.Event], ImportResult]
"""A flavor's list-file reader: ``(dropped file, recipient store, stop flag) -> result``."""


def _fail(line: int, message: str) -> ImportResult:
    result = ImportResult(failed=True)
    result.error(line, message)
    return result


def _check_row(row: list[str], width: int, email_at: int, key_at: int, seen: set[str]) -> str | None:
    """Why a data row is invalid, or None when it is valid."""
    if len(row) != width:
        return f"expected {width} fields, found {len(row)}"
    email = row[email_at]
    if not email.strip() or "@" not in email:
        return "invalid email"
    key = row[key_at]
    if not key.strip():
        return "empty CommunicationKey"
    if key in seen:
        return "duplicate CommunicationKey"
    return None


def import_list(source: Path, store: Path, stop: threading.Event, delimiter: str = ",") -> ImportResult:
    """Validate ``source`` and write its valid (Email, CommunicationKey) rows to ``store``.

    The file is read with the csv module (``delimiter``, ``"`` quoting) one record at a time. Line
    numbers are those of the file, the header being line 1; a quoted field with line breaks makes a
    record span lines, and its number is the line it starts on. A UTF-8 byte order mark is tolerated.
    """
    try:
        with source.open(encoding="utf-8-sig", newline="") as handle:
            reader = csv.reader(handle, delimiter=delimiter)
            try:
                return _read(reader, store, stop)
            except UnicodeDecodeError:
                return _fail(reader.line_num + 1, "invalid UTF-8 at or after this line")
            except csv.Error as exc:
                return _fail(reader.line_num, f"malformed CSV: {exc}")
    except FileNotFoundError:
        return _fail(1, "file not found")
    except IsADirectoryError:
        return _fail(1, "not a file")


@contextlib.contextmanager
def recipient_store(store: Path) -> Iterator[Callable[[str, str], object]]:
    """Write an import's recipients to ``store``: ``add(email, key)`` for each, in list order; the
    file is renamed into place at the end of the block (and discarded if the block raises)."""
    with atomic_writer(store) as out:
        out.write(csv_line((EMAIL, COMMUNICATION_KEY)))
        yield lambda email, key: out.write(csv_line((email, key)))


def _read(reader: _csv.Reader, store: Path, stop: threading.Event) -> ImportResult:
    header = next(reader, None)
    if header is None:
        return _fail(1, "empty file: no header row")
    for column in (EMAIL, COMMUNICATION_KEY):
        if column not in header:
            return _fail(1, f"missing column {column}")
    duplicates = sorted({c for c in header if header.count(c) > 1})
    if duplicates:
        return _fail(1, f"duplicate column {', '.join(duplicates)}")
    width, email_at, key_at = len(header), header.index(EMAIL), header.index(COMMUNICATION_KEY)

    result = ImportResult()
    # Keys of the rows imported so far: a later row with the same key is the duplicate.
    seen: set[str] = set()
    line_num = reader.line_num
    with recipient_store(store) as add:
        for row in reader:
            start_line, line_num = line_num + 1, reader.line_num
            if not row:
                continue  # a blank line is no record
            result.rows_total += 1
            if result.rows_total % _STOP_CHECK_ROWS == 0 and stop.is_set():
                raise ImportInterruptedError
            problem = _check_row(row, width, email_at, key_at, seen)
            if problem is not None:
                result.rows_invalid += 1
                result.error(start_line, problem)
                continue
            seen.add(row[key_at])
            result.rows_valid += 1
            add(row[email_at], row[key_at])
    return result


def recipients(store: Path) -> Iterator[tuple[str, str]]:
    """The imported (email, communication key) pairs, in list order, read as a stream."""
    with store.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        next(reader, None)
        for row in reader:
            if len(row) == 2:
                yield row[0], row[1]
