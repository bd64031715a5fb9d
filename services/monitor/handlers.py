"""The monitor's handler: import → (send) → follow, never sending one broadcast twice.

"Send requested" is recorded in control.jobs before the send call. If it was recorded before
(a restart, a redelivery), the ESP is asked whether the send exists before anything is sent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import asyncpg

from services.monitor import core
from services.monitor.settings import Settings
from shared.esp import (
    Connector,
    Connectors,
    ImportState,
    SendState,
    SendStatus,
)
from shared.esp.rest import EspUnavailableError
from shared.infra.db import jobs
from shared.infra.logs import log_context
from shared.model.errors import PermanentError, TransientError
from shared.model.messages import BroadcastJob, ListUploaded, SendMode, Stage, State, decode
from shared.runtime.failpoints import Point
from shared.runtime.runtime import Runtime
from shared.runtime.status import StatusReporter

log = logging.getLogger(__name__)

T = TypeVar("T")


class ImportRejectedError(PermanentError):
    """The ESP refused the uploaded list."""


class StageTimeoutError(PermanentError):
    """An import or send did not finish within its configured time."""


@dataclass
class Monitor:
    """The monitor's per-process resources."""

    settings: Settings
    runtime: Runtime
    pool: asyncpg.Pool
    connectors: Connectors
    statuses: StatusReporter
    """Publishes the import and send statuses and records them in control.jobs."""

    async def wait(self, delay: float, retry_after: float | None = None) -> None:
        """Wait before the next poll (or as long as the ESP asked with Retry-After)."""
        await self.runtime.sleep(max(delay, retry_after or 0.0))  # raises StoppingError at SIGTERM


async def handle_list(body: bytes, monitor: Monitor) -> None:
    """One uploaded list: drive its import and send to the end."""
    upload = decode(ListUploaded, body)
    with log_context(job_id=upload.job_id):
        async with monitor.pool.acquire() as conn:
            job = await jobs.job_of(conn, upload.job_id)
        if job is None:
            raise PermanentError(f"job {upload.job_id} is not recorded in control.jobs")
        connector = monitor.connectors.get(upload.esp, upload.account)
        stage = Stage.IMPORT
        try:
            import_id = await run_import(upload, job, connector, monitor)
            stage = Stage.SEND
            if job.mode is SendMode.UPLOAD_ONLY:
                await monitor.statuses.report(
                    core.status(job.job_id, stage, State.CANCELLED, "upload_only job: no send requested")
                )
                return
            await run_send(job, import_id, connector, monitor)
        except PermanentError as exc:
            await monitor.statuses.report(core.status(job.job_id, stage, State.FAILED, str(exc)))
            raise


async def run_import(upload: ListUploaded, job: BroadcastJob, connector: Connector, monitor: Monitor) -> str:
    """Start (or resume) the ESP's import of the list and wait for it; returns the import id."""
    async with monitor.pool.acquire() as conn:
        known = await jobs.get_job(conn, job.job_id)
    deadline = time.monotonic() + monitor.settings.import_timeout_s
    if known is not None and known.esp_import_id:
        import_id = known.esp_import_id
        imp = await ask(monitor, "import status", lambda: connector.import_status(import_id), deadline)
    else:
        # Starting is idempotent for the same job, so a lost answer is asked for again in place.
        imp = await ask(
            monitor, "import start", lambda: connector.start_import(upload.remote_path, job), deadline
        )
        async with monitor.pool.acquire() as conn:
            await jobs.set_import_id(conn, job.job_id, imp.import_id)
    await monitor.statuses.report(
        core.status(job.job_id, Stage.IMPORT, State.RUNNING, f"import {imp.import_id}")
    )
    delays = core.backoff(monitor.settings.poll_initial_s, monitor.settings.poll_max_s)
    while imp.state not in (ImportState.DONE, ImportState.FAILED):
        if time.monotonic() > deadline:
            raise StageTimeoutError(
                f"import {imp.import_id} not done after {monitor.settings.import_timeout_s:.0f}s"
            )
        retry_after = None
        try:
            await monitor.wait(next(delays))
            imp = await connector.import_status(imp.import_id)
        except EspUnavailableError as exc:
            retry_after = exc.retry_after_s
            log.warning("import status unavailable, polling again", extra={"error": str(exc)})
            await monitor.wait(0, retry_after)
    rejected = core.import_failure(imp)
    if rejected is not None:
        raise ImportRejectedError(rejected)
    await monitor.statuses.report(
        core.status(job.job_id, Stage.IMPORT, State.DONE, core.import_detail(imp), **core.import_counts(imp))
    )
    return imp.import_id


async def run_send(job: BroadcastJob, import_id: str, connector: Connector, monitor: Monitor) -> None:
    """Send once, then follow the send to its end."""
    async with monitor.pool.acquire() as conn:
        first_request = await jobs.claim_send(conn, job.job_id)
    deadline = time.monotonic() + monitor.settings.import_timeout_s
    existing = (
        None if first_request else await ask(monitor, "find send", lambda: connector.find_send(job), deadline)
    )
    if existing is not None:
        send = existing
        log.info("send already exists at the ESP, following it", extra={"send_id": send.send_id})
    else:
        send = await _send_with_retries(job, import_id, connector, monitor)
    async with monitor.pool.acquire() as conn:
        await jobs.set_send_id(conn, job.job_id, send.send_id)
    await monitor.statuses.report(
        core.status(
            job.job_id,
            Stage.SEND,
            State.RUNNING,
            f"send {send.send_id} {send.state}",
            **core.send_counts(send),
        )
    )
    deadline = time.monotonic() + monitor.settings.send_timeout_s
    delays = core.backoff(monitor.settings.poll_initial_s, monitor.settings.poll_max_s)
    while send.state not in (SendState.SENT, SendState.FAILED):
        if time.monotonic() > deadline:
            raise StageTimeoutError(
                f"send {send.send_id} not finished after {monitor.settings.send_timeout_s:.0f}s"
            )
        try:
            await monitor.wait(next(delays))
            send = await connector.send_status(send.send_id)
        except EspUnavailableError as exc:
            log.warning("send status unavailable, polling again", extra={"error": str(exc)})
            await monitor.wait(0, exc.retry_after_s)
    state = State.DONE if send.state is SendState.SENT else State.FAILED
    await monitor.statuses.report(
        core.status(
            job.job_id, Stage.SEND, state, f"send {send.send_id} {send.state}", **core.send_counts(send)
        )
    )


async def _send_with_retries(
    job: BroadcastJob, import_id: str, connector: Connector, monitor: Monitor
) -> SendStatus:
    """POST the send; when its answer is lost, ask the ESP before trying again."""
    delays = core.backoff(monitor.settings.poll_initial_s, monitor.settings.poll_max_s)
    deadline = time.monotonic() + monitor.settings.import_timeout_s
    while True:
        try:
            await monitor.runtime.failpoints.reach(Point.MONITOR_BEFORE_SEND)
            send = await connector.send(import_id, job)
            await monitor.runtime.failpoints.reach(Point.MONITOR_AFTER_SEND)
            return send
        except TransientError as exc:
            if time.monotonic() > deadline:
                raise
            log.warning("send call failed, checking the ESP before retrying", extra={"error": str(exc)})
            retry_after = exc.retry_after_s if isinstance(exc, EspUnavailableError) else None
            await monitor.wait(next(delays), retry_after)
            found = await ask(monitor, "find send", lambda: connector.find_send(job), deadline)
            if found is not None:
                return found


async def ask(monitor: Monitor, what: str, call: Callable[[], Awaitable[T]], deadline: float) -> T:
    """A call that is safe to repeat (a read, an idempotent start), made until the ESP answers.

    A transient failure is logged and the call made again after a growing wait, at least as long
    as the ESP's Retry-After; after ``deadline`` the failure is raised (the message is retried).
    """
    delays = core.backoff(monitor.settings.poll_initial_s, monitor.settings.poll_max_s)
    while True:
        try:
            return await call()
        except TransientError as exc:
            if time.monotonic() > deadline:
                raise
            retry_after = exc.retry_after_s if isinstance(exc, EspUnavailableError) else None
            log.warning(
                f"{what} failed, asking the ESP again",
                extra={"error": str(exc), "error_class": type(exc).__name__, "retry_after_s": retry_after},
            )
            await monitor.wait(next(delays), retry_after)
