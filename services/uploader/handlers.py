"""The uploader's handler: job → selection → list file on the ESP's SFTP drop → ListUploaded."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg

from services.uploader import core, selection
from services.uploader.settings import Settings
from shared.esp import Connectors
from shared.infra.db import Conn, jobs
from shared.infra.logs import log_context
from shared.infra.sftp import SftpPool, upload_stream_atomic
from shared.model.errors import InvalidMessageError, PermanentError
from shared.model.messages import (
    BroadcastJob,
    CsvSelection,
    InlineSelection,
    ListUploaded,
    State,
    TableSelection,
    decode,
    utcnow,
)
from shared.runtime.failpoints import Point
from shared.runtime.runtime import Runtime

log = logging.getLogger(__name__)

CHUNK_ROWS = 2000
COPY_CHUNK_BYTES = 256 * 1024
"""The server's COPY output is passed on to SFTP in pieces of about this size."""


async def _next_chunk(queue: asyncio.Queue[bytes | None], task: asyncio.Task[int]) -> bytes | None:
    """The next piece of COPY output, or None at its end; the COPY's own error if it failed."""
    getter = asyncio.ensure_future(queue.get())
    await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
    if getter.done():
        return getter.result()
    getter.cancel()
    task.result()  # raises the COPY's error
    return await queue.get()  # the COPY finished: its last pieces are queued


@dataclass
class Uploader:
    """The uploader's per-process resources."""

    settings: Settings
    runtime: Runtime
    pool: asyncpg.Pool
    sftp: SftpPool
    connectors: Connectors

    async def status(self, job_id: str, state: State, detail: str = "", **counts: int) -> None:
        """Publish an upload status and keep it in control.jobs."""
        await self.report(core.status(job_id, state, detail, **counts))

    async def report(self, status: Any) -> None:
        """Publish a status and record it."""
        await self.runtime.publish(status)
        async with self.pool.acquire() as conn:
            await jobs.record_status(conn, status)


async def handle_job(body: bytes, up: Uploader) -> None:
    """One broadcast job. Invalid or impossible jobs get a failed status and a dead letter."""
    try:
        job = decode(BroadcastJob, body)
    except InvalidMessageError as exc:
        status = core.rejected(body, str(exc))
        if status is not None:
            await up.runtime.publish(status)
        log.error("job rejected", extra={"job_id": core.job_id_of(body), "error": str(exc)[:2000]})
        raise
    with log_context(job_id=job.job_id):
        async with up.pool.acquire() as conn:
            new = await jobs.upsert_job(conn, job)
            if not new and await jobs.upload_done(conn, job.job_id):
                # The same job published again: its list is on the ESP's site and announced already.
                log.info("job already uploaded, the duplicate is ignored")
                return
        try:
            upload = await upload_list(job, up)
        except PermanentError as exc:
            await up.status(job.job_id, State.FAILED, str(exc))
            log.error("job failed", extra={"error_class": type(exc).__name__, "error": str(exc)[:2000]})
            raise
        await up.runtime.publish(upload)
        await up.report(core.uploaded_status(upload))
        log.info(
            "list uploaded",
            extra={"rows": upload.rows, "excluded": upload.excluded, "remote": upload.remote_path},
        )


async def upload_list(job: BroadcastJob, up: Uploader) -> ListUploaded:
    """Stream the selection into the ESP's list format and upload it atomically."""
    connector = up.connectors.get(job.esp, job.account)
    core.check_mode(job, connector.can_send, connector.account.connector)
    fmt = connector.list_format
    header = core.list_columns(job, fmt.email_field, fmt.key_field)
    wanted = core.source_columns(job, fmt.key_field)
    remote = connector.list_path(job)
    await up.status(job.job_id, State.RUNNING, f"writing {remote}")
    tally = selection.Tally()
    rows = 0

    async def chunks(source: AsyncIterator[tuple[Any, ...]]) -> AsyncIterator[bytes]:
        nonlocal rows
        first = await anext(source, None)
        if first is None:
            raise core.EmptySelectionError(f"the selection has no recipients ({tally.excluded} opted out)")
        yield core.encode_rows([header, first], fmt.delimiter, fmt.line_terminator, fmt.encoding)
        rows = 1
        await up.runtime.failpoints.reach(Point.UPLOADER_MID_UPLOAD)  # the first chunk is written
        batch: list[tuple[Any, ...]] = []
        async for row in source:
            batch.append(row)
            if len(batch) >= CHUNK_ROWS:
                rows += len(batch)
                yield core.encode_rows(batch, fmt.delimiter, fmt.line_terminator, fmt.encoding)
                batch = []
        if batch:
            rows += len(batch)
            yield core.encode_rows(batch, fmt.delimiter, fmt.line_terminator, fmt.encoding)

    async def copied(conn: Conn, sel: TableSelection) -> AsyncIterator[bytes]:
        """The list file from the server's COPY: the header, then its CSV as it arrives."""
        nonlocal rows
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)  # bounded: memory stays flat
        pending = bytearray()

        async def output(data: bytes) -> None:
            pending.extend(data)
            if len(pending) >= COPY_CHUNK_BYTES:
                await queue.put(bytes(pending))
                pending.clear()

        async def run() -> int:
            n = await selection.copy_table_csv(conn, sel, wanted, column, tally, fmt.delimiter, output)
            await queue.put(bytes(pending))
            await queue.put(None)
            return n

        task = asyncio.create_task(run())
        try:
            yield core.encode_rows([header], fmt.delimiter, fmt.line_terminator, fmt.encoding)
            first = True
            while (chunk := await _next_chunk(queue, task)) is not None:
                yield chunk
                if first and chunk:
                    first = False
                    await up.runtime.failpoints.reach(Point.UPLOADER_MID_UPLOAD)  # header + rows written
            rows = await task
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if rows == 0:
            raise core.EmptySelectionError(f"the selection has no recipients ({tally.excluded} opted out)")

    sel = job.selection
    column = up.settings.suppression_column
    async with up.sftp.session() as sftp:
        if isinstance(sel, TableSelection) and core.copy_can_write(fmt):
            async with up.pool.acquire() as conn, conn.transaction(readonly=True):
                uploaded = await upload_stream_atomic(sftp, copied(conn, sel), remote)
        elif isinstance(sel, TableSelection):
            async with up.pool.acquire() as conn, conn.transaction(readonly=True):
                source = selection.from_table(conn, sel, wanted, column, tally, up.settings.fetch_rows)
                uploaded = await upload_stream_atomic(sftp, chunks(source), remote)
        elif isinstance(sel, CsvSelection):
            path = selection.resolve_csv(up.settings.csv_dir, sel.path)
            uploaded = await upload_stream_atomic(
                sftp, chunks(selection.from_csv(path, sel, wanted, column, tally)), remote
            )
        else:
            assert isinstance(sel, InlineSelection)
            uploaded = await upload_stream_atomic(
                sftp, chunks(selection.from_inline(sel, wanted, column, tally)), remote
            )
    async with up.pool.acquire() as conn:
        await jobs.set_remote_path(conn, job.job_id, remote)
    return ListUploaded(
        job_id=job.job_id,
        esp=job.esp,
        account=job.account,
        remote_path=remote,
        rows=rows,
        bytes=uploaded.bytes,
        sha256=uploaded.sha256,
        excluded=tally.excluded,
        uploaded_at=utcnow(),
    )
