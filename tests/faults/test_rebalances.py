"""Two uploaders and two loaders sharing work while one of each is stopped and another started
mid-run (rebalances): still one list, one import and one send per broadcast, and every response
event loaded once."""

from __future__ import annotations

import signal
from contextlib import ExitStack

from aiokafka.partitioner import DefaultPartitioner

from shared.infra.db import connect
from tests.fixtures.deployment import Deployment
from tests.fixtures.faults import assert_exactly_once, fault_pipeline, start_another, stopped_within
from tests.fixtures.pipeline import seed_list
from tests.fixtures.processes import log_messages
from tests.fixtures.waits import wait_for


def spread_job_ids(prefix: str, partitions: int, per_partition: int) -> list[str]:
    """Job ids whose messages land ``per_partition`` on each partition of broadcast.jobs.v1, so
    that every uploader of the group gets some."""
    partitioner = DefaultPartitioner()
    everywhere = list(range(partitions))
    ids: list[str] = []
    filled = dict.fromkeys(everywhere, 0)
    n = 0
    while min(filled.values()) < per_partition:
        job_id = f"{prefix}-{n}"
        n += 1
        part = partitioner(job_id.encode(), everywhere, everywhere)
        if filled[part] < per_partition:
            filled[part] += 1
            ids.append(job_id)
    return ids


async def test_two_uploaders_and_two_loaders_through_rebalances(deployment: Deployment) -> None:
    expected_rows = await seed_list(deployment, 800)
    partitions = deployment.kafka.partitions_default
    first, second = (spread_job_ids(f"reb-{deployment.unique}-{wave}", partitions, 1) for wave in "ab")
    with ExitStack() as stack:
        pipeline = fault_pipeline(stack, deployment)
        uploader_1, loader_1 = pipeline.procs["uploader"], pipeline.procs["loader"]
        uploader_2 = await start_another(pipeline, stack, "uploader", "uploader-2")
        loader_2 = await start_another(pipeline, stack, "loader", "loader-2")
        for job_id in first:
            await pipeline.publish("sandbox", job_id)
        conn = await connect(deployment.database)
        try:

            async def loading() -> bool:
                return bool(await conn.fetchval("SELECT count(*) FROM responses.events") > 0)

            await wait_for(loading, timeout_s=120, what="responses loading")
        finally:
            await conn.close()

        # Mid-run: the second wave arrives while one uploader and one loader leave and new ones join.
        for job_id in second:
            await pipeline.publish("sandbox", job_id)
        for proc in (uploader_1, loader_1):
            proc.send_signal(signal.SIGTERM)
        assert stopped_within(uploader_1, 60) == 0
        assert stopped_within(loader_1, 60) == 0
        await start_another(pipeline, stack, "uploader")
        await start_another(pipeline, stack, "loader")

        await assert_exactly_once(pipeline, first + second, expected_rows)
        for proc in (uploader_2, loader_2):
            proc.send_signal(signal.SIGTERM)
            assert stopped_within(proc, 60) == 0
        pipeline.stop()
    # Both members of each group did part of the work.
    for name in ("uploader", "uploader-2"):
        assert "list uploaded" in log_messages(deployment.folder / f"{name}.log"), name
    for name in ("loader", "loader-2"):
        assert "batch loaded" in log_messages(deployment.folder / f"{name}.log"), name
