"""Each service starts as its own process, joins its consumer group, works, and stops on SIGTERM."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import orjson
import pytest
from aiohttp import ClientSession

from shared.kafka import ensure_topics
from shared.messages import BroadcastStatus, DeadLetter, Stage, State
from shared.settings import KafkaSettings
from shared.topics import Topic
from tests.fixtures.kafka import Record, group_members, produce, read_until, wait_for
from tests.fixtures.processes import running, service_env, stop
from tests.fixtures.servers import ROOT, Servers

SERVICES = ["uploader", "monitor", "gatherer", "loader"]


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


@pytest.mark.parametrize("name", SERVICES)
async def test_service_joins_its_group_and_stops_on_sigterm(
    name: str, servers: Servers, kafka: KafkaSettings, tmp_path: Path
) -> None:
    env = service_env(servers.env, ESPBRIDGE_KAFKA_TOPIC_PREFIX=kafka.topic_prefix)
    group = f"{kafka.topic_prefix}espbridge-{name}"
    log = tmp_path / f"{name}.log"
    with running(f"services.{name}", env, log) as proc:
        members = await wait_for(
            lambda: _stable_members(kafka, group), timeout_s=60, what=f"{name} in group {group}"
        )
        assert len(members) == 1
        assert members[0]["client_id"].startswith(f"espbridge-{name}")
        port = _health_port(log)
        async with ClientSession() as http, http.get(f"http://127.0.0.1:{port}/healthz") as resp:
            assert resp.status == 200
            assert (await resp.json())["service"] == name
        assert stop(proc) == 0
    assert await group_members(kafka, group) == []
    text = log.read_text()
    assert '"msg":"stopped"' in text
    assert "Traceback" not in text


async def test_uploader_reports_valid_jobs_and_dead_letters_bad_ones(
    servers: Servers, kafka: KafkaSettings, tmp_path: Path
) -> None:
    good: dict[str, object] = {
        "job_id": "job-ok",
        "esp": "sandbox",
        "account": "demo",
        "list_name": "November",
        "message": "msg-1",
        "selection": {"kind": "table", "table": "crm.customers", "columns": ["email", "communication_key"]},
        "field_map": {"email": "Email"},
        "communication_key": "communication_key",
        "requested_by": "test",
        "created_at": datetime.now(UTC).isoformat(),
    }
    injected = {
        **good,
        "job_id": "job-bad",
        "selection": {
            "kind": "table",
            "table": "crm.x; DROP TABLE y",
            "columns": ["email", "communication_key"],
        },
    }
    garbage = b"\xff\xfenot json at all"
    env = service_env(servers.env, ESPBRIDGE_KAFKA_TOPIC_PREFIX=kafka.topic_prefix)
    await ensure_topics(kafka)
    with running("services.uploader", env, tmp_path / "uploader.log") as proc:
        await produce(
            kafka,
            Topic.BROADCAST_JOBS,
            [(b"job-ok", orjson.dumps(good)), (b"job-bad", orjson.dumps(injected)), (None, garbage)],
        )
        statuses = await read_until(
            kafka, Topic.BROADCAST_STATUS, lambda rs: {_status(r).job_id for r in rs} >= {"job-ok", "job-bad"}
        )
        letters = await read_until(kafka, Topic.DEADLETTER, lambda rs: len(rs) >= 2)
        assert stop(proc) == 0

    by_job = {s.job_id: s for s in map(_status, statuses)}
    assert (by_job["job-ok"].stage, by_job["job-ok"].state) == (Stage.UPLOAD, State.QUEUED)
    assert by_job["job-bad"].state is State.FAILED
    assert "selection.table.table" in by_job["job-bad"].detail
    payloads = {
        DeadLetter.from_json(r.value).payload: DeadLetter.from_json(r.value) for r in letters if r.value
    }
    assert set(payloads) == {orjson.dumps(injected), garbage}
    assert payloads[garbage].error_class == "InvalidMessageError"
    assert payloads[garbage].source.name == kafka.topic(Topic.BROADCAST_JOBS)
    assert payloads[garbage].source.partition is not None
    assert payloads[garbage].source.offset is not None


def _status(record: Record) -> BroadcastStatus:
    assert record.value is not None
    return BroadcastStatus.from_json(record.value)


async def _stable_members(kafka: KafkaSettings, group: str) -> list[dict[str, str]] | None:
    members = await group_members(kafka, group)
    return members if members and all(m["state"] == "Stable" for m in members) else None


def _health_port(log: Path) -> int:
    for line in log.read_text().splitlines():
        if '"health endpoint listening"' in line:
            url: str = orjson.loads(line)["url"]
            return int(url.rsplit(":", 1)[1].split("/", 1)[0])
    raise AssertionError("the service did not log its health endpoint")
