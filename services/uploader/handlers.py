"""The uploader's handler: job → selection → list file on the ESP's SFTP drop → ListUploaded."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from services.uploader import core
from services.uploader.settings import Settings
from shared.esp import Connector, attribution
from shared.esp.resources import EspResources
from shared.infra.db import Conn, jobs, uploaded_lists
from shared.infra.logs import log_context
from shared.infra.sftp import upload_stream_atomic
from shared.model.errors import InvalidMessageError, PermanentError
from shared.model.messages import BroadcastJob, ListUploaded, State, TableSelection, decode, utcnow
from shared.operations import lists, selection
from shared.operations.lists import ListStream
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
    crm_pool: asyncpg.Pool
    """The CRM database's pool, that selections are read from (``pool`` itself when the CRM is
    espbridge's database)."""
    state_missing_said: bool = False

    async def suppression(self, crm: Conn, job: BroadcastJob, connector: Connector) -> selection.Suppression:
        """What leaves the job's recipients out; says once per process that the CRM keeps no
        subscription state (so only the suppression column does)."""
        suppression = await lists.job_suppression(crm, job, connector, self.settings)
        if suppression.scope is None and not self.state_missing_said:
            self.state_missing_said = True
            log.warning(
                "the CRM database has no crm.suppressions view: no subscription state is kept, "
                "only the suppression column leaves recipients out",
                extra={"suppression_column": suppression.column},
            )
        return suppression


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
            cancelled = await jobs.cancel_requested(conn, job.job_id)
        if cancelled:
            await uploader.statuses.report(
                core.status(job.job_id, State.CANCELLED, "cancelled: not uploaded")
            )
            log.info("job cancelled before its upload: not uploaded")
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
    """Stream the selection into the ESP's list format, without the recipients the CRM suppresses,
    and upload it atomically; where the account attributes response rows by communication key,
    record the list's keys."""
    connector = uploader.esp.connectors.get(job.esp, job.account)
    lists.check_mode(job, connector.can_send, connector.account.connector)
    fmt = connector.list_format
    wanted = lists.source_columns(job, fmt.key_field)
    header = lists.list_columns(job, fmt.email_field, fmt.key_field)
    sel = job.selection
    copied = isinstance(sel, TableSelection) and lists.copy_can_write(fmt)
    kept_days = attribution.kept_days(connector)
    recording = kept_days is not None
    key_at = header.index(fmt.key_field)
    remote = connector.list_path(job)
    stream = ListStream(
        header=header,
        fmt=fmt,
        first_rows_written=functools.partial(uploader.runtime.failpoints.reach, Point.UPLOADER_MID_UPLOAD),
        key_at=key_at if recording and not copied else None,
    )

    async def progress() -> None:
        await uploader.statuses.report(core.writing_status(job.job_id, remote, stream.rows, stream.written))

    stream.progress = progress
    await uploader.statuses.report(core.status(job.job_id, State.RUNNING, f"writing {remote}"))
    settings = uploader.settings
    uploaded_at: datetime | None = None  # set where the keys are recorded with the upload
    selected_keys: list[str] | None = None  # the keys of a COPY-written list in a CRM of its own
    # Recording reads the keys again, in the snapshot the file was written from.
    snapshot = recording and copied
    # The keys go in by the selection's own INSERT … SELECT only where the CRM is espbridge's database.
    in_place = snapshot and uploader.crm_pool is uploader.pool
    if isinstance(sel, TableSelection):
        async with (
            uploader.esp.sftp.session() as sftp,
            uploader.crm_pool.acquire() as conn,
            conn.transaction(readonly=not in_place, isolation="repeatable_read" if snapshot else None),
        ):
            suppression = await uploader.suppression(conn, job, connector)
            file = lists.list_file(stream, job, wanted, settings, suppression, conn, copied=copied)
            uploaded = await upload_stream_atomic(sftp, file, remote)
            if snapshot:
                uploaded_at = utcnow()
                select, args = await selection.key_query(conn, sel, wanted[key_at], suppression)
                if in_place:
                    await _record_selected_keys(conn, job, uploaded_at, select, args)
                else:
                    selected_keys = [r[0] for r in await conn.fetch(select, *args) if r[0] is not None]
    else:
        async with uploader.crm_pool.acquire() as conn:  # the suppressed emails are read once, here
            suppression = await uploader.suppression(conn, job, connector)
        async with uploader.esp.sftp.session() as sftp:
            file = lists.list_file(stream, job, wanted, settings, suppression, None, copied=False)
            uploaded = await upload_stream_atomic(sftp, file, remote)
    uploaded_at = uploaded_at or utcnow()
    async with uploader.pool.acquire() as conn:
        if kept_days is not None:
            if not in_place:
                await _record_keys(
                    conn, job, uploaded_at, stream.keys if selected_keys is None else selected_keys
                )
            forgotten = await uploaded_lists.forget_lists(
                conn, job.esp, job.account, uploaded_at - timedelta(days=kept_days)
            )
            if forgotten:
                log.info("old lists' keys removed", extra={"lists": forgotten, "kept_days": kept_days})
        await jobs.set_remote_path(conn, job.job_id, remote)
    if stream.tally.excluded:
        log.info(
            "recipients left out",
            extra={
                "by_subscription_state": stream.tally.by_state,
                "by_suppression_column": stream.tally.by_column,
            },
        )
    return ListUploaded(
        job_id=job.job_id,
        esp=job.esp,
        account=job.account,
        remote_path=remote,
        rows=stream.rows,
        bytes=uploaded.bytes,
        sha256=uploaded.sha256,
        excluded=stream.tally.excluded,
        uploaded_at=uploaded_at,
    )


async def _record_selected_keys(
    conn: Conn, job: BroadcastJob, uploaded_at: datetime, select: str, args: list[Any]
) -> None:
    """Record the keys of a list written by the server's COPY, by the same selection (``select``),
    in the same transaction (so in the snapshot the file was written from)."""
    list_id = await uploaded_lists.start_list(conn, job.job_id, job.esp, job.account, uploaded_at)
    keys = await uploaded_lists.insert_selected_keys(conn, list_id, select, args)
    log.info("list keys recorded", extra={"keys": keys})


async def _record_keys(conn: Conn, job: BroadcastJob, uploaded_at: datetime, keys: list[str]) -> None:
    """Record the keys of a list written here (noted as its rows were encoded), by COPY."""
    async with conn.transaction():
        list_id = await uploaded_lists.start_list(conn, job.job_id, job.esp, job.account, uploaded_at)
        await uploaded_lists.copy_keys(conn, list_id, keys)
    log.info("list keys recorded", extra={"keys": len(keys)})
