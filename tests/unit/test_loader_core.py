"""The loader's rules without I/O, beyond the wire form (tests/unit/test_events.py): the COPY line
an event becomes, the opt-outs carried back to the CRM, and the statuses and reasons it reports."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.loader import core
from shared.model.events import EventFields, fields_of
from shared.model.messages import (
    EventSource,
    EventType,
    ResponseEvent,
    Stage,
    State,
    SubscriptionState,
    event_id_for,
)

WHEN = datetime(2026, 11, 22, 10, 0, 3, tzinfo=UTC)


def event(kind: EventType, email: str | None = "a@x.com", **changes: object) -> EventFields:
    values: dict[str, object] = {
        "event_id": event_id_for("sandbox", esp_event_id=f"demo:{kind}:{email}"),
        "esp": "sandbox",
        "account": "demo",
        "broadcast_id": "job-1",
        "communication_key": "ck1",
        "email": email,
        "type": kind,
        "occurred_at": WHEN,
        "source": EventSource(kind="file", name="sandbox/demo/responses/r.csv", line=12),
    }
    values.update(changes)
    return fields_of(ResponseEvent.model_validate(values))


def test_an_event_is_one_copy_line_in_column_order_with_nulls_as_backslash_n() -> None:
    fields = event(EventType.CLICK, url="https://x.com/a", extra={"device": "mobile"})
    assert (
        core.copy_line(fields)
        == (
            f"{fields.event_id}\tsandbox\tdemo\tjob-1\t\\N\tck1\ta@x.com\tclick\thttps://x.com/a\t"
            '2026-11-22T10:00:03+00:00\tfile:sandbox/demo/responses/r.csv:12\t{"device":"mobile"}\n'
        ).encode()
    )
    assert len(core.COLUMNS) == core.copy_line(fields).count(b"\t") + 1


@pytest.mark.parametrize(
    ("kind", "state"),
    [
        (EventType.UNSUBSCRIBE, SubscriptionState.UNSUBSCRIBED),
        (EventType.COMPLAINT, SubscriptionState.UNSUBSCRIBED),
        (EventType.BOUNCE_HARD, SubscriptionState.UNSUBSCRIBED),
        (EventType.SUBSCRIBE, SubscriptionState.SUBSCRIBED),
    ],
)
def test_a_subscription_event_becomes_a_change_for_the_crm_under_its_event_id(
    kind: EventType, state: SubscriptionState
) -> None:
    fields = event(kind)
    (change,) = core.subscription_changes([fields])
    assert (change.email, change.esp, change.account, change.state, change.reason) == (
        "a@x.com",
        "sandbox",
        "demo",
        state,
        kind.value,
    )
    assert (str(change.change_id), change.occurred_at, change.list) == (fields.event_id, WHEN, "")


def test_an_address_no_esp_takes_changes_no_subscription() -> None:
    assert core.subscription_changes([event(EventType.UNSUBSCRIBE, email="not an address")]) == []


def test_other_events_and_opt_outs_without_an_email_change_no_subscription() -> None:
    events = [
        event(EventType.OPEN),
        event(EventType.BOUNCE_SOFT),
        event(EventType.CLICK),
        event(EventType.UNSUBSCRIBE, email=None),
    ]
    assert core.subscription_changes(events) == []


def test_a_loaded_batch_reports_each_broadcasts_totals_and_what_was_new() -> None:
    status = core.load_status("job-1", {"sent": 100, "open": 40}, added=25)
    assert (status.job_id, status.stage, status.state, status.service) == (
        "job-1",
        Stage.LOAD,
        State.RUNNING,
        "loader",
    )
    assert status.counts == {"sent": 100, "open": 40}
    assert status.detail == "25 new events loaded"


def test_an_event_of_an_unknown_broadcast_says_which_and_that_it_can_be_replayed() -> None:
    why = core.unknown_broadcast(event(EventType.OPEN, broadcast_id="job-404"))
    assert why.startswith("broadcast 'job-404' is not a job espbridge knows (no row in control.jobs)")
    assert "open event from file:sandbox/demo/responses/r.csv:12" in why
    assert why.endswith("replay it once the job is recorded")
