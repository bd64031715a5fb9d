"""SIGTERM each service in the middle of its work: it exits 0 within its grace period, with its
in-flight work either finished or handed back untouched, and a restart completes the broadcast
exactly once. A SIGTERM while a service still starts ends it at once, also with exit code 0."""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.infra.db import connect
from shared.infra.kafka import read_topic
from shared.model.topics import Topic
from shared.runtime.failpoints import Point
from tests.fixtures.deployment import Deployment
from tests.fixtures.faults import (
    assert_exactly_once,
    fault_pipeline,
    markers,
    reached,
    release,
    start_another,
    stopped_within,
)
from tests.fixtures.kafka import committed
from tests.fixtures.pipeline import Pipeline, seed_list
from tests.fixtures.processes import log_messages, log_records, running, service_env
from tests.fixtures.servers import free_port
from tests.fixtures.waits import wait_for

CUSTOMERS = 2000
GRACE_S = 20
STOPPING = "stopping: finishing in-flight messages"


async def the_list_is_uploaded_and_announced(pipeline: Pipeline, job_id: str) -> None:
    kafka = pipeline.deployment.kafka
    drop = pipeline.esps["sandbox"].account_dir(pipeline.accounts["sandbox"]) / "drop"
    assert (drop / f"{job_id}.csv").exists()
    assert len(await read_topic(kafka, Topic.BROADCAST_LISTS)) == 1
    assert await committed(kafka, "uploader", Topic.BROADCAST_JOBS) == 1, "the job's offset is committed"


async def the_file_is_published_and_archived(pipeline: Pipeline, job_id: str) -> None:
    conn = await connect(pipeline.deployment.database)
    try:
        rows = await conn.fetch("SELECT state, count(*) AS n FROM control.gathered_files GROUP BY state")
    finally:
        await conn.close()
    states = {r["state"]: r["n"] for r in rows}
    assert "processing" not in states, "no file is left half done"
    assert states["archived"] >= 1


async def the_committed_offsets_cover_the_loaded_rows(pipeline: Pipeline, job_id: str) -> None:
    kafka = pipeline.deployment.kafka
    conn = await connect(pipeline.deployment.database)
    try:
        loaded = await conn.fetchval("SELECT count(*) FROM responses.events")
    finally:
        await conn.close()
    assert await committed(kafka, "loader", Topic.RESPONSE_EVENTS) == loaded > 0


@dataclass(frozen=True)
class Held:
    """A service held at a failpoint in the middle of its work when SIGTERM comes."""

    point: Point
    finished: str
    """The service's log message for the work in hand, done."""
    left: Callable[[Pipeline, str], Awaitable[None]]
    """Checks what the stopped process left behind for the broadcast (job id)."""

    @property
    def service(self) -> str:
        return self.point.value.split(".")[0]


HELD = [
    Held(Point.UPLOADER_MID_UPLOAD, "list uploaded", the_list_is_uploaded_and_announced),
    Held(Point.GATHERER_MID_FILE, "file gathered", the_file_is_published_and_archived),
    Held(Point.LOADER_AFTER_DB_COMMIT, "batch loaded", the_committed_offsets_cover_the_loaded_rows),
]


@pytest.mark.parametrize("held", HELD, ids=lambda h: h.point.value)
async def test_sigterm_mid_work_finishes_the_work_in_hand(held: Held, deployment: Deployment) -> None:
    expected_rows = await seed_list(deployment, CUSTOMERS)
    service = held.service
    log = deployment.folder / f"{service}.log"
    with ExitStack() as stack:
        grace = {f"ESPBRIDGE_{service.upper()}_SHUTDOWN_TIMEOUT_S": str(GRACE_S)}
        pipeline = fault_pipeline(stack, deployment, (held.point,), None, **grace)
        job = await pipeline.publish("sandbox", f"term-{deployment.unique}")
        proc = pipeline.procs[service]
        await reached(markers(deployment), held.point, proc)
        proc.send_signal(signal.SIGTERM)
        await wait_for(lambda: STOPPING in log_messages(log), what="shutdown begun")
        assert proc.poll() is None, "the process waits for its in-flight work"
        release(proc)
        assert stopped_within(proc, GRACE_S) == 0, "it exits 0 before its grace runs out"
        # The work in hand was finished while the process stopped, not cut off by the grace.
        stop = log_messages(log)[log_messages(log).index(STOPPING) :]
        assert held.finished in stop
        assert "stopped" in stop[stop.index(held.finished) :]
        await held.left(pipeline, job.job_id)

        await start_another(pipeline, stack, service)
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)
        pipeline.stop()


async def test_sigterm_monitor_while_polling_an_import_leaves_the_next_poll_due(
    deployment: Deployment,
) -> None:
    expected_rows = await seed_list(deployment, CUSTOMERS)
    log = deployment.folder / "monitor.log"
    with ExitStack() as stack:
        pipeline = fault_pipeline(
            stack,
            deployment,
            sandbox={"import_delay_s": "2"},
            ESPBRIDGE_MONITOR_SHUTDOWN_TIMEOUT_S=str(GRACE_S),
            ESPBRIDGE_MONITOR_LEASE_S="600",  # only a released row can be resumed at once
        )
        job = await pipeline.publish("sandbox", f"term-{deployment.unique}")
        conn = await connect(deployment.database)
        try:

            async def importing() -> bool:
                row = await conn.fetchrow(
                    "SELECT w.step, j.stage, j.state FROM control.broadcast_work w "
                    "JOIN control.jobs j USING (job_id) WHERE job_id = $1",
                    job.job_id,
                )
                return row is not None and tuple(row) == ("import_status", "import", "running")

            await wait_for(importing, timeout_s=60, what="the monitor polling the import")
            proc = pipeline.procs["monitor"]
            proc.send_signal(signal.SIGTERM)
            assert stopped_within(proc, GRACE_S) == 0, "it exits 0 before its grace runs out"
            # It finished the step in hand (one ESP call) and claimed nothing more.
            stop = log_messages(log)[log_messages(log).index(STOPPING) :]
            assert "due work stopped: the steps in hand finished" in stop
            # The import's next poll is due, its row free for any monitor; nothing was sent.
            row = await conn.fetchrow(
                "SELECT w.step, w.lease, j.state, j.send_requested_at FROM control.broadcast_work w "
                "JOIN control.jobs j USING (job_id) WHERE job_id = $1",
                job.job_id,
            )
            assert row is not None
            assert tuple(row) == ("import_status", None, "running", None)
            assert await pipeline.sends_created("sandbox") == {}
        finally:
            await conn.close()

        await start_another(pipeline, stack, "monitor")
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)
        pipeline.stop()
    assert "Traceback" not in log.read_text()


def catches_sigterm(pid: int) -> bool:
    """Whether the process has its own SIGTERM handler (SigCgt in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


@pytest.mark.parametrize("service", ["uploader", "monitor", "gatherer", "loader"])
async def test_sigterm_while_the_service_starts_exits_0(service: str, tmp_path: Path) -> None:
    """A stop that comes while the process still imports its modules (a second or more) ends it
    with exit code 0, not killed by the signal."""
    log = tmp_path / f"{service}.log"
    env = service_env({"ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    with running(f"services.{service}", env, log) as proc:

        def handler_installed() -> bool:
            return proc.poll() is not None or catches_sigterm(proc.pid)

        await wait_for(handler_installed, interval_s=0.01, what="a SIGTERM handler")
        before_any_line = log.read_bytes() == b""  # not even "starting": it is still importing
        proc.send_signal(signal.SIGTERM)
        assert stopped_within(proc, GRACE_S) == 0, log.read_text(errors="replace")[-2000:]
    assert before_any_line, "the process caught SIGTERM only after it had started up"


async def test_sigterm_while_waiting_for_kafka_cancels_the_start_up_and_exits_0(tmp_path: Path) -> None:
    log = tmp_path / "loader.log"
    env = service_env({"ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"})
    with running("services.loader", env, log) as proc:
        await wait_for(
            lambda: "Kafka not available yet, retrying" in log_messages(log), what="the wait for Kafka"
        )
        proc.send_signal(signal.SIGTERM)
        assert stopped_within(proc, GRACE_S) == 0
    assert "stopped while starting (SIGTERM before the service was ready)" in log_messages(log)
    assert not [r for r in log_records(log) if "Traceback" in str(r) or "exc" in r]
