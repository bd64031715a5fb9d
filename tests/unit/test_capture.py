"""Change data capture without a worker: the connector's names and configuration, and the decoding
of Debezium's events (as the live worker emits them) into the requests the syncer pushes."""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr

from shared.esp.accounts import AccountConfig, Accounts, SubscriptionPolicy
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.errors import ConfigurationError, InvalidMessageError
from shared.model.messages import CapturedChange, RequestOrigin, SubscriptionState
from shared.operations.capture import (
    CaptureStatus,
    ConnectSettings,
    TaskState,
    capture_config,
    capture_names,
    request_from_capture,
    requests_from_capture,
    worker_reason,
)

PREFIX = "staging."
SECRETS = "/run/secrets/crm-postgres.properties"
CHANGED_AT = "2026-12-08T01:18:40.753279Z"
UPDATED_AT = "2026-12-08T01:19:02.000001Z"


def row(**overrides: Any) -> dict[str, Any]:
    """A crm.subscriptions row image as Debezium 3.6 sends it (timestamptz ISO text, jsonb as text)."""
    image: dict[str, Any] = {
        "email": "ann@example.com",
        "esp": "mailup",
        "account": "emea",
        "list": "2",
        "state": "subscribed",
        "reason": "",
        "source": "crm",
        "changed_at": CHANGED_AT,
        "written_by": "crm",
        "change_id": None,
        "fields": '{"points": 3, "first_name": "Ann"}',
        "updated_at": CHANGED_AT,
    }
    image.update(overrides)
    return image


def change(
    op: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
    lsn: int = 28872928496,
    **source: Any,
) -> CapturedChange:
    """A captured event with its source block (position, commit time, snapshot flag)."""
    block = {"lsn": lsn, "txId": 164367, "ts_ms": 1796692720758, "snapshot": "false", **source}
    return CapturedChange.model_validate(
        {"op": op, "before": before, "after": after, "source": block, "ts_ms": 1796692720907}
    )


def test_a_crm_insert_asks_for_its_state_and_fields_at_changed_at() -> None:
    request = request_from_capture(change("c", after=row()), PREFIX)

    assert request is not None
    assert (request.email, request.esp, request.account, request.list) == (
        "ann@example.com",
        "mailup",
        "emea",
        "2",
    )
    assert request.state is SubscriptionState.SUBSCRIBED
    assert request.fields == {"points": "3", "first_name": "Ann"}
    assert request.origin is RequestOrigin.CAPTURE
    assert request.source == "crm"
    assert request.requested_at == datetime(2026, 12, 8, 1, 18, 40, 753279, tzinfo=UTC)


def test_a_crm_update_of_the_state_asks_for_the_new_state_with_its_reason() -> None:
    after = row(state="unsubscribed", reason="asked  the\tcall centre", changed_at=UPDATED_AT)

    request = request_from_capture(change("u", before=row(), after=after), PREFIX)

    assert request is not None
    assert request.state is SubscriptionState.UNSUBSCRIBED
    assert request.reason == "asked the call centre"
    assert request.requested_at == datetime(2026, 12, 8, 1, 19, 2, 1, tzinfo=UTC)


def test_an_update_of_the_fields_alone_asks_for_the_fields_only_at_updated_at() -> None:
    after = row(fields='{"first_name": "Anna"}', updated_at=UPDATED_AT)

    request = request_from_capture(change("u", before=row(), after=after), PREFIX)

    assert request is not None
    assert request.state is None
    assert request.fields == {"first_name": "Anna"}
    assert request.requested_at == datetime(2026, 12, 8, 1, 19, 2, 1, tzinfo=UTC)


def test_an_update_that_changes_neither_state_nor_fields_asks_for_nothing() -> None:
    after = row(reason="touched", updated_at=UPDATED_AT)

    assert request_from_capture(change("u", before=row(), after=after), PREFIX) is None


def test_espbridges_own_write_asks_for_nothing_so_no_change_echoes_back() -> None:
    after = row(
        state="unsubscribed", written_by="espbridge", source="mailup/emea", change_id=str(uuid.uuid4())
    )

    assert request_from_capture(change("u", before=row(), after=after), PREFIX) is None
    assert request_from_capture(change("c", after=after), PREFIX) is None


def test_a_crm_delete_asks_for_removed_at_its_commit() -> None:
    request = request_from_capture(change("d", before=row(written_by="espbridge")), PREFIX)

    assert request is not None
    assert request.state is SubscriptionState.REMOVED
    assert request.fields == {}
    assert request.requested_at == datetime.fromtimestamp(1796692720758 / 1000, UTC)


@pytest.mark.parametrize(
    ("op", "snapshot"),
    [("r", "true"), ("c", "last"), ("t", "false"), ("m", "false")],
    ids=["snapshot read", "snapshot flag", "truncate", "message"],
)
def test_snapshots_truncates_and_messages_ask_for_nothing(op: str, snapshot: str) -> None:
    captured = change(op, after=row() if op in ("r", "c") else None, snapshot=snapshot)

    assert request_from_capture(captured, PREFIX) is None


@pytest.mark.parametrize(
    "where",
    [{"esp": "*", "account": "*", "list": "*"}, {"account": "*", "list": "*"}],
    ids=["everywhere", "every account"],
)
def test_a_row_for_every_esp_has_nothing_to_push_to(where: dict[str, str]) -> None:
    assert (
        request_from_capture(
            change("u", before=row(**where), after=row(state="unsubscribed", **where)), PREFIX
        )
        is None
    )


def test_the_same_event_read_twice_is_the_same_request_and_another_position_another() -> None:
    captured = change("u", before=row(), after=row(state="unsubscribed"))

    first, again = request_from_capture(captured, PREFIX), request_from_capture(captured, PREFIX)
    later = request_from_capture(
        change("u", before=row(), after=row(state="unsubscribed"), lsn=28872999999), PREFIX
    )
    elsewhere = request_from_capture(captured, "production.")

    ids = [None if r is None else r.request_id for r in (first, again, later, elsewhere)]
    assert None not in ids
    assert ids[0] == ids[1]
    assert len(set(ids)) == 3


def test_times_in_microseconds_are_read_as_well_as_iso_text() -> None:
    micros = int(datetime(2026, 12, 8, 1, 18, 40, 753279, tzinfo=UTC).timestamp() * 1_000_000)

    request = request_from_capture(change("c", after=row(changed_at=micros, fields={"tier": "gold"})), PREFIX)

    assert request is not None
    assert request.requested_at == datetime(2026, 12, 8, 1, 18, 40, 753279, tzinfo=UTC)
    assert request.fields == {"tier": "gold"}


@pytest.mark.parametrize(
    ("image", "reason"),
    [
        (row(email="not-an-address"), "email"),
        (row(list="the newsletter"), "list"),
        (row(fields='{"address": {"city": "Rome"}}'), "'address' is not a single value"),
        (row(changed_at="yesterday"), "changed_at is not a time"),
        ({"email": "ann@example.com"}, "no column"),
    ],
    ids=["bad email", "bad list id", "nested field", "bad time", "missing column"],
)
def test_a_row_that_cannot_be_pushed_is_an_invalid_message_saying_why(
    image: dict[str, Any], reason: str
) -> None:
    with pytest.raises(InvalidMessageError, match=reason):
        request_from_capture(change("c", after=image), PREFIX)


def accounts() -> Accounts:
    policy = SubscriptionPolicy(lists=("2", "7"))
    return Accounts((AccountConfig(esp="mailup", account="emea", connector="mailup", subscriptions=policy),))


def test_a_row_for_every_list_asks_for_each_list_the_account_syncs() -> None:
    captured = change("u", before=row(list="*"), after=row(list="*", state="unsubscribed"))

    requests = requests_from_capture(captured, PREFIX, accounts())

    assert request_from_capture(captured, PREFIX) is None
    assert [(r.list, r.state) for r in requests] == [
        ("2", SubscriptionState.UNSUBSCRIBED),
        ("7", SubscriptionState.UNSUBSCRIBED),
    ]
    assert len({r.request_id for r in requests}) == 2


def test_every_list_of_an_unknown_account_is_one_request_the_push_can_refuse() -> None:
    captured = change("c", after=row(account="apac", list="*", state="unsubscribed"))

    requests = requests_from_capture(captured, PREFIX, accounts())

    assert [(r.account, r.list) for r in requests] == [("apac", "")]


def test_a_row_naming_its_list_is_one_request_from_either_function() -> None:
    captured = change("c", after=row())

    assert requests_from_capture(captured, PREFIX, accounts()) == [request_from_capture(captured, PREFIX)]


def test_names_are_valid_for_connect_postgresql_and_kafka_and_differ_per_deployment() -> None:
    kafka = KafkaSettings(topic_prefix=PREFIX)
    names = capture_names(kafka, PostgresSettings(database="espbridge"))
    long_db = PostgresSettings(database="Customer_Data_" + "x" * 60)
    long_a = capture_names(kafka, long_db)
    long_b = capture_names(kafka, long_db.with_database("customer_data_" + "x" * 60))

    assert names.connector == "espbridge-crm-staging-espbridge"
    assert names.slot == names.publication == "espbridge_staging_espbridge"
    assert names.topic == "staging.crm.subscriptions.captured.v1"
    assert capture_names(KafkaSettings(), PostgresSettings()).connector == "espbridge-crm-default-espbridge"
    for slot in (long_a.slot, long_b.slot):
        assert len(slot) <= 63
        assert re.fullmatch(r"[a-z0-9_]+", slot)
    assert long_a.slot != long_b.slot


def test_the_configuration_names_the_password_file_never_the_password() -> None:
    crm = PostgresSettings(database="crm", password=SecretStr("s3cret-pw"))

    config = capture_config(KafkaSettings(topic_prefix=PREFIX), crm, SECRETS)

    assert "s3cret-pw" not in str(config)
    assert config["database.password"] == f"${{file:{SECRETS}:password}}"
    assert config["snapshot.mode"] == "no_data"
    assert config["table.include.list"] == r"crm\.subscriptions"
    assert config["transforms.route.regex"] == r"espbridge\-crm\-staging\-crm\.crm\.subscriptions"
    assert config["transforms.route.replacement"] == "staging.crm.subscriptions.captured.v1"


def test_the_worker_may_reach_the_crm_by_another_address() -> None:
    config = capture_config(
        KafkaSettings(), PostgresSettings(), SECRETS, database_host="postgres", database_port=5432
    )

    assert (config["database.hostname"], config["database.port"]) == ("postgres", "5432")


@pytest.mark.parametrize("path", ["relative/file", "/run/a:b", "/run/${x}"])
def test_a_secrets_path_the_worker_cannot_read_through_its_provider_is_refused(path: str) -> None:
    with pytest.raises(ConfigurationError, match="absolute path"):
        capture_config(KafkaSettings(), PostgresSettings(), path)


def test_without_a_secrets_file_enabling_says_where_it_comes_from() -> None:
    with pytest.raises(ConfigurationError, match="ESPBRIDGE_CONNECT_SECRETS_FILE"):
        ConnectSettings(secrets_file=None).require_secrets_file()


def test_a_failed_task_is_told_by_its_root_cause() -> None:
    trace = (
        "org.apache.kafka.connect.errors.ConnectException: An exception occurred in the change event"
        " producer.\n"
        "\tat io.debezium.pipeline.ErrorHandler.setProducerThrowable(ErrorHandler.java:67)\n"
        'Caused by: org.postgresql.util.PSQLException: FATAL: password authentication failed for user "crm"\n'
        "\tat org.postgresql.core.v3.ConnectionFactoryImpl.doAuthentication(ConnectionFactoryImpl.java:693)\n"
    )
    status = CaptureStatus(
        capture_names(KafkaSettings(), PostgresSettings()),
        "RUNNING",
        (TaskState(0, "FAILED", "127.0.0.1:8083", trace),),
    )

    assert not status.running
    assert status.failure == worker_reason(trace)
    assert status.failure is not None
    assert "password authentication failed" in status.failure
    assert status.failure.startswith("org.apache.kafka.connect.errors.ConnectException")
