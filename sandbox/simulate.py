"""The simulated send: which events each recipient produces, and when.

Everything is drawn from ``random.Random(f"{seed}:{external_id}")`` over the imported rows in list
order, so the same seed, broadcast and list always give the same events, numbers and times. That
is what lets a restarted sandbox regenerate a half-written broadcast and write only what is missing.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Iterable, Iterator
from dataclasses import dataclass, replace

from sandbox.protocol import EventType
from sandbox.settings import Rates

# Messages leave at this rate, so a large list takes a plausible while to send.
SEND_RATE_PER_S = 200

URLS = (
    "https://example.com/offer?id=1001",
    "https://example.com/offer?id=1002",
    "https://example.com/offer?id=1003&utm_source=newsletter&utm_medium=email",
    # A comma makes the clients' CSV readers prove they honour RFC 4180 quoting.
    "https://example.com/catalog?tags=shoes,bags",
)

_MINUTE = 60
_HOUR = 60 * _MINUTE
_DAY = 24 * _HOUR


@dataclass(frozen=True, slots=True)
class Event:
    """One response event; ``number`` is its position in the whole broadcast (1-based)."""

    number: int
    event_type: EventType
    email: str
    key: str
    url: str
    at: int


def _recipient(rng: random.Random, index: int, t0: int, rates: Rates) -> list[tuple[EventType, int, str]]:
    """The events of one recipient as (type, epoch seconds, url), each later than what causes it."""
    sent = t0 + index // SEND_RATE_PER_S
    out = [(EventType.SENT, sent, "")]
    draw = rng.random()
    if draw < rates.hard_bounce:
        out.append((EventType.BOUNCE_HARD, sent + rng.randint(1, 20), ""))
        return out
    if draw < rates.hard_bounce + rates.soft_bounce:
        # An ESP retries a temporary failure for a while before it reports the soft bounce.
        out.append((EventType.BOUNCE_SOFT, sent + rng.randint(5 * _MINUTE, 4 * _HOUR), ""))
        return out
    delivered = sent + rng.randint(1, 20)
    out.append((EventType.DELIVERED, delivered, ""))
    if rng.random() < rates.open:
        opens = sorted(delivered + rng.randint(_MINUTE, 12 * _HOUR) for _ in range(rng.randint(1, 3)))
        out.extend((EventType.OPEN, at, "") for at in opens)
        if rng.random() < rates.click:
            clicks = sorted(opens[0] + rng.randint(5, 15 * _MINUTE) for _ in range(rng.randint(1, 2)))
            out.extend((EventType.CLICK, at, rng.choice(URLS)) for at in clicks)
        if rng.random() < rates.unsubscribe:
            out.append((EventType.UNSUBSCRIBE, opens[-1] + rng.randint(10, 10 * _MINUTE), ""))
    if rng.random() < rates.complaint:
        out.append((EventType.COMPLAINT, delivered + rng.randint(10 * _MINUTE, _DAY), ""))
    return out


def _returned(rng: random.Random, events: list[tuple[EventType, int, str]], rates: Rates) -> None:
    """Maybe add a ``returned`` event (auto-reply or late bounce) after a delivered message."""
    delivered = next((at for t, at, _ in events if t is EventType.DELIVERED), None)
    if delivered is not None and rng.random() < rates.returned:
        events.append((EventType.RETURNED, delivered + rng.randint(_MINUTE, 2 * _HOUR), ""))


def simulate(
    recipients: Iterable[tuple[str, str]],
    seed: int,
    external_id: str,
    t0: int,
    rates: Rates,
    esp_only: Collection[EventType] = (),
) -> Iterator[Event]:
    """All events of a broadcast sent at ``t0`` (epoch seconds), recipient by recipient.

    ESP-only event types (``EventType.RETURNED``) are simulated only when named in ``esp_only``,
    with their own generator (``random.Random(f"{seed}:{external_id}:returned")``), so the other
    events are the same with or without them.
    """
    rng = random.Random(f"{seed}:{external_id}")
    returned_rng = random.Random(f"{seed}:{external_id}:returned") if EventType.RETURNED in esp_only else None
    number = 0
    for index, (email, key) in enumerate(recipients):
        events = _recipient(rng, index, t0, rates)
        if returned_rng is not None:
            _returned(returned_rng, events, rates)
        for event_type, at, url in events:
            number += 1
            yield Event(number, event_type, email, key, url, at)


def distinct_seconds(events: Iterable[Event]) -> Iterator[Event]:
    """The events, each moved on a second while an earlier one has its recipient, type, URL and second.

    For formats without an event id, whose reader tells events apart by (recipient, type, link,
    second). A recipient's events come together in :func:`simulate`'s order, and keys are unique.
    """
    key: str | None = None
    seen: set[tuple[EventType, str, int]] = set()
    for event in events:
        if event.key != key:
            key, seen = event.key, set()
        at = event.at
        while (event.event_type, event.url, at) in seen:
            at += 1
        seen.add((event.event_type, event.url, at))
        yield event if at == event.at else replace(event, at=at)


def phase_files(
    events: Iterable[Event], types: Collection[EventType], rows_per_file: int, whole_phase: bool = False
) -> Iterator[list[Event]]:
    """The events of the given types cut into files of at most ``rows_per_file``, each in time order.

    With ``whole_phase`` the phase's events are sorted by time as a whole before they are cut, so
    the files follow each other in time order too (the phase is held in memory).
    """
    if whole_phase:
        ordered = sorted((e for e in events if e.event_type in types), key=lambda e: (e.at, e.number))
        for start in range(0, len(ordered), rows_per_file):
            yield ordered[start : start + rows_per_file]
        return
    chunk: list[Event] = []
    for event in events:
        if event.event_type not in types:
            continue
        chunk.append(event)
        if len(chunk) == rows_per_file:
            yield sorted(chunk, key=lambda e: (e.at, e.number))
            chunk = []
    if chunk:
        yield sorted(chunk, key=lambda e: (e.at, e.number))
