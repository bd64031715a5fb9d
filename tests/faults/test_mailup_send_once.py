"""MailUp end to end with its monitor killed right after the send: MailUp's SendHistory rows name
no sending, yet the restarted monitor sees the broadcast as sent and never sends it again."""

from __future__ import annotations

import signal
from contextlib import ExitStack
from typing import Any

import orjson

from shared.infra.db import connect
from shared.model.messages import Stage, State
from shared.operations.jobs import read_statuses
from shared.runtime.failpoints import Point
from tests.fixtures.deployment import Deployment
from tests.fixtures.faults import SANDBOX, SERVICES, assert_exactly_once, markers, reached, start_another
from tests.fixtures.pipeline import seed_list, start_pipeline
from tests.fixtures.waits import wait_for

CUSTOMERS = 2000
ESP = "mailup"


async def test_a_monitor_killed_after_the_send_finds_it_in_the_send_history(deployment: Deployment) -> None:
    expected_rows = await seed_list(deployment, CUSTOMERS)
    point = Point.MONITOR_AFTER_SEND
    armed: dict[str, Any] = {
        **SERVICES,
        "ESPBRIDGE_FAILPOINTS": point.value,
        "ESPBRIDGE_FAILPOINT_DIR": str(markers(deployment)),
    }
    with ExitStack() as stack:
        pipeline = start_pipeline(
            stack, deployment, [(ESP, deployment.account)], sandbox_settings=SANDBOX, **armed
        )
        job = await pipeline.publish(ESP, f"kill-{ESP}-{deployment.unique}")
        monitor = pipeline.procs["monitor"]
        await reached(markers(deployment), point, monitor)
        assert await pipeline.sends_created(ESP) == {job.job_id: 1}, "MailUp accepted the send"
        monitor.send_signal(signal.SIGKILL)
        assert monitor.wait(timeout=30) == -signal.SIGKILL

        # Let the sending leave MailUp's queues for its SendHistory (the manifest is complete once
        # delivery has ended), so the restarted monitor can only learn of it there.
        manifest = pipeline.manifest(ESP, job.job_id)
        await wait_for(
            lambda: manifest.exists() and orjson.loads(manifest.read_bytes())["complete"],
            timeout_s=60,
            what="the sending delivered",
        )
        await start_another(pipeline, stack, "monitor")
        await assert_exactly_once(pipeline, [job.job_id], expected_rows, esp=ESP)

        statuses = await read_statuses(deployment.kafka, job.job_id)
        sends = [(s.state, s.detail) for s in statuses if s.stage is Stage.SEND]
        assert sends[-1] == (State.DONE, "send 42 sent"), sends
        assert State.FAILED not in {state for state, _ in sends}
        conn = await connect(deployment.database)
        try:
            row = await conn.fetchrow(
                "SELECT esp_send_id, send_requested_at FROM control.jobs WHERE job_id = $1", job.job_id
            )
            done = await conn.fetchval(
                "SELECT count(*) FROM control.job_history "
                "WHERE job_id = $1 AND stage = 'send' AND state = 'done'",
                job.job_id,
            )
        finally:
            await conn.close()
        assert row is not None
        # Only SendHistory showed the sending (no sending id there): the send id is the message's.
        assert (row["esp_send_id"], row["send_requested_at"] is not None, done) == ("42", True, 1)
        pipeline.stop()
