"""The original bytes of a response file's records, for the dead letters of its bad rows.

A connector reports a bad row by its first line. The gatherer keeps the bytes from that line up
to the line of the next item the connector yields (or the end of the file), so the dead letter
carries the record exactly as the ESP wrote it — quoting, line breaks, encoding — and a replay
can parse it again under the file's header line with the connector's configuration of the day.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar

from services.gatherer.core import SERVICE_NAME
from shared.esp import BadRow
from shared.model.deadletters import file_row_letter
from shared.model.events import EncodedEvent
from shared.model.messages import DeadLetter, ResponseEvent, ResponseFile

E = TypeVar("E", ResponseEvent, EncodedEvent)

MAX_RECORD_BYTES = 512 * 1024
"""A larger record keeps the connector's rendering of the row instead (Kafka's default message
limit is 1 MB); a header error spanning a larger file is then replayed by gathering it again."""

TO_END = 2**62
"""``end`` of a record that runs to the end of the file."""


class RecordReader:
    """Reads a local response file forward, line by line, as the connectors' csv readers split it."""

    def __init__(self, path: Path) -> None:
        # latin-1 maps every byte to one character, so the text is the bytes; newline="" splits
        # lines on \n, \r and \r\n as the connectors' readers do.
        self._file = path.open(encoding="latin-1", newline="")
        self.header = self._file.readline().encode("latin-1")
        self._next = 2  # the number of the line readline returns next

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._file.close()

    def header_text(self) -> str | None:
        """The header line as text (line break kept), or None if it is not UTF-8 (nor ASCII)."""
        try:
            return self.header.decode("utf-8")
        except UnicodeDecodeError:
            return None

    def record(self, first: int, end: int) -> bytes | None:
        """The bytes of lines ``first`` to ``end - 1``; None if they are behind the reader, empty
        or larger than :data:`MAX_RECORD_BYTES`."""
        if end <= first:
            return None
        parts: list[str] = []
        size = 0
        if first == 1 and self._next == 2:
            parts.append(self.header.decode("latin-1"))
            size = len(self.header)
            first = 2
        elif first < self._next:
            return None
        while self._next < first:
            if not self._file.readline():
                return None
            self._next += 1
        while self._next < end:
            line = self._file.readline()
            if not line:
                break
            self._next += 1
            size += len(line)
            if size > MAX_RECORD_BYTES:
                return None
            parts.append(line)
        return _without_line_end("".join(parts).encode("latin-1")) or None


def _without_line_end(record: bytes) -> bytes:
    """The record without the line break that ends it (a record is its rows, not their separator)."""
    for end in (b"\r\n", b"\n", b"\r"):
        if record.endswith(end):
            return record[: -len(end)]
    return record


def with_originals(
    items: Iterable[E | BadRow], records: RecordReader
) -> Iterator[E | tuple[BadRow, bytes | None]]:
    """The connector's items in order, each bad row paired with its original bytes (a bad row is
    yielded once the next item shows where it ends)."""
    pending: BadRow | None = None
    for item in items:
        if pending is not None:
            end = _line(item)
            yield pending, records.record(pending.line, end)
            pending = None
        if isinstance(item, BadRow):
            pending = item
        else:
            yield item
    if pending is not None:
        yield pending, records.record(pending.line, TO_END)


def _line(item: ResponseEvent | EncodedEvent | BadRow) -> int:
    if isinstance(item, ResponseEvent):
        return item.source.line or 0
    return item.line or 0


def row_letter(file: ResponseFile, row: BadRow, original: bytes | None, header: str | None) -> DeadLetter:
    """A bad row's dead letter: its original bytes and the file's header line when both were kept
    (what ``espbridge dlq replay`` parses again), else the connector's rendering of the row."""
    return file_row_letter(
        file.esp,
        file.account,
        file.path,
        row.line,
        row.raw if original is None else original,
        row.error,
        SERVICE_NAME,
        header=None if original is None else header,
    )
