"""The loader's handler: a batch of events → dead letters for bad ones, one transaction for the rest,
then statuses; the three stages of the Kafka layer's batch pipeline, which loads the batches already
fetched one after another, each one's database work overlapping the reading of the next."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import cast

import asyncpg
from aiokafka.structs import ConsumerRecord

from services.loader import core, store
from services.loader.settings import Settings
from shared.infra.db import jobs, outside_message_context
from shared.infra.kafka import BatchStages, Records
from shared.model.deadletters import record_letter
from shared.model.errors import InvalidMessageError, PermanentError, UnavailableError
from shared.model.events import EventFields, fields_of, read_fast
from shared.model.messages import DeadLetter, ResponseEvent, decode
from shared.runtime.failpoints import Point
from shared.runtime.runtime import Runtime
from shared.runtime.status import StatusReporter

log = logging.getLogger(__name__)


@dataclass
class Loader:
    """The loader's per-process resources."""

    settings: Settings
    runtime: Runtime
    pool: asyncpg.Pool
    statuses: StatusReporter
    """Publishes the load statuses (published only, not recorded in control.jobs)."""


@dataclass
class Prepared:
    """A batch read and checked, ready for the database."""

    data: bytes
    """The COPY text of its loadable events."""
    count: int
    tally: core.Tally
    broadcasts: list[str]
    """The broadcasts it loads into (sorted)."""
    opt_outs: list[EventFields]
    """Events read with their values (opt-outs among them become subscription changes)."""
    dead_letters: int
    started: float
    decoded: float


YIELD_EVERY = 2_000
"""Records read between two chances for the event loop to run other work (a pending COPY)."""


async def prepare(records: Records, loader: Loader) -> Prepared | None:
    """Read a batch: dead letters for bad records (published here), COPY text for the rest; None
    when nothing in it is loadable."""
    started = time.perf_counter()
    # Most records have espbridge's own shape and become COPY text directly (see fast_copy_line).
    fast_copy = core.fast_copy_line
    fasts: list[core.FastLine | None] = []
    for start in range(0, len(records), YIELD_EVERY):
        if start:
            await asyncio.sleep(0)  # lets the previous batch's COPY go on meanwhile
        fasts += [fast_copy(r.value or b"") for r in records[start : start + YIELD_EVERY]]
    if None not in fasts:
        prepared = await _prepare_all_fast(cast("list[core.FastLine]", fasts), loader, started)
        if prepared is not None:
            return prepared
    return await _prepare_each(records, fasts, loader, started)


async def _prepare_all_fast(fasts: list[core.FastLine], loader: Loader, started: float) -> Prepared | None:
    """A batch whose every record was read fast: grouped per broadcast and type; None if one of its
    broadcasts is unknown (then :func:`_prepare_each` dead-letters its records)."""
    groups: dict[tuple[bytes, bytes], list[bytes]] = {}
    for broadcast, kind, occurred, _ in fasts:
        times = groups.get((broadcast, kind))
        if times is None:
            groups[(broadcast, kind)] = [occurred]
        else:
            times.append(occurred)
    broadcasts = sorted({b.decode() for b, _ in groups})
    if len(await _known_broadcasts(loader, broadcasts, len(fasts))) < len(broadcasts):
        return None
    tally = core.Tally()
    for (broadcast, kind), times in groups.items():
        tally.add_times(broadcast, kind, times)
    data = b"".join([line for _, _, _, line in fasts])
    return Prepared(data, len(fasts), tally, broadcasts, [], 0, started, time.perf_counter())


async def _known_broadcasts(loader: Loader, broadcasts: list[str], events: int) -> set[str]:
    try:
        return await outside_message_context(_known(loader.pool, broadcasts))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"looking up the broadcasts of {events} events failed: {exc}") from exc


async def _prepare_each(
    records: Records,
    fasts: list[core.FastLine | None],
    loader: Loader,
    started: float,
) -> Prepared | None:
    """A batch record by record: those not read fast are read with the model's rules."""
    # (record, broadcast, (broadcast, type, time, COPY line) when read fast, values otherwise)
    decoded: list[tuple[ConsumerRecord[bytes, bytes], str, core.FastLine | None, EventFields | None]] = []
    letters: list[DeadLetter] = []
    for record, fast in zip(records, fasts, strict=True):
        if fast is not None:
            decoded.append((record, fast[0].decode(), fast, None))
            continue
        value = record.value or b""
        event = read_fast(value)
        if event is None:
            try:
                event = fields_of(decode(ResponseEvent, value))
            except InvalidMessageError as exc:
                letters.append(record_letter(record, exc, "loader"))
                continue
        decoded.append((record, event.broadcast_id, None, event))
    broadcasts = {b for _, b, _, _ in decoded}
    known = await _known_broadcasts(loader, sorted(broadcasts), len(decoded))
    events: list[EventFields] = []
    loaded: set[str] = set()
    lines: list[bytes] = []
    tally = core.Tally()  # what the counts gain if every event of the batch is new
    for record, broadcast, fast, event in decoded:
        try:
            lines.append(_copy_line(record, broadcast, fast[3] if fast else None, event, known))
        except PermanentError as exc:
            letters.append(record_letter(record, exc, "loader"))
            continue
        if fast is not None:
            broadcast_id, kind, occurred, _ = fast
            tally.add(broadcast_id, kind, occurred)
        else:
            assert event is not None  # each decoded record was read fast or has its values
            events.append(event)
            tally.add(event.broadcast_id.encode(), event.type.encode(), event.occurred_at.encode())
        loaded.add(broadcast)
    for letter in letters:
        await loader.runtime.dead_letter(letter)
    if letters:
        log.warning(
            "events rejected to the dead-letter topic",
            extra={"dead_letters": len(letters), "unknown_broadcasts": sorted(broadcasts - known)},
        )
    if not lines:
        return None
    return Prepared(
        b"".join(lines), len(lines), tally, sorted(loaded), events, len(letters), started, time.perf_counter()
    )


@dataclass
class Stored:
    """What the database step of a batch did."""

    added: dict[str, int]
    totals: dict[str, dict[str, int]]
    done: float


async def store_batch(batch: Prepared, loader: Loader) -> Stored:
    """The batch's one transaction; database trouble is transient (the batch is retried)."""
    try:
        added, totals = await outside_message_context(
            _load(loader.pool, batch.data, batch.tally, batch.broadcasts)
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"loading {batch.count} events failed: {exc}") from exc
    return Stored(added, totals, time.perf_counter())


async def finish(batch: Prepared, stored: Stored, loader: Loader) -> None:
    """After a batch's commit: metrics, subscription changes, load statuses, the log line."""
    await loader.runtime.failpoints.reach(Point.LOADER_AFTER_DB_COMMIT)  # offsets are committed later
    added = stored.added
    new = sum(added.values())
    loader.runtime.metrics.inc("events_loaded_total", new)
    loader.runtime.metrics.inc("events_duplicate_total", batch.count - new)
    await loader.runtime.publish_many(core.subscription_changes(batch.opt_outs))
    await loader.statuses.report_all(
        [core.load_status(b, t, added.get(b, 0)) for b, t in stored.totals.items() if added.get(b, 0)]
    )
    log.info(
        "batch loaded",
        extra={
            "events": batch.count,
            "new": new,
            "dead_letters": batch.dead_letters,
            "decode_ms": round((batch.decoded - batch.started) * 1000),
            "db_ms": round((stored.done - batch.decoded) * 1000),
        },
    )


def stages(loader: Loader) -> BatchStages[Prepared, Stored]:
    """The loader's stages of the Kafka layer's batch pipeline: read a batch, its one transaction,
    then statuses (see :meth:`shared.runtime.runtime.Runtime.batch_subscriber`)."""
    return BatchStages(
        prepare=lambda records: prepare(records, loader),
        store=lambda batch: store_batch(batch, loader),
        finish=lambda batch, stored: finish(batch, stored, loader),
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
        return await jobs.known_job_ids(conn, broadcasts)


async def _load(
    pool: asyncpg.Pool, copy_text: bytes, tally: core.Tally, broadcasts: list[str]
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    async with pool.acquire() as conn:
        added = await store.load(conn, copy_text, tally)
        return added, await store.totals(conn, broadcasts)
