"""SIGTERM each service in the middle of its work: it exits 0 within its grace period, with its
in-flight work either finished or handed back untouched, and a restart completes the broadcast
exactly once. A SIGTERM while a service still starts ends it at once, also with exit code 0."""

from __future__ import annotations

import signal
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import orjson
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
from tests.fixtures.pipeline import seed_list
from tests.fixtures.processes import running, service_env
from tests.fixtures.servers import free_port
from tests.fixtures.waits import wait_for

CUSTOMERS = 2000
GRACE_S = 20


def logged(log: Path, msg: str) -> bool:
    """Whether a service log has a record with this message."""
    return any(
        orjson.loads(line).get("msg") == msg
        for line in log.read_bytes().splitlines()
        if line.startswith(b"{")
    )


async def terminate_while_held(proc: subprocess.Popen[bytes], log: Path) -> float:
    """SIGTERM a process that holds at a failpoint; once its shutdown has begun, let the held work
    go on. Returns how long the process took to exit (it must exit 0)."""
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    await wait_for(lambda: logged(log, "stopping: finishing in-flight messages"), what="shutdown begun")
    assert proc.poll() is None, "the process waits for its in-flight work"
    release(proc)
    assert stopped_within(proc, GRACE_S + 10) == 0
    return time.monotonic() - started


async def test_sigterm_uploader_mid_upload_finishes_the_list(
    deployment: Deployment,
) -> None:
    kafka, unique, tmp_path = deployment.kafka, deployment.unique, deployment.folder
    expected_rows = await seed_list(deployment, CUSTOMERS)
    point = Point.UPLOADER_MID_UPLOAD
    with ExitStack() as stack:
        pipeline = fault_pipeline(
            stack,
            deployment,
            (point,),
            ESPBRIDGE_UPLOADER_SHUTDOWN_TIMEOUT_S=str(GRACE_S),
        )
        job = await pipeline.publish("sandbox", f"term-{unique}")
        proc = pipeline.procs["uploader"]
        await reached(markers(deployment), point, proc)
        assert await terminate_while_held(proc, tmp_path / "uploader.log") < GRACE_S
        # The process that was told to stop finished the list and announced it.
        drop = pipeline.esps["sandbox"].account_dir(pipeline.accounts["sandbox"]) / "drop"
        assert (drop / f"{job.job_id}.csv").exists()
        assert len(await read_topic(kafka, Topic.BROADCAST_LISTS)) == 1

        await start_another(pipeline, stack, "uploader")
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)
        pipeline.stop()


async def test_sigterm_monitor_while_polling_an_import_hands_it_back(
    deployment: Deployment,
) -> None:
    database, unique, tmp_path = deployment.database, deployment.unique, deployment.folder
    expected_rows = await seed_list(deployment, CUSTOMERS)
    with ExitStack() as stack:
        pipeline = fault_pipeline(
            stack,
            deployment,
            sandbox={"import_delay_s": "2"},
            ESPBRIDGE_MONITOR_SHUTDOWN_TIMEOUT_S=str(GRACE_S),
        )
        job = await pipeline.publish("sandbox", f"term-{unique}")
        conn = await connect(database)
        try:

            async def importing() -> bool:
                row = await conn.fetchrow(
                    "SELECT stage, state, esp_import_id FROM control.jobs WHERE job_id = $1", job.job_id
                )
                return row is not None and row["esp_import_id"] is not None and row["stage"] == "import"

            await wait_for(importing, timeout_s=60, what="the monitor polling the import")
            proc = pipeline.procs["monitor"]
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert stopped_within(proc, GRACE_S + 10) == 0
            # It stops polling at once rather than holding shutdown for its whole grace.
            assert time.monotonic() - started < GRACE_S / 2
            # Handed back untouched: the import still running at the ESP, no send requested.
            row = await conn.fetchrow(
                "SELECT stage, state, send_requested_at FROM control.jobs WHERE job_id = $1", job.job_id
            )
            assert row is not None
            assert (row["stage"], row["state"], row["send_requested_at"]) == ("import", "running", None)
            assert await pipeline.sends_created("sandbox") == {}
        finally:
            await conn.close()

        await start_another(pipeline, stack, "monitor")
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)
        pipeline.stop()
    assert "Traceback" not in (tmp_path / "monitor.log").read_text()


async def test_sigterm_gatherer_mid_file_finishes_the_file(
    deployment: Deployment,
) -> None:
    database, unique, tmp_path = deployment.database, deployment.unique, deployment.folder
    expected_rows = await seed_list(deployment, CUSTOMERS)
    point = Point.GATHERER_MID_FILE
    with ExitStack() as stack:
        pipeline = fault_pipeline(
            stack,
            deployment,
            (point,),
            ESPBRIDGE_GATHERER_SHUTDOWN_TIMEOUT_S=str(GRACE_S),
        )
        job = await pipeline.publish("sandbox", f"term-{unique}")
        proc = pipeline.procs["gatherer"]
        await reached(markers(deployment), point, proc)
        assert await terminate_while_held(proc, tmp_path / "gatherer.log") < GRACE_S
        # The file in hand was finished: published to the end and archived, none left half done.
        conn = await connect(database)
        try:
            states = {
                r["state"]: r["n"]
                for r in await conn.fetch(
                    "SELECT state, count(*) AS n FROM control.gathered_files GROUP BY state"
                )
            }
        finally:
            await conn.close()
        assert "processing" not in states
        assert states["archived"] >= 1

        await start_another(pipeline, stack, "gatherer")
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)
        pipeline.stop()


async def test_sigterm_loader_mid_batch_commits_what_it_loaded(
    deployment: Deployment,
) -> None:
    kafka, database = deployment.kafka, deployment.database
    unique, tmp_path = deployment.unique, deployment.folder
    expected_rows = await seed_list(deployment, CUSTOMERS)
    point = Point.LOADER_AFTER_DB_COMMIT
    with ExitStack() as stack:
        pipeline = fault_pipeline(
            stack,
            deployment,
            (point,),
            ESPBRIDGE_LOADER_SHUTDOWN_TIMEOUT_S=str(GRACE_S),
        )
        job = await pipeline.publish("sandbox", f"term-{unique}")
        proc = pipeline.procs["loader"]
        await reached(markers(deployment), point, proc)
        assert await terminate_while_held(proc, tmp_path / "loader.log") < GRACE_S
        # Nothing half done: the offsets the loader committed cover exactly the rows it loaded.
        offsets = await committed(kafka, "loader", Topic.RESPONSE_EVENTS)
        conn = await connect(database)
        try:
            loaded = await conn.fetchval("SELECT count(*) FROM responses.events")
        finally:
            await conn.close()
        assert offsets == loaded > 0

        await start_another(pipeline, stack, "loader")
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)
        pipeline.stop()


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
        await wait_for(lambda: logged(log, "Kafka not available yet, retrying"), what="the wait for Kafka")
        proc.send_signal(signal.SIGTERM)
        assert stopped_within(proc, GRACE_S) == 0
    assert logged(log, "stopped while starting (SIGTERM before the service was ready)")
    assert not [line for line in log.read_bytes().splitlines() if b"Traceback" in line or b'"exc"' in line]
