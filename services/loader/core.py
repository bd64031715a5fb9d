"""The loader's rules (no I/O): an event as a database row, statuses, subscription changes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import orjson

from shared.errors import PermanentError
from shared.messages import (
    BroadcastStatus,
    EventType,
    ResponseEvent,
    Stage,
    State,
    SubscriptionAction,
    SubscriptionChange,
)

COLUMNS = (
    "event_id",
    "esp",
    "account",
    "broadcast_id",
    "esp_message_id",
    "communication_key",
    "email",
    "type",
    "url",
    "occurred_at",
    "source",
    "extra",
)


class UnknownBroadcastError(PermanentError):
    """An event of a broadcast that is not a job espbridge knows (not in control.jobs)."""


def unknown_broadcast(event: ResponseEvent) -> str:
    """Why an event of an unknown broadcast is not loaded, and what to do about it."""
    return (
        f"broadcast {event.broadcast_id!r} is not a job espbridge knows (no row in control.jobs); "
        f"the {event.type.value} event from {source_text(event)} is kept here: "
        "replay it once the job is recorded"
    )


OPT_OUTS = {
    EventType.UNSUBSCRIBE: SubscriptionAction.UNSUBSCRIBE,
    EventType.COMPLAINT: SubscriptionAction.SUPPRESS,
    EventType.BOUNCE_HARD: SubscriptionAction.SUPPRESS,
}


def source_text(event: ResponseEvent) -> str:
    """The event's origin as one readable string, e.g. ``file:sandbox/demo/responses/x.csv:12``."""
    src = event.source
    where = src.name
    if src.line is not None:
        where += f":{src.line}"
    elif src.page is not None:
        where += f"#page={src.page}"
    return f"{src.kind}:{where}"


def row(event: ResponseEvent) -> tuple[Any, ...]:
    """The event as a responses.events row, in :data:`COLUMNS` order."""
    return (
        event.event_id,
        event.esp,
        event.account,
        event.broadcast_id,
        event.esp_message_id,
        event.communication_key,
        event.email,
        event.type.value,
        event.url,
        event.occurred_at,
        source_text(event),
        orjson.dumps(event.extra).decode() if event.extra else None,
    )


def subscription_changes(events: Iterable[ResponseEvent]) -> list[SubscriptionChange]:
    """Opt-outs to carry back to the CRM: unsubscribes, complaints and hard bounces with an email."""
    return [
        SubscriptionChange(
            email=e.email,
            action=OPT_OUTS[e.type],
            reason=e.type.value,
            source=e.esp,
            occurred_at=e.occurred_at,
        )
        for e in events
        if e.type in OPT_OUTS and e.email
    ]


def load_status(broadcast_id: str, totals: dict[str, int], added: int) -> BroadcastStatus:
    """The running load status of a broadcast with its event totals so far."""
    return BroadcastStatus(
        job_id=broadcast_id,
        stage=Stage.LOAD,
        state=State.RUNNING,
        counts=totals,
        detail=f"{added} new events loaded",
        service="loader",
    )
