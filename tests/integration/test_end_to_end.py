"""One broadcast of 10,000 customers through the four services, each its own process, against the
sandbox ESP on the real SFTP server: the list file, the statuses, the response counts, re-gathering.
"""

from __future__ import annotations

import csv
import io
import secrets
import shutil
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from shared.esp import AccountsSettings
from shared.infra.db import connect
from shared.infra.kafka import ensure_topics
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.messages import Stage, State
from shared.model.topics import Topic
from shared.operations.gathering import gather_now
from shared.operations.jobs import build_job, funnel, publish_job, read_statuses
from tests.fixtures.kafka import produce, read_until
from tests.fixtures.processes import running, service_env, stop
from tests.fixtures.sandbox import running_sandbox
from tests.fixtures.servers import Servers
from tests.fixtures.waits import wait_for
from tools.demo import FLAVORS, demo_job, seed_customers, write_accounts_file

TYPES = ("sent", "delivered", "bounce_hard", "bounce_soft", "open", "click", "unsubscribe", "complaint")
SERVICES = ("uploader", "monitor", "gatherer", "loader")


async def loaded_counts(pg: PostgresSettings, broadcast_id: str) -> dict[str, int]:
    conn = await connect(pg)
    try:
        rows = await conn.fetch(
            "SELECT type, count(*) AS n FROM responses.events WHERE broadcast_id = $1 GROUP BY type",
            broadcast_id,
        )
    finally:
        await conn.close()
    return {r["type"]: r["n"] for r in rows}


async def test_a_broadcast_end_to_end(
    servers: Servers, kafka: KafkaSettings, database: PostgresSettings, unique: str, tmp_path: Path
) -> None:
    account = f"t{unique}"
    conn = await connect(database)
    try:
        await seed_customers(conn, 10_000)
        selected = await conn.fetch(
            "SELECT email, first_name, last_name, city, communication_key "
            "FROM crm.customers WHERE NOT opted_out"
        )
    finally:
        await conn.close()
    expected_rows = sorted(
        (r["email"], r["first_name"], r["last_name"], r["city"], r["communication_key"]) for r in selected
    )
    assert len(expected_rows) == 10_000 - 10_000 // 33

    token = secrets.token_urlsafe(16)
    token_file = tmp_path / "token"
    token_file.write_text(token)
    await ensure_topics(kafka)
    with (
        running_sandbox(
            servers.sftp_local_root, token, accounts=account, phase_delay_s="0.3", rows_per_file="1500"
        ) as esp,
        ExitStack() as stack,
    ):
        accounts_file = tmp_path / "accounts.json"
        write_accounts_file(
            accounts_file, [FLAVORS["sandbox"].account_entry("sandbox", account, esp.url, token_file)]
        )
        env = service_env(
            servers.env,
            ESPBRIDGE_KAFKA_TOPIC_PREFIX=kafka.topic_prefix,
            ESPBRIDGE_PG_DATABASE=database.database,
            ESPBRIDGE_ACCOUNTS_FILE=str(accounts_file),
            ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="0.5",
            ESPBRIDGE_MONITOR_POLL_INITIAL_S="0.1",
            ESPBRIDGE_MONITOR_POLL_MAX_S="0.5",
        )
        procs = {
            name: stack.enter_context(running(f"services.{name}", env, tmp_path / f"{name}.log"))
            for name in SERVICES
        }

        job = build_job(demo_job(f"e2e-{unique}", "sandbox", account))
        await publish_job(kafka, job)
        manifest_file = esp.account_dir(account) / "manifest" / f"{job.job_id}.json"

        async def all_loaded() -> dict[str, Any] | None:
            if not manifest_file.exists():
                return None
            manifest: dict[str, Any] = orjson.loads(manifest_file.read_bytes())
            if not manifest["complete"]:
                return None
            counts = await loaded_counts(database, job.job_id)
            return manifest if all(counts.get(t, 0) == manifest["counts"][t] for t in TYPES) else None

        manifest = await wait_for(all_loaded, timeout_s=240, interval_s=0.5, what="every response loaded")

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
        assert upload_done.counts["excluded"] == 10_000 // 33
        assert {s.stage for s in statuses} >= {Stage.GATHER, Stage.LOAD}

        # Response counts per type equal the ESP's manifest exactly, in the events and the aggregates.
        assert manifest["recipients"] == len(expected_rows)
        assert await loaded_counts(database, job.job_id) == {t: n for t, n in manifest["counts"].items() if n}
        loaded = await funnel(database, job.job_id)
        assert loaded is not None
        assert loaded["opens"] == manifest["counts"]["open"]
        assert loaded["bounce_hard"] == manifest["counts"]["bounce_hard"]

        # Sent exactly once.
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{esp.api(account)}/_sandbox/stats", headers=esp.headers) as resp,
        ):
            stats = await resp.json()
        assert stats["sends_created"] == {job.job_id: 1}

        # A redelivered ListUploaded (as after a monitor crash) follows the existing send, never a new one.
        (uploaded,) = await read_until(kafka, Topic.BROADCAST_LISTS, lambda rs: len(rs) >= 1)
        await produce(kafka, Topic.BROADCAST_LISTS, [(uploaded.key, uploaded.value or b"")])

        async def second_send_done() -> bool:
            done = [
                s
                for s in await read_statuses(kafka, job.job_id)
                if (s.stage, s.state) == (Stage.SEND, State.DONE)
            ]
            return len(done) == 2

        await wait_for(second_send_done, timeout_s=60, what="the redelivered list followed to its send")
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{esp.api(account)}/_sandbox/stats", headers=esp.headers) as resp,
        ):
            assert (await resp.json())["sends_created"] == {job.job_id: 1}

        # Gathering again adds no rows: a scan finds nothing new, and a file the ESP delivers again
        # (same content, new file) is gathered but its events are already there.
        assert (
            await gather_now(kafka, database, servers.sftp, AccountsSettings(accounts_file=accounts_file))
            == []
        )
        archived = sorted((esp.account_dir(account) / "archive").glob("*_opens.csv"))
        assert archived, "gathered files are archived on the ESP's site"
        again = esp.account_dir(account) / "responses" / archived[0].name
        shutil.copyfile(archived[0], again)
        conn = await connect(database)
        try:
            await wait_for(
                lambda: _archived_twice(conn, archived[0].name),
                timeout_s=60,
                what="the re-delivered file gathered",
            )
        finally:
            await conn.close()
        assert await loaded_counts(database, job.job_id) == {t: n for t, n in manifest["counts"].items() if n}

        for name, proc in procs.items():
            assert stop(proc) == 0, f"{name} did not stop cleanly"
    for name in SERVICES:
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text(), f"{name} logged a traceback"


async def _archived_twice(conn: Any, name: str) -> bool:
    n = await conn.fetchval(
        "SELECT count(*) FROM control.gathered_files WHERE path LIKE '%/' || $1 AND state = 'archived'", name
    )
    return int(n) == 2
