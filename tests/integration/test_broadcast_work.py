"""The broadcast lifecycle's SQL against a real PostgreSQL: work recorded once, due rows claimed by
one process at a time under a lease, leases that run out, and the send claim and a cancel that
exclude each other; ``cancelled`` is final."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg

from shared.infra.db import broadcast_work, connect, jobs
from shared.infra.db.broadcast_work import CancelState, Next, Recorded, Step
from shared.infra.db.jobs import CancelFound, SendClaim
from shared.infra.settings import PostgresSettings
from shared.model.messages import BroadcastJob, BroadcastStatus, CancelRequest, Stage, State
from shared.operations.jobs import build_job
from tests.fixtures.waits import wait_for
from tools.demo import demo_job

HOUR = 3600.0


async def a_job(conn: asyncpg.Connection, job_id: str) -> None:
    await jobs.upsert_job(conn, build_job({**demo_job(job_id, "sandbox", "demo"), "requested_by": "test"}))


def cancel_of(job_id: str) -> CancelRequest:
    return CancelRequest(
        job_id=job_id, reason="wrong list", requested_at=datetime.now(UTC), requested_by="ana"
    )


async def work_row(conn: asyncpg.Connection, job_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow("SELECT * FROM control.broadcast_work WHERE job_id = $1", job_id)


async def test_a_list_records_its_work_once_and_none_for_an_unknown_or_cancelled_job(
    db: asyncpg.Connection,
) -> None:
    assert await broadcast_work.record(db, "nobody", "drop/x.csv", HOUR, HOUR) is Recorded.UNKNOWN_JOB
    await a_job(db, "j-1")
    assert await broadcast_work.record(db, "j-1", "demo/drop/j-1.csv", HOUR, HOUR) is Recorded.NEW
    assert await broadcast_work.record(db, "j-1", "demo/drop/j-1.csv", HOUR, HOUR) is Recorded.KNOWN
    row = await work_row(db, "j-1")
    assert row is not None
    assert (row["step"], row["remote_path"], row["cancel"]) == ("start_import", "demo/drop/j-1.csv", "none")
    assert row["deadline"] - row["due_at"] == timedelta(hours=1)

    await a_job(db, "j-2")
    assert (await jobs.request_cancel(db, cancel_of("j-2"), "cancelled")).found is CancelFound.BEFORE_SEND
    assert await broadcast_work.record(db, "j-2", "demo/drop/j-2.csv", HOUR, HOUR) is Recorded.CANCELLED
    assert await work_row(db, "j-2") is None, "a late list does not resurrect a cancelled job"


async def test_a_job_taken_further_by_earlier_monitors_resumes_there(db: asyncpg.Connection) -> None:
    for job_id in ("imported", "claimed", "sending"):
        await a_job(db, job_id)
        await jobs.set_import_id(db, job_id, f"imp-{job_id}")
    for job_id in ("claimed", "sending"):
        assert await jobs.claim_send(db, job_id) is SendClaim.CLAIMED
    await jobs.set_send_id(db, "sending", "s-1")
    for job_id in ("imported", "claimed", "sending"):
        await broadcast_work.record(db, job_id, f"drop/{job_id}.csv", HOUR, HOUR)
    steps = {
        r["job_id"]: r["step"] for r in await db.fetch("SELECT job_id, step FROM control.broadcast_work")
    }
    assert steps == {"imported": "import_status", "claimed": "find_send", "sending": "send_status"}


async def test_due_rows_go_to_one_claimer_each_and_come_back_when_a_lease_runs_out(
    db: asyncpg.Connection, database: PostgresSettings
) -> None:
    for n in range(6):
        await a_job(db, f"j-{n}")
        await broadcast_work.record(db, f"j-{n}", f"drop/j-{n}.csv", HOUR, HOUR)
    other = await connect(database)
    try:
        async with db.transaction(), other.transaction():  # both claim while the other holds its rows
            mine = await broadcast_work.claim_due(db, "a:1", 60, 4)
            theirs = await broadcast_work.claim_due(other, "b:2", 60, 4)
        assert (len(mine), len(theirs)) == (4, 2)
        assert {i.job_id for i in mine}.isdisjoint(i.job_id for i in theirs)
        assert await broadcast_work.claim_due(db, "a:1", 60, 10) == [], "every row is leased"

        # A lease that is not renewed (its process was killed) runs out; the row is claimable again.
        async with db.transaction():
            await db.execute(
                "UPDATE control.broadcast_work SET claimed_until = now() + interval '0.3 s' WHERE lease = $1",
                mine[0].lease,
            )
        again = await wait_for(
            lambda: broadcast_work.claim_due(other, "b:2", 60, 10), timeout_s=10, what="the lease to run out"
        )
        assert [i.job_id for i in again] == [mine[0].job_id]
        assert again[0].lease != mine[0].lease
        # The first claimer's outcome is dropped: the row is the new claimer's now.
        late = Next(Step.ENDED, None, None, None, None)
        assert not await broadcast_work.finish(db, mine[0].lease, late)
        assert await broadcast_work.renew(db, [mine[0].lease, mine[1].lease], 60) == {mine[1].lease}
    finally:
        await other.close()


async def test_a_finished_step_writes_the_next_and_releases_the_row(db: asyncpg.Connection) -> None:
    await a_job(db, "j-1")
    await broadcast_work.record(db, "j-1", "drop/j-1.csv", HOUR, HOUR)
    (item,) = await broadcast_work.claim_due(db, "a:1", 60, 10)
    assert (item.job_id, item.step, item.job_state) == ("j-1", Step.START_IMPORT, "queued")
    assert BroadcastJob.from_json(item.job_json).job_id == "j-1"
    later = item.now + timedelta(hours=2)
    after = Next(Step.IMPORT_STATUS, later, item.deadline, "imp-1", None, polls=1)
    assert await broadcast_work.finish(db, item.lease, after)
    row = await work_row(db, "j-1")
    assert row is not None
    assert (row["step"], row["due_at"], row["import_id"], row["polls"], row["lease"]) == (
        "import_status",
        later,
        "imp-1",
        1,
        None,
    )
    assert await broadcast_work.claim_due(db, "a:1", 60, 10) == [], "not due before its time"


async def test_a_cancel_before_the_send_claim_wins_and_nothing_is_sent(db: asyncpg.Connection) -> None:
    await a_job(db, "j-1")
    await broadcast_work.record(db, "j-1", "drop/j-1.csv", HOUR, HOUR)
    decision = await jobs.request_cancel(db, cancel_of("j-1"), "cancelled by ana: wrong list")
    assert (decision.found, decision.stage) == (CancelFound.BEFORE_SEND, "upload")
    await broadcast_work.end_cancelled(db, "j-1")
    assert await jobs.claim_send(db, "j-1") is SendClaim.CANCELLED
    row = await db.fetchrow("SELECT state, detail, send_requested_at FROM control.jobs WHERE job_id = 'j-1'")
    assert row is not None
    assert tuple(row) == ("cancelled", "cancelled by ana: wrong list", None)
    assert await broadcast_work.claim_due(db, "a:1", 60, 10) == []
    again = await jobs.request_cancel(db, cancel_of("j-1"), "cancelled")
    assert again.found is CancelFound.ALREADY_CANCELLED


async def test_a_send_claimed_before_the_cancel_sends_the_cancel_to_the_esp(db: asyncpg.Connection) -> None:
    await a_job(db, "j-1")
    await broadcast_work.record(db, "j-1", "drop/j-1.csv", HOUR, HOUR)
    (item,) = await broadcast_work.claim_due(db, "a:1", 60, 10)
    assert await jobs.claim_send(db, "j-1") is SendClaim.CLAIMED
    assert await jobs.claim_send(db, "j-1") is SendClaim.CLAIMED_BEFORE
    decision = await jobs.request_cancel(db, cancel_of("j-1"), "cancelled")
    assert decision.found is CancelFound.SEND_CLAIMED
    assert await broadcast_work.request_cancel(db, "j-1")
    # The step in hand ends; the cancel waiting makes the row due at once, with the cancel to ask.
    sending = Next(Step.SEND_STATUS, item.now + timedelta(hours=1), None, "imp-1", "s-1")
    assert await broadcast_work.finish(db, item.lease, sending)
    (cancel,) = await broadcast_work.claim_due(db, "a:1", 60, 10)
    assert (cancel.cancel, cancel.send_id) == (CancelState.REQUESTED, "s-1")
    answered = Next(
        Step.SEND_STATUS, cancel.now + timedelta(hours=1), None, "imp-1", "s-1", cancel_answered=True
    )
    assert await broadcast_work.finish(db, cancel.lease, answered)
    row = await work_row(db, "j-1")
    assert row is not None
    assert (row["cancel"], row["due_at"] > cancel.now) == ("answered", True)
    state = await db.fetchval("SELECT state FROM control.jobs WHERE job_id = 'j-1'")
    assert state == "queued", "only the ESP's answer can cancel a send that was requested"


async def test_the_claim_waits_for_a_cancel_in_progress_and_loses_to_it(
    db: asyncpg.Connection, database: PostgresSettings
) -> None:
    await a_job(db, "j-1")
    other = await connect(database)
    try:
        cancelling = db.transaction()
        await cancelling.start()
        assert (await jobs.request_cancel(db, cancel_of("j-1"), "cancelled")).found is CancelFound.BEFORE_SEND
        claim = asyncio.create_task(jobs.claim_send(other, "j-1"))
        await wait_for(
            lambda: db.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND pid = $1", other.get_server_pid()
            ),
            what="the claim waiting for the cancel's lock",
        )
        await cancelling.commit()
        assert await claim is SendClaim.CANCELLED
    finally:
        await other.close()


async def test_a_cancel_before_its_job_arrives_refuses_the_job(db: asyncpg.Connection) -> None:
    decision = await jobs.request_cancel(db, cancel_of("early"), "cancelled")
    assert (decision.found, decision.stage) == (CancelFound.UNKNOWN_JOB, None)
    await a_job(db, "early")
    assert await jobs.cancel_requested(db, "early")
    assert not await jobs.cancel_requested(db, "other")
    row = await db.fetchrow("SELECT state, detail FROM control.jobs WHERE job_id = 'early'")
    assert row is not None
    assert tuple(row) == ("cancelled", "cancelled before the job arrived")
    assert await broadcast_work.record(db, "early", "drop/early.csv", HOUR, HOUR) is Recorded.CANCELLED
    assert await jobs.claim_send(db, "early") is SendClaim.CANCELLED


async def test_cancelled_is_final_but_later_statuses_stay_in_the_history(db: asyncpg.Connection) -> None:
    await a_job(db, "j-1")
    await jobs.request_cancel(db, cancel_of("j-1"), "cancelled")
    for stage, state in (
        (Stage.UPLOAD, State.CANCELLED),
        (Stage.UPLOAD, State.DONE),
        (Stage.IMPORT, State.RUNNING),
    ):
        await jobs.record_status(db, BroadcastStatus(job_id="j-1", stage=stage, state=state, service="test"))
    row = await db.fetchrow("SELECT stage, state FROM control.jobs WHERE job_id = 'j-1'")
    assert row is not None
    assert tuple(row) == ("upload", "cancelled")
    history = [tuple(r) for r in await db.fetch("SELECT stage, state FROM control.job_history ORDER BY seq")]
    assert history == [("upload", "cancelled"), ("upload", "done"), ("import", "running")]
    await jobs.record_status(db, BroadcastStatus(job_id="nobody", stage=Stage.SEND, state=State.DONE))
    assert await db.fetchval("SELECT count(*) FROM control.job_history WHERE job_id = 'nobody'") == 0


async def test_a_stopping_process_gives_its_rows_back_at_once(db: asyncpg.Connection) -> None:
    await a_job(db, "j-1")
    await broadcast_work.record(db, "j-1", "drop/j-1.csv", HOUR, HOUR)
    (item,) = await broadcast_work.claim_due(db, "a:1", 600, 10)
    assert await broadcast_work.release(db, [item.lease, uuid.uuid4()]) == 1
    (again,) = await broadcast_work.claim_due(db, "b:2", 600, 10)
    assert (again.job_id, again.step) == ("j-1", Step.START_IMPORT)
