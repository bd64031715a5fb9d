"""Bad broadcast jobs through the real uploader and monitor: each gets a failed status that names
the job and says why, a log line with the job id, and a dead letter with its original bytes; a
good job published after them on the same partition still goes through, and a list the ESP
refuses fails the import with the ESP's reason (a failed status and the monitor's log line) and is
never sent.

An empty selection (no rows, or every row opted out) is a failure, not a done upload of zero
rows: nothing is uploaded, imported or sent, and the requester sees why."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from shared.model.messages import DeadLetter, Stage, State
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import Record, produce, read_until, status_of
from tests.fixtures.pipeline import start_pipeline
from tests.fixtures.processes import log_records
from tools.demo import demo_job

KEY = b"one-partition"  # every job on one partition, in order: the good job comes last
COLUMNS = ["email", "first_name", "last_name", "city", "communication_key"]


def job(job_id: str, esp_account: str, **changes: Any) -> dict[str, Any]:
    doc = demo_job(job_id, "sandbox", esp_account)
    doc["created_at"] = datetime.now(UTC).isoformat()
    doc.update(changes)
    return doc


def table(name: str = "crm.customers", columns: list[str] = COLUMNS, **filters: Any) -> dict[str, Any]:
    return {"kind": "table", "table": name, "columns": columns, "filters": filters}


def extra_column(column: str, header: str) -> dict[str, Any]:
    """The changes to the demo job that select one more column and map it to ``header``."""
    return {"selection": table(columns=[*COLUMNS, column]), "field_map": {"email": "Email", column: header}}


CHANGED: list[tuple[str, dict[str, Any], str]] = [
    # job id, its changes to the demo job, what its failed status must say
    ("unknown-esp", {"esp": "nosuchesp"}, "nosuchesp/"),
    ("unknown-account", {"account": "nobody"}, "sandbox/nobody is not configured"),
    ("table-injection", {"selection": table("crm.customers; drop table x")}, "selection.table.table"),
    ("column-injection", extra_column('"email"--', "Extra"), "selection.table.columns"),
    ("no-such-table", {"selection": table("crm.missing")}, "crm.missing does not exist"),
    ("no-such-column", extra_column("shoe_size", "ShoeSize"), "crm.customers has no column shoe_size"),
    (
        "no-such-selected-column",  # selected, never mapped: still refused, the list is never written
        {"selection": table(columns=[*COLUMNS, "shoe_size", "hat_size"])},
        "crm.customers has no column hat_size, shoe_size",
    ),
    ("no-rows", {"selection": table(city="Atlantis")}, "the selection has no recipients (0 opted out)"),
    (
        "all-opted-out",  # customer 33 is opted out everywhere in crm.subscriptions
        {"selection": table(email="customer33@example.com")},
        "the selection has no recipients (1 suppressed by the subscription state)",
    ),
]


def bad_jobs(account: str) -> dict[str, tuple[bytes, str]]:
    """job id → (the message as published, what its failed status must say)."""
    missing = orjson.dumps({"job_id": "missing-fields", "esp": "sandbox"})
    return {
        "missing-fields": (missing, "account: Field required"),
        **{job_id: (orjson.dumps(job(job_id, account, **changes)), why) for job_id, changes, why in CHANGED},
    }


NOT_JSON = b"\xff\xfe{not json"


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as s:
        yield s


async def test_bad_jobs_fail_clearly_and_never_block_the_good_job_behind_them(
    deployment: Deployment, stack: ExitStack
) -> None:
    kafka, account = deployment.kafka, deployment.account
    await deployment.seed(40)  # customer 33 is opted out (in crm.subscriptions)
    pipeline = start_pipeline(stack, deployment, [("sandbox", account)])
    bad = bad_jobs(account)
    # The ESP refuses every row: the field map puts first names in the Email column.
    refused = orjson.dumps(job("refused", account, field_map={"first_name": "Email", "email": "FirstName"}))
    good = orjson.dumps(job("good", account))
    await produce(
        kafka,
        Topic.BROADCAST_JOBS,
        [(KEY, NOT_JSON), *((KEY, body) for body, _ in bad.values()), (KEY, refused), (KEY, good)],
    )

    def finished(records: list[Record]) -> bool:
        done = {(s.job_id, s.stage, s.state) for s in map(status_of, records)}
        return ("good", Stage.SEND, State.DONE) in done and ("refused", Stage.IMPORT, State.FAILED) in done

    statuses = [status_of(r) for r in await read_until(kafka, Topic.BROADCAST_STATUS, finished, timeout_s=90)]
    letters = [
        DeadLetter.from_json(r.value or b"")
        for r in await read_until(kafka, Topic.DEADLETTER, lambda rs: len(rs) >= len(bad) + 1)
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

    records = log_records(deployment.folder / "uploader.log")
    logged = {r.get("job_id") for r in records if str(r.get("msg", "")).startswith("job ")}
    assert logged >= set(bad), f"no log line with the job id for {set(bad) - logged}"
    assert "job rejected" in [r.get("msg") for r in records]

    # The list the ESP refused: the import failed with the ESP's own reason, nothing was sent.
    assert "the ESP refused all" in failed["refused"].detail
    assert "line 2: invalid email" in failed["refused"].detail
    # The monitor's step failed the stage (its list was taken when its work was recorded): a log line.
    monitor = [r for r in log_records(deployment.folder / "monitor.log") if r.get("job_id") == "refused"]
    assert "ImportRejectedError" in [r.get("error_class") for r in monitor]
    sends = await pipeline.sends_created("sandbox")
    assert "refused" not in sends
    assert sends.get("good") == 1
    # Nothing of the bad jobs reached the ESP's site.
    drop = pipeline.esps["sandbox"].account_dir(account) / "drop"
    assert {p.name for p in drop.iterdir()} <= {"good.csv", "refused.csv"}
