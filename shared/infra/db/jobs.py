"""control.jobs and control.job_history: each broadcast job, its latest state, its history, and the
ESP ids the monitor needs to resume and the gatherer to pull responses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from shared.model.messages import BroadcastJob, BroadcastStatus, CancelRequest, Stage, State

if TYPE_CHECKING:  # SentBroadcast crosses the connector interface, which imports no I/O library
    import asyncpg

    from shared.infra.db.core import Conn


@dataclass(frozen=True, slots=True)
class JobRow:
    """What control.jobs knows about a job."""

    job_id: str
    stage: str
    state: str
    remote_path: str | None
    esp_import_id: str | None
    send_requested_at: datetime | None
    esp_send_id: str | None


async def _lock_job_id(conn: Conn, job_id: str) -> None:
    """Serialize, until the transaction ends, the recording of a job and of a cancel for its id
    (a cancel may come before the job: neither may miss the other)."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext('control.jobs'), hashtext($1))", job_id)


async def upsert_job(conn: Conn, job: BroadcastJob) -> bool:
    """Record a job (once); True if it was new. A job whose cancel came first is recorded cancelled."""
    async with conn.transaction():
        await _lock_job_id(conn, job.job_id)
        inserted = await conn.fetchval(
            """
            INSERT INTO control.jobs (job_id, esp, account, job, stage, state, detail, created_at)
            SELECT $1, $2, $3, $4::jsonb, 'upload',
                   CASE WHEN c.job_id IS NULL THEN 'queued' ELSE 'cancelled' END,
                   CASE WHEN c.job_id IS NULL THEN '' ELSE 'cancelled before the job arrived' END, $5
            FROM (SELECT 1) AS one LEFT JOIN control.job_cancels c ON c.job_id = $1
            ON CONFLICT (job_id) DO NOTHING
            RETURNING true
            """,
            job.job_id,
            job.esp,
            job.account,
            job.to_json().decode(),
            job.created_at,
        )
    return bool(inserted)


async def upload_done(conn: Conn, job_id: str) -> bool:
    """Whether the job's list was uploaded and announced before (its upload reached ``done``)."""
    done = await conn.fetchval(
        """
        SELECT EXISTS (
            SELECT 1 FROM control.job_history WHERE job_id = $1 AND stage = 'upload' AND state = 'done'
        )
        """,
        job_id,
    )
    return bool(done)


async def record_status(conn: Conn, status: BroadcastStatus) -> None:
    """Keep a job's latest state and its history (unknown jobs are ignored).

    ``cancelled`` is final: a later status of a cancelled job (a step that was already under way)
    goes into its history but does not move its state.
    """
    await conn.execute(
        """
        WITH job AS (
            SELECT job_id, state FROM control.jobs WHERE job_id = $1 FOR UPDATE
        ), moved AS (
            UPDATE control.jobs j
            SET stage = $2, state = $3, detail = $4, counts = $5::jsonb, updated_at = $6
            FROM job WHERE j.job_id = job.job_id AND (job.state <> 'cancelled' OR $3 = 'cancelled')
        )
        INSERT INTO control.job_history (job_id, stage, state, detail, counts, service, at)
        SELECT job.job_id, $2, $3, $4, $5::jsonb, $7, $6 FROM job
        """,
        status.job_id,
        status.stage.value,
        status.state.value,
        status.detail,
        orjson.dumps(status.counts).decode(),
        status.at,
        status.service,
    )


async def get_job(conn: Conn, job_id: str) -> JobRow | None:
    """The job's row, if recorded."""
    row = await conn.fetchrow(
        """
        SELECT job_id, stage, state, remote_path, esp_import_id, send_requested_at, esp_send_id
        FROM control.jobs WHERE job_id = $1
        """,
        job_id,
    )
    return JobRow(**dict(row)) if row else None


async def set_remote_path(conn: Conn, job_id: str, remote_path: str) -> None:
    """Where the job's list file is on the ESP's SFTP site."""
    await conn.execute("UPDATE control.jobs SET remote_path = $2 WHERE job_id = $1", job_id, remote_path)


async def set_import_id(conn: Conn, job_id: str, import_id: str) -> None:
    """The ESP's id for the job's list import."""
    await conn.execute("UPDATE control.jobs SET esp_import_id = $2 WHERE job_id = $1", job_id, import_id)


class SendClaim(StrEnum):
    """What claiming a job's send found."""

    CLAIMED = "claimed"
    """"Send requested" is recorded now: the caller makes the send call."""
    CLAIMED_BEFORE = "claimed_before"
    """It was recorded before, so an earlier attempt may have reached the ESP: ask the ESP first."""
    CANCELLED = "cancelled"
    """The job was cancelled before its send was claimed: nothing may be sent."""


async def claim_send(conn: Conn, job_id: str) -> SendClaim:
    """Record "send requested" before the send call, unless it was recorded before or the job was
    cancelled. The claim and :func:`request_cancel` lock the job's row, so exactly one comes first."""
    claimed = await conn.fetchval(
        """
        UPDATE control.jobs SET send_requested_at = now()
        WHERE job_id = $1 AND send_requested_at IS NULL AND state <> 'cancelled' RETURNING true
        """,
        job_id,
    )
    if claimed:
        return SendClaim.CLAIMED
    # A new statement, a new snapshot: it sees whichever claim or cancel made the update pass.
    before = await conn.fetchval(
        "SELECT send_requested_at IS NOT NULL FROM control.jobs WHERE job_id = $1", job_id
    )
    return SendClaim.CLAIMED_BEFORE if before else SendClaim.CANCELLED


class CancelFound(StrEnum):
    """Where a cancel request found its job."""

    UNKNOWN_JOB = "unknown_job"
    """Not received yet: the cancel is recorded and the job is refused when it arrives."""
    BEFORE_SEND = "before_send"
    """Its send was not claimed: the job is cancelled now and nothing will be sent."""
    ALREADY_CANCELLED = "already_cancelled"
    """Cancelled before (or an upload_only job whose import ended): nothing to do."""
    SEND_CLAIMED = "send_claimed"
    """Its send was requested from the ESP: only the ESP's cancel can stop it."""


@dataclass(frozen=True, slots=True)
class CancelDecision:
    """What :func:`request_cancel` decided, and the job's stage when the cancel came."""

    found: CancelFound
    stage: str | None


async def request_cancel(conn: Conn, cancel: CancelRequest, detail: str) -> CancelDecision:
    """Record a cancel request and cancel the job if its send is not claimed yet (``detail`` is then
    its state's detail). Exclusive with :func:`claim_send`: whichever locks the job's row first wins."""
    async with conn.transaction():
        await _lock_job_id(conn, cancel.job_id)
        await conn.execute(
            """
            INSERT INTO control.job_cancels (job_id, reason, requested_by, requested_at)
            VALUES ($1, $2, $3, $4) ON CONFLICT (job_id) DO NOTHING
            """,
            cancel.job_id,
            cancel.reason,
            cancel.requested_by,
            cancel.requested_at,
        )
        row = await conn.fetchrow(
            "SELECT stage, state, send_requested_at FROM control.jobs WHERE job_id = $1 FOR UPDATE",
            cancel.job_id,
        )
        if row is None:
            return CancelDecision(CancelFound.UNKNOWN_JOB, None)
        if row["send_requested_at"] is not None:
            return CancelDecision(CancelFound.SEND_CLAIMED, row["stage"])
        if row["state"] == "cancelled":
            return CancelDecision(CancelFound.ALREADY_CANCELLED, row["stage"])
        await conn.execute(
            "UPDATE control.jobs SET state = 'cancelled', detail = $2, updated_at = now() WHERE job_id = $1",
            cancel.job_id,
            detail,
        )
        return CancelDecision(CancelFound.BEFORE_SEND, row["stage"])


async def cancel_requested(conn: Conn, job_id: str) -> bool:
    """Whether a cancel was requested for the job (also before it arrived)."""
    return bool(
        await conn.fetchval("SELECT EXISTS (SELECT 1 FROM control.job_cancels WHERE job_id = $1)", job_id)
    )


async def set_send_id(conn: Conn, job_id: str, send_id: str) -> None:
    """The ESP's id for the job's send."""
    await conn.execute("UPDATE control.jobs SET esp_send_id = $2 WHERE job_id = $1", job_id, send_id)


async def job_of(conn: Conn, job_id: str) -> BroadcastJob | None:
    """The job as it was received, if recorded."""
    document = await conn.fetchval("SELECT job FROM control.jobs WHERE job_id = $1", job_id)
    return None if document is None else BroadcastJob.from_json(document)


async def known_job_ids(conn: Conn, job_ids: Sequence[str]) -> set[str]:
    """Those of ``job_ids`` that are recorded jobs."""
    rows = await conn.fetch("SELECT job_id FROM control.jobs WHERE job_id = ANY($1)", list(job_ids))
    return {r["job_id"] for r in rows}


@dataclass(frozen=True, slots=True)
class SentBroadcast:
    """A broadcast the ESP has sent, as control.jobs knows it (what an API pull asks the ESP about)."""

    job_id: str
    message: str
    import_id: str | None
    send_id: str | None
    requested_at: datetime | None


async def sent_broadcasts(conn: Conn, esp: str, account: str, window_days: float) -> list[SentBroadcast]:
    """The account's broadcasts with a send at the ESP, requested within the last ``window_days``,
    oldest first."""
    rows = await conn.fetch(
        """
        SELECT job_id, job->>'message' AS message, esp_import_id AS import_id, esp_send_id AS send_id,
               send_requested_at AS requested_at
        FROM control.jobs
        WHERE esp = $1 AND account = $2 AND esp_send_id IS NOT NULL
          AND send_requested_at > now() - make_interval(days => $3::int)
        ORDER BY send_requested_at
        """,
        esp,
        account,
        int(window_days),
    )
    return [SentBroadcast(**dict(row)) for row in rows]


# --- the run history: jobs listed and shown (espbridge job list, job status) --------------------------


@dataclass(frozen=True, slots=True)
class JobSummary:
    """A job as the run history shows it: what it sends, where it is now, and when."""

    job_id: str
    esp: str
    account: str
    list_name: str
    message: str
    mode: str
    send_at: datetime | None
    requested_by: str
    stage: str
    state: str
    detail: str
    counts: dict[str, int]
    created_at: datetime
    updated_at: datetime
    send_requested_at: datetime | None
    esp_import_id: str | None
    esp_send_id: str | None
    cancel_requested_at: datetime | None
    """When a cancel of the job was requested (control.job_cancels), if one was."""
    cancel_requested_by: str | None
    cancel_reason: str | None


_SUMMARY = """
    SELECT j.job_id, j.esp, j.account, j.job->>'list_name' AS list_name, j.job->>'message' AS message,
           coalesce(j.job->>'mode', 'upload_and_send') AS mode, (j.job->>'send_at')::timestamptz AS send_at,
           j.job->>'requested_by' AS requested_by, j.stage, j.state, j.detail, j.counts::text AS counts,
           j.created_at, j.updated_at, j.send_requested_at, j.esp_import_id, j.esp_send_id,
           c.requested_at AS cancel_requested_at, c.requested_by AS cancel_requested_by,
           c.reason AS cancel_reason
    FROM control.jobs j LEFT JOIN control.job_cancels c ON c.job_id = j.job_id
"""


def _summary(row: asyncpg.Record) -> JobSummary:
    fields: dict[str, Any] = dict(row)
    return JobSummary(**{**fields, "counts": orjson.loads(fields["counts"])})


@dataclass(frozen=True, slots=True)
class JobFilters:
    """Which jobs :func:`list_jobs` lists: those that match every filter given (None: any)."""

    state: str | None = None
    stage: str | None = None
    esp: str | None = None
    account: str | None = None
    since: datetime | None = None
    """Created at or after this time."""


async def list_jobs(conn: Conn, filters: JobFilters, limit: int = 50) -> list[JobSummary]:
    """The newest jobs first, those that match the filters."""
    rows = await conn.fetch(
        _SUMMARY
        + """
        WHERE ($1::text IS NULL OR j.state = $1) AND ($2::text IS NULL OR j.stage = $2)
          AND ($3::text IS NULL OR j.esp = $3) AND ($4::text IS NULL OR j.account = $4)
          AND ($5::timestamptz IS NULL OR j.created_at >= $5)
        ORDER BY j.created_at DESC, j.job_id DESC
        LIMIT $6
        """,
        filters.state,
        filters.stage,
        filters.esp,
        filters.account,
        filters.since,
        limit,
    )
    return [_summary(r) for r in rows]


async def job_summary(conn: Conn, job_id: str) -> JobSummary | None:
    """One job as the run history shows it, if recorded."""
    row = await conn.fetchrow(_SUMMARY + " WHERE j.job_id = $1", job_id)
    return None if row is None else _summary(row)


async def job_history(conn: Conn, job_id: str) -> list[BroadcastStatus]:
    """Every status recorded for a job (upload, import, send), oldest first."""
    rows = await conn.fetch(
        """
        SELECT stage, state, detail, counts::text AS counts, service, at
        FROM control.job_history WHERE job_id = $1 ORDER BY at, seq
        """,
        job_id,
    )
    return [
        BroadcastStatus(
            job_id=job_id,
            stage=Stage(r["stage"]),
            state=State(r["state"]),
            detail=r["detail"],
            counts=orjson.loads(r["counts"]),
            service=r["service"],
            at=r["at"],
        )
        for r in rows
    ]
