"""Bad broadcast jobs through the real uploader and monitor: each gets a failed status that names
the job and says why, a log line with the job id, and a dead letter with its original bytes; a
good job published after them on the same partition still goes through, and a list the ESP
refuses fails the import with the ESP's reason and is never sent.

An empty selection (no rows, or every row opted out) is a failure, not a done upload of zero
rows: nothing is uploaded, imported or sent, and the requester sees why."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from shared.infra.db import connect
from shared.infra.kafka import ensure_topics
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.messages import BroadcastStatus, DeadLetter, ListUploaded, Stage, State
from shared.model.topics import Topic
from tests.fixtures.kafka import produce, read_until
from tests.fixtures.pipeline import start_pipeline
from tests.fixtures.servers import Servers
from tools.demo import demo_job, seed_customers

KEY = b"one-partition"  # every job on one partition, in order: the good job comes last
COLUMNS = ["email", "first_name", "last_name", "city", "communication_key"]


def job(job_id: str, esp_account: str, **changes: Any) -> dict[str, Any]:
    doc = demo_job(job_id, "sandbox", esp_account)
    doc["created_at"] = datetime.now(UTC).isoformat()
    doc.update(changes)
    return doc


def table(name: str = "crm.customers", columns: list[str] = COLUMNS, **filters: Any) -> dict[str, Any]:
    return {"kind": "table", "table": name, "columns": columns, "filters": filters}


def bad_jobs(account: str) -> dict[str, tuple[bytes, str]]:
    """job id → (the message as published, what its failed status must say)."""
    cases: dict[str, tuple[dict[str, Any] | bytes, str]] = {
        "missing-fields": ({"job_id": "missing-fields", "esp": "sandbox"}, "account: Field required"),
        "unknown-esp": (job("unknown-esp", account, esp="nosuchesp"), "nosuchesp/"),
        "unknown-account": (
            job("unknown-account", account, account="nobody"),
            "sandbox/nobody is not configured",
        ),
        "table-injection": (
            job("table-injection", account, selection=table("crm.customers; drop table x")),
            "selection.table.table",
        ),
        "column-injection": (
            job(
                "column-injection",
                account,
                selection=table(columns=[*COLUMNS, '"email"--']),
                field_map={"email": "Email", '"email"--': "Extra"},
            ),
            "selection.table.columns",
        ),
        "no-such-table": (
            job("no-such-table", account, selection=table("crm.missing")),
            "crm.missing does not exist",
        ),
        "no-such-column": (
            job(
                "no-such-column",
                account,
                selection=table(columns=[*COLUMNS, "shoe_size"]),
                field_map={"email": "Email", "shoe_size": "ShoeSize"},
            ),
            "crm.customers has no column shoe_size",
        ),
        "no-rows": (
            job("no-rows", account, selection=table(city="Atlantis")),
            "the selection has no recipients (0 opted out)",
        ),
        "all-opted-out": (
            job("all-opted-out", account, selection=table(opted_out=True)),
            "the selection has no recipients (1 opted out)",
        ),
    }
    return {k: (v if isinstance(v, bytes) else orjson.dumps(v), why) for k, (v, why) in cases.items()}


NOT_JSON = b"\xff\xfe{not json"


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


async def test_bad_jobs_fail_clearly_and_never_block_the_good_job_behind_them(
    servers: Servers,
    kafka: KafkaSettings,
    database: PostgresSettings,
    unique: str,
    tmp_path: Path,
    stack: ExitStack,
) -> None:
    conn = await connect(database)
    try:
        await seed_customers(conn, 40)  # customer 33 is opted out
    finally:
        await conn.close()
    await ensure_topics(kafka)
    account = f"t{unique}"
    pipeline = start_pipeline(stack, servers, kafka.topic_prefix, database, tmp_path, [("sandbox", account)])
    bad = bad_jobs(account)
    # The ESP refuses every row: the field map puts first names in the Email column.
    refused = orjson.dumps(job("refused", account, field_map={"first_name": "Email", "email": "FirstName"}))
    good = orjson.dumps(job("good", account))
    await produce(
        kafka,
        Topic.BROADCAST_JOBS,
        [(KEY, NOT_JSON), *((KEY, body) for body, _ in bad.values()), (KEY, refused), (KEY, good)],
    )

    def finished(records: list[Any]) -> bool:
        done = {(s.job_id, s.stage, s.state) for s in map(_status, records)}
        return ("good", Stage.SEND, State.DONE) in done and ("refused", Stage.IMPORT, State.FAILED) in done

    statuses = [_status(r) for r in await read_until(kafka, Topic.BROADCAST_STATUS, finished, timeout_s=90)]
    letters = [
        DeadLetter.from_json(r.value or b"")
        for r in await read_until(kafka, Topic.DEADLETTER, lambda rs: len(rs) >= len(bad) + 2)
    ]
    pipeline.stop()

    failed = {s.job_id: s for s in statuses if s.state is State.FAILED}
    for job_id, (_, why) in bad.items():
        assert job_id in failed, f"{job_id} has no failed status"
        assert failed[job_id].stage is Stage.UPLOAD
        assert why in failed[job_id].detail, f"{job_id}: {failed[job_id].detail}"
    payloads = {d.payload: d for d in letters}
    for job_id, (body, _) in bad.items():
        assert body in payloads, f"{job_id} has no dead letter with its original bytes"
        assert payloads[body].source.name == kafka.topic(Topic.BROADCAST_JOBS)
    assert payloads[NOT_JSON].error_class == "InvalidMessageError"
    assert payloads[bad["no-rows"][0]].error_class == "EmptySelectionError"

    log = (tmp_path / "uploader.log").read_text()
    logged = {orjson.loads(line).get("job_id") for line in log.splitlines() if '"msg":"job ' in line}
    assert logged >= set(bad), f"no log line with the job id for {set(bad) - logged}"
    assert '"msg":"job rejected"' in log

    # The list the ESP refused: the import failed with the ESP's own reason, nothing was sent.
    assert "the ESP refused all" in failed["refused"].detail
    assert "line 2: invalid email" in failed["refused"].detail
    (rejected,) = [d for d in letters if d.service == "monitor"]
    assert rejected.error_class == "ImportRejectedError"
    assert ListUploaded.from_json(rejected.payload).job_id == "refused"
    sends = await pipeline.sends_created("sandbox")
    assert "refused" not in sends
    assert sends.get("good") == 1
    # Nothing of the bad jobs reached the ESP's site.
    drop = pipeline.esps["sandbox"].account_dir(account) / "drop"
    assert {p.name for p in drop.iterdir()} <= {"good.csv", "refused.csv"}


def _status(record: Any) -> BroadcastStatus:
    return BroadcastStatus.from_json(record.value)
