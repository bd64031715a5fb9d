"""Each ESP flavor through the whole pipeline, and two ESPs of different kinds at the same time."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import pytest

from shared import jobs_cli
from shared.db import connect
from shared.kafka import ensure_topics
from shared.messages import Stage, State
from shared.settings import KafkaSettings, PostgresSettings
from tests.fixtures.pipeline import loaded_counts, start_pipeline, wait_all_loaded
from tests.fixtures.processes import stop
from tests.fixtures.servers import Servers
from tools.demo import FLAVORS, demo_job, seed_customers

ESPS = ["generic_sftp", "instiller"]
"""ESP flavors besides the default one (which tests/integration/test_end_to_end.py covers in depth)."""


async def seed(database: PostgresSettings, n: int) -> None:
    conn = await connect(database)
    try:
        await seed_customers(conn, n)
    finally:
        await conn.close()


@pytest.mark.parametrize("esp", ESPS)
async def test_each_esp_end_to_end(
    esp: str, servers: Servers, kafka: KafkaSettings, database: PostgresSettings, unique: str, tmp_path: Path
) -> None:
    await seed(database, 3000)
    await ensure_topics(kafka)
    account = f"t{unique}"
    with ExitStack() as stack:
        pipeline = start_pipeline(stack, servers, kafka.topic_prefix, database, tmp_path, [(esp, account)])
        job = jobs_cli.build_job(demo_job(f"e2e-{esp}-{unique}", esp, account, FLAVORS[esp].mode))
        await jobs_cli.publish_job(kafka, job)
        manifest = await wait_all_loaded(pipeline, esp, job.job_id, database)
        assert manifest["recipients"] == 3000 - 3000 // 33
        assert await loaded_counts(database, job.job_id) == {t: n for t, n in manifest["counts"].items() if n}
        assert await pipeline.sends_created(esp) == {job.job_id: 1}
        statuses = {(s.stage, s.state) for s in await jobs_cli.read_statuses(kafka, job.job_id)}
        assert (Stage.UPLOAD, State.DONE) in statuses
        assert (Stage.IMPORT, State.DONE) in statuses
        for name, proc in pipeline.procs.items():
            assert stop(proc) == 0, f"{name} did not stop cleanly"


async def test_two_esps_of_different_kinds_at_the_same_time(
    servers: Servers, kafka: KafkaSettings, database: PostgresSettings, unique: str, tmp_path: Path
) -> None:
    await seed(database, 2000)
    await ensure_topics(kafka)
    esps = [("sandbox", f"a{unique}"), ("generic_sftp", f"b{unique}")]
    with ExitStack() as stack:
        pipeline = start_pipeline(stack, servers, kafka.topic_prefix, database, tmp_path, esps)
        jobs = {
            esp: jobs_cli.build_job(demo_job(f"two-{esp}-{unique}", esp, account, FLAVORS[esp].mode))
            for esp, account in esps
        }
        for job in jobs.values():
            await jobs_cli.publish_job(kafka, job)
        for esp, job in jobs.items():
            manifest = await wait_all_loaded(pipeline, esp, job.job_id, database)
            assert await loaded_counts(database, job.job_id) == {
                t: n for t, n in manifest["counts"].items() if n
            }
            assert await pipeline.sends_created(esp) == {job.job_id: 1}
        # Each list went to its own ESP's folder in its own format, and nothing crossed over.
        generic_list = (
            pipeline.esps["sandbox"].account_dir(esps[0][1]) / "drop" / f"{jobs['sandbox'].job_id}.csv"
        )
        sftp_list = (
            pipeline.esps["generic_sftp"].account_dir(esps[1][1])
            / "drop"
            / f"{jobs['generic_sftp'].job_id}.txt"
        )
        assert generic_list.read_text().startswith("Email,FirstName,")
        assert sftp_list.read_text().startswith("Email\tFirstName\t")
        conn = await connect(database)
        try:
            by_esp = {
                (r["esp"], r["broadcast_id"])
                for r in await conn.fetch("SELECT DISTINCT esp, broadcast_id FROM responses.events")
            }
        finally:
            await conn.close()
        assert by_esp == {(esp, job.job_id) for esp, job in jobs.items()}
        for name, proc in pipeline.procs.items():
            assert stop(proc) == 0, f"{name} did not stop cleanly"
