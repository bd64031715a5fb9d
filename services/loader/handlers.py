"""The loader's handler: a batch of events → dead letters for bad ones, one transaction for the rest."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
from aiokafka.structs import ConsumerRecord

from services.loader import core, store
from services.loader.settings import Settings
from shared.db import outside_message_context
from shared.errors import InvalidMessageError, PermanentError, UnavailableError
from shared.events import EventFields, fields_of, read_fast
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
    started = time.perf_counter()
    # (record, broadcast, COPY line when known, values when read): most records have espbridge's
    # own shape and become COPY text directly; the rest are read with the model's rules.
    decoded: list[tuple[ConsumerRecord[bytes, bytes], str, bytes | None, EventFields | None]] = []
    letters: list[DeadLetter] = []
    for record in records:
        value = record.value or b""
        fast = core.fast_copy_line(value)
        if fast is not None:
            decoded.append((record, fast[0].decode(), fast[1], None))
            continue
        event = read_fast(value)
        if event is None:
            try:
                event = fields_of(decode(ResponseEvent, value))
            except InvalidMessageError as exc:
                letters.append(_letter(record, exc))
                continue
        decoded.append((record, event.broadcast_id, None, event))
    broadcasts = {b for _, b, _, _ in decoded}
    try:
        known = await outside_message_context(_known(ld.pool, sorted(broadcasts)))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"looking up the broadcasts of {len(decoded)} events failed: {exc}") from exc
    events: list[EventFields] = []
    loaded: set[str] = set()
    lines: list[bytes] = []
    for record, broadcast, fast_line, event in decoded:
        try:
            lines.append(_copy_line(record, broadcast, fast_line, event, known))
        except PermanentError as exc:
            letters.append(_letter(record, exc))
            continue
        if event is not None:
            events.append(event)
        loaded.add(broadcast)
    for letter in letters:
        await ld.runtime.dead_letter(letter)
    if letters:
        log.warning(
            "events rejected to the dead-letter topic",
            extra={"dead_letters": len(letters), "unknown_broadcasts": sorted(broadcasts - known)},
        )
    if not lines:
        return
    count = len(lines)
    data = b"".join(lines)
    del lines
    decoded_at = time.perf_counter()
    try:
        added, totals = await outside_message_context(_load(ld.pool, data, sorted(loaded)))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"loading {count} events failed: {exc}") from exc
    loaded_at = time.perf_counter()
    await ld.runtime.failpoints.reach(Point.LOADER_AFTER_DB_COMMIT)  # offsets are committed after return
    new = sum(added.values())
    ld.runtime.metrics.inc("events_loaded_total", new)
    ld.runtime.metrics.inc("events_duplicate_total", count - new)
    await ld.runtime.publish_many(core.subscription_changes(events))
    await ld.runtime.publish_many(
        [core.load_status(b, t, added.get(b, 0)) for b, t in totals.items() if added.get(b, 0)]
    )
    log.info(
        "batch loaded",
        extra={
            "events": count,
            "new": new,
            "dead_letters": len(letters),
            "decode_ms": round((decoded_at - started) * 1000),
            "db_ms": round((loaded_at - decoded_at) * 1000),
        },
    )


def _copy_line(
    record: ConsumerRecord[bytes, bytes],
    broadcast: str,
    fast_line: bytes | None,
    event: EventFields | None,
    known: set[str],
) -> bytes:
    """A decoded record's COPY line; raises a PermanentError if it cannot be loaded."""
    if broadcast not in known:
        values = event or read_fast(record.value or b"")
        assert values is not None  # a record of espbridge's own shape reads fast
        raise core.UnknownBroadcastError(core.unknown_broadcast(values))
    if fast_line is not None:
        return fast_line
    assert event is not None  # each decoded record has a line or its values
    return core.copy_line(event)


async def _known(pool: asyncpg.Pool, broadcasts: list[str]) -> set[str]:
    async with pool.acquire() as conn:
        return await store.known_broadcasts(conn, broadcasts)


async def _load(
    pool: asyncpg.Pool, copy_text: bytes, broadcasts: list[str]
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    async with pool.acquire() as conn:
        added = await store.load(conn, copy_text)
        return added, await store.totals(conn, broadcasts)


def _letter(record: ConsumerRecord[bytes, bytes], exc: Exception) -> DeadLetter:
    """A dead letter for one consumed record, with its original bytes and where it was."""
    return DeadLetter(
        source=EventSource(kind="topic", name=record.topic, partition=record.partition, offset=record.offset),
        payload=record.value or b"",
        error_class=type(exc).__name__,
        message=str(exc),
        service="loader",
    )
