"""A broadcast survives each server it depends on being stopped for 30 seconds mid-run.

For each of Kafka, PostgreSQL and sshd (the ESP's SFTP site): the four services and the sandbox ESP
run against a private set of servers; once the broadcast's responses are being gathered and
loaded, the server is stopped with ``infra/local.sh down``, left down for 30 seconds and started
again with ``infra/local.sh up``. The broadcast must then complete with every response loaded
exactly once, one send at the ESP, every service process still the one that was started (and
none busy while it waited), and a clear line in the services' logs about the outage and about
the recovery.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import orjson
import pytest

from bench.harness import usage
from shared.infra.db import connect
from shared.infra.kafka import ensure_topics
from shared.infra.settings import PostgresSettings
from shared.model.messages import Stage, State
from shared.operations.jobs import read_statuses
from tests.faults.private_servers import PrivateServers, private_servers
from tests.fixtures.deployment import Deployment
from tests.fixtures.pipeline import loaded_as_made, loaded_counts, start_pipeline, wait_all_loaded
from tests.fixtures.processes import log_records
from tests.fixtures.waits import wait_for
from tools.demo import SERVICES, seed_customers
from tools.scratch import create_database

# One set of private servers serves the module: its tests stay on one parallel worker.
pytestmark = pytest.mark.xdist_group("outages")

OUTAGE_S = 30.0
"""How long a server stays down: the scenario itself, not a wait for a condition."""

RECIPIENTS = 3000

# The server's name in the services' log lines, and the services that must report its outage and
# its end: every service holds Kafka connections and a PostgreSQL pool (whose connections the
# server's shutdown closes, also in a service that is idle then); only the gatherer is sure to be
# reading the SFTP site while it is down.
NAMES = {"kafka": "Kafka", "postgres": "PostgreSQL", "sftp": "SFTP server"}
REPORTED_BY = {
    "kafka": SERVICES,
    "postgres": SERVICES,
    "sftp": ("gatherer",),
}
CPU_SHARE_WHILE_DOWN = 0.25
"""The most CPU time a service may use while a server is down, as a share of the outage."""
MAX_OUTAGE_LINES = 80
"""Per service and outage: one line per retry with capped backoff, not one per client attempt."""


@pytest.fixture(scope="module")
def private() -> Iterator[PrivateServers]:
    """Kafka, PostgreSQL and sshd of this module alone (free ports, own state directory)."""
    with private_servers() as servers:
        yield servers


@pytest.fixture
async def private_database(private: PrivateServers, unique: str) -> PostgresSettings:
    """A fresh database on the private PostgreSQL with all migrations applied."""
    settings = await create_database(private.servers.pg, f"test_{unique}")
    conn = await connect(settings)
    try:
        await seed_customers(conn, RECIPIENTS)
    finally:
        await conn.close()
    return settings


def outage_lines(path: Path, server: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A service's log lines about an outage of ``server``: (unreachable…, reachable again…)."""
    records = log_records(path)
    down = [r for r in records if str(r.get("msg", "")).startswith(f"{server} unreachable")]
    again = [r for r in records if str(r.get("msg", "")).startswith(f"{server} reachable again")]
    return down, again


@pytest.mark.timeout(420)
@pytest.mark.parametrize("component", ["kafka", "postgres", "sftp"])
async def test_a_broadcast_survives_a_30_second_outage(
    component: str,
    private: PrivateServers,
    private_database: PostgresSettings,
    unique: str,
    tmp_path: Path,
) -> None:
    database = private_database
    kafka = private.servers.kafka_for(unique)
    await ensure_topics(kafka)
    deployment = Deployment(private.servers, kafka, database, tmp_path, unique)
    job_id = f"outage-{component}-{unique}"
    with ExitStack() as stack:
        pipeline = start_pipeline(
            stack,
            deployment,
            [("sandbox", deployment.account)],
            # responses trickle in over several seconds, in many small files
            sandbox_settings={"phase_delay_s": "2.0", "rows_per_file": "200"},
            ESPBRIDGE_LOADER_BATCH_MAX="500",
            ESPBRIDGE_LOADER_BATCH_WAIT_MS="100",
        )
        await pipeline.publish("sandbox", job_id)

        # The moment the server is in use: responses are being gathered and loaded.
        async def loading() -> bool:
            return bool(await loaded_counts(database, job_id))

        await wait_for(loading, timeout_s=120, interval_s=0.2, what="the first responses loaded")
        manifest_file = pipeline.manifest("sandbox", job_id)
        assert not (manifest_file.exists() and orjson.loads(manifest_file.read_bytes())["complete"]), (
            "the ESP finished its responses before the outage; it would not hit work in progress"
        )

        private.down(component)
        stopped_at = time.monotonic()
        cpu_before = {name: usage(proc.pid).cpu_s for name, proc in pipeline.procs.items()}
        await asyncio.sleep(OUTAGE_S)  # the outage: the server stays down this long
        cpu_down = {name: usage(proc.pid).cpu_s - cpu_before[name] for name, proc in pipeline.procs.items()}
        private.up(component)
        outage = time.monotonic() - stopped_at

        try:
            manifest = await wait_all_loaded(pipeline, "sandbox", job_id, timeout_s=180)
        except TimeoutError:
            made = orjson.loads(manifest_file.read_bytes()) if manifest_file.exists() else None
            loaded = await loaded_counts(database, job_id)
            raise AssertionError(
                f"after the {component} outage: the ESP made {made}, loaded {loaded}"
            ) from None

        # Every response exactly once, and one send.
        assert await loaded_counts(database, job_id) == loaded_as_made(manifest)
        assert await pipeline.sends_created("sandbox") == {job_id: 1}
        statuses = await read_statuses(kafka, job_id)
        assert [(s.stage, s.state) for s in statuses if s.stage is Stage.SEND][-1] == (Stage.SEND, State.DONE)
        assert not [s for s in statuses if s.state is State.FAILED], "a stage failed during the outage"

        # Each service that needed the server says when it is back.
        server = NAMES[component]

        # A probe is at most 10 s behind the server's return, a retried message up to its 30 s backoff.
        def not_yet_back() -> list[str]:
            return [n for n in REPORTED_BY[component] if not outage_lines(tmp_path / f"{n}.log", server)[1]]

        try:
            await wait_for(lambda: not not_yet_back(), timeout_s=120, what="the 'reachable again' lines")
        except TimeoutError:
            raise AssertionError(f"no '{server} reachable again' line from {not_yet_back()}") from None

        # Waiting for a server costs next to nothing: no client spins through reconnects (a spinning
        # one uses a whole core; a waiting one well under a second in these 30 s).
        limit = CPU_SHARE_WHILE_DOWN * OUTAGE_S
        busy = {name: round(used, 1) for name, used in cpu_down.items() if used > limit}
        assert not busy, f"CPU seconds used in {OUTAGE_S:.0f} s of the {component} outage: {busy}"

        # No service process exited (and none was started twice) during the outage.
        for name, proc in pipeline.procs.items():
            assert proc.poll() is None, (
                f"{name} exited ({proc.returncode}) after a {outage:.0f}s {component} outage"
            )
        pipeline.stop()

    for name in SERVICES:
        records = log_records(tmp_path / f"{name}.log")
        starts = [r for r in records if r.get("msg") == "starting"]
        assert len(starts) == 1, f"{name} started {len(starts)} times"
        assert not [r for r in records if "exc" in r], f"{name} logged a traceback"
        rejected = [r for r in records if "dead-letter" in str(r.get("msg", ""))]
        assert not rejected, f"{name} dead-lettered good input during the outage: {rejected[0]}"
        down, again = outage_lines(tmp_path / f"{name}.log", server)
        if name in REPORTED_BY[component]:
            assert down, f"{name} logged nothing about the {server} outage"
            assert again, f"{name} did not log that {server} was reachable again"
        assert len(down) <= MAX_OUTAGE_LINES, f"{name} logged {len(down)} lines about the outage"
        client = [
            r for r in records if str(r.get("logger", "")).startswith(("aiokafka", "asyncpg", "asyncssh"))
        ]
        assert len(client) <= MAX_OUTAGE_LINES, f"{name}: {len(client)} lines from client libraries"
