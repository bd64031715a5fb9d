"""kill -9 each service at an exact point of its work (a failpoint), start a new process of it, and
check that the broadcast still ends exactly once: the list complete, one import, one send, every
response event loaded once."""

from __future__ import annotations

import signal
from contextlib import ExitStack

import pytest

from shared.infra.db import connect
from shared.runtime.failpoints import Point
from tests.fixtures.deployment import Deployment
from tests.fixtures.faults import (
    assert_exactly_once,
    fault_pipeline,
    markers,
    reached,
    start_another,
)
from tests.fixtures.pipeline import Pipeline, seed_list

CUSTOMERS = 2000


async def held_state(point: Point, pipeline: Pipeline, job_id: str) -> None:
    """What is true while the process holds at the point (so the kill hits work half done)."""
    account_dir = pipeline.esps["sandbox"].account_dir(pipeline.accounts["sandbox"])
    if point is Point.UPLOADER_MID_UPLOAD:
        partial = [p for p in (account_dir / "drop").iterdir() if p.name.endswith(".partial")]
        assert len(partial) == 1
        assert partial[0].name.startswith(f".{job_id}.csv.")
        assert partial[0].stat().st_size > 0, "part of the list is written"
        assert not (account_dir / "drop" / f"{job_id}.csv").exists()
        return
    if point is Point.MONITOR_BEFORE_SEND:
        assert await pipeline.sends_created("sandbox") == {}
        return
    if point is Point.MONITOR_AFTER_SEND:
        assert await pipeline.sends_created("sandbox") == {job_id: 1}, "the ESP accepted the send"
        return
    conn = await connect(pipeline.deployment.database)
    try:
        if point is Point.GATHERER_MID_FILE:
            processing = await conn.fetchval(
                "SELECT count(*) FROM control.gathered_files WHERE state = 'processing'"
            )
            assert processing == 1, "one file is being gathered, not archived"
        else:
            assert await conn.fetchval("SELECT count(*) FROM responses.events") > 0, "a batch is committed"
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "point",
    [
        Point.UPLOADER_MID_UPLOAD,
        Point.MONITOR_BEFORE_SEND,
        Point.MONITOR_AFTER_SEND,
        Point.GATHERER_MID_FILE,
        Point.LOADER_AFTER_DB_COMMIT,
    ],
)
async def test_kill_at_failpoint_then_restart(point: Point, deployment: Deployment) -> None:
    service = point.value.split(".")[0]
    expected_rows = await seed_list(deployment, CUSTOMERS)
    with ExitStack() as stack:
        pipeline = fault_pipeline(stack, deployment, (point,))
        job = await pipeline.publish("sandbox", f"kill-{deployment.unique}")
        victim = pipeline.procs[service]
        await reached(markers(deployment), point, victim)
        await held_state(point, pipeline, job.job_id)
        victim.send_signal(signal.SIGKILL)
        assert victim.wait(timeout=30) == -signal.SIGKILL

        await start_another(pipeline, stack, service)  # same settings: the point's marker lets it pass
        await assert_exactly_once(pipeline, [job.job_id], expected_rows)
        pipeline.stop()
