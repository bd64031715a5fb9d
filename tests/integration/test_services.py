"""Each service starts as its own process, joins its consumer group, works, and stops on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import ClientSession

from shared.infra.db import connect
from shared.infra.kafka import check_topics, ensure_topics
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.messages import DeadLetter, ListUploaded, State
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import group_members, produce, read_until, status_of
from tests.fixtures.processes import running, service_env, stop
from tests.fixtures.servers import ROOT, Servers
from tests.fixtures.waits import wait_for
from tools.demo import demo_job

SERVICES = ["uploader", "monitor", "gatherer", "loader", "syncer"]
GROUPS = {"syncer": "syncer-changes"}
"""A service whose subscribers have groups of their own: the one the group test watches."""


@pytest.mark.parametrize("name", SERVICES)
def test_help_describes_the_service(name: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", f"services.{name}", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    assert result.returncode == 0
    assert f"python -m services.{name}" in result.stdout
    assert "SIGTERM" in result.stdout


def _check(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", f"services.{name}", "--check"],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
        timeout=120,
    )


async def test_check_reports_what_the_service_needs_and_creates_nothing(
    servers: Servers, kafka: KafkaSettings, database: PostgresSettings
) -> None:
    env = service_env(
        servers.env, ESPBRIDGE_KAFKA_TOPIC_PREFIX=kafka.topic_prefix, ESPBRIDGE_PG_DATABASE=database.database
    )
    result = _check("loader", env)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert f"ok   Kafka at {kafka.bootstrap_servers}: answers" in lines
    events = kafka.topic(Topic.RESPONSE_EVENTS)
    assert f"ok   topic {events}: missing (a service creates it when it starts)" in lines
    assert any(line.startswith(f"ok   PostgreSQL at {database.host}:{database.port}/") for line in lines)
    assert [r.partitions for r in await check_topics(kafka)] == [None] * len(Topic)  # still none

    await ensure_topics(kafka)  # 6 partitions of responses.*, where the service's settings ask for 12
    again = _check("loader", env)
    assert again.returncode == 1
    lines = again.stdout.splitlines()
    assert f"FAIL topic {events}: 6 partitions, fewer than the 12 configured" in lines
    assert f"ok   topic {kafka.topic(Topic.BROADCAST_JOBS)}: 3 partitions" in lines


async def test_check_of_a_service_that_reads_the_crm_reports_the_crm_migrations_too(
    servers: Servers, kafka: KafkaSettings, database: PostgresSettings
) -> None:
    env = service_env(
        servers.env, ESPBRIDGE_KAFKA_TOPIC_PREFIX=kafka.topic_prefix, ESPBRIDGE_PG_DATABASE=database.database
    )
    where = f"PostgreSQL at {database.host}:{database.port}"
    migrated = _check("syncer", env).stdout.splitlines()
    assert any(
        line.startswith(f"ok   {where}/{database.database} (crm migrations): answers") for line in migrated
    )

    # a CRM database of its own that nobody migrated: the syncer is not ready, and says why
    apart = _check("syncer", {**env, "ESPBRIDGE_CRM_DATABASE": "postgres"})
    assert apart.returncode == 1
    line = next(x for x in apart.stdout.splitlines() if "(crm migrations)" in x)
    assert line.startswith(
        f"FAIL {where}/postgres (crm migrations): answers; 0 migrations applied, pending: "
    )
    assert "0001_subscriptions" in line
    assert line.endswith("(run `espbridge db migrate`)")


async def test_check_fails_when_kafka_does_not_answer(servers: Servers, database: PostgresSettings) -> None:
    env = service_env(
        servers.env, ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS="127.0.0.1:9", ESPBRIDGE_PG_DATABASE=database.database
    )
    result = _check("monitor", env)
    assert result.returncode == 1
    assert result.stdout.startswith("FAIL Kafka at 127.0.0.1:9: "), result.stdout


@pytest.mark.parametrize("name", SERVICES)
async def test_service_joins_its_group_and_stops_on_sigterm(
    name: str, servers: Servers, kafka: KafkaSettings, tmp_path: Path
) -> None:
    env = service_env(servers.env, ESPBRIDGE_KAFKA_TOPIC_PREFIX=kafka.topic_prefix)
    group = f"{kafka.topic_prefix}espbridge-{GROUPS.get(name, name)}"
    log = tmp_path / f"{name}.log"
    with running(f"services.{name}", env, log) as proc:
        members = await wait_for(
            lambda: _stable_members(kafka, group), timeout_s=60, what=f"{name} in group {group}"
        )
        assert len(members) == 1
        assert members[0]["client_id"].startswith(f"espbridge-{name}")
        port = _health_port(log)

        async def healthy() -> dict[str, Any] | None:
            # a service of several subscribers (the syncer's three groups) is healthy once all run
            async with ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                return dict(await resp.json()) if resp.status == 200 else None

        health = await wait_for(healthy, timeout_s=60, what=f"{name}'s /healthz answering 200")
        assert health["service"] == name
        assert stop(proc) == 0
    assert await group_members(kafka, group) == []
    text = log.read_text()
    assert '"msg":"stopped"' in text
    assert "Traceback" not in text


async def test_uploader_fails_bad_jobs_clearly_and_dead_letters_them(deployment: Deployment) -> None:
    kafka = deployment.kafka
    accounts = deployment.accounts_file([deployment.offline_account("sandbox", "demo", "t0ken")])

    def job(job_id: str, **changes: object) -> bytes:
        doc = demo_job(job_id, "sandbox", "demo")
        doc["created_at"] = datetime.now(UTC).isoformat()
        doc.update(changes)
        return orjson.dumps(doc)

    table = {"kind": "table", "columns": ["email", "first_name", "last_name", "city", "communication_key"]}
    bad = {
        "job-unknown-account": job("job-unknown-account", account="nope"),
        "job-injection": job("job-injection", selection={**table, "table": "crm.x; DROP TABLE y"}),
        "job-no-table": job("job-no-table", selection={**table, "table": "crm.missing"}),
        "job-empty": job(
            "job-empty", selection={**table, "table": "crm.customers", "filters": {"city": "Atlantis"}}
        ),
    }
    garbage = b"\xff\xfenot json at all"
    with ExitStack() as stack:
        proc = deployment.start(stack, "uploader", deployment.env(accounts))
        await produce(
            kafka, Topic.BROADCAST_JOBS, [*((k.encode(), v) for k, v in bad.items()), (None, garbage)]
        )
        statuses = await read_until(
            kafka,
            Topic.BROADCAST_STATUS,
            lambda rs: {s.job_id for s in map(status_of, rs) if s.state is State.FAILED} >= set(bad),
        )
        letters = await read_until(kafka, Topic.DEADLETTER, lambda rs: len(rs) >= len(bad) + 1)
        assert stop(proc) == 0

    failed = {s.job_id: s.detail for s in map(status_of, statuses) if s.state is State.FAILED}
    assert "sandbox/nope is not configured" in failed["job-unknown-account"]
    assert "selection.table.table" in failed["job-injection"]
    assert "crm.missing does not exist" in failed["job-no-table"]
    assert "the selection has no recipients" in failed["job-empty"]
    payloads = {
        DeadLetter.from_json(r.value).payload: DeadLetter.from_json(r.value) for r in letters if r.value
    }
    assert set(payloads) == {*bad.values(), garbage}
    assert payloads[garbage].error_class == "InvalidMessageError"
    assert payloads[garbage].source.name == kafka.topic(Topic.BROADCAST_JOBS)
    assert payloads[garbage].source.offset is not None
    assert payloads[bad["job-no-table"]].error_class == "SelectionError"
    conn = await connect(deployment.database)
    try:
        states = {r["job_id"]: r["state"] for r in await conn.fetch("SELECT job_id, state FROM control.jobs")}
    finally:
        await conn.close()
    assert states == {"job-unknown-account": "failed", "job-no-table": "failed", "job-empty": "failed"}


async def _stable_members(kafka: KafkaSettings, group: str) -> list[dict[str, str]] | None:
    members = await group_members(kafka, group)
    return members if members and all(m["state"] == "Stable" for m in members) else None


def _health_port(log: Path) -> int:
    for line in log.read_text().splitlines():
        if '"health endpoint listening"' in line:
            url: str = orjson.loads(line)["url"]
            return int(url.rsplit(":", 1)[1].split("/", 1)[0])
    raise AssertionError("the service did not log its health endpoint")


async def test_uploader_reads_inline_and_csv_selections(
    deployment: Deployment, sftp_folder: tuple[str, Path]
) -> None:
    kafka = deployment.kafka
    remote, local = sftp_folder
    entry = deployment.offline_account("sandbox", "demo", "t0ken") | {"sftp_root": remote}
    accounts = deployment.accounts_file([entry])
    (local / "drop").mkdir()
    csv_dir = deployment.folder / "lists"
    csv_dir.mkdir()
    (csv_dir / "people.csv").write_text(
        "mail;name;key;opted_out\n"
        "x@example.com;Xi;k1;no\n"
        'y@example.com;"Y; the second";k2;yes\n'
        "z@example.com;Zed;k3;\n",
        encoding="utf-8",
    )
    base = {
        "esp": "sandbox",
        "account": "demo",
        "list_name": "l",
        "message": "m",
        "requested_by": "t",
        "created_at": datetime.now(UTC).isoformat(),
    }
    inline = {
        **base,
        "job_id": "job-inline",
        "selection": {
            "kind": "inline",
            "rows": [
                {"email": "a@example.com", "first": "Ann, Jr", "ck": "c1"},
                {"email": "b@example.com", "first": "Bo", "ck": "c2", "opted_out": True},
            ],
        },
        "field_map": {"email": "Email", "first": "FirstName"},
        "communication_key": "ck",
    }
    from_csv = {
        **base,
        "job_id": "job-csv",
        "selection": {"kind": "csv", "path": "people.csv", "delimiter": ";"},
        "field_map": {"mail": "Email", "name": "FirstName"},
        "communication_key": "key",
    }
    escape = {**from_csv, "job_id": "job-escape", "selection": {"kind": "csv", "path": "../../etc/passwd"}}
    with ExitStack() as stack:
        proc = deployment.start(
            stack, "uploader", deployment.env(accounts, ESPBRIDGE_UPLOADER_CSV_DIR=str(csv_dir))
        )
        await produce(
            kafka, Topic.BROADCAST_JOBS, [(None, orjson.dumps(j)) for j in (inline, from_csv, escape)]
        )
        lists = await read_until(kafka, Topic.BROADCAST_LISTS, lambda rs: len(rs) >= 2)
        statuses = await read_until(
            kafka,
            Topic.BROADCAST_STATUS,
            lambda rs: any(
                status_of(r).job_id == "job-escape" and status_of(r).state is State.FAILED for r in rs
            ),
        )
        assert stop(proc) == 0

    uploaded = {u.job_id: u for u in (ListUploaded.from_json(r.value or b"") for r in lists)}
    assert (uploaded["job-inline"].rows, uploaded["job-inline"].excluded) == (1, 1)
    assert (uploaded["job-csv"].rows, uploaded["job-csv"].excluded) == (2, 1)
    assert (
        local / "drop" / "job-inline.csv"
    ).read_text() == 'Email,FirstName,CommunicationKey\na@example.com,"Ann, Jr",c1\n'
    assert (local / "drop" / "job-csv.csv").read_text() == (
        "Email,FirstName,CommunicationKey\nx@example.com,Xi,k1\nz@example.com,Zed,k3\n"
    )
    escaped = next(
        status_of(r)
        for r in statuses
        if status_of(r).job_id == "job-escape" and status_of(r).state is State.FAILED
    )
    assert "outside" in escaped.detail
    assert not (local / "drop" / "job-escape.csv").exists()
