"""A job's list file: its columns, its values as text, and the file itself as a stream of bytes —
the header, then the recipients' rows, encoded as the rows arrive (CSV writer) or passed on from
PostgreSQL's own CSV COPY.

The uploader streams it to the ESP's SFTP drop; ``espbridge job check`` reads its first rows from
the same code, so what the check shows is what the ESP would get.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import csv
import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from shared.esp import Connector, ListFormat
from shared.infra.db import Conn
from shared.model.errors import PermanentError
from shared.model.messages import BroadcastJob, CsvSelection, InlineSelection, SendMode, TableSelection
from shared.operations import selection
from shared.operations.selection import SelectionSettings, Suppression

CHUNK_ROWS = 2000
COPY_CHUNK_BYTES = 256 * 1024
"""The server's COPY output is passed on to SFTP in pieces of about this size."""
PROGRESS_EVERY_S = 5.0
"""How often a long list reports how far it is (a short one reports nothing on its way)."""


class EmptySelectionError(PermanentError):
    """A job's selection has no recipients left to upload."""


class FieldMapError(PermanentError):
    """A job's field map does not give the ESP the fields it needs."""


class ModeError(PermanentError):
    """A job asks for a send from an ESP account that cannot send."""


def check_mode(job: BroadcastJob, can_send: bool, connector: str) -> None:
    """File-only ESPs take ``upload_only`` jobs alone; say so before anything is uploaded."""
    if job.mode is SendMode.UPLOAD_AND_SEND and not can_send:
        raise ModeError(
            f"{job.esp}/{job.account} uses the {connector} connector, which cannot send: "
            "publish the job with mode upload_only"
        )


def list_columns(job: BroadcastJob, email_field: str, key_field: str) -> list[str]:
    """The list file's header: the mapped fields, plus the ESP's key field if not mapped."""
    fields = list(job.field_map.values())
    if email_field not in fields:
        raise FieldMapError(f"field_map maps no column to the ESP's {email_field!r} field")
    if key_field not in fields:
        fields.append(key_field)
    return fields


def email_column(job: BroadcastJob, email_field: str) -> str:
    """The source column mapped to the ESP's email field (whose subscription state is checked)."""
    for column, list_field in job.field_map.items():
        if list_field == email_field:
            return column
    raise FieldMapError(f"field_map maps no column to the ESP's {email_field!r} field")


def source_columns(job: BroadcastJob, key_field: str) -> list[str]:
    """The source column behind each list column, in the same order as :func:`list_columns`."""
    sources = list(job.field_map)
    if key_field not in job.field_map.values():
        sources.append(job.communication_key)
    return sources


def text(value: Any) -> str:
    """A source value as list-file text."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return format(value, "f")  # digits, as PostgreSQL writes numeric (never 1E+20)
    return str(value)


def copy_can_write(fmt: ListFormat) -> bool:
    """Whether PostgreSQL's CSV COPY writes this list format exactly as :func:`encode_rows` does:
    UTF-8, lines ending in a bare LF, a one-character delimiter that is not a quote or line break."""
    return (
        codecs.lookup(fmt.encoding).name == "utf-8"
        and fmt.line_terminator == "\n"
        and len(fmt.delimiter) == 1
        and fmt.delimiter not in '"\r\n'
    )


def encode_rows(rows: Iterable[Iterable[Any]], delimiter: str, terminator: str, encoding: str) -> bytes:
    """Rows as CSV bytes (RFC 4180 quoting)."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator=terminator, quoting=csv.QUOTE_MINIMAL)
    writer.writerows([text(v) for v in row] for row in rows)
    return buf.getvalue().encode(encoding)


async def _nothing() -> None:
    return None


@dataclass
class ListStream:
    """Writes one list file; counts its rows and bytes (and, in ``tally``, the rows left out)."""

    header: list[str]
    """The list file's columns."""
    fmt: ListFormat
    tally: selection.Tally = field(default_factory=selection.Tally)
    first_rows_written: Callable[[], Awaitable[None]] = _nothing
    """Called once the header and the first rows are handed on (a failpoint)."""
    progress: Callable[[], Awaitable[None]] = _nothing
    """Called at most every :data:`PROGRESS_EVERY_S` while the file is written (rows and bytes so far)."""
    key_at: int | None = None
    """The communication key's column, when the list's keys are noted in ``keys`` as rows are encoded."""
    limit: int | None = None
    """At most this many rows (the check's first rows); None: every row."""
    keys: list[str] = field(default_factory=list)
    rows: int = 0
    """Rows written so far (for a COPY, known at its end)."""
    written: int = 0
    """Bytes handed on so far."""
    _reported: float = field(default_factory=time.monotonic)

    def _encode(self, rows: list[Any]) -> bytes:
        if self.key_at is not None:
            at = self.key_at
            self.keys.extend(key for row in rows if (key := text(row[at])))
        return encode_rows(rows, self.fmt.delimiter, self.fmt.line_terminator, self.fmt.encoding)

    def _encode_header(self) -> bytes:
        return encode_rows([self.header], self.fmt.delimiter, self.fmt.line_terminator, self.fmt.encoding)

    def _empty(self) -> EmptySelectionError:
        return EmptySelectionError(
            f"the selection has no recipients ({excluded_text(self.tally.by_state, self.tally.by_column)})"
        )

    async def _handed_on(self, chunk: bytes) -> None:
        self.written += len(chunk)
        if time.monotonic() - self._reported >= PROGRESS_EVERY_S:
            self._reported = time.monotonic()
            await self.progress()

    async def encoded(self, source: AsyncIterator[tuple[Any, ...]]) -> AsyncIterator[bytes]:
        """The file from rows of the source columns, encoded here in chunks of :data:`CHUNK_ROWS`."""
        first = await anext(source, None)
        if first is None:
            raise self._empty()
        chunk = self._encode_header() + self._encode([first])
        yield chunk
        self.rows = 1
        await self.first_rows_written()
        await self._handed_on(chunk)
        batch: list[tuple[Any, ...]] = []
        async for row in source:
            if self.limit is not None and self.rows + len(batch) >= self.limit:
                break
            batch.append(row)
            if len(batch) >= CHUNK_ROWS:
                self.rows += len(batch)
                chunk = self._encode(batch)
                yield chunk
                await self._handed_on(chunk)
                batch = []
        if batch:
            self.rows += len(batch)
            chunk = self._encode(batch)
            yield chunk
            await self._handed_on(chunk)

    async def copied(
        self, conn: Conn, table: TableSelection, wanted: list[str], suppression: Suppression
    ) -> AsyncIterator[bytes]:
        """The file from the server's COPY: the header, then its CSV as it arrives (only for a format
        :func:`copy_can_write`)."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)  # bounded: memory stays flat
        pending = bytearray()

        async def output(data: bytes) -> None:
            pending.extend(data)
            if len(pending) >= COPY_CHUNK_BYTES:
                await queue.put(bytes(pending))
                pending.clear()

        async def run() -> int:
            n = await selection.copy_table_csv(
                conn, table, wanted, suppression, self.tally, self.fmt.delimiter, output, self.limit
            )
            await queue.put(bytes(pending))
            await queue.put(None)
            return n

        task = asyncio.create_task(run())
        try:
            yield self._encode_header()
            first = True
            while (chunk := await _next_chunk(queue, task)) is not None:
                yield chunk
                if first and chunk:
                    first = False
                    await self.first_rows_written()
                await self._handed_on(chunk)
            self.rows = await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.rows == 0:
            raise self._empty()


async def _next_chunk(queue: asyncio.Queue[bytes | None], task: asyncio.Task[int]) -> bytes | None:
    """The next piece of COPY output, or None at its end; the COPY's own error if it failed."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    task.result()  # raises the COPY's error
    return await queue.get()  # the COPY finished: its last pieces are queued


def subscription_scope(connector: Connector) -> selection.SubscriptionScope:
    """The account and list whose subscription state a job through ``connector`` honours: the
    account's broadcast list (``*`` when it syncs no lists)."""
    account = connector.account
    return selection.SubscriptionScope(account.esp, account.account, account.subscriptions.default_list)


async def job_suppression(
    crm: Conn, job: BroadcastJob, connector: Connector, reading: SelectionSettings
) -> Suppression:
    """What leaves a recipient out of the job's list, read through the CRM connection: the
    account's subscription state (where the CRM keeps it) and the suppression column."""
    return await selection.suppression_for(
        crm,
        job.selection,
        reading.suppression_column,
        subscription_scope(connector),
        email_column(job, connector.list_format.email_field),
    )


def excluded_text(by_state: int, by_column: int) -> str:
    """The rows left out, as an empty selection's error says them."""
    if by_state and by_column:
        return f"{by_state:,} suppressed by the subscription state, {by_column:,} opted out"
    if by_state:
        return f"{by_state:,} suppressed by the subscription state"
    return f"{by_column:,} opted out"


def list_file(
    stream: ListStream,
    job: BroadcastJob,
    wanted: list[str],
    reading: SelectionSettings,
    suppression: Suppression,
    conn: Conn | None,
    *,
    copied: bool,
) -> AsyncIterator[bytes]:
    """The job's list file from its selection: a table through the CRM connection ``conn`` (inside
    a transaction; by the server's COPY when ``copied``), a CSV file from the allowed folder, or the
    inline rows; each without the rows ``suppression`` leaves out."""
    sel = job.selection
    if isinstance(sel, TableSelection):
        assert conn is not None, "a table selection is read through a connection"
        if copied:
            return stream.copied(conn, sel, wanted, suppression)
        rows = selection.from_table(
            conn, sel, wanted, suppression, stream.tally, reading.fetch_rows, stream.limit
        )
        return stream.encoded(rows)
    if isinstance(sel, CsvSelection):
        path = selection.resolve_csv(reading.csv_dir, sel.path)
        return stream.encoded(selection.from_csv(path, sel, wanted, suppression, stream.tally))
    assert isinstance(sel, InlineSelection)
    return stream.encoded(selection.from_inline(sel, wanted, suppression, stream.tally))
