"""control.broadcast_work: the monitor's due work, one row per broadcast whose list was uploaded.

A row holds the broadcast's next step (one ESP call) and when it is due. A monitor claims due rows
with ``FOR UPDATE SKIP LOCKED`` and gives each a *lease* (a fresh uuid and a time it runs out): the
ESP call is made outside any transaction, the lease is renewed while the step runs, and the step's
outcome is written only while the lease is still the same. A process killed mid-step stops renewing,
so its rows are claimable again once their leases run out.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the step names cross into the monitor's core, which imports no I/O library
    from shared.infra.db.core import Conn


class Step(StrEnum):
    """A broadcast's next step: each is one ESP call (or none)."""

    START_IMPORT = "start_import"
    """Start the ESP's import of the uploaded list (idempotent for the same job)."""
    IMPORT_STATUS = "import_status"
    """Ask how the import is going."""
    SEND = "send"
    """Due at the send time: claim the send ("send requested"), then the send call."""
    FIND_SEND = "find_send"
    """The send was claimed before: ask the ESP whether the send exists before any send call."""
    RESEND = "resend"
    """The ESP has no send of a claimed broadcast: the send call again."""
    SEND_STATUS = "send_status"
    """Ask how the send is going."""
    ENDED = "ended"
    """Nothing more to do (a cancel request may still be answered)."""


class CancelState(StrEnum):
    """Whether a cancel waits for the ESP's answer."""

    NONE = "none"
    REQUESTED = "requested"
    """A cancel came after the send was claimed: the ESP's cancel is the next step."""
    ANSWERED = "answered"


class Recorded(StrEnum):
    """What recording a broadcast's work found."""

    NEW = "new"
    """Recorded now: its first step is due."""
    KNOWN = "known"
    """Recorded before (a list delivered again): nothing changes."""
    CANCELLED = "cancelled"
    """The job is cancelled: no work is recorded for it."""
    UNKNOWN_JOB = "unknown_job"
    """control.jobs does not hold the job."""


@dataclass(frozen=True, slots=True)
class WorkItem:
    """A claimed row: the step to run, what the earlier steps found, the job."""

    job_id: str
    step: Step
    lease: uuid.UUID
    remote_path: str
    import_id: str | None
    send_id: str | None
    deadline: datetime | None
    polls: int
    attempts: int
    last_error: str
    cancel: CancelState
    job_json: str
    """The job as received (parsed by the step, so that one unreadable job fails alone)."""
    job_state: str
    """The job's state in control.jobs."""
    now: datetime
    """The database's time at the claim: every monitor's due times count from the same clock."""


@dataclass(frozen=True, slots=True)
class Next:
    """A step's outcome: the row's next step and when it is due (None: ended)."""

    step: Step
    due_at: datetime | None
    deadline: datetime | None
    import_id: str | None
    send_id: str | None
    polls: int = 0
    attempts: int = 0
    last_error: str = ""
    cancel_answered: bool = False


async def record(
    conn: Conn, job_id: str, remote_path: str, import_timeout_s: float, send_timeout_s: float
) -> Recorded:
    """Record a broadcast's work once, unless its job is cancelled; its first step is due now.

    A job that earlier monitors took further (an import id, a claimed send) resumes there.
    """
    row = await conn.fetchrow(
        """
        WITH job AS (
            SELECT job_id, state, esp_import_id, esp_send_id, send_requested_at
            FROM control.jobs WHERE job_id = $1 FOR SHARE
        ), added AS (
            INSERT INTO control.broadcast_work
                (job_id, remote_path, step, due_at, deadline, import_id, send_id)
            SELECT job_id, $2,
                   CASE WHEN esp_send_id IS NOT NULL THEN 'send_status'
                        WHEN send_requested_at IS NOT NULL THEN 'find_send'
                        WHEN esp_import_id IS NOT NULL THEN 'import_status'
                        ELSE 'start_import' END,
                   now(),
                   now() + make_interval(
                       secs => CASE WHEN send_requested_at IS NULL THEN $3::float8 ELSE $4::float8 END
                   ),
                   esp_import_id, esp_send_id
            FROM job WHERE state <> 'cancelled'
            ON CONFLICT (job_id) DO NOTHING
            RETURNING job_id
        )
        SELECT (SELECT state FROM job) AS state, EXISTS (SELECT 1 FROM added) AS added
        """,
        job_id,
        remote_path,
        import_timeout_s,
        send_timeout_s,
    )
    assert row is not None  # the SELECT without FROM always returns its row
    if row["state"] is None:
        return Recorded.UNKNOWN_JOB
    if row["added"]:
        return Recorded.NEW
    return Recorded.CANCELLED if row["state"] == "cancelled" else Recorded.KNOWN


async def claim_due(conn: Conn, owner: str, lease_s: float, limit: int) -> list[WorkItem]:
    """Claim up to ``limit`` due rows no live lease holds, for ``lease_s`` seconds, earliest first."""
    rows = await conn.fetch(
        """
        WITH due AS (
            SELECT job_id FROM control.broadcast_work
            WHERE due_at <= now() AND (claimed_until IS NULL OR claimed_until < now())
            ORDER BY due_at
            LIMIT $1
            FOR UPDATE SKIP LOCKED
        )
        UPDATE control.broadcast_work w
        SET lease = gen_random_uuid(), claimed_by = $2,
            claimed_until = now() + make_interval(secs => $3::float8)
        FROM due, control.jobs j
        WHERE w.job_id = due.job_id AND j.job_id = w.job_id
        RETURNING w.job_id, w.step, w.lease, w.remote_path, w.import_id, w.send_id, w.deadline, w.polls,
                  w.attempts, w.last_error, w.cancel, j.job, j.state AS job_state, now() AS now
        """,
        limit,
        owner,
        lease_s,
    )
    return [
        WorkItem(
            job_id=r["job_id"],
            step=Step(r["step"]),
            lease=r["lease"],
            remote_path=r["remote_path"],
            import_id=r["import_id"],
            send_id=r["send_id"],
            deadline=r["deadline"],
            polls=r["polls"],
            attempts=r["attempts"],
            last_error=r["last_error"],
            cancel=CancelState(r["cancel"]),
            job_json=r["job"],
            job_state=r["job_state"],
            now=r["now"],
        )
        for r in rows
    ]


async def renew(conn: Conn, leases: Sequence[uuid.UUID], lease_s: float) -> set[uuid.UUID]:
    """Extend leases still held; returns those (a lease another process took over is not)."""
    rows = await conn.fetch(
        """
        UPDATE control.broadcast_work SET claimed_until = now() + make_interval(secs => $2::float8)
        WHERE lease = ANY($1::uuid[]) RETURNING lease
        """,
        list(leases),
        lease_s,
    )
    return {r["lease"] for r in rows}


async def mark_step(conn: Conn, lease: uuid.UUID, step: Step) -> bool:
    """Write the step a leased row resumes at if its process dies now (before a send call: find
    the send first); False if the lease was lost."""
    done = await conn.fetchval(
        "UPDATE control.broadcast_work SET step = $2, updated_at = now() WHERE lease = $1 RETURNING true",
        lease,
        step.value,
    )
    return bool(done)


async def finish(conn: Conn, lease: uuid.UUID, after: Next) -> bool:
    """Write a step's outcome and release the lease; False if the lease was lost (a cancel ended
    the row, or another process took it over), in which case nothing is written.

    A cancel requested while the step ran makes the row due at once, also when it ended.
    """
    done = await conn.fetchval(
        """
        UPDATE control.broadcast_work
        SET step = $2, deadline = $4, import_id = $5, send_id = $6, polls = $7, attempts = $8,
            last_error = $9,
            cancel = CASE WHEN $10 THEN 'answered' ELSE cancel END,
            due_at = CASE WHEN cancel = 'requested' AND NOT $10 THEN now() ELSE $3 END,
            lease = NULL, claimed_until = NULL, updated_at = now()
        WHERE lease = $1
        RETURNING true
        """,
        lease,
        after.step.value,
        after.due_at,
        after.deadline,
        after.import_id,
        after.send_id,
        after.polls,
        after.attempts,
        after.last_error[:2000],
        after.cancel_answered,
    )
    return bool(done)


async def release(conn: Conn, leases: Sequence[uuid.UUID]) -> int:
    """Give leased rows back unchanged (a stopping process), claimable at once; how many."""
    rows = await conn.fetch(
        """
        UPDATE control.broadcast_work SET lease = NULL, claimed_until = NULL, updated_at = now()
        WHERE lease = ANY($1::uuid[]) RETURNING job_id
        """,
        list(leases),
    )
    return len(rows)


async def end_cancelled(conn: Conn, job_id: str) -> None:
    """End a cancelled job's work, whoever holds it: no step of it runs again."""
    await conn.execute(
        """
        UPDATE control.broadcast_work
        SET step = 'ended', due_at = NULL, lease = NULL, claimed_until = NULL, updated_at = now()
        WHERE job_id = $1
        """,
        job_id,
    )


async def request_cancel(conn: Conn, job_id: str) -> bool:
    """Make the ESP's cancel the row's next step, due now; False if the job has no work row."""
    done = await conn.fetchval(
        """
        UPDATE control.broadcast_work SET cancel = 'requested', due_at = now(), updated_at = now()
        WHERE job_id = $1 RETURNING true
        """,
        job_id,
    )
    return bool(done)
