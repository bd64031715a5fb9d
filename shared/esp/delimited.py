"""Reading a delimited response file record by record, keeping each record's original bytes.

Response files come from outside and may be broken in every way: bytes that are not the file's
encoding, CRLF line ends, quoted fields with line breaks, a last line cut short, a line of
megabytes. :func:`read_records` reads any of them in bounded memory and never stops at a bad
record: each record comes with the line it starts on and its bytes exactly as in the file (without
the final line end), so a record a parser rejects becomes a dead letter naming the file and line.

* Bytes that are not valid in the encoding are decoded with ``surrogateescape``;
  :func:`undecodable` says where, so the parser can reject that record (and only it).
* A record longer than ``max_record_bytes`` (a huge line, or an unclosed quote swallowing the
  lines after it) is not parsed: it comes back with ``fields=None`` and its first
  ``keep_bytes`` bytes, and reading goes on at the next line.
* A UTF-8 byte order mark at the start of the file is skipped.

A list file a connector reads back from the SFTP site to post its rows itself comes as a stream of
bytes: :func:`stream_records` splits it into records without holding the file in memory.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import AsyncGenerator, AsyncIterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

MAX_RECORD_BYTES = 128 * 1024
"""The longest record parsed; also keeps every field under the csv module's 131,072-character limit."""
KEEP_BYTES = 64 * 1024
"""How much of an over-long record its dead letter keeps (a Kafka message must stay under 1 MB)."""

_BOM = codecs.BOM_UTF8
_SKIP_CHUNK = 1 << 20
_PROBE = "\n\r\t ,;|\"'"


@dataclass(slots=True)  # not frozen: one is made per row, and a frozen one costs 4x to make
class Record:
    """One record of a delimited file."""

    line: int
    """The physical line it starts on (the first line of the file is 1)."""
    raw: bytes
    """Its bytes as in the file, without the final line end (the first ``keep_bytes`` if too long)."""
    fields: list[str] | None
    """Its fields, or None when it could not be parsed (see ``error``)."""
    error: str = ""


def check_line_encoding(encoding: str) -> None:
    """Raise ValueError unless ``encoding`` is known and writes line ends, quotes and delimiters as ASCII.

    Records are split on the byte ``\\n`` before decoding, which only works for such encodings
    (UTF-8, Latin-1, Windows code pages — not UTF-16).
    """
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise ValueError(f"unknown encoding {encoding!r}") from None
    if _PROBE.encode(encoding, "replace") != _PROBE.encode("ascii"):
        raise ValueError(f"encoding {encoding!r} is not ASCII-compatible; response files cannot use it")


def undecodable(fields: list[str], encoding: str) -> str | None:
    """Why a record's fields are not valid ``encoding`` text (the first bad byte), or None."""
    # Fast path (nearly every record): escaped bytes are lone surrogates, which UTF-8 cannot encode.
    joined = "".join(fields)
    if joined.isascii():
        return None
    try:
        joined.encode("utf-8")
    except UnicodeEncodeError:
        pass
    else:
        return None
    for number, value in enumerate(fields, start=1):
        for at, ch in enumerate(value):
            if "\udc80" <= ch <= "\udcff":
                byte = ord(ch) - 0xDC00
                return f"not valid {encoding}: byte 0x{byte:02X} in field {number}, character {at + 1}"
    return None


class _Lines:
    """Physical lines of a binary file, decoded, feeding a csv reader; remembers the bytes it fed."""

    def __init__(self, f: BinaryIO, encoding: str, max_record_bytes: int, keep_bytes: int) -> None:
        self._f = f
        self._encoding = encoding
        self._max = max_record_bytes
        self._keep = keep_bytes
        self.line = 0
        """Physical lines read so far."""
        self.pending = bytearray()
        """The bytes of the record being read (at most ``max_record_bytes + 1``)."""
        self.pending_size = 0
        self.overflow: str | None = None
        """Why reading stopped early (a record over the limit); the reader then needs restarting."""

    def take(self) -> bytes:
        """The bytes of the record just read, without its final line end; starts the next record."""
        raw = bytes(self.pending)
        self.pending.clear()
        self.pending_size = 0
        if raw.endswith(b"\n"):
            raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
        return raw

    def __iter__(self) -> Iterator[str]:
        while True:
            data = self._f.readline(self._max + 1 - self.pending_size)
            if not data:
                return
            self.line += 1
            if self.line == 1 and data.startswith(_BOM):
                data = data[len(_BOM) :]
            self.pending_size += len(data)
            self.pending += data
            if self.pending_size > self._max:
                del self.pending[self._keep :]
                self._skip_rest_of_line(data)
                self.overflow = (
                    f"record of {self.pending_size} bytes is over the {self._max}-byte limit "
                    f"(a huge line or an unclosed quote); the dead letter keeps its first "
                    f"{min(self.pending_size, self._keep)} bytes"
                )
                return
            yield data.decode(self._encoding, "surrogateescape")

    def _skip_rest_of_line(self, data: bytes) -> None:
        """Read past the rest of an over-long line without keeping it."""
        while not data.endswith(b"\n"):
            data = self._f.readline(_SKIP_CHUNK)
            if not data:
                return
            self.pending_size += len(data)


def read_records(
    path: Path,
    *,
    delimiter: str = ",",
    encoding: str = "utf-8",
    max_record_bytes: int = MAX_RECORD_BYTES,
    keep_bytes: int = KEEP_BYTES,
) -> Iterator[Record]:
    """Every record of a delimited file (RFC 4180 quoting), good or not, in order; blank lines too."""
    with path.open("rb") as f:
        lines = _Lines(f, encoding, max_record_bytes, keep_bytes)
        while True:
            reader = csv.reader(lines, delimiter=delimiter)
            start = lines.line + 1
            while True:
                try:
                    fields = next(reader, None)
                except csv.Error as exc:
                    yield Record(start, lines.take(), None, f"malformed CSV: {exc}")
                    start = lines.line + 1
                    continue
                if lines.overflow is not None or fields is None:
                    break
                yield Record(start, lines.take(), fields)
                start = lines.line + 1
            if lines.overflow is None:
                return
            yield Record(start, lines.take(), None, lines.overflow)
            lines.overflow = None


def read_csv_records(
    path: Path, *, delimiter: str = ",", encoding: str = "utf-8", quotechar: str = '"'
) -> Iterator[Record]:
    """Every record of a delimited file as Python's csv module reads its text, in order; blank lines too.

    Unlike :func:`read_records` it takes any encoding Python knows, line ends of ``\\n``, ``\\r``
    or ``\\r\\n`` and another quote character; a record's ``raw`` is its fields joined again by
    the delimiter (UTF-8, undecodable bytes restored). A record csv cannot read (a field over its
    limit) comes back with ``fields=None`` and reading goes on after it.
    """
    bom = codecs.lookup(encoding).name == "utf-8"
    with path.open(encoding="utf-8-sig" if bom else encoding, errors="surrogateescape", newline="") as f:
        reader = csv.reader(f, delimiter=delimiter, quotechar=quotechar)
        last = 0
        while True:
            line = last + 1
            try:
                fields = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                last = reader.line_num
                yield Record(line, b"", None, f"malformed CSV: {exc}")
                continue
            last = reader.line_num
            yield Record(line, delimiter.join(fields).encode("utf-8", "surrogateescape"), fields)


class NotUtf8Error(ValueError):
    """A streamed file's bytes that are not UTF-8."""

    def __init__(self, lines_read: int, reason: str) -> None:
        super().__init__(f"not UTF-8 after line {lines_read}: {reason}")
        self.lines_read = lines_read
        """The complete lines before the bad bytes."""
        self.reason = reason


async def stream_records(data: AsyncIterable[bytes]) -> AsyncGenerator[tuple[int, list[str]], None]:
    """The records of a UTF-8 CSV byte stream: the line each starts on, and its lines (each with
    its ``\\n``, but a last line the file does not end); a byte order mark is skipped.

    RFC 4180 quoting as Python's csv writes it: a quoted field may hold the delimiter, doubled
    quotes and line ends, so a record ends at a line end after an even number of ``"``; an
    unclosed quote takes the rest of the file. Decoding is incremental, so the file is never held
    in memory; bytes that are not UTF-8 raise :class:`NotUtf8Error`.
    """
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""
    record: list[str] = []
    quotes = line = start = 0
    try:
        async for block in data:
            pending += decoder.decode(block)
            *lines, pending = pending.split("\n")
            for text in lines:
                line += 1
                if not record:
                    start = line
                record.append(text + "\n")
                quotes += text.count('"')
                if quotes % 2 == 0:
                    yield start, record
                    record, quotes = [], 0
        pending += decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise NotUtf8Error(line, exc.reason) from None
    if pending:
        line += 1
        if not record:
            start = line
        record.append(pending)
    if record:
        yield start, record
