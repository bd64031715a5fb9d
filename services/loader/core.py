"""The loader's rules (no I/O): an event as a database row, statuses, subscription changes."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable
from datetime import date, datetime

from shared.model.errors import PermanentError
from shared.model.events import EventFields
from shared.model.messages import (
    BroadcastStatus,
    EventType,
    Stage,
    State,
    SubscriptionChange,
    SubscriptionState,
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
    EventType.UNSUBSCRIBE.value: SubscriptionState.UNSUBSCRIBED,
    EventType.COMPLAINT.value: SubscriptionState.UNSUBSCRIBED,
    EventType.BOUNCE_HARD.value: SubscriptionState.UNSUBSCRIBED,
    EventType.SUBSCRIBE.value: SubscriptionState.SUBSCRIBED,
}
"""Response events that change a contact's subscription, and the state they report (whether a
hard bounce unsubscribes is the account's policy, applied by the syncer)."""

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


# The JSON of a ResponseEvent exactly as espbridge writes it (orjson and the model write the same
# bytes): no escapes and no control characters in strings, so every value is already COPY text.
_STR = rb'"([^"\\\x00-\x1f]*)"'
_OPT = rb'(?:null|"([^"\\\x00-\x1f]*)")'
_INT = rb"(null|0|[1-9][0-9]{0,17})"
_NAME = rb'"([a-z0-9][a-z0-9_-]{0,62})"'
_OWN_SHAPE = re.compile(
    rb'\{"schema_version":1,"event_id":"([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})",'
    rb'"esp":' + _NAME + rb',"account":' + _NAME + rb',"broadcast_id":"([^"\\\x00-\x1f]{1,200})",'
    rb'"esp_message_id":' + _OPT + rb',"communication_key":' + _OPT + rb',"email":' + _OPT + rb","
    rb'"type":"(sent|delivered|bounce_hard|bounce_soft|open|click|unsubscribe|complaint|subscribe)",'
    rb'"url":' + _OPT + rb","
    rb'"occurred_at":"(([0-9]{4}-[0-9]{2}-[0-9]{2})T(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?Z)",'
    rb'"source":\{"kind":"(file|api|webhook|topic)","name":'
    + _STR
    + rb',"line":(null|[1-9][0-9]{0,17})'
    + rb',"page":'
    + _INT
    + rb',"partition":'
    + _INT
    + rb',"offset":'
    + _INT
    + rb'\},"extra":\{\}\}'
)
_OPT_OUT_TYPES = frozenset(t.encode() for t in OPT_OUTS)
_dates: dict[bytes, bool] = {}
_MAX_DATES = 100_000


FastLine = tuple[bytes, bytes, bytes, bytes]
"""(broadcast_id, type, occurred_at, COPY text line) of an event read by :func:`fast_copy_line`."""


def fast_copy_line(body: bytes) -> FastLine | None:
    """(broadcast_id, type, occurred_at, COPY text line) of a ResponseEvent JSON exactly as
    espbridge writes it, checked by the model's rules without parsing it; None for any other
    spelling (then :func:`read_fast` and the model decide) and for opt-outs (they need their values
    for a SubscriptionChange)."""
    m = _OWN_SHAPE.fullmatch(body)
    if m is None:
        return None
    (event_id, esp, account, broadcast_id, message_id, key, email, kind, url, occurred, day) = m.group(
        1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11
    )
    src_kind, name, line, page = m.group(12, 13, 14, 15)
    if not (key or email) or kind in _OPT_OUT_TYPES or not _valid_day(day):
        return None
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            return None
    if line != b"null":
        source = b"%s:%s:%s" % (src_kind, name, line)
    elif page != b"null":
        source = b"%s:%s#page=%s" % (src_kind, name, page)
    else:
        source = b"%s:%s" % (src_kind, name)
    return (
        broadcast_id,
        kind,
        occurred,
        b"%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t\\N\n"
        % (
            event_id,
            esp,
            account,
            broadcast_id,
            b"\\N" if message_id is None else message_id,
            b"\\N" if key is None else key,
            b"\\N" if email is None else email,
            kind,
            b"\\N" if url is None else url,
            occurred,
            source,
        ),
    )


def _valid_day(day: bytes) -> bool:
    valid = _dates.get(day)
    if valid is None:
        try:
            date.fromisoformat(day.decode())
        except ValueError:
            valid = False
        else:
            valid = True
        if len(_dates) < _MAX_DATES:
            _dates[day] = valid
    return valid


def _sortable(occurred: bytes) -> bytes:
    """An ISO 8601 UTC time (``…SS[.ffffff]`` then ``Z`` or ``+00:00``) as bytes that sort as the
    times do (the fraction padded to microseconds, the zone dropped)."""
    if len(occurred) == 20:  # …SSZ, the usual spelling
        return occurred[:19]
    fraction = occurred[19:].rstrip(b"Z").partition(b"+")[0]
    return occurred[:19] + fraction.ljust(7, b"0") if fraction else occurred[:19]


class _Times:
    """The events of one broadcast and type in a batch, with their first and last times (each
    also as :func:`_sortable` bytes, which compare as the times do)."""

    __slots__ = ("events", "first", "first_key", "last", "last_key")

    def __init__(self, events: int, first: bytes, last: bytes) -> None:
        self.events = events
        self.first_key, self.first = _sortable(first), first
        self.last_key, self.last = _sortable(last), last


class Tally:
    """Events per broadcast and type of a batch, with their first and last times: what the batch
    adds to ``responses.broadcast_type_counts`` when all of its events are new."""

    __slots__ = ("_groups",)

    def __init__(self) -> None:
        self._groups: dict[tuple[bytes, bytes], _Times] = {}

    def add(self, broadcast_id: bytes, kind: bytes, occurred: bytes) -> None:
        """Count one event (``occurred`` as :func:`_sortable` takes it)."""
        group = self._groups.get((broadcast_id, kind))
        if group is None:
            self._groups[(broadcast_id, kind)] = _Times(1, occurred, occurred)
            return
        key = _sortable(occurred)
        group.events += 1
        if key < group.first_key:
            group.first_key, group.first = key, occurred
        elif key > group.last_key:
            group.last_key, group.last = key, occurred

    def add_times(self, broadcast_id: bytes, kind: bytes, times: list[bytes]) -> None:
        """Count events of one broadcast and type at once (``times`` not empty)."""
        if set(map(len, times)) == {20}:  # all …SSZ: the bytes sort as the times do
            first, last = min(times), max(times)
        else:
            first, last = min(times, key=_sortable), max(times, key=_sortable)
        group = self._groups.get((broadcast_id, kind))
        if group is None:
            self._groups[(broadcast_id, kind)] = _Times(len(times), first, last)
            return
        group.events += len(times)
        if _sortable(first) < group.first_key:
            group.first_key, group.first = _sortable(first), first
        if _sortable(last) > group.last_key:
            group.last_key, group.last = _sortable(last), last

    def rows(self) -> list[tuple[str, str, int, datetime, datetime]]:
        """(broadcast_id, type, events, first_at, last_at) per group, in key order (the order the
        counts rows are locked in, the same in every loader)."""
        return [
            (
                b.decode(),
                k.decode(),
                g.events,
                datetime.fromisoformat(g.first.decode()),
                datetime.fromisoformat(g.last.decode()),
            )
            for (b, k), g in sorted(self._groups.items())
        ]

    def per_broadcast(self) -> dict[str, int]:
        """Events per broadcast."""
        out: dict[str, int] = {}
        for (b, _), g in self._groups.items():
            name = b.decode()
            out[name] = out.get(name, 0) + g.events
        return out


def subscription_changes(events: Iterable[EventFields]) -> list[SubscriptionChange]:
    """The subscription states to carry to the CRM: unsubscribes, complaints, hard bounces and
    subscribes with an email, each under its event's id (the same event loaded twice is one change).
    An address no ESP would take is left out: the event itself is still loaded."""
    changes: list[SubscriptionChange] = []
    for e in events:
        if e.type not in OPT_OUTS or not e.email:
            continue
        try:
            changes.append(
                SubscriptionChange(
                    change_id=uuid.UUID(e.event_id),
                    email=e.email,
                    esp=e.esp,
                    account=e.account,
                    state=OPT_OUTS[e.type],
                    reason=e.type,
                    occurred_at=datetime.fromisoformat(e.occurred_at),
                )
            )
        except ValueError:
            continue
    return changes


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
