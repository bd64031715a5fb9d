"""Change data capture on the real Kafka Connect worker: Debezium's PostgreSQL connector posted by
espbridge captures the CRM's crm.subscriptions onto the test's captured topic, and the syncer's
decoding makes requests of the CRM's writes and none of espbridge's own."""

from __future__ import annotations

import asyncpg
import pytest

from cli import main as cli_main
from shared.model.messages import RequestOrigin, SubscriptionState
from shared.model.topics import Topic
from tests.fixtures.capture import Capture, as_json, crm_write, espbridge_write, requests_of, subscribe_sql
from tests.fixtures.kafka import read_until
from tests.fixtures.servers import Servers

EMAIL = "ann@example.com"


async def test_enabling_twice_is_one_connector_and_disabling_leaves_no_slot(
    capture: Capture, db: asyncpg.Connection
) -> None:
    first = await capture.enable()
    again = await capture.enable()

    assert first.running
    assert again.running
    assert (await capture.connectors()).count(capture.names.connector) == 1
    status = await capture.status()
    assert status.slot is not None
    assert status.slot.active
    assert status.slot.database == capture.crm.database

    outcome = await capture.disable()

    assert (outcome.connector_deleted, outcome.slot_dropped, outcome.publication_dropped) == (
        True,
        True,
        True,
    )
    assert capture.names.connector not in await capture.connectors()
    assert (
        await db.fetchval(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1", capture.names.slot
        )
        == 0
    )
    assert (
        await db.fetchval("SELECT count(*) FROM pg_publication WHERE pubname = $1", capture.names.publication)
        == 0
    )


async def test_a_crm_update_is_captured_and_becomes_a_request_to_push(
    capture: Capture, db: asyncpg.Connection
) -> None:
    await capture.enable()

    await crm_write(
        db, subscribe_sql(), EMAIL, "mailup", "emea", "2", as_json({"first_name": "Ann", "points": 3})
    )
    await crm_write(
        db,
        "UPDATE crm.subscriptions SET state = 'unsubscribed', reason = 'asked the call centre'"
        " WHERE email = $1",
        EMAIL,
    )

    records = await read_until(capture.kafka, Topic.CRM_CAPTURED, lambda found: len(found) >= 2, timeout_s=30)
    subscribed, unsubscribed = requests_of(records, capture.kafka.topic_prefix)
    assert subscribed is not None
    assert unsubscribed is not None
    assert (subscribed.email, subscribed.esp, subscribed.account, subscribed.list) == (
        EMAIL,
        "mailup",
        "emea",
        "2",
    )
    assert subscribed.state is SubscriptionState.SUBSCRIBED
    assert subscribed.fields == {"first_name": "Ann", "points": "3"}
    assert unsubscribed.state is SubscriptionState.UNSUBSCRIBED
    assert unsubscribed.reason == "asked the call centre"
    assert {r.origin for r in (subscribed, unsubscribed)} == {RequestOrigin.CAPTURE}
    assert {r.source for r in (subscribed, unsubscribed)} == {"crm"}
    row_changed_at = await db.fetchval("SELECT changed_at FROM crm.subscriptions WHERE email = $1", EMAIL)
    assert unsubscribed.requested_at == row_changed_at
    assert subscribed.request_id != unsubscribed.request_id


async def test_espbridges_own_write_is_captured_but_becomes_no_request(
    capture: Capture, db: asyncpg.Connection
) -> None:
    await capture.enable()

    await crm_write(db, subscribe_sql(), EMAIL, "mailup", "emea", "2", as_json({}))
    await espbridge_write(
        db,
        "UPDATE crm.subscriptions SET state = 'unsubscribed', reason = 'unsubscribe', source = 'mailup/emea',"
        " change_id = gen_random_uuid(), changed_at = clock_timestamp() WHERE email = $1",
        EMAIL,
    )
    await crm_write(db, "UPDATE crm.subscriptions SET state = 'subscribed' WHERE email = $1", EMAIL)

    records = await read_until(capture.kafka, Topic.CRM_CAPTURED, lambda found: len(found) >= 3, timeout_s=30)
    requests = requests_of(records, capture.kafka.topic_prefix)
    assert [None if r is None else r.state for r in requests] == [
        SubscriptionState.SUBSCRIBED,
        None,  # espbridge's write: never pushed back (no echo)
        SubscriptionState.SUBSCRIBED,
    ]


def test_the_operator_enables_checks_and_disables_the_capture_from_the_cli(
    capture: Capture, servers: Servers, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in servers.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ESPBRIDGE_KAFKA_TOPIC_PREFIX", capture.kafka.topic_prefix)
    monkeypatch.setenv("ESPBRIDGE_CRM_DATABASE", capture.crm.database)
    monkeypatch.setattr(cli_main, "configure", lambda *_: None)  # the test's own logging stays

    def run(*args: str) -> tuple[int, str]:
        code = cli_main.main(["crm", "capture", *args])
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    enabled = run("enable")
    running = run("status")
    disabled = run("disable")
    stopped = run("status")
    monkeypatch.setenv("ESPBRIDGE_CONNECT_URL", "http://127.0.0.1:9")
    unreachable = run("status")

    assert enabled == (0, enabled[1])
    assert f"connector {capture.names.connector} RUNNING" in enabled[1]
    assert running[0] == 0
    assert f"slot       {capture.names.slot} in database {capture.crm.database}: active" in running[1]
    assert disabled[0] == 0
    assert f"replication slot {capture.names.slot} dropped" in disabled[1]
    assert stopped[0] == 1
    assert stopped[1].startswith("capture is not enabled")
    assert unreachable[0] == 1
    assert unreachable[1].count("\n") == 1
    assert unreachable[1].startswith(
        "espbridge: the Kafka Connect worker at http://127.0.0.1:9 is not reachable"
    )
