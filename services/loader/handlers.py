"""The loader's handler: a batch of events → dead letters for bad ones, one transaction for the rest;
batches already fetched are loaded one after another, each one's database work overlapping the
reading of the next."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, cast

import asyncpg
from aiokafka.structs import ConsumerRecord, TopicPartition

from services.loader import core, store
from services.loader.settings import Settings
from shared.infra.db import jobs, outside_message_context
from shared.model.errors import InvalidMessageError, PermanentError, UnavailableError
from shared.model.events import EventFields, fields_of, read_fast
from shared.model.messages import DeadLetter, EventSource, ResponseEvent, decode
from shared.runtime.failpoints import Point
from shared.runtime.runtime import Runtime

log = logging.getLogger(__name__)


@dataclass
class Loader:
    """The loader's per-process resources."""

    settings: Settings
    runtime: Runtime
    pool: asyncpg.Pool


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


async def prepare(records: Sequence[ConsumerRecord[bytes, bytes]], ld: Loader) -> Prepared | None:
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
        prepared = await _prepare_all_fast(cast("list[core.FastLine]", fasts), ld, started)
        if prepared is not None:
            return prepared
    return await _prepare_each(records, fasts, ld, started)


async def _prepare_all_fast(fasts: list[core.FastLine], ld: Loader, started: float) -> Prepared | None:
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
    if len(await _known_broadcasts(ld, broadcasts, len(fasts))) < len(broadcasts):
        return None
    tally = core.Tally()
    for (broadcast, kind), times in groups.items():
        tally.add_times(broadcast, kind, times)
    data = b"".join([f[3] for f in fasts])
    return Prepared(data, len(fasts), tally, broadcasts, [], 0, started, time.perf_counter())


async def _known_broadcasts(ld: Loader, broadcasts: list[str], events: int) -> set[str]:
    try:
        return await outside_message_context(_known(ld.pool, broadcasts))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"looking up the broadcasts of {events} events failed: {exc}") from exc


async def _prepare_each(
    records: Sequence[ConsumerRecord[bytes, bytes]],
    fasts: list[core.FastLine | None],
    ld: Loader,
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
                letters.append(_letter(record, exc))
                continue
        decoded.append((record, event.broadcast_id, None, event))
    broadcasts = {b for _, b, _, _ in decoded}
    known = await _known_broadcasts(ld, sorted(broadcasts), len(decoded))
    events: list[EventFields] = []
    loaded: set[str] = set()
    lines: list[bytes] = []
    tally = core.Tally()  # what the counts gain if every event of the batch is new
    for record, broadcast, fast, event in decoded:
        try:
            lines.append(_copy_line(record, broadcast, fast[3] if fast else None, event, known))
        except PermanentError as exc:
            letters.append(_letter(record, exc))
            continue
        if fast is not None:
            tally.add(fast[0], fast[1], fast[2])
        else:
            assert event is not None  # each decoded record was read fast or has its values
            events.append(event)
            tally.add(event.broadcast_id.encode(), event.type.encode(), event.occurred_at.encode())
        loaded.add(broadcast)
    for letter in letters:
        await ld.runtime.dead_letter(letter)
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


async def store_batch(batch: Prepared, ld: Loader) -> Stored:
    """The batch's one transaction; database trouble is transient (the batch is retried)."""
    try:
        added, totals = await outside_message_context(
            _load(ld.pool, batch.data, batch.tally, batch.broadcasts)
        )
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"loading {batch.count} events failed: {exc}") from exc
    return Stored(added, totals, time.perf_counter())


async def finish(batch: Prepared, stored: Stored, ld: Loader) -> None:
    """After a batch's commit: metrics, subscription changes, load statuses, the log line."""
    await ld.runtime.failpoints.reach(Point.LOADER_AFTER_DB_COMMIT)  # offsets are committed later
    added = stored.added
    new = sum(added.values())
    ld.runtime.metrics.inc("events_loaded_total", new)
    ld.runtime.metrics.inc("events_duplicate_total", batch.count - new)
    await ld.runtime.publish_many(core.subscription_changes(batch.opt_outs))
    await ld.runtime.publish_many(
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


async def handle_batch(records: Sequence[ConsumerRecord[bytes, bytes]], ld: Loader) -> None:
    """Load one batch: read it, one transaction, then statuses."""
    batch = await prepare(records, ld)
    if batch is not None:
        await finish(batch, await store_batch(batch, ld), ld)


class Fetcher(Protocol):
    """What :func:`handle_batches` needs of the Kafka consumer the batch came from."""

    async def getmany(self, *, timeout_ms: int, max_records: int | None) -> dict[Any, list[Any]]: ...

    def seek(self, partition: Any, offset: int) -> None: ...


async def handle_batches(
    first: Sequence[ConsumerRecord[bytes, bytes]], consumer: Fetcher | None, ld: Loader
) -> None:
    """Load a batch and the batches already fetched after it, each one's database work overlapping
    the reading of the next, up to ``pipeline_batches``; returns once every one is committed (the
    caller then commits the offsets).

    If a later batch fails, the earlier ones stay loaded, the consumer is rewound to the failed
    batch's records (and everything fetched after them), and this returns normally: offsets are
    committed up to the failed batch, which comes again as a batch of its own under the error
    policy. If the first batch fails, the batches after it are rewound and the error goes to the
    error policy as for a single batch.
    """
    chain: list[dict[tuple[str, int], int]] = []  # per batch: earliest offset per partition
    done = 0  # batches before this index are committed and finished
    pending: tuple[int, Prepared, asyncio.Task[Stored]] | None = None  # the batch in the database
    records: Sequence[ConsumerRecord[bytes, bytes]] = first
    try:
        while True:
            index = len(chain)
            chain.append(_earliest(records))
            batch = await prepare(records, ld)
            previous, pending = pending, None
            committed = (previous[0], previous[1], await previous[2]) if previous is not None else None
            if batch is not None:  # into the database while the previous one's statuses go out
                pending = (index, batch, asyncio.ensure_future(store_batch(batch, ld)))
                await asyncio.sleep(0)
            if committed is not None:
                await finish(committed[1], committed[2], ld)
                done = committed[0] + 1
            if batch is None:
                done = index + 1
            if (
                consumer is None
                or len(chain) >= ld.settings.pipeline_batches
                or ld.runtime.stopping.is_set()  # shutting down: commit what is loaded
                or ld.runtime.inflight.draining  # a rebalance waits: commit before partitions move
            ):
                break
            # Waiting for the next fetch costs nothing while the database works on this batch.
            wait_ms = ld.settings.batch_wait_ms if pending is not None else 0
            fetched = await consumer.getmany(timeout_ms=wait_ms, max_records=ld.settings.batch_max)
            records = [r for rs in fetched.values() for r in rs]
            if not records:
                break
        if pending is not None:
            await finish(pending[1], await pending[2], ld)
            done = pending[0] + 1
            pending = None
    except BaseException as exc:
        if pending is not None:
            if isinstance(exc, Exception):  # the batch in the database may still commit
                with contextlib.suppress(Exception):
                    stored = await pending[2]
                    if done == pending[0]:
                        await finish(pending[1], stored, ld)
                        done = pending[0] + 1
            else:
                pending[2].cancel()
                with contextlib.suppress(BaseException):
                    await pending[2]
        # The first batch is the error policy's to rewind (or dead-letter); the rest not done are ours.
        if consumer is not None and len(chain) > max(done, 1):
            _rewind(consumer, chain[max(done, 1) :])
        if done == 0 or not isinstance(exc, Exception):
            raise
        log.warning(
            "a batch failed after earlier ones were loaded: it comes again on its own",
            extra={"error": repr(exc), "batches_loaded": done},
        )


def _earliest(records: Sequence[ConsumerRecord[bytes, bytes]]) -> dict[tuple[str, int], int]:
    earliest: dict[tuple[str, int], int] = {}
    for r in records:
        where = (r.topic, r.partition)
        if where not in earliest or r.offset < earliest[where]:
            earliest[where] = r.offset
    return earliest


def _rewind(consumer: Fetcher, batches: Sequence[dict[tuple[str, int], int]]) -> None:
    """Seek each partition back to its earliest record among ``batches``."""
    earliest: dict[tuple[str, int], int] = {}
    for batch in batches:
        for where, offset in batch.items():
            if where not in earliest or offset < earliest[where]:
                earliest[where] = offset
    for (topic, partition), offset in earliest.items():
        consumer.seek(TopicPartition(topic, partition), offset)


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


def _letter(record: ConsumerRecord[bytes, bytes], exc: Exception) -> DeadLetter:
    """A dead letter for one consumed record, with its original bytes and where it was."""
    return DeadLetter(
        source=EventSource(kind="topic", name=record.topic, partition=record.partition, offset=record.offset),
        payload=record.value or b"",
        error_class=type(exc).__name__,
        message=str(exc),
        service="loader",
    )
