"""A job's list file as a stream of bytes for the SFTP upload: the header, then the recipients'
rows, encoded as the rows arrive (CSV writer) or passed on from PostgreSQL's own CSV COPY."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from services.uploader import core, selection
from shared.esp import ListFormat
from shared.infra.db import Conn
from shared.model.messages import TableSelection

CHUNK_ROWS = 2000
COPY_CHUNK_BYTES = 256 * 1024
"""The server's COPY output is passed on to SFTP in pieces of about this size."""


@dataclass
class ListStream:
    """Writes one list file; counts its rows (and, in ``tally``, the rows left out)."""

    header: list[str]
    """The list file's columns."""
    fmt: ListFormat
    first_rows_written: Callable[[], Awaitable[None]]
    """Called once the header and the first rows are handed on (a failpoint)."""
    tally: selection.Tally
    key_at: int | None = None
    """The communication key's column, when the list's keys are noted in ``keys`` as rows are encoded."""
    keys: list[str] = field(default_factory=list)
    rows: int = 0

    def _encode(self, rows: list[Any]) -> bytes:
        if self.key_at is not None:
            at = self.key_at
            self.keys.extend(key for row in rows if (key := core.text(row[at])))
        return core.encode_rows(rows, self.fmt.delimiter, self.fmt.line_terminator, self.fmt.encoding)

    def _encode_header(self) -> bytes:
        return core.encode_rows(
            [self.header], self.fmt.delimiter, self.fmt.line_terminator, self.fmt.encoding
        )

    def _empty(self) -> core.EmptySelectionError:
        return core.EmptySelectionError(f"the selection has no recipients ({self.tally.excluded} opted out)")

    async def encoded(self, source: AsyncIterator[tuple[Any, ...]]) -> AsyncIterator[bytes]:
        """The file from rows of the source columns, encoded here in chunks of :data:`CHUNK_ROWS`."""
        first = await anext(source, None)
        if first is None:
            raise self._empty()
        yield self._encode_header() + self._encode([first])
        self.rows = 1
        await self.first_rows_written()
        batch: list[tuple[Any, ...]] = []
        async for row in source:
            batch.append(row)
            if len(batch) >= CHUNK_ROWS:
                self.rows += len(batch)
                yield self._encode(batch)
                batch = []
        if batch:
            self.rows += len(batch)
            yield self._encode(batch)

    async def copied(
        self, conn: Conn, table: TableSelection, wanted: list[str], suppression_column: str
    ) -> AsyncIterator[bytes]:
        """The file from the server's COPY: the header, then its CSV as it arrives (only for a format
        :func:`core.copy_can_write`)."""
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)  # bounded: memory stays flat
        pending = bytearray()

        async def output(data: bytes) -> None:
            pending.extend(data)
            if len(pending) >= COPY_CHUNK_BYTES:
                await queue.put(bytes(pending))
                pending.clear()

        async def run() -> int:
            n = await selection.copy_table_csv(
                conn, table, wanted, suppression_column, self.tally, self.fmt.delimiter, output
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
