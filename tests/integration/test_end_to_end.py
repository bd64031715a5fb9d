"""One broadcast of 10,000 customers through the four services, each its own process, against the
sandbox ESP on the real SFTP server: the list file, the statuses, the response counts, re-gathering.
"""

from __future__ import annotations

import csv
import io
import shutil
from contextlib import ExitStack

import asyncpg

from shared.esp import AccountsSettings
from shared.infra.db import connect
from shared.model.messages import Stage, State
from shared.model.topics import Topic
from shared.operations.gathering import gather_now
from shared.operations.jobs import funnel, read_statuses
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import committed, produce, read_until
from tests.fixtures.pipeline import loaded_as_made, loaded_counts, seed_list, start_pipeline, wait_all_loaded
from tests.fixtures.processes import log_messages
from tests.fixtures.waits import wait_for
from tools.demo import SERVICES

CUSTOMERS = 10_000


async def test_a_broadcast_end_to_end(deployment: Deployment) -> None:
    kafka, database, account = deployment.kafka, deployment.database, deployment.account
    expected_rows = await seed_list(deployment, CUSTOMERS)
    assert len(expected_rows) == CUSTOMERS - CUSTOMERS // 33

    with ExitStack() as stack:
        pipeline = start_pipeline(stack, deployment, [("sandbox", account)])
        esp = pipeline.esps["sandbox"]
        job = await pipeline.publish("sandbox", f"e2e-{deployment.unique}")
        manifest = await wait_all_loaded(pipeline, "sandbox", job.job_id)

        # The list file on the ESP's SFTP site: exactly the selected, non-opted-out rows, field map applied.
        list_file = esp.account_dir(account) / "drop" / f"{job.job_id}.csv"
        header, *rows = list(csv.reader(io.StringIO(list_file.read_text(encoding="utf-8"))))
        assert header == ["Email", "FirstName", "LastName", "City", "CommunicationKey"]
        assert sorted(tuple(r) for r in rows) == expected_rows

        # The status sequence a dashboard sees on broadcast.status.v1.
        statuses = await read_statuses(kafka, job.job_id)
        lifecycle = [
            (s.stage, s.state) for s in statuses if s.stage in (Stage.UPLOAD, Stage.IMPORT, Stage.SEND)
        ]
        assert lifecycle == [
            (Stage.UPLOAD, State.RUNNING),
            (Stage.UPLOAD, State.DONE),
            (Stage.IMPORT, State.RUNNING),
            (Stage.IMPORT, State.DONE),
            (Stage.SEND, State.RUNNING),
            (Stage.SEND, State.DONE),
        ]
        upload_done = next(s for s in statuses if (s.stage, s.state) == (Stage.UPLOAD, State.DONE))
        assert upload_done.counts["rows"] == len(expected_rows)
        assert upload_done.counts["excluded"] == CUSTOMERS // 33
        assert {s.stage for s in statuses} >= {Stage.GATHER, Stage.LOAD}

        # Response counts per type equal the ESP's manifest exactly, in the events and the aggregates.
        assert manifest["recipients"] == len(expected_rows)
        assert await loaded_counts(database, job.job_id) == loaded_as_made(manifest)
        loaded = await funnel(database, job.job_id)
        assert loaded is not None
        assert loaded["opens"] == manifest["counts"]["open"]
        assert loaded["bounce_hard"] == manifest["counts"]["bounce_hard"]

        # Sent exactly once.
        assert await pipeline.sends_created("sandbox") == {job.job_id: 1}

        # A redelivered ListUploaded (as after a monitor crash) finds the broadcast's work recorded
        # already: it is consumed and changes nothing, and nothing is sent again.
        (uploaded,) = await read_until(kafka, Topic.BROADCAST_LISTS, lambda rs: len(rs) >= 1)
        await produce(kafka, Topic.BROADCAST_LISTS, [(uploaded.key, uploaded.value or b"")])

        async def redelivery_consumed() -> bool:
            return await committed(kafka, "monitor", Topic.BROADCAST_LISTS) == 2

        await wait_for(redelivery_consumed, timeout_s=60, what="the redelivered list consumed")
        monitor_log = log_messages(deployment.folder / "monitor.log")
        assert "the broadcast's work is recorded already: the list changes nothing" in monitor_log
        sends = [s for s in await read_statuses(kafka, job.job_id) if s.stage is Stage.SEND]
        assert [s.state for s in sends] == [State.RUNNING, State.DONE]
        assert await pipeline.sends_created("sandbox") == {job.job_id: 1}

        # Gathering again adds no rows: a scan finds nothing new, and a file the ESP delivers again
        # (same content, new file) is gathered but its events are already there.
        accounts = AccountsSettings(accounts_file=pipeline.accounts_file)
        assert await gather_now(kafka, database, deployment.servers.sftp, accounts) == []
        archived = sorted((esp.account_dir(account) / "archive").glob("*_opens.csv"))
        assert archived, "gathered files are archived on the ESP's site"
        again = esp.account_dir(account) / "responses" / archived[0].name
        shutil.copyfile(archived[0], again)
        conn = await connect(database)
        try:
            await wait_for(
                lambda: archived_twice(conn, archived[0].name),
                timeout_s=60,
                what="the re-delivered file gathered",
            )
        finally:
            await conn.close()
        assert await loaded_counts(database, job.job_id) == loaded_as_made(manifest)

        pipeline.stop()
    for name in SERVICES:
        assert "Traceback" not in (deployment.folder / f"{name}.log").read_text(), (
            f"{name} logged a traceback"
        )


async def archived_twice(conn: asyncpg.Connection, name: str) -> bool:
    """Whether two response files of this name were gathered and archived."""
    n = await conn.fetchval(
        "SELECT count(*) FROM control.gathered_files WHERE path LIKE '%/' || $1 AND state = 'archived'", name
    )
    return int(n) == 2
