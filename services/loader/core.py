"""The loader's rules (no I/O): an event as a database row, statuses, subscription changes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime

from shared.errors import PermanentError
from shared.events import EventFields
from shared.messages import (
    BroadcastStatus,
    EventType,
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


class UnstorableEventError(PermanentError):
    """A valid event with text PostgreSQL cannot store (a NUL character, a lone surrogate)."""


def unknown_broadcast(event: EventFields) -> str:
    """Why an event of an unknown broadcast is not loaded, and what to do about it."""
    return (
        f"broadcast {event.broadcast_id!r} is not a job espbridge knows (no row in control.jobs); "
        f"the {event.type} event from {event.source} is kept here: "
        "replay it once the job is recorded"
    )


OPT_OUTS = {
    EventType.UNSUBSCRIBE.value: SubscriptionAction.UNSUBSCRIBE,
    EventType.COMPLAINT.value: SubscriptionAction.SUPPRESS,
    EventType.BOUNCE_HARD.value: SubscriptionAction.SUPPRESS,
}

_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_SPECIAL = re.compile(r"[\\\t\n\r\x00]")


def _text(value: str | None) -> str:
    """A value in COPY's text format."""
    if value is None:
        return "\\N"
    return value.translate(_ESCAPES) if _SPECIAL.search(value) else value


def copy_line(event: EventFields) -> bytes:
    """The event as one line of COPY text, in :data:`COLUMNS` order.

    Raises :class:`UnstorableEventError` for text PostgreSQL refuses, which would fail the batch.
    """
    # event_id, esp, account, type and occurred_at are checked patterns: nothing to escape.
    line = "\t".join(
        (
            event.event_id,
            event.esp,
            event.account,
            _text(event.broadcast_id),
            _text(event.esp_message_id),
            _text(event.communication_key),
            _text(event.email),
            event.type,
            _text(event.url),
            event.occurred_at,
            _text(event.source),
            _text(event.extra),
        )
    )
    # jsonb refuses an escaped NUL too (a literal backslash-u0000 in a value is refused with it).
    if "\x00" in line or (event.extra and "\\u0000" in event.extra):
        raise UnstorableEventError("the event has text with a NUL character, which PostgreSQL cannot store")
    try:
        return f"{line}\n".encode()
    except UnicodeEncodeError as exc:
        raise UnstorableEventError(f"the event has text that is not UTF-8: {exc.reason}") from None


def subscription_changes(events: Iterable[EventFields]) -> list[SubscriptionChange]:
    """Opt-outs to carry back to the CRM: unsubscribes, complaints and hard bounces with an email."""
    return [
        SubscriptionChange(
            email=e.email,
            action=OPT_OUTS[e.type],
            reason=e.type,
            source=e.esp,
            occurred_at=datetime.fromisoformat(e.occurred_at),
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
