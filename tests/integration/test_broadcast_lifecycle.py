"""Broadcasts that wait and run side by side, through the four services and the sandbox ESP: many
broadcasts in flight at once across several monitors, send times held in the database through
kill -9 of every monitor, and cancels before the send (nothing sent), after it (the ESP's cancel)
and before the job itself arrives (nothing uploaded)."""

from __future__ import annotations

import signal
from collections import defaultdict
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta

from shared.infra.db import connect
from shared.infra.kafka import read_topic
from shared.model.messages import BroadcastJob, BroadcastStatus, CancelRequest, Stage, State
from shared.model.topics import Topic
from shared.operations.jobs import build_job, read_statuses
from tests.fixtures.deployment import Deployment
from tests.fixtures.faults import start_another
from tests.fixtures.kafka import produce
from tests.fixtures.pipeline import Pipeline, start_pipeline
from tests.fixtures.waits import wait_for
from tools.demo import FLAVORS, demo_job

ESP = "sandbox"
HELD_FILE_ESP = "deployteq"
"""An ESP whose send is a file released from staging: held there until its send time."""
CUSTOMERS = 60
IMMEDIATE = 27
SCHEDULED = 3
SEND_AFTER_S = 30.0
"""How far ahead the scheduled broadcasts are sent: time for the immediate ones to be sent first."""


def a_job(pipeline: Pipeline, job_id: str, send_at: datetime | None = None, esp: str = ESP) -> BroadcastJob:
    """The demo broadcast to an ESP of the pipeline, sent now or at ``send_at``."""
    flavor = FLAVORS[esp]
    document = demo_job(job_id, esp, pipeline.accounts[esp], flavor.mode, flavor.message, flavor.email_field)
    return build_job({**document, "send_at": send_at.isoformat() if send_at else None})


async def publish_jobs(pipeline: Pipeline, jobs: list[BroadcastJob]) -> None:
    """Publish jobs all at once, as a CRM does."""
    items: list[tuple[bytes | None, bytes]] = [(job.job_id.encode(), job.to_json()) for job in jobs]
    await produce(pipeline.deployment.kafka, Topic.BROADCAST_JOBS, items)


async def cancel(pipeline: Pipeline, job_id: str) -> None:
    """Publish a cancel request for a job, as ``espbridge job cancel`` or any producer does."""
    request = CancelRequest(
        job_id=job_id, reason="wrong segment", requested_at=datetime.now(UTC), requested_by="ana"
    )
    await produce(pipeline.deployment.kafka, Topic.BROADCAST_CANCELS, [(job_id.encode(), request.to_json())])


async def statuses_by_job(pipeline: Pipeline) -> dict[str, list[BroadcastStatus]]:
    """Every status on broadcast.status.v1, per job, oldest first."""
    by_job: dict[str, list[BroadcastStatus]] = defaultdict(list)
    for record in await read_topic(pipeline.deployment.kafka, Topic.BROADCAST_STATUS):
        if record.value:
            status = BroadcastStatus.from_json(record.value)
            by_job[status.job_id].append(status)
    return {job_id: sorted(statuses, key=lambda s: s.at) for job_id, statuses in by_job.items()}


def first(statuses: list[BroadcastStatus], stage: Stage, state: State) -> BroadcastStatus | None:
    """The first status of a stage in a state."""
    return next((s for s in statuses if (s.stage, s.state) == (stage, state)), None)


async def test_scheduled_broadcasts_wait_while_the_rest_are_sent_and_survive_every_monitor_killed(
    deployment: Deployment,
) -> None:
    await deployment.seed(CUSTOMERS)
    database = deployment.database
    with ExitStack() as stack:
        esps = [(ESP, deployment.account), (HELD_FILE_ESP, deployment.account)]
        pipeline = start_pipeline(stack, deployment, esps, ESPBRIDGE_MONITOR_MAX_IN_FLIGHT="4")
        second = await start_another(pipeline, stack, "monitor", "monitor-2")
        monitors = [pipeline.procs["monitor"], second]
        send_at = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=SEND_AFTER_S)
        unique = deployment.unique
        immediate = [a_job(pipeline, f"now-{n}-{unique}") for n in range(IMMEDIATE)]
        scheduled = [a_job(pipeline, f"later-{n}-{unique}", send_at) for n in range(SCHEDULED)]
        called_off_at = send_at - timedelta(seconds=5)
        called_off = a_job(pipeline, f"called-off-{unique}", called_off_at)
        held = a_job(pipeline, f"held-{unique}", send_at, HELD_FILE_ESP)
        await publish_jobs(pipeline, [*scheduled[:2], *immediate, called_off, held, scheduled[2]])

        # The immediate broadcasts are all sent, once each, while the scheduled ones wait.
        async def immediate_sent() -> dict[str, int] | None:
            sends = await pipeline.sends_created(ESP)
            return sends if all(job.job_id in sends for job in immediate) else None

        sends = await wait_for(
            immediate_sent, timeout_s=SEND_AFTER_S - 8, what="the immediate broadcasts sent"
        )
        assert datetime.now(UTC) < send_at - timedelta(seconds=5)
        assert sends == {job.job_id: 1 for job in immediate}, "none sent twice, no scheduled one sent"

        conn = await connect(database)
        try:

            async def waiting() -> list[tuple[str, datetime]] | None:
                rows = await conn.fetch(
                    "SELECT job_id, due_at FROM control.broadcast_work WHERE step = 'send' ORDER BY job_id"
                )
                return [tuple(r) for r in rows] if len(rows) == SCHEDULED + 2 else None

            waits = await wait_for(waiting, timeout_s=10, what="the scheduled broadcasts imported")
            assert waits == sorted(
                [(job.job_id, send_at) for job in (*scheduled, held)] + [(called_off.job_id, called_off_at)]
            )
            # Deployteq's list file is the send: it stays in staging until its time.
            deployteq_site = pipeline.esps[HELD_FILE_ESP].account_dir(pipeline.accounts[HELD_FILE_ESP])
            staged = list(deployteq_site.glob(f"espbridge/staging/*+{held.job_id}.csv"))
            assert len(staged) == 1
            assert list(deployteq_site.glob(f"csv upload/*/*/*+{held.job_id}.csv")) == []

            # Several monitors shared the work: the steps ran in both processes.
            ran_in = {
                int(owner.rpartition(":")[2])
                for owner in await conn.fetchval(
                    "SELECT array_agg(DISTINCT claimed_by) FROM control.broadcast_work WHERE claimed_by <> ''"
                )
            }
            assert ran_in == {proc.pid for proc in monitors}

            # A cancel during the wait: that broadcast ends now and is never sent.
            await cancel(pipeline, called_off.job_id)

            async def called_off_ended() -> bool:
                row = await conn.fetchrow(
                    "SELECT w.step, j.state FROM control.broadcast_work w JOIN control.jobs j USING (job_id) "
                    "WHERE job_id = $1",
                    called_off.job_id,
                )
                return row is not None and tuple(row) == ("ended", "cancelled")

            await wait_for(called_off_ended, timeout_s=20, what="the cancelled broadcast ended")

            # A cancel after a broadcast went out: the ESP is asked, says it is too late; still done.
            went_out = immediate[0].job_id

            async def went_out_done() -> bool:
                state = await conn.fetchval("SELECT state FROM control.jobs WHERE job_id = $1", went_out)
                return bool(state == "done")

            await wait_for(went_out_done, timeout_s=20, what="an immediate broadcast done")
            await cancel(pipeline, went_out)

            async def too_late() -> BroadcastStatus | None:
                answers = [s for s in await read_statuses(deployment.kafka, went_out) if "cancel" in s.detail]
                return answers[0] if answers else None

            answer = await wait_for(too_late, timeout_s=20, what="the ESP's answer to the late cancel")
            assert (answer.stage, answer.state) == (Stage.SEND, State.DONE)
            assert answer.detail.startswith("too late to cancel send "), answer.detail
            assert await conn.fetchval("SELECT state FROM control.jobs WHERE job_id = $1", went_out) == "done"

            # kill -9 every monitor during the wait; the send times are rows, new monitors take them.
            for proc in monitors:
                proc.send_signal(signal.SIGKILL)
                assert proc.wait(timeout=30) == -signal.SIGKILL
            await start_another(pipeline, stack, "monitor")

            async def scheduled_sent() -> dict[str, int] | None:
                sends = await pipeline.sends_created(ESP)
                return sends if all(job.job_id in sends for job in scheduled) else None

            sends = await wait_for(
                scheduled_sent, timeout_s=SEND_AFTER_S + 30, what="the scheduled broadcasts sent"
            )
            assert sends == {job.job_id: 1 for job in [*immediate, *scheduled]}, (
                "the cancelled one is not sent"
            )
            assert (await pipeline.stats(ESP))["sends_cancelled"] == {}

            async def held_file_sent() -> dict[str, int] | None:
                return await pipeline.sends_created(HELD_FILE_ESP) or None

            assert await wait_for(held_file_sent, timeout_s=30, what="the held file released") == {
                held.job_id: 1
            }
            assert not staged[0].exists(), "released from staging"
            assert datetime.now(UTC) > called_off_at
            state = await conn.fetchval("SELECT state FROM control.jobs WHERE job_id = $1", called_off.job_id)
            assert state == "cancelled"
        finally:
            await conn.close()

        statuses = await statuses_by_job(pipeline)
        for job in (*scheduled, held):
            waited = first(statuses[job.job_id], Stage.SEND, State.QUEUED)
            assert waited is not None
            assert waited.detail == f"waiting for its send time {send_at:%Y-%m-%dT%H:%M:%SZ}"
            started = first(statuses[job.job_id], Stage.SEND, State.RUNNING)
            assert started is not None
            assert started.at >= send_at, "not sent before its time"
        cancelled = first(statuses[called_off.job_id], Stage.SEND, State.CANCELLED)
        assert cancelled is not None
        assert cancelled.detail == "cancelled by ana: wrong segment; nothing is sent"
        assert first(statuses[called_off.job_id], Stage.SEND, State.RUNNING) is None
        pipeline.stop()


async def test_a_cancel_after_the_send_asks_the_esp_one_before_the_job_refuses_it_and_a_missed_time_fails(
    deployment: Deployment,
) -> None:
    await deployment.seed(CUSTOMERS)
    with ExitStack() as stack:
        # The ESP holds each send a while before its messages go out: time to cancel it there.
        pipeline = start_pipeline(
            stack,
            deployment,
            [(ESP, deployment.account)],
            sandbox_settings={"send_delay_s": "20"},
            ESPBRIDGE_MONITOR_SEND_AT_GRACE_S="60",
        )
        unique = deployment.unique
        sending, early = a_job(pipeline, f"sending-{unique}"), a_job(pipeline, f"early-{unique}")
        late = a_job(pipeline, f"late-{unique}", datetime.now(UTC) - timedelta(seconds=120))
        await cancel(pipeline, early.job_id)  # before its job is even published

        async def cancel_recorded() -> BroadcastStatus | None:
            return first(await read_statuses(deployment.kafka, early.job_id), Stage.UPLOAD, State.CANCELLED)

        recorded = await wait_for(cancel_recorded, timeout_s=30, what="the early cancel recorded")
        assert (
            recorded.detail
            == "cancelled by ana: wrong segment before the job arrived: it is refused when it comes"
        )
        await publish_jobs(pipeline, [sending, early, late])

        async def send_requested() -> bool:
            statuses = await read_statuses(deployment.kafka, sending.job_id)
            return first(statuses, Stage.SEND, State.RUNNING) is not None

        await wait_for(send_requested, timeout_s=60, what="the send requested from the ESP")
        await cancel(pipeline, sending.job_id)

        async def cancelled_at_the_esp() -> BroadcastStatus | None:
            return first(await read_statuses(deployment.kafka, sending.job_id), Stage.SEND, State.CANCELLED)

        answer = await wait_for(cancelled_at_the_esp, timeout_s=30, what="the ESP's answer to the cancel")
        assert answer.detail.startswith("the ESP cancelled send ")

        # A send time already passed by more than the grace when the broadcast is ready: not sent late.
        async def late_failed() -> BroadcastStatus | None:
            return first(await read_statuses(deployment.kafka, late.job_id), Stage.SEND, State.FAILED)

        missed = await wait_for(late_failed, timeout_s=30, what="the late broadcast failed")
        assert missed.detail.endswith("(more than send_at_grace_s, 60s): not sent late"), missed.detail
        stats = await pipeline.stats(ESP)
        assert stats["sends_created"] == {sending.job_id: 1}
        assert stats["sends_cancelled"] == {sending.job_id: 1}

        # The job that was cancelled before it arrived: refused by the uploader, nothing uploaded.
        early_statuses = await read_statuses(deployment.kafka, early.job_id)
        assert [(s.stage, s.state, s.detail) for s in early_statuses] == [
            (Stage.UPLOAD, State.CANCELLED, recorded.detail),
            (Stage.UPLOAD, State.CANCELLED, "cancelled: not uploaded"),
        ]
        drop = pipeline.esps[ESP].account_dir(pipeline.accounts[ESP]) / "drop"
        assert not (drop / f"{early.job_id}.csv").exists()
        conn = await connect(deployment.database)
        try:
            rows = await conn.fetch(
                "SELECT job_id, state FROM control.jobs WHERE job_id = ANY($1)",
                [sending.job_id, early.job_id],
            )
            states = {r["job_id"]: r["state"] for r in rows}
            work = await conn.fetchval(
                "SELECT count(*) FROM control.broadcast_work WHERE job_id = $1", early.job_id
            )
        finally:
            await conn.close()
        assert states == {sending.job_id: "cancelled", early.job_id: "cancelled"}
        assert work == 0
        pipeline.stop()
