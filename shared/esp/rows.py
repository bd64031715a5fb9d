"""Turning an ESP's response rows and items into events, the same way in every connector.

* :class:`ResponseTable` reads a delimited response file (records from :mod:`shared.esp.delimited`)
  under its header: a header without a required column is one BadRow, then each record becomes a
  :class:`Row` whose values are looked up by role (:class:`Columns`: role → column name).
* :func:`item_events` does the same for the JSON items of an API page or a webhook call.
* A connector's function from a row or an item to its event raises ValueError to reject it: the
  rejection becomes a :class:`~shared.esp.base.BadRow` with its line and its bytes, and the next
  row is read.
* :class:`LocalTimes` reads times written in an account's formats and zone (and ISO 8601 always),
  :func:`aware_time` ISO 8601 times with an offset; :class:`Events` builds the events with their
  deterministic ids.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Required, TypedDict, TypeVar, Unpack
from zoneinfo import ZoneInfo

import orjson

from shared.esp.accounts import AccountConfig
from shared.esp.base import BadRow
from shared.esp.delimited import Record, read_csv_records, read_records, undecodable
from shared.model.messages import EventSource, EventType, ResponseEvent, event_id_for

T = TypeVar("T")

UNIX = "unix"
"""The time format of Unix seconds (a number, in UTC)."""
ISO = "iso"
"""The time format of ISO 8601 (a time without an offset is in the account's zone)."""


class Columns:
    """Where each role's column is in a response file, found by the file's header."""

    def __init__(self, roles: Mapping[str, str], header: Sequence[str]) -> None:
        self.roles = roles
        self.header = list(header)
        self._index = {name: i for i, name in enumerate(header)}

    def missing(self, required: Iterable[str | tuple[str, ...]]) -> list[str]:
        """The columns of ``required`` roles the header lacks; of a tuple of roles one is enough."""
        lacking = []
        for roles in required:
            names = [self.roles[role] for role in ((roles,) if isinstance(roles, str) else roles)]
            if not any(name in self._index for name in names):
                lacking.append(" or ".join(names))
        return lacking

    def row(self, record: Record, encoding: str, times: LocalTimes | None = None) -> Row:
        """A record's fields as a row; ValueError when they do not fit the header or the encoding."""
        fields = record.fields or []
        if len(fields) != len(self.header):
            raise ValueError(f"{len(fields)} fields, want {len(self.header)}")
        bad_bytes = undecodable(fields, encoding)
        if bad_bytes:
            raise ValueError(bad_bytes)
        return Row(self, fields, record.line, times)

    def position(self, role: str) -> int | None:
        """The index of the role's column in the header, None when it has none."""
        return self._index.get(self.roles[role])


class Row:
    """One record of a response file, its values looked up by role."""

    __slots__ = ("columns", "fields", "line", "times")

    def __init__(
        self, columns: Columns, fields: list[str], line: int, times: LocalTimes | None = None
    ) -> None:
        self.columns = columns
        self.fields = fields
        self.line = line
        self.times = times

    def get(self, role: str) -> str:
        """The role's value, stripped; "" when the file has no such column."""
        at = self.columns.position(role)
        return self.fields[at].strip() if at is not None else ""

    def column(self, role: str) -> str:
        """The name of the role's column (for messages)."""
        return self.columns.roles[role]

    def time(self, role: str) -> datetime:
        """The role's value as a time in the account's format and zone, as UTC (see :class:`LocalTimes`)."""
        if self.times is None:
            raise TypeError("the response table reads no times")
        return self.times.utc(self.column(role), self.get(role))

    def unmapped(self) -> dict[str, str]:
        """The non-empty values of the columns no role names, by column."""
        mapped = set(self.columns.roles.values())
        pairs = zip(self.columns.header, self.fields, strict=True)
        return {name: value for name, value in pairs if name not in mapped and value}


def records_events(records: Iterable[Record], event: Callable[[Record], T | None]) -> Iterator[T | BadRow]:
    """Each record's event (None: none), or the BadRow of a record it rejects; blank lines are skipped."""
    for record in records:
        if record.fields == []:
            continue  # a blank line is no record
        try:
            if record.fields is None:
                raise ValueError(record.error)
            made = event(record)
        except ValueError as exc:
            yield BadRow(record.line, record.raw, str(exc))
            continue
        if made is not None:
            yield made


@dataclass(frozen=True, slots=True)
class ResponseTable:
    """How an ESP writes its response files: the delimited format, the columns by role, the ones
    a header must have (a tuple of roles: one of them), and its times."""

    roles: Mapping[str, str]
    required: tuple[str | tuple[str, ...], ...]
    delimiter: str = ","
    encoding: str = "utf-8"
    quotechar: str = '"'
    times: LocalTimes | None = None
    byte_exact: bool = False
    """Read by :func:`read_records` (each record's bytes as in the file, in bounded memory; an
    ASCII-compatible encoding) instead of :func:`read_csv_records` (as Python's csv reads the text)."""

    def events(self, path: Path, event: Callable[[Row], T | None]) -> Iterator[T | BadRow]:
        """The events ``event`` makes of a file's rows under its header (None: none), and BadRows:
        the header when it lacks a required column, and each row ``event`` or the header rejects."""
        return self.events_under(path, lambda columns: event)

    def events_under(
        self, path: Path, per_file: Callable[[Columns], Callable[[Row], T | None]]
    ) -> Iterator[T | BadRow]:
        """:meth:`events` with the row function ``per_file`` makes from the file's header, which
        may also refuse the whole file (ValueError: one BadRow, the header's)."""
        if self.byte_exact:
            records = read_records(path, delimiter=self.delimiter, encoding=self.encoding)
        else:
            records = read_csv_records(
                path, delimiter=self.delimiter, encoding=self.encoding, quotechar=self.quotechar
            )
        first = next(records, None)
        if first is None:
            return
        if first.fields is None:
            yield BadRow(first.line, first.raw, f"unreadable header: {first.error}")
            return
        columns = Columns(self.roles, first.fields)
        missing = columns.missing(self.required)
        if missing:
            yield BadRow(first.line, first.raw, f"header lacks {', '.join(missing)}")
            return
        try:
            event = per_file(columns)
        except ValueError as exc:
            yield BadRow(first.line, first.raw, str(exc))
            return
        yield from records_events(
            records, lambda record: event(columns.row(record, self.encoding, self.times))
        )


def raw_json(item: Any) -> bytes:
    """An item's bytes for its BadRow: its JSON, or its repr when it is no JSON value."""
    try:
        return orjson.dumps(item)
    except TypeError:
        return repr(item).encode("utf-8", "replace")


def item_events(
    items: Iterable[Any],
    event: Callable[[int, Any], ResponseEvent | Sequence[ResponseEvent] | None],
    *,
    what: str = "",
    first_line: int = 1,
) -> list[ResponseEvent | BadRow]:
    """The events ``event(line, item)`` makes of JSON items numbered from ``first_line`` (None:
    none); an item it rejects is a BadRow whose error starts with ``what``."""
    out: list[ResponseEvent | BadRow] = []
    for line, item in enumerate(items, start=first_line):
        try:
            made = event(line, item)
        except ValueError as exc:
            out.append(BadRow(line, raw_json(item), f"{what}: {exc}" if what else str(exc)))
            continue
        if isinstance(made, ResponseEvent):
            out.append(made)
        elif made is not None:
            out.extend(made)
    return out


class LocalTimes:
    """Times an account writes in its formats and zone, read as UTC.

    A value is read by the first of the account's formats it fits (:data:`UNIX`, :data:`ISO` or a
    strptime pattern), else as an ISO 8601 time with ``Z`` or an offset, which every account
    accepts. A time that carries its zone keeps it; one without is in the account's zone, and in
    the hour repeated when summer time ends it is the first occurrence.
    """

    def __init__(self, formats: str | Sequence[str], zone: str) -> None:
        self.formats = (formats,) if isinstance(formats, str) else tuple(formats)
        if not self.formats:
            raise ValueError("no time format")
        self.zone = ZoneInfo(zone)

    def utc(self, label: str, value: str) -> datetime:
        """``value`` (of the field ``label``, for messages) as UTC; ValueError when it is none."""
        if not value:
            raise ValueError(f"empty {label}")
        for fmt in self.formats:
            parsed = _read_time(fmt, value)
            if parsed is not None:
                break
        else:
            # Every account takes ISO 8601 times that say their zone; a naive one must fit a format.
            parsed = _iso_time(value)
            if parsed is None or parsed.tzinfo is None:
                raise ValueError(self._unreadable(label, value))
        local = parsed if parsed.tzinfo else parsed.replace(tzinfo=self.zone, fold=0)
        return local.astimezone(UTC)

    def _unreadable(self, label: str, value: str) -> str:
        if len(self.formats) > 1:
            named = ", ".join(_FORMAT_NAMES.get(fmt, repr(fmt)) for fmt in self.formats)
            return f"{label} {value!r} is in none of the formats {named}, nor ISO 8601 with a zone"
        fmt = self.formats[0]
        if fmt == UNIX:
            return f"{label} {value!r} is not Unix seconds"
        if fmt == ISO:
            return f"{label} {value!r} is not an ISO 8601 time"
        return f"{label} {value!r} does not match {fmt!r}"


_FORMAT_NAMES = {UNIX: "Unix seconds", ISO: "ISO 8601"}


def _read_time(fmt: str, value: str) -> datetime | None:
    """``value`` in one format (naive unless it carries a zone), or None when it does not fit."""
    if fmt == UNIX:
        try:
            return datetime.fromtimestamp(float(value), UTC)
        except (ValueError, OverflowError, OSError):
            return None
    if fmt == ISO:
        return _iso_time(value)
    try:
        return datetime.strptime(value, fmt)
    except ValueError:
        return None


def _iso_time(value: str) -> datetime | None:
    """An ISO 8601 time (RFC 3339's ``t``, ``z`` or a space too), naive when it has no zone; None
    when ``value`` is none."""
    text = value.strip()
    if len(text) > 10 and text[10] in "tT ":
        text = f"{text[:10]}T{text[11:]}"
    if text.endswith(("z", "Z")):
        text = text[:-1] + "+00:00"
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def aware_time(label: str, value: Any) -> datetime:
    """An ISO 8601 time with ``Z`` or an offset (RFC 3339's ``t``, ``z`` or a space too) as UTC."""
    if not value:
        raise ValueError(f"empty {label}")
    when = _iso_time(value) if isinstance(value, str) else None
    if when is None:
        raise ValueError(f"{label} {value!r} is not an ISO 8601 time")
    if when.utcoffset() is None:
        raise ValueError(f"{label} {value!r} has no time zone offset")
    return when.astimezone(UTC)


def file_source(remote_path: str, line: int) -> EventSource:
    """Where an event of a response file came from: the file and the line."""
    return EventSource(kind="file", name=posixpath.normpath(remote_path), line=line)


def api_source(name: str, page: int) -> EventSource:
    """Where an event of an API pull came from: the endpoint (as the connector names it) and the page."""
    return EventSource(kind="api", name=name, page=page)


class EventFields(TypedDict, total=False):
    """What a connector says of an event, by :class:`ResponseEvent`'s field names."""

    broadcast_id: Required[str]
    type: Required[EventType]
    occurred_at: Required[datetime]
    source: Required[EventSource]
    url: str | None
    communication_key: str | None
    email: str | None
    esp_message_id: str | None
    extra: dict[str, str]


class Events:
    """The events of one account, with their deterministic ids.

    The id is derived from ``esp_event_id`` when the ESP gives its own, else from the facts:
    broadcast, ``recipient``, type, time and URL (see :func:`event_id_for`).
    """

    def __init__(self, account: AccountConfig) -> None:
        self.esp = account.esp
        self.account = account.account

    def make(
        self, *, recipient: str = "", esp_event_id: str | None = None, **fields: Unpack[EventFields]
    ) -> ResponseEvent:
        """One event (ResponseEvent's own checks apply: a key or an email, a broadcast id)."""
        event_id = event_id_for(
            self.esp,
            esp_event_id=esp_event_id,
            broadcast_id=fields["broadcast_id"],
            recipient=recipient,
            event_type=fields["type"].value,
            occurred_at=fields["occurred_at"],
            url=fields.get("url"),
        )
        return ResponseEvent(event_id=event_id, esp=self.esp, account=self.account, **fields)
