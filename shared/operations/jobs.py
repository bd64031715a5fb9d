"""Broadcast jobs from the outside: building one from a document, publishing it, cancelling it,
following it, and the run history (control.jobs, job_history and the response funnel).

Used by the CLI (``espbridge job …``), the demo and the tests; services never need these.
"""

from __future__ import annotations

import getpass
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from faststream.kafka import KafkaBroker
from pydantic import ValidationError

from shared.infra.db import connect, jobs, responses
from shared.infra.db.jobs import JobFilters, JobSummary
from shared.infra.kafka import ensure_topics, publish, read_topic
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.errors import InvalidMessageError
from shared.model.messages import (
    BroadcastJob,
    BroadcastStatus,
    CancelRequest,
    Message,
    SendMode,
    Stage,
    State,
)
from shared.model.topics import Topic


def new_job_id() -> str:
    """A readable unique job id: ``job-20261122-093000-1a2b3c``."""
    return f"job-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def job_fields(document: dict[str, Any]) -> dict[str, Any]:
    """A job document's fields with job_id, created_at and requested_by filled in if absent."""
    data = dict(document)
    data.setdefault("job_id", new_job_id())
    data.setdefault("created_at", datetime.now(UTC).isoformat())
    data.setdefault("requested_by", getpass.getuser())
    return data


def build_job(document: dict[str, Any]) -> BroadcastJob:
    """A job from a YAML/JSON document, filling job_id, created_at and requested_by if absent."""
    try:
        return BroadcastJob.model_validate(job_fields(document))
    except ValidationError as exc:
        raise InvalidMessageError(f"the job is not valid:\n{validation_problems(exc, '(job)')}") from None


def build_cancel(job_id: str, reason: str = "", requested_by: str | None = None) -> CancelRequest:
    """A request to cancel a job, made now, by ``requested_by`` (default: the user running this)."""
    try:
        return CancelRequest(
            job_id=job_id,
            reason=reason,
            requested_at=datetime.now(UTC),
            requested_by=getpass.getuser() if requested_by is None else requested_by,
        )
    except ValidationError as exc:
        raise InvalidMessageError(
            f"the cancel request is not valid:\n{validation_problems(exc, '(request)')}"
        ) from None


def validation_problems(exc: ValidationError, whole: str) -> str:
    """One indented line per problem: where (``whole`` for the message itself) and what."""
    return "\n".join(f"  {'.'.join(str(p) for p in e['loc']) or whole}: {e['msg']}" for e in exc.errors())


async def publish_message(kafka: KafkaSettings, message: Message) -> None:
    """Publish one message to its topic (creating the topics if needed)."""
    await ensure_topics(kafka)
    broker = KafkaBroker(kafka.bootstrap_servers, client_id=f"{kafka.client_id}-cli")
    await broker.start()
    try:
        await publish(broker, kafka, message)
    finally:
        await broker.stop()


async def publish_job(kafka: KafkaSettings, job: BroadcastJob) -> None:
    """Publish a job to broadcast.jobs.v1 (creating the topics if needed)."""
    await publish_message(kafka, job)


async def publish_cancel(kafka: KafkaSettings, request: CancelRequest) -> None:
    """Publish a cancel request to broadcast.cancels.v1, keyed by its job (creating the topics if
    needed). The monitor acts on it and reports the outcome on broadcast.status.v1."""
    await publish_message(kafka, request)


async def read_statuses(kafka: KafkaSettings, job_id: str) -> list[BroadcastStatus]:
    """Every status of a job on broadcast.status.v1 written before the call, oldest first."""
    records = await read_topic(kafka, Topic.BROADCAST_STATUS, key=job_id.encode())
    return sorted((BroadcastStatus.from_json(r.value) for r in records if r.value), key=lambda s: s.at)


async def funnel(pg: PostgresSettings, broadcast_id: str) -> dict[str, int] | None:
    """A broadcast's response funnel (None if nothing is loaded)."""
    conn = await connect(pg)
    try:
        return await responses.funnel(conn, broadcast_id)
    finally:
        await conn.close()


@dataclass(frozen=True, slots=True)
class JobView:
    """A job as ``espbridge job status`` shows it, all from the database: its row in control.jobs,
    the statuses recorded in control.job_history, and its response funnel."""

    summary: JobSummary
    history: list[BroadcastStatus]
    funnel: dict[str, int] | None

    @property
    def ended(self) -> bool:
        """Whether the broadcast is over: sent (imported, for an upload_only job), failed or cancelled.

        Responses may keep coming in for days after; they show in its funnel, not in its state.
        """
        s = self.summary
        last = Stage.IMPORT if s.mode == SendMode.UPLOAD_ONLY else Stage.SEND
        return s.state in (State.FAILED, State.CANCELLED) or (s.stage, s.state) == (last, State.DONE)

    @property
    def succeeded(self) -> bool:
        """Whether it did what it was for: sent, or for an upload_only job imported (its send stage is
        then marked cancelled: there is none)."""
        s = self.summary
        if s.mode == SendMode.UPLOAD_ONLY:
            imported = any((h.stage, h.state) == (Stage.IMPORT, State.DONE) for h in self.history)
            return imported and s.state != State.FAILED
        return (s.stage, s.state) == (Stage.SEND, State.DONE)

    @property
    def outcome(self) -> str:
        """How it ended, in words (for a broadcast that :attr:`ended`)."""
        s = self.summary
        if self.succeeded:
            return "sent" if s.mode != SendMode.UPLOAD_ONLY else "imported (an upload_only job is not sent)"
        return f"{s.state} at {s.stage}" + (f": {s.detail}" if s.detail else "")

    @property
    def recipients(self) -> int | None:
        """The recipients its list file held, once uploaded."""
        done = [h for h in self.history if (h.stage, h.state) == (Stage.UPLOAD, State.DONE)]
        return done[-1].counts.get("rows") if done else None


async def view_job(pg: PostgresSettings, job_id: str) -> JobView | None:
    """The job's row, history and funnel, read in one go; None for a job the uploader never took."""
    conn = await connect(pg)
    try:
        async with conn.transaction(readonly=True, isolation="repeatable_read"):  # one snapshot
            summary = await jobs.job_summary(conn, job_id)
            if summary is None:
                return None
            return JobView(
                summary, await jobs.job_history(conn, job_id), await responses.funnel(conn, job_id)
            )
    finally:
        await conn.close()


async def list_jobs(pg: PostgresSettings, filters: JobFilters, limit: int = 50) -> list[JobSummary]:
    """The run history: the newest jobs first, those that match the filters."""
    conn = await connect(pg)
    try:
        return await jobs.list_jobs(conn, filters, limit)
    finally:
        await conn.close()
