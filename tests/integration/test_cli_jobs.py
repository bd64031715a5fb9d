"""``espbridge job check``, ``job publish``, ``job list`` and ``job status [--follow]`` as an operator
runs them, against real servers: a job that would fail is refused at the prompt with the reason
and nothing is published; the run history comes from the control tables; ``--follow`` shows a
broadcast's stages as they are recorded and ends when the broadcast does."""

from __future__ import annotations

import asyncio
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest

from cli.history import view_header
from shared.infra.db import connect
from shared.infra.db.jobs import JobFilters, record_status, upsert_job
from shared.model.messages import BroadcastStatus, Stage, State
from shared.model.topics import Topic
from shared.operations import lists
from shared.operations.checking import Verdict, job_id_finding
from shared.operations.jobs import build_job, list_jobs, view_job
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import count_records
from tests.fixtures.servers import ROOT, free_port
from tests.fixtures.waits import wait_for
from tests.integration.test_dlq import Cli
from tools.demo import NOT_OPTED_OUT, demo_job

COLUMNS = ["email", "first_name", "last_name", "city", "communication_key"]
HEADER = "Email,FirstName,LastName,City,CommunicationKey"


def job_file(deployment: Deployment, name: str, **changes: Any) -> Path:
    """A job file as an operator writes it: the demo broadcast with ``changes``."""
    doc = {**demo_job(f"{name}-{deployment.unique}", "sandbox", deployment.account), **changes}
    path = deployment.folder / f"{name}.json"
    path.write_bytes(orjson.dumps(doc))
    return path


def cli_for(deployment: Deployment, **settings: str) -> Cli:
    """The CLI with the deployment's servers, topics, database and accounts (a sandbox account whose
    API is never called, a file-only account), plus ``settings``."""
    accounts = deployment.accounts_file(
        [
            deployment.offline_account("sandbox", deployment.account),
            {"esp": "files", "account": deployment.account, "connector": "generic_sftp"},
        ]
    )
    return Cli(deployment.env(accounts, **settings))


def table(name: str = "crm.customers", columns: list[str] = COLUMNS) -> dict[str, Any]:
    return {"kind": "table", "table": name, "columns": columns}


PAST = (datetime.now(UTC) - timedelta(hours=2)).isoformat()
BAD: list[tuple[str, dict[str, Any], str]] = [
    # name, the job's changes, the failed check and what it says
    (
        "missing-table",
        {"selection": table("crm.missing")},
        "selection  table or view crm.missing does not exist",
    ),
    ("unknown-account", {"account": "nobody"}, "account    ESP account sandbox/nobody is not configured"),
    (
        "missing-column",
        {"selection": table(columns=[*COLUMNS, "shoe_size"])},
        "selection  crm.customers has no column shoe_size",
    ),
    ("past-send-time", {"send_at": PAST}, "send time  send_at "),
    (
        "send-from-a-file-only-account",
        {"esp": "files"},
        "account    files/{account} uses the generic_sftp connector, which cannot send: publish the job "
        "with mode upload_only",
    ),
]


@pytest.mark.parametrize(("name", "changes", "reason"), BAD, ids=[b[0] for b in BAD])
async def test_job_check_says_why_a_job_would_fail_exits_2_and_publishes_nothing(
    deployment: Deployment, name: str, changes: dict[str, Any], reason: str
) -> None:
    await deployment.seed(40)

    checked = cli_for(deployment)("job", "check", str(job_file(deployment, name, **changes)))

    assert checked.returncode == 2, checked.stderr
    failed = [
        " ".join(line.split()) for line in checked.stdout.splitlines() if line.strip().startswith("FAILED")
    ]
    assert len(failed) == 1, checked.stdout
    assert failed[0].startswith(" ".join(("FAILED " + reason.format(account=deployment.account)).split()))
    assert checked.stdout.rstrip().endswith("the job would fail: 1 problem (nothing was published)")
    assert await count_records(deployment.kafka, Topic.BROADCAST_JOBS) == 0


async def test_job_publish_checks_first_a_missing_table_is_an_error_at_the_prompt(
    deployment: Deployment,
) -> None:
    path = job_file(deployment, "missing", selection=table("crm.missing"))

    published = cli_for(deployment)("job", "publish", str(path))

    assert (published.returncode, published.stdout) == (2, "")
    assert published.stderr.splitlines() == [
        "espbridge: the job fails its check, nothing was published:",
        "  selection: table or view crm.missing does not exist",
    ]
    assert await count_records(deployment.kafka, Topic.BROADCAST_JOBS) == 0


async def test_a_good_job_is_checked_with_its_first_rows_as_the_list_file_holds_them_then_published(
    deployment: Deployment,
) -> None:
    await deployment.seed(40)  # customer 33 is opted out (in crm.subscriptions)
    cli, path = cli_for(deployment), job_file(deployment, "good")
    conn = await connect(deployment.database)
    try:
        rows = await conn.fetch(f"SELECT {', '.join(COLUMNS)} FROM crm.customers WHERE {NOT_OPTED_OUT}")
    finally:
        await conn.close()
    list_rows = set(lists.encode_rows(rows, ",", "\n", "utf-8").decode().splitlines())  # quoted as CSV

    checked = cli("job", "check", str(path), "--json")

    assert checked.returncode == 0, checked.stdout
    found = orjson.loads(checked.stdout)
    assert (found["ok"], found["recipients"], found["excluded"]) == (True, 39, 1)
    assert (found["excluded_by_subscription_state"], found["excluded_by_suppression_column"]) == (1, 0)
    assert {c["check"]: c["verdict"] for c in found["checks"]} == dict.fromkeys(
        ["account", "field map", "job id", "selection", "recipients", "send time", "size"], "ok"
    )
    head = found["list_file"]
    assert head["path"] == f"sandbox/{deployment.account}/drop/good-{deployment.unique}.csv"
    header, *first = head["text"].splitlines()
    assert header == HEADER
    assert len(first) == head["rows"] == 5
    assert set(first) <= list_rows
    assert await count_records(deployment.kafka, Topic.BROADCAST_JOBS) == 0

    published = cli("job", "publish", str(path))
    assert (published.returncode, published.stdout) == (0, f"good-{deployment.unique}\n")
    assert await count_records(deployment.kafka, Topic.BROADCAST_JOBS) == 1


async def test_a_job_too_large_for_the_topic_is_refused_with_the_limit_even_unchecked(
    deployment: Deployment,
) -> None:
    rows = [{"email": f"p{i}@example.com", "ck": f"{i:0120d}"} for i in range(10_000)]
    inline = {"kind": "inline", "rows": rows}
    path = job_file(
        deployment, "large", selection=inline, field_map={"email": "Email"}, communication_key="ck"
    )

    done = cli_for(deployment)("job", "publish", "--no-check", str(path))

    assert (done.returncode, done.stdout) == (2, "")
    assert re.match(
        r"espbridge: not published: the job is 1,\d{3},\d{3} bytes, over the limit of 1,048,576 bytes "
        r"\(the producer's max_request_size\)",
        done.stderr,
    ), done.stderr
    assert await count_records(deployment.kafka, Topic.BROADCAST_JOBS) == 0


async def test_a_job_id_in_use_or_cancelled_fails_the_check_and_a_failed_upload_may_be_retried(
    deployment: Deployment,
) -> None:
    await record(deployment, "sent", UPLOADED, SENT)
    await record(deployment, "upload-failed", (Stage.UPLOAD, State.FAILED, "crm.x does not exist"))
    conn = await connect(deployment.database)
    try:
        await conn.execute(
            "INSERT INTO control.job_cancels (job_id, requested_at) VALUES ('cancelled-first', now())"
        )
        found = {
            job_id: await job_id_finding(conn, build_job(demo_job(job_id, "sandbox", deployment.account)))
            for job_id in ("new", "sent", "upload-failed", "cancelled-first")
        }
    finally:
        await conn.close()

    assert {job_id: f.verdict for job_id, f in found.items()} == {
        "new": Verdict.OK,
        "sent": Verdict.FAILED,
        "upload-failed": Verdict.OK,
        "cancelled-first": Verdict.FAILED,
    }
    assert found["sent"].detail.startswith(
        "sent exists already (send done): publishing it again does nothing"
    )
    assert found["upload-failed"].detail.endswith("publishing it again retries the upload")
    assert found["cancelled-first"].detail.endswith(
        "was cancelled before it was published: it would be refused"
    )


@pytest.mark.parametrize(
    ("server", "command"),
    [
        ("kafka", ["check", "FILE"]),
        ("postgres", ["status", "--follow", "j"]),
    ],
    ids=["kafka-check", "postgres-follow"],
)
async def test_a_server_that_is_down_is_said_in_one_line_and_exits_1(
    deployment: Deployment, server: str, command: list[str]
) -> None:
    port = free_port()
    down = (
        {"ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}"}
        if server == "kafka"
        else {"ESPBRIDGE_PG_PORT": str(port)}
    )
    await deployment.seed(5)
    args = [str(job_file(deployment, "down")) if a == "FILE" else a for a in command]

    done = cli_for(deployment, **down)("job", *args)

    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [done.stderr.strip()], "one line, no traceback"
    name = "Kafka" if server == "kafka" else "PostgreSQL"
    assert done.stderr.startswith(f"espbridge: {name} at 127.0.0.1:{port}"), done.stderr
    assert " is unreachable" in done.stderr


# --- the run history -------------------------------------------------------------------------------


async def record(
    deployment: Deployment, job_id: str, *statuses: tuple[Stage, State, str], **job: Any
) -> None:
    """A job taken by the uploader (once), and statuses the services recorded for it."""
    conn = await connect(deployment.database)
    try:
        doc = {**demo_job(job_id, "sandbox", deployment.account), "requested_by": "test", **job}
        await upsert_job(conn, build_job(doc))
        for stage, state, detail in statuses:
            counts = (
                {"rows": 39, "excluded": 1, "bytes": 2048}
                if (stage, state) == (Stage.UPLOAD, State.DONE)
                else {}
            )
            await record_status(
                conn, BroadcastStatus(job_id=job_id, stage=stage, state=state, detail=detail, counts=counts)
            )
    finally:
        await conn.close()


async def loaded(deployment: Deployment, job_id: str, **events: int) -> None:
    """Events of each type loaded for a job, as the loader counts them for the funnel."""
    conn = await connect(deployment.database)
    try:
        await conn.executemany(
            "INSERT INTO responses.broadcast_type_counts (broadcast_id, type, events) VALUES ($1, $2, $3)",
            [(job_id, kind, n) for kind, n in events.items()],
        )
    finally:
        await conn.close()


UPLOADED = (Stage.UPLOAD, State.DONE, "39 recipients in sandbox/x/drop/j.csv")
SENT = (Stage.SEND, State.DONE, "39 recipients sent")


async def test_job_list_filters_on_state_stage_esp_account_and_time(deployment: Deployment) -> None:
    old = (datetime.now(UTC) - timedelta(days=3)).isoformat()
    await record(deployment, "sent", UPLOADED, (Stage.IMPORT, State.DONE, "imported"), SENT)
    await record(deployment, "failed", (Stage.UPLOAD, State.FAILED, "table or view crm.x does not exist"))
    await record(deployment, "old", UPLOADED, created_at=old)
    await record(deployment, "elsewhere", UPLOADED, account="other")

    async def listed(**filters: Any) -> list[str]:
        limit = filters.pop("limit", 50)
        return [j.job_id for j in await list_jobs(deployment.database, JobFilters(**filters), limit)]

    assert await listed() == ["elsewhere", "failed", "sent", "old"], "newest first"
    assert await listed(state="failed") == ["failed"]
    assert await listed(stage="send") == ["sent"]
    assert await listed(stage="upload", state="done") == ["elsewhere", "old"]
    assert await listed(account=deployment.account) == ["failed", "sent", "old"]
    assert await listed(esp="sandbox", account="other") == ["elsewhere"]
    assert await listed(since=datetime.now(UTC) - timedelta(days=2)) == ["elsewhere", "failed", "sent"]
    assert await listed(esp="nosuchesp") == []
    assert await listed(limit=2) == ["elsewhere", "failed"]

    shown = cli_for(deployment)("job", "list", "--state", "failed", "--since", "2d")
    assert shown.returncode == 0, shown.stderr
    header, row = shown.stdout.splitlines()
    assert header.split()[:5] == ["JOB", "ID", "CREATED", "ESP/ACCOUNT", "LIST"]
    assert row.split()[0] == "failed"
    assert "  upload  failed  " in row
    assert "table or view crm.x does not exist" in row


async def test_job_status_reads_the_control_tables_and_the_funnel(deployment: Deployment) -> None:
    await record(deployment, "j1", UPLOADED, (Stage.IMPORT, State.DONE, "imported"), SENT)
    await loaded(deployment, "j1", sent=39, delivered=37, open=12)
    cli = cli_for(deployment)

    shown, unknown = cli("job", "status", "j1"), cli("job", "status", "j2")
    view = await view_job(deployment.database, "j1")

    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert (
        lines[0] == f"job j1 → sandbox/{deployment.account}, list 'espbridge demo', message 'demo-newsletter'"
    )
    assert lines[2].startswith("  now: send done: 39 recipients sent")
    stages = [line.split()[2:4] for line in lines[4:7]]
    assert stages == [["upload", "done"], ["import", "done"], ["send", "done"]]
    assert {"rows=39", "excluded=1", "bytes=2048"} <= set(lines[4].split())
    assert lines[-1].startswith("response funnel: sent=39  delivered=37  bounce_hard=0")
    assert view is not None
    assert (view.ended, view.recipients, view.funnel and view.funnel["opens"]) == (True, 39, 12)
    assert unknown.returncode == 1
    assert "job j2 is not known" in unknown.stderr


async def test_a_cancelled_job_shows_who_cancelled_it_and_why(deployment: Deployment) -> None:
    await record(deployment, "j3", UPLOADED, (Stage.SEND, State.CANCELLED, "cancelled before its send"))
    conn = await connect(deployment.database)
    try:
        await conn.execute(
            "INSERT INTO control.job_cancels (job_id, reason, requested_by, requested_at) "
            "VALUES ($1, $2, $3, $4)",
            "j3",
            "wrong list",
            "ops-anna",
            datetime(2026, 11, 22, 9, 45, tzinfo=UTC),
        )
    finally:
        await conn.close()

    view = await view_job(deployment.database, "j3")

    assert view is not None
    assert (view.ended, view.succeeded, view.outcome) == (
        True,
        False,
        "cancelled at send: cancelled before its send",
    )
    updated = f"{view.summary.updated_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
    assert view_header(view)[2:] == [
        "  cancel requested by ops-anna at 2026-11-22 09:45:00: wrong list",
        f"  now: send cancelled: cancelled before its send (updated {updated})",
    ]


async def test_follow_shows_each_stage_as_it_is_recorded_and_ends_with_the_broadcast(
    deployment: Deployment,
) -> None:
    await record(deployment, "live", (Stage.UPLOAD, State.RUNNING, "writing sandbox/x/drop/live.csv"))
    cli = cli_for(deployment)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "cli", "job", "status", "live", "--follow", "--interval", "0.1", "--timeout", "60"),
        env=cli.env,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    seen: list[str] = []

    async def shows(text: str) -> None:
        async def line_with_it() -> bool:
            assert proc.stdout is not None
            seen.append((await asyncio.wait_for(proc.stdout.readline(), 30)).decode())
            return text in seen[-1]

        await wait_for(line_with_it, timeout_s=30, interval_s=0, what=f"--follow to show {text!r}")

    try:
        await shows("upload  running")
        await record(deployment, "live", UPLOADED, (Stage.IMPORT, State.DONE, "imported 39"))
        await shows("import  done")
        await loaded(deployment, "live", sent=20)
        await shows("response funnel: sent=20")
        await record(deployment, "live", SENT)
        code = await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    rest = (await proc.stdout.read()).decode().splitlines()
    assert code == 0
    assert rest[-1] == "job live ended: sent"
    assert any("send    done" in line for line in rest)
