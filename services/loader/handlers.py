"""The loader's handler: a batch of events → dead letters for bad ones, one transaction for the rest."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka.structs import ConsumerRecord

from services.loader import core, store
from services.loader.settings import Settings
from shared.errors import InvalidMessageError, UnavailableError
from shared.failpoints import Point
from shared.kafka import decode
from shared.messages import DeadLetter, EventSource, ResponseEvent
from shared.service import Runtime

log = logging.getLogger(__name__)


@dataclass
class Loader:
    """The loader's per-process resources."""

    settings: Settings
    runtime: Runtime
    pool: asyncpg.Pool


async def handle_batch(records: Sequence[ConsumerRecord[bytes, bytes]], ld: Loader) -> None:
    """Load one batch; database trouble is transient (the batch is retried, nothing is lost)."""
    decoded: list[tuple[ConsumerRecord[bytes, bytes], ResponseEvent]] = []
    letters: list[DeadLetter] = []
    for record in records:
        try:
            decoded.append((record, decode(ResponseEvent, record.value or b"")))
        except InvalidMessageError as exc:
            letters.append(_letter(record, exc))
    try:
        async with ld.pool.acquire() as conn:
            known = await store.known_broadcasts(conn, sorted({e.broadcast_id for _, e in decoded}))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"looking up the broadcasts of {len(decoded)} events failed: {exc}") from exc
    events: list[ResponseEvent] = []
    for record, event in decoded:
        if event.broadcast_id in known:
            events.append(event)
        else:
            letters.append(_letter(record, core.UnknownBroadcastError(core.unknown_broadcast(event))))
    for letter in letters:
        await ld.runtime.dead_letter(letter)
    if letters:
        log.warning(
            "events rejected to the dead-letter topic",
            extra={
                "dead_letters": len(letters),
                "unknown_broadcasts": sorted({e.broadcast_id for _, e in decoded} - known),
            },
        )
    if not events:
        return
    try:
        async with ld.pool.acquire() as conn:
            added = await store.load(conn, [core.row(e) for e in events])
            totals = await store.totals(conn, sorted({e.broadcast_id for e in events}))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"loading {len(events)} events failed: {exc}") from exc
    await ld.runtime.failpoints.reach(Point.LOADER_AFTER_DB_COMMIT)  # offsets are committed after return
    new = sum(added.values())
    ld.runtime.metrics.inc("events_loaded_total", new)
    ld.runtime.metrics.inc("events_duplicate_total", len(events) - new)
    await ld.runtime.publish_many(core.subscription_changes(events))
    await ld.runtime.publish_many(
        [core.load_status(b, t, added.get(b, 0)) for b, t in totals.items() if added.get(b, 0)]
    )
    log.info("batch loaded", extra={"events": len(events), "new": new, "dead_letters": len(letters)})


def _letter(record: ConsumerRecord[bytes, bytes], exc: Exception) -> DeadLetter:
    """A dead letter for one consumed record, with its original bytes and where it was."""
    return DeadLetter(
        source=EventSource(kind="topic", name=record.topic, partition=record.partition, offset=record.offset),
        payload=record.value or b"",
        error_class=type(exc).__name__,
        message=str(exc),
        service="loader",
    )
