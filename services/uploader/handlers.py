"""The uploader's handler: job → selection → list file on the ESP's SFTP drop → ListUploaded."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import asyncpg

from services.uploader import core, selection
from services.uploader.listfile import ListStream
from services.uploader.settings import Settings
from shared.esp.resources import EspResources
from shared.infra.db import jobs
from shared.infra.logs import log_context
from shared.infra.sftp import upload_stream_atomic
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
from shared.runtime.status import StatusReporter

log = logging.getLogger(__name__)


@dataclass
class Uploader:
    """The uploader's per-process resources."""

    settings: Settings
    runtime: Runtime
    pool: asyncpg.Pool
    esp: EspResources
    statuses: StatusReporter
    """Publishes the upload statuses and records them in control.jobs."""


async def handle_job(body: bytes, uploader: Uploader) -> None:
    """One broadcast job. Invalid or impossible jobs get a failed status and a dead letter."""
    try:
        job = decode(BroadcastJob, body)
    except InvalidMessageError as exc:
        status = core.rejected(body, str(exc))
        if status is not None:
            # Published only: control.jobs holds the valid job of that id, if any, not this message.
            await uploader.runtime.publish(status)
        log.error("job rejected", extra={"job_id": core.job_id_of(body), "error": str(exc)[:2000]})
        raise
    with log_context(job_id=job.job_id):
        async with uploader.pool.acquire() as conn:
            new = await jobs.upsert_job(conn, job)
            if not new and await jobs.upload_done(conn, job.job_id):
                # The same job published again: its list is on the ESP's site and announced already.
                log.info("job already uploaded, the duplicate is ignored")
                return
        try:
            upload = await upload_list(job, uploader)
        except PermanentError as exc:
            await uploader.statuses.report(core.status(job.job_id, State.FAILED, str(exc)))
            log.error("job failed", extra={"error_class": type(exc).__name__, "error": str(exc)[:2000]})
            raise
        await uploader.runtime.publish(upload)
        await uploader.statuses.report(core.uploaded_status(upload))
        log.info(
            "list uploaded",
            extra={"rows": upload.rows, "excluded": upload.excluded, "remote": upload.remote_path},
        )


async def upload_list(job: BroadcastJob, uploader: Uploader) -> ListUploaded:
    """Stream the selection into the ESP's list format and upload it atomically."""
    connector = uploader.esp.connectors.get(job.esp, job.account)
    core.check_mode(job, connector.can_send, connector.account.connector)
    fmt = connector.list_format
    wanted = core.source_columns(job, fmt.key_field)
    stream = ListStream(
        header=core.list_columns(job, fmt.email_field, fmt.key_field),
        fmt=fmt,
        first_rows_written=functools.partial(uploader.runtime.failpoints.reach, Point.UPLOADER_MID_UPLOAD),
        tally=selection.Tally(),
    )
    remote = connector.list_path(job)
    await uploader.statuses.report(core.status(job.job_id, State.RUNNING, f"writing {remote}"))
    sel = job.selection
    column = uploader.settings.suppression_column
    async with uploader.esp.sftp.session() as sftp:
        if isinstance(sel, TableSelection) and core.copy_can_write(fmt):
            async with uploader.pool.acquire() as conn, conn.transaction(readonly=True):
                uploaded = await upload_stream_atomic(sftp, stream.copied(conn, sel, wanted, column), remote)
        elif isinstance(sel, TableSelection):
            async with uploader.pool.acquire() as conn, conn.transaction(readonly=True):
                rows = selection.from_table(
                    conn, sel, wanted, column, stream.tally, uploader.settings.fetch_rows
                )
                uploaded = await upload_stream_atomic(sftp, stream.encoded(rows), remote)
        elif isinstance(sel, CsvSelection):
            path = selection.resolve_csv(uploader.settings.csv_dir, sel.path)
            rows = selection.from_csv(path, sel, wanted, column, stream.tally)
            uploaded = await upload_stream_atomic(sftp, stream.encoded(rows), remote)
        else:
            assert isinstance(sel, InlineSelection)
            rows = selection.from_inline(sel, wanted, column, stream.tally)
            uploaded = await upload_stream_atomic(sftp, stream.encoded(rows), remote)
    async with uploader.pool.acquire() as conn:
        await jobs.set_remote_path(conn, job.job_id, remote)
    return ListUploaded(
        job_id=job.job_id,
        esp=job.esp,
        account=job.account,
        remote_path=remote,
        rows=stream.rows,
        bytes=uploaded.bytes,
        sha256=uploaded.sha256,
        excluded=stream.tally.excluded,
        uploaded_at=utcnow(),
    )
