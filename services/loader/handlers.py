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
    events: list[ResponseEvent] = []
    letters: list[DeadLetter] = []
    for record in records:
        body = record.value or b""
        try:
            events.append(decode(ResponseEvent, body))
        except InvalidMessageError as exc:
            letters.append(
                DeadLetter(
                    source=EventSource(
                        kind="topic", name=record.topic, partition=record.partition, offset=record.offset
                    ),
                    payload=body,
                    error_class=type(exc).__name__,
                    message=str(exc),
                    service="loader",
                )
            )
    for letter in letters:
        await ld.runtime.dead_letter(letter)
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
