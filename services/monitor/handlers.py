"""The monitor's handlers: an uploaded list records the broadcast's work; a cancel request cancels
it or asks the ESP; a claimed step of the work makes one ESP call and says what comes next.

Never sent twice: "send requested" is recorded in control.jobs before the send call, in the same
transaction that makes "find the send" the step a dead process's successor resumes at; a send
claimed before is looked up at the ESP before anything is sent. The claim and a cancel lock the
job's row, so one of them comes first: a cancel before the claim means nothing is ever sent.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import asyncpg

from services.monitor import core
from services.monitor.settings import Settings
from shared.esp import Connector, Connectors, ImportStatus, SendState, SendStatus
from shared.esp.base import CancelOutcome, CancelResult
from shared.esp.rest import EspUnavailableError
from shared.infra.db import broadcast_work, jobs
from shared.infra.db.broadcast_work import CancelState, Next, Recorded, Step, WorkItem
from shared.infra.db.jobs import CancelFound, SendClaim
from shared.infra.logs import log_context
from shared.infra.outages import unreachable_server
from shared.model.errors import PermanentError, is_transient
from shared.model.messages import (
    BroadcastJob,
    CancelRequest,
    ListUploaded,
    SendMode,
    Stage,
    State,
    decode,
)
from shared.runtime.failpoints import Point
from shared.runtime.runtime import Runtime
from shared.runtime.status import StatusReporter

log = logging.getLogger(__name__)


class ImportRejectedError(PermanentError):
    """The ESP refused the uploaded list."""


class StageTimeoutError(PermanentError):
    """An import or send did not finish within its configured time."""


class SendTimeMissedError(PermanentError):
    """The broadcast was ready too long after its send time to be sent."""


class LeaseLostError(Exception):
    """The step's row was ended by a cancel or taken over by another process: drop the step."""


@dataclass
class Monitor:
    """The monitor's per-process resources."""

    settings: Settings
    runtime: Runtime
    pool: asyncpg.Pool
    connectors: Connectors
    statuses: StatusReporter
    """Publishes the import and send statuses and records them in control.jobs."""
    due: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when this process made work due now, so its loop claims it without waiting."""


async def handle_list(body: bytes, monitor: Monitor) -> None:
    """One uploaded list: record its broadcast's work (once), unless the job is cancelled."""
    upload = decode(ListUploaded, body)
    settings = monitor.settings
    with log_context(job_id=upload.job_id):
        async with monitor.pool.acquire() as conn:
            recorded = await broadcast_work.record(
                conn, upload.job_id, upload.remote_path, settings.import_timeout_s, settings.send_timeout_s
            )
        if recorded is Recorded.UNKNOWN_JOB:
            raise PermanentError(f"job {upload.job_id} is not recorded in control.jobs")
        if recorded is Recorded.CANCELLED:
            log.info("the job is cancelled: its list is not imported")
        elif recorded is Recorded.KNOWN:
            log.info("the broadcast's work is recorded already: the list changes nothing")
        else:
            log.info("list recorded: its import is due", extra={"remote": upload.remote_path})
            monitor.due.set()


async def handle_cancel(body: bytes, monitor: Monitor) -> None:
    """One cancel request: before the send claim the job is cancelled and nothing is sent; after it
    the ESP's cancel becomes the broadcast's next step."""
    cancel = decode(CancelRequest, body)
    detail = core.cancel_detail(cancel)
    with log_context(job_id=cancel.job_id):
        async with monitor.pool.acquire() as conn, conn.transaction():
            decision = await jobs.request_cancel(conn, cancel, f"{detail}; nothing is sent")
            if decision.found is CancelFound.BEFORE_SEND:
                await broadcast_work.end_cancelled(conn, cancel.job_id)
            elif decision.found is CancelFound.SEND_CLAIMED:
                asked = await broadcast_work.request_cancel(conn, cancel.job_id)
        stage = Stage(decision.stage) if decision.stage else Stage.UPLOAD
        if decision.found is CancelFound.SEND_CLAIMED:
            if asked:
                log.info("cancel requested after the send was requested: asking the ESP")
                monitor.due.set()
            else:
                log.warning("cancel requested after the send, but the broadcast has no work to cancel")
            return
        log.info("cancel request", extra={"found": decision.found.value, "stage": stage.value})
        if decision.found is CancelFound.UNKNOWN_JOB:
            said = f"{detail} before the job arrived: it is refused when it comes"
        elif decision.found is CancelFound.ALREADY_CANCELLED:
            said = f"{detail}: the job was cancelled or ended before (nothing is sent)"
        else:
            said = f"{detail}; nothing is sent"
        await monitor.statuses.report(core.status(cancel.job_id, stage, State.CANCELLED, said))


@dataclass
class StepRun:
    """One claimed step of one broadcast: the row, its job, the ESP, the clock."""

    item: WorkItem
    monitor: Monitor
    started: float = field(default_factory=time.monotonic)
    send_called: bool = False
    """The send call was (or is being) made: a failure must be followed by "find send"."""

    @functools.cached_property
    def job(self) -> BroadcastJob:
        """The broadcast's job as received (one no longer valid fails its step)."""
        return decode(BroadcastJob, self.item.job_json.encode())

    @property
    def connector(self) -> Connector:
        """The connector of the job's account (an account no longer configured fails the step)."""
        return self.monitor.connectors.get(self.job.esp, self.job.account)

    def now(self) -> datetime:
        """The database's time at the claim, moved on by this process's clock."""
        return self.item.now + timedelta(seconds=time.monotonic() - self.started)

    def after(
        self,
        step: Step,
        delay_s: float = 0.0,
        *,
        at: datetime | None = None,
        deadline: datetime | None = None,
        import_id: str | None = None,
        send_id: str | None = None,
        polls: int = 0,
        attempts: int = 0,
        last_error: str = "",
        cancel_answered: bool = False,
    ) -> Next:
        """The row's next step, due after ``delay_s`` or at ``at``; the deadline and ids as they
        were unless given; the polls and errors of the step count from 0 unless given."""
        return Next(
            step=step,
            due_at=at or self.now() + timedelta(seconds=delay_s),
            deadline=deadline or self.item.deadline,
            import_id=import_id or self.item.import_id,
            send_id=send_id or self.item.send_id,
            polls=polls,
            attempts=attempts,
            last_error=last_error,
            cancel_answered=cancel_answered,
        )

    def poll_again(self) -> Next:
        """The same step after the next, longer wait."""
        s = self.monitor.settings
        return self.after(
            self.item.step,
            core.poll_delay(s.poll_initial_s, s.poll_max_s, self.item.polls),
            polls=self.item.polls + 1,
        )

    def ended(self, cancel_answered: bool = False) -> Next:
        """Nothing more to do."""
        done = self.after(Step.ENDED, cancel_answered=cancel_answered)
        return dataclasses.replace(done, due_at=None)

    async def report(self, stage: Stage, state: State, detail: str = "", **counts: int) -> None:
        """Publish a status of this broadcast and record it in control.jobs."""
        await self.monitor.statuses.report(core.status(self.item.job_id, stage, state, detail, **counts))

    # --- the steps ----------------------------------------------------------------------------------

    async def run(self) -> Next:
        """The step the row is at (the ESP's cancel first, when one waits)."""
        item = self.item
        if item.cancel is CancelState.REQUESTED:
            return await self.cancel()
        if item.step is Step.ENDED:
            return self.ended()
        if item.deadline is not None and self.now() > item.deadline:
            s = self.monitor.settings
            importing = core.stage_of(item.step) is Stage.IMPORT
            raise StageTimeoutError(
                core.timeout_detail(
                    item.step,
                    item.import_id if importing else item.send_id,
                    s.import_timeout_s if importing else s.send_timeout_s,
                    item.last_error,
                )
            )
        steps = {
            Step.START_IMPORT: self.start_import,
            Step.IMPORT_STATUS: self.import_status,
            Step.SEND: self.send,
            Step.FIND_SEND: self.find_send,
            Step.RESEND: self.resend,
            Step.SEND_STATUS: self.send_status,
        }
        return await steps[item.step]()

    async def start_import(self) -> Next:
        """Start the ESP's import; idempotent for the same job, so a lost answer is asked again."""
        imp = await self.connector.start_import(self.item.remote_path, self.job)
        async with self.monitor.pool.acquire() as conn:
            await jobs.set_import_id(conn, self.item.job_id, imp.import_id)
        await self.report(Stage.IMPORT, State.RUNNING, f"import {imp.import_id}")
        if imp.state in core.FINISHED_IMPORTS:
            return await self.imported(imp)
        s = self.monitor.settings
        return self.after(Step.IMPORT_STATUS, s.poll_initial_s, import_id=imp.import_id, polls=1)

    async def import_status(self) -> Next:
        """Ask how the import is going."""
        assert self.item.import_id is not None  # recorded with the step before
        imp = await self.connector.import_status(self.item.import_id)
        return await self.imported(imp) if imp.state in core.FINISHED_IMPORTS else self.poll_again()

    async def imported(self, imp: ImportStatus) -> Next:
        """The import ended: fail, end an upload_only job, or make the send due at its time."""
        rejected = core.import_failure(imp)
        if rejected is not None:
            raise ImportRejectedError(rejected)
        await self.report(Stage.IMPORT, State.DONE, core.import_detail(imp), **core.import_counts(imp))
        if self.job.mode is SendMode.UPLOAD_ONLY:
            await self.report(Stage.SEND, State.CANCELLED, "upload_only job: no send requested")
            return dataclasses.replace(self.ended(), import_id=imp.import_id)
        send_at = self.job.send_at
        now = self.now()
        due = now if send_at is None or send_at <= now else send_at
        if due > now:
            assert send_at is not None
            await self.report(Stage.SEND, State.QUEUED, core.waiting_detail(send_at))
        self.monitor.due.set()
        deadline = due + timedelta(seconds=self.monitor.settings.send_timeout_s)
        return self.after(Step.SEND, at=due, deadline=deadline, import_id=imp.import_id)

    async def send(self) -> Next:
        """The send time has come: claim the send, then call it (or look for it, if claimed before)."""
        self.refuse_if_late()
        async with self.monitor.pool.acquire() as conn, conn.transaction():
            claim = await jobs.claim_send(conn, self.item.job_id)
            if claim is SendClaim.CLAIMED and not await broadcast_work.mark_step(
                conn, self.item.lease, Step.FIND_SEND
            ):
                raise LeaseLostError  # rolls the claim back: whoever holds the row now sends
        if claim is SendClaim.CANCELLED:
            log.info("the job was cancelled before its send: nothing is sent")
            return self.ended()
        if claim is SendClaim.CLAIMED_BEFORE:
            return self.after(Step.FIND_SEND)
        return await self.sent(await self.call_send())

    async def find_send(self) -> Next:
        """Ask the ESP for the send of a broadcast claimed before; follow it, or send if it has none."""
        found = await self.connector.find_send(self.job)
        if found is None:
            return self.after(Step.RESEND)
        log.info("send already exists at the ESP, following it", extra={"send_id": found.send_id})
        return await self.sent(found)

    async def resend(self) -> Next:
        """The ESP has no send of this claimed broadcast: the send call, "find send" first if it dies."""
        self.refuse_if_late()
        async with self.monitor.pool.acquire() as conn:
            if not await broadcast_work.mark_step(conn, self.item.lease, Step.FIND_SEND):
                raise LeaseLostError
        return await self.sent(await self.call_send())

    def refuse_if_late(self) -> None:
        """Fail a broadcast whose send time passed more than the grace ago."""
        missed = core.send_time_missed(self.job.send_at, self.now(), self.monitor.settings.send_at_grace_s)
        if missed is not None:
            raise SendTimeMissedError(missed)

    async def call_send(self) -> SendStatus:
        """The send call, between the failpoints of the fault tests."""
        failpoints = self.monitor.runtime.failpoints
        await failpoints.reach(Point.MONITOR_BEFORE_SEND)
        assert self.item.import_id is not None  # the import ended before the send step
        self.send_called = True
        send = await self.connector.send(self.item.import_id, self.job)
        await failpoints.reach(Point.MONITOR_AFTER_SEND)
        return send

    async def sent(self, send: SendStatus) -> Next:
        """The ESP has the send: keep its id, report it, follow it."""
        async with self.monitor.pool.acquire() as conn:
            await jobs.set_send_id(conn, self.item.job_id, send.send_id)
        await self.report(Stage.SEND, State.RUNNING, core.send_detail(send), **core.send_counts(send))
        if send.state in core.FINISHED_SENDS:
            return dataclasses.replace(await self.send_ended(send), send_id=send.send_id)
        s = self.monitor.settings
        return self.after(Step.SEND_STATUS, s.poll_initial_s, send_id=send.send_id, polls=1)

    async def send_status(self) -> Next:
        """Ask how the send is going."""
        assert self.item.send_id is not None  # recorded with the step before
        send = await self.connector.send_status(self.item.send_id)
        return await self.send_ended(send) if send.state in core.FINISHED_SENDS else self.poll_again()

    async def send_ended(self, send: SendStatus) -> Next:
        """The send finished at the ESP: done or failed."""
        state = State.DONE if send.state is SendState.SENT else State.FAILED
        await self.report(Stage.SEND, state, core.send_detail(send), **core.send_counts(send))
        return self.ended()

    async def cancel(self) -> Next:
        """A cancel came after the send was claimed: ask the ESP to stop the send, report its answer.

        Without a send id yet (the send call's answer was lost), the ESP is asked for the send
        first; if it has none, none is made.
        """
        item = self.item
        if item.send_id is None:
            if item.step not in (Step.FIND_SEND, Step.RESEND):
                await self.report(Stage.SEND, self.state_now(), "cancel request: there is no send to cancel")
                return self.resume(cancel_answered=True)
            found = await self.connector.find_send(self.job)
            if found is None:
                await self.report(
                    Stage.SEND, State.CANCELLED, "cancelled: the ESP has no send of it; none is made"
                )
                return self.ended(cancel_answered=True)
            async with self.monitor.pool.acquire() as conn:
                await jobs.set_send_id(conn, item.job_id, found.send_id)
            item = dataclasses.replace(item, send_id=found.send_id, step=Step.SEND_STATUS)
            self.item = item
        assert item.send_id is not None
        try:
            result = await self.connector.cancel_send(item.send_id, self.job)
        except PermanentError as exc:
            result = CancelResult(CancelOutcome.NOT_SUPPORTED, f"the ESP refused the cancel: {exc}")
        answer = core.cancel_answer(result, item.send_id)
        log.info(
            "the ESP answered the cancel",
            extra={"outcome": result.outcome.value, "detail": result.detail[:500]},
        )
        if result.outcome is CancelOutcome.CANCELLED:
            await self.report(Stage.SEND, State.CANCELLED, answer)
            return self.ended(cancel_answered=True)
        await self.report(Stage.SEND, self.state_now(), answer)
        return self.resume(cancel_answered=True)  # the send goes on (or went out): follow it as before

    def resume(self, cancel_answered: bool) -> Next:
        """The row's step as it was, due now (or still ended)."""
        if self.item.step is Step.ENDED:
            return self.ended(cancel_answered)
        return self.after(self.item.step, polls=self.item.polls, cancel_answered=cancel_answered)

    def state_now(self) -> State:
        """The job's state for a status that changes nothing: its recorded one once the work ended."""
        return State(self.item.job_state) if self.item.step is Step.ENDED else State.RUNNING

    # --- failures -----------------------------------------------------------------------------------

    async def failed(self, exc: Exception) -> Next | None:
        """A step that raised: try it again after a wait if the failure is transient (a send call's
        failure is followed by "find send"), else fail the stage; None when the row is not ours."""
        if isinstance(exc, LeaseLostError):
            log.info("the step's broadcast was cancelled or taken over meanwhile: its outcome is dropped")
            return None
        item = self.item
        if unreachable_server(exc) is not None or is_transient(exc):
            return self.retry(exc)
        if isinstance(exc, PermanentError):
            log.error(
                f"{item.step} failed", extra={"error_class": type(exc).__name__, "error": str(exc)[:2000]}
            )
        else:
            log.exception(f"{item.step} failed unexpectedly")
        try:
            await self.report(core.stage_of(item.step), State.FAILED, str(exc) or type(exc).__name__)
        except Exception as unreported:
            return self.retry(unreported)  # the failure is said once Kafka and PostgreSQL take it
        return self.ended(cancel_answered=item.cancel is CancelState.REQUESTED)

    def retry(self, exc: Exception) -> Next:
        """The step again after a growing wait, at least the ESP's Retry-After; a failed send call
        is followed by "find send"."""
        item = self.item
        s = self.monitor.settings
        retry_after = exc.retry_after_s if isinstance(exc, EspUnavailableError) else None
        delay = core.retry_delay(s.poll_initial_s, s.poll_max_s, item.attempts, retry_after)
        log.warning(
            f"{item.step} failed, trying again",
            extra={
                "error": str(exc)[:500],
                "error_class": type(exc).__name__,
                "retry_in_s": round(delay, 2),
                "attempt": item.attempts + 1,
            },
        )
        return self.after(
            Step.FIND_SEND if self.send_called else item.step,
            delay,
            polls=item.polls,
            attempts=item.attempts + 1,
            last_error=str(exc)[:500] or type(exc).__name__,
        )
