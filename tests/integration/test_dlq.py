"""`espbridge dlq list` and `espbridge dlq replay`, run as an operator runs them, against the real
services: a job fixed and replayed once, response rows loaded after a connector's configuration is
fixed (and not twice), and an unauthenticated webhook call that is never replayed."""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from dataclasses import dataclass

import aiohttp
import orjson

from shared.infra.db import connect
from shared.infra.settings import KafkaSettings
from shared.model.messages import DeadLetter, ListUploaded, Stage, State
from shared.model.topics import Topic
from shared.operations.jobs import build_job, publish_job, read_statuses
from tests.fixtures.deployment import Deployment, place
from tests.fixtures.jobs import record_jobs
from tests.fixtures.kafka import committed, count_records, read_until
from tests.fixtures.pipeline import loaded_counts, loaded_equal, start_pipeline, wait_all_loaded
from tests.fixtures.processes import healthy, stop
from tests.fixtures.servers import ROOT, free_port
from tests.fixtures.waits import wait_for
from tools.demo import demo_job


@dataclass
class Cli:
    """``python -m cli`` with a deployment's environment, as an operator runs it."""

    env: dict[str, str]

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [sys.executable, "-m", "cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert not done.stderr or done.returncode != 0, done.stderr
        return done


def rows_of(listing: str, letter_id: str) -> list[str]:
    """The rows of a ``dlq list`` table whose ID column is ``letter_id`` (not a time that holds it)."""
    return [line for line in listing.splitlines() if line.split(maxsplit=1)[:1] == [letter_id]]


async def test_a_job_replayed_after_its_table_exists_runs_once(deployment: Deployment) -> None:
    kafka, account = deployment.kafka, deployment.account
    table = f"crm.dlq_{deployment.unique}"
    await deployment.seed(50)
    with ExitStack() as stack:
        pipeline = start_pipeline(stack, deployment, [("sandbox", account)])
        cli = Cli(deployment.env(pipeline.accounts_file))
        doc = demo_job(f"dlq-{deployment.unique}", "sandbox", account)
        doc["selection"]["table"] = table
        job = build_job(doc)
        await publish_job(kafka, job)

        (record,) = await read_until(kafka, Topic.DEADLETTER, lambda rs: len(rs) >= 1)
        letter_id = f"{record.partition}:{record.offset}"
        listed = cli("dlq", "list")
        assert listed.returncode == 0
        (line,) = rows_of(listed.stdout, letter_id)
        assert "uploader" in line
        assert f"topic {kafka.topic(Topic.BROADCAST_JOBS)}" in line
        assert "SelectionError" in line
        assert f"table or view {table} does not exist" in line
        assert "  new  " in line
        assert len(rows_of(cli("dlq", "list", "--broadcast", job.job_id).stdout, letter_id)) == 1
        assert "no dead letters match (1 on" in cli("dlq", "list", "--service", "gatherer").stdout

        conn = await connect(deployment.database)
        try:
            await conn.execute(f"CREATE VIEW {table} AS SELECT * FROM crm.customers")
        finally:
            await conn.close()
        dry = cli("dlq", "replay", "--id", letter_id, "--dry-run")
        assert (dry.returncode, "would replay" in dry.stdout) == (0, True), dry.stdout
        replayed = cli("dlq", "replay", "--id", letter_id)
        assert replayed.returncode == 0, replayed.stdout
        assert f"{letter_id}  replayed  to {kafka.topic(Topic.BROADCAST_JOBS)}" in replayed.stdout

        # The job's first run failed: only its replay's responses are waited for.
        await wait_all_loaded(pipeline, "sandbox", job.job_id, timeout_s=120, stop_at_failure=False)
        assert (pipeline.esps["sandbox"].account_dir(account) / "drop" / f"{job.job_id}.csv").exists()
        statuses = await read_statuses(kafka, job.job_id)
        assert (Stage.SEND, State.DONE) in {(s.stage, s.state) for s in statuses}

        again = cli("dlq", "replay", "--id", letter_id)
        assert again.returncode == 0
        assert f"{letter_id}  skipped  replayed " in again.stdout
        assert "replayed " in cli("dlq", "list", "--state", "replayed").stdout
        assert await count_records(kafka, Topic.BROADCAST_JOBS) == 2  # the job, and its one replay
        lists = await read_until(kafka, Topic.BROADCAST_LISTS, lambda rs: len(rs) >= 1)
        assert [ListUploaded.from_json(r.value or b"").job_id for r in lists] == [job.job_id]
        assert await pipeline.sends_created("sandbox") == {job.job_id: 1}
        assert await count_records(kafka, Topic.DEADLETTER) == 1
        pipeline.stop()


HEADER = "MessageType\turn\temail\tmailingId\tmailingName\ttimestamp\tlink\tbouncetype\tbouncereason\n"
ROWS = (
    "Send\tk1\ta@x.com\tjob-r\tNov\t22.11.2026 10:00\t\t\t\n"
    "Open\tk1\ta@x.com\tjob-r\tNov\t22.11.2026 10:05\t\t\t\n"
    "Teleport\tk2\tb@x.com\tjob-r\tNov\t22.11.2026 10:06\t\t\t\n"
    "Click\tk1\ta@x.com\tjob-r\tNov\t22.11.2026 10:07\thttps://x.com/\t\t\n"
)


async def test_response_rows_load_once_after_the_connector_configuration_is_fixed(
    deployment: Deployment,
) -> None:
    kafka, database, account = deployment.kafka, deployment.database, deployment.account
    entry = deployment.offline_account("generic_sftp", account)
    accounts = deployment.accounts_file([entry])  # timestamps are expected as Unix seconds: every row is bad
    await record_jobs(database, "generic_sftp", account, "job-r")
    folder = deployment.response_folders("generic_sftp", account)
    name = "20261122100000_FERGE_dates.txt"
    place(folder / "responses", name, HEADER + ROWS)
    cli = Cli(deployment.env(accounts))
    with ExitStack() as stack:
        env = deployment.env(accounts, ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="0.5")
        procs = [deployment.start(stack, service, env) for service in ("gatherer", "loader")]
        letters = await read_until(kafka, Topic.DEADLETTER, lambda rs: len(rs) >= 4)
        await wait_for(lambda: (folder / "archive" / name).exists(), timeout_s=30, what="the file archived")
        assert await loaded_counts(database, "job-r") == {}
        ids = {DeadLetter.from_json(r.value or b"").source.line: f"{r.partition}:{r.offset}" for r in letters}
        listed = cli("dlq", "list", "--kind", "file")
        assert listed.returncode == 0
        rows = [x for x in listed.stdout.splitlines() if "BadResponseRow" in x]
        assert len(rows) == 4
        assert all("  new  " in x for x in rows)
        assert f"file generic_sftp/{account}/responses/{name} line 2" in listed.stdout
        assert "timestamp '22.11.2026 10:00' is not Unix seconds" in listed.stdout

        entry["options"] = {"timestamp_format": "%d.%m.%Y %H:%M"}
        deployment.accounts_file([entry])
        first = cli("dlq", "replay", "--kind", "file")
        assert first.returncode == 1, first.stdout  # one row is still bad
        assert "replayed 3, still failing 1" in first.stdout
        assert f"{ids[4]}  still failing  line 4: unknown MessageType 'Teleport'" in first.stdout
        want = {"sent": 1, "open": 1, "click": 1}
        await wait_for(
            lambda: loaded_equal(database, "job-r", want), timeout_s=60, what="the replayed rows loaded"
        )
        listed = cli("dlq", "list", "--json")
        states = {x["id"]: x["state"] for x in orjson.loads(listed.stdout)}
        assert states == {ids[2]: "replayed", ids[3]: "replayed", ids[4]: "failing", ids[5]: "replayed"}

        second = cli("dlq", "replay", "--kind", "file")
        assert second.returncode == 1
        assert "skipped 3, still failing 1" in second.stdout
        forced = cli("dlq", "replay", "--kind", "file", "--state", "replayed", "--force")
        assert forced.returncode == 0, forced.stdout
        assert "replayed 3" in forced.stdout
        await wait_for(lambda: caught_up(kafka, "loader"), timeout_s=60, what="the loader caught up")
        assert await loaded_counts(database, "job-r") == want
        assert await count_records(kafka, Topic.RESPONSE_EVENTS) == 6  # three rows, published twice
        assert await count_records(kafka, Topic.DEADLETTER) == 4  # a row still bad is not dead-lettered again
        for proc in procs:
            assert stop(proc) == 0


async def caught_up(kafka: KafkaSettings, service: str) -> bool:
    """Whether a service's consumer group has committed every record of responses.events.v1."""
    return await committed(kafka, service, Topic.RESPONSE_EVENTS) == await count_records(
        kafka, Topic.RESPONSE_EVENTS
    )


async def test_an_unauthenticated_webhook_call_is_never_replayed(deployment: Deployment) -> None:
    kafka, account, unique = deployment.kafka, deployment.account, deployment.unique
    secret = f"secret-{unique}"
    accounts = deployment.accounts_file([deployment.offline_account("mailup", account, f"right-{unique}")])
    port = free_port()
    env = deployment.env(accounts, ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="0", ESPBRIDGE_HTTP_PORT=str(port))
    cli = Cli(deployment.env(accounts))
    body = f"Secret={secret}&EventType=unsubscribe&IdNL=42&Job=hook-1&Email=a%40x.com"
    url = f"http://127.0.0.1:{port}/webhooks/mailup/{account}"

    with ExitStack() as stack:
        proc = deployment.start(stack, "gatherer", env)
        await wait_for(lambda: healthy(port), timeout_s=60, what="the gatherer ready")
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=body, headers={"Content-Type": "application/x-www-form-urlencoded"}) as resp,
        ):
            assert resp.status == 401
        (record,) = await read_until(kafka, Topic.DEADLETTER, lambda rs: len(rs) >= 1)
        assert stop(proc) == 0
    letter_id = f"{record.partition}:{record.offset}"
    assert secret.encode() not in (record.value or b"")

    listed = cli("dlq", "list", "--kind", "webhook")
    assert listed.returncode == 0
    (line,) = rows_of(listed.stdout, letter_id)
    assert f"webhook webhook:mailup/{account}" in line
    assert "WebhookAuthError" in line
    assert "not-replayable" in line
    as_json = cli("dlq", "list", "--json")
    assert secret not in listed.stdout + as_json.stdout
    for args in (["--id", letter_id], ["--id", letter_id, "--force"], ["--all"]):
        refused = cli("dlq", "replay", *args)
        assert refused.returncode == 1
        assert f"{letter_id}  refused  the webhook call failed authentication" in refused.stdout
    assert await count_records(kafka, Topic.RESPONSE_EVENTS) == 0
