"""Message models: round trips, validation of names, times and versions, deterministic event ids."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from pydantic import ValidationError

from shared.model.contracts import message_models, message_schema
from shared.model.messages import (
    BroadcastJob,
    BroadcastStatus,
    CancelRequest,
    CapturedChange,
    DeadLetter,
    EventSource,
    EventType,
    ListUploaded,
    Message,
    ResponseEvent,
    ResponseFile,
    Stage,
    State,
    SubscriptionChange,
    SubscriptionRequest,
    SubscriptionState,
    event_id_for,
)
from shared.model.topics import REGISTRY

NOW = datetime(2026, 11, 22, 9, 30, tzinfo=UTC)


def job(**overrides: object) -> BroadcastJob:
    data: dict[str, object] = {
        "job_id": "job-1",
        "esp": "sandbox",
        "account": "demo",
        "list_name": "November newsletter",
        "message": "msg-42",
        "selection": {
            "kind": "table",
            "table": "crm.customers",
            "columns": ["email", "first_name", "communication_key"],
            "filters": {"segment": "gold"},
        },
        "field_map": {"email": "EmailAddress", "first_name": "FirstName"},
        "communication_key": "communication_key",
        "requested_by": "ops@example.com",
        "created_at": NOW.isoformat(),
    }
    data.update(overrides)
    return BroadcastJob.model_validate(data)


def examples() -> list[Message]:
    source = EventSource(kind="file", name="responses/opens.csv", line=2)
    return [
        job(),
        ListUploaded(
            job_id="job-1",
            esp="sandbox",
            account="demo",
            remote_path="sandbox/demo/drop/job-1.csv",
            rows=10,
            bytes=1234,
            sha256="a" * 64,
            excluded=2,
            uploaded_at=NOW,
        ),
        BroadcastStatus(job_id="job-1", stage=Stage.SEND, state=State.DONE, counts={"sent": 10}, at=NOW),
        CancelRequest(job_id="job-1", reason="wrong list", requested_at=NOW, requested_by="ops@example.com"),
        ResponseFile(esp="sandbox", account="demo", path="responses/opens.csv", size=10, mtime=NOW),
        ResponseEvent(
            event_id=event_id_for("sandbox", esp_event_id="e1"),
            esp="sandbox",
            account="demo",
            broadcast_id="job-1",
            communication_key="ck-1",
            type=EventType.CLICK,
            url="https://example.com/a?b=c",
            occurred_at=NOW,
            source=source,
            extra={"Browser": "Firefox"},
        ),
        SubscriptionChange(
            change_id=uuid.UUID(int=7),
            email="A@Example.com",
            esp="sandbox",
            account="demo",
            state=SubscriptionState.UNSUBSCRIBED,
            occurred_at=NOW,
        ),
        SubscriptionRequest(
            request_id=uuid.UUID(int=8),
            email="b@example.com",
            esp="sandbox",
            account="demo",
            list="12",
            state=SubscriptionState.SUBSCRIBED,
            fields={"FirstName": "Bo"},
            requested_at=NOW,
        ),
        CapturedChange(
            before=None,
            after={"email": "b@example.com", "esp": "sandbox", "state": "unsubscribed"},
            op="c",
            source={"lsn": 1, "txId": 2},
        ),
        DeadLetter(
            source=source, payload=b"\xff\x00not json", error_class="InvalidMessageError", message="x"
        ),
    ]


@pytest.mark.parametrize("message", examples(), ids=lambda m: type(m).__name__)
def test_every_message_round_trips_through_json(message: Message) -> None:
    data = message.to_json()
    again = type(message).from_json(data)
    assert again == message
    assert again.to_json() == data


def test_examples_cover_every_topic_model() -> None:
    assert {type(m) for m in examples()} == {spec.model for spec in REGISTRY.values()}


def test_dead_letter_keeps_the_original_bytes() -> None:
    (letter,) = [m for m in examples() if isinstance(m, DeadLetter)]
    assert letter.payload == b"\xff\x00not json", "bytes that are neither UTF-8 nor JSON"
    assert DeadLetter.from_json(letter.to_json()).payload == b"\xff\x00not json"


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("reason", "wrong list\nsend the other one", "pattern"),
        ("reason", "wrong list\u2028again", "pattern"),
        ("reason", "x" * 501, "at most 500"),
        ("requested_by", "ops\r\nX-Injected: 1", "pattern"),
        ("requested_at", "2026-11-22T09:30:00", "timezone"),
        ("job_id", "../etc/passwd", "pattern"),
    ],
)
def test_a_cancel_request_refuses_bad_fields(field: str, value: str, error: str) -> None:
    data = {"job_id": "job-1", "requested_at": NOW.isoformat(), field: value}
    with pytest.raises(ValidationError, match=error):
        CancelRequest.model_validate(data)


def test_a_cancel_request_needs_only_the_job_and_the_time() -> None:
    cancel = CancelRequest.model_validate({"job_id": "job-1", "requested_at": "2026-11-22T10:30:00+01:00"})
    assert (cancel.reason, cancel.requested_by, cancel.requested_at) == ("", "", NOW)


def test_messages_are_frozen() -> None:
    with pytest.raises(ValidationError):
        job().job_id = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "table", ["crm.customers; DROP TABLE x", "a.b.c", "1abc", 'crm."customers"', "crm.cust omers", ""]
)
def test_table_names_must_be_identifiers(table: str) -> None:
    with pytest.raises(ValidationError):
        job(selection={"kind": "table", "table": table, "columns": ["email"]})


def test_column_names_must_be_identifiers() -> None:
    with pytest.raises(ValidationError, match="pattern"):
        job(
            selection={"kind": "table", "table": "crm.customers", "columns": ["email", "x) OR (1=1"]},
            field_map={"email": "Email"},
            communication_key="email",
        )


def test_field_map_and_key_must_be_selected_columns() -> None:
    with pytest.raises(ValidationError, match="columns used but not selected: last_name"):
        job(field_map={"email": "Email", "last_name": "LastName"})


@pytest.mark.parametrize(
    ("overrides", "error"),
    [
        ({"list_name": "November\nnewsletter"}, "list_name"),
        ({"list_name": "x" * 201}, "at most 200"),
        ({"message": "msg-42\r\n"}, "message"),
        ({"field_map": {"email": "Email\nX-Injected: 1"}}, "field_map.email"),
        ({"field_map": {"email": "E" * 201}}, "at most 200"),
        ({"field_map": {"email": ""}}, "at least 1"),
        ({"requested_by": "ops\u2028someone"}, "requested_by"),
        (
            {
                "selection": {
                    "kind": "table",
                    "table": "crm.customers",
                    "columns": [f"c{i}" for i in range(1601)],
                }
            },
            "at most 1600",
        ),
    ],
)
def test_a_jobs_free_text_is_one_line_and_bounded(overrides: dict[str, object], error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        job(**overrides)


def test_naive_datetimes_are_refused_and_zones_normalized_to_utc() -> None:
    with pytest.raises(ValidationError, match="timezone"):
        job(created_at="2026-11-22T09:30:00")
    cet = datetime(2026, 11, 22, 10, 30, tzinfo=timezone(timedelta(hours=1)))
    assert job(created_at=cet.isoformat()).created_at == NOW
    assert job(created_at=cet.isoformat()).created_at.tzinfo == UTC


def test_upload_only_jobs_have_no_send_time() -> None:
    with pytest.raises(ValidationError, match="upload_only"):
        job(mode="upload_only", send_at=NOW.isoformat())


def test_inline_selection_is_bounded() -> None:
    rows = [{"email": f"p{i}@example.com", "ck": str(i)} for i in range(10_001)]
    with pytest.raises(ValidationError, match="10000"):
        job(selection={"kind": "inline", "rows": rows}, field_map={"email": "Email"}, communication_key="ck")


def test_unknown_fields_and_versions_are_refused() -> None:
    with pytest.raises(ValidationError, match="extra"):
        job(colour="blue")
    with pytest.raises(ValidationError, match="schema_version 2 is not supported"):
        job(schema_version=2)


def test_event_ids_are_deterministic() -> None:
    a = event_id_for("mailup", broadcast_id="b", recipient="r", event_type="open", occurred_at=NOW)
    b = event_id_for(
        "mailup",
        broadcast_id="b",
        recipient="r",
        event_type="open",
        occurred_at=NOW.astimezone(timezone(timedelta(hours=2))),
    )
    assert a == b
    assert a.version == 5
    assert a != event_id_for("mailup", broadcast_id="b", recipient="r", event_type="click", occurred_at=NOW)
    assert event_id_for("x", esp_event_id="1") != event_id_for("y", esp_event_id="1")
    assert event_id_for("x", esp_event_id="1") == uuid.UUID(str(event_id_for("x", esp_event_id="1")))


def test_response_event_needs_a_recipient() -> None:
    with pytest.raises(ValidationError, match="communication_key or an email"):
        ResponseEvent(
            event_id=uuid.uuid4(),
            esp="sandbox",
            account="demo",
            broadcast_id="b",
            type=EventType.OPEN,
            occurred_at=NOW,
            source=EventSource(kind="api", name="/stats", page=1),
        )


def test_json_schemas_are_published_for_every_model() -> None:
    models = message_models()
    assert set(models) == {spec.model.__name__ for spec in REGISTRY.values()}
    assert "selection" in message_schema(models["BroadcastJob"])["properties"]
