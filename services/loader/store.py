"""The loader's database work: COPY (or stage and merge when some events are there already), keep
the per-broadcast counts.

All in one transaction, committed before the Kafka offsets are: a crash anywhere loses nothing,
and a redelivered event finds its event_id present and adds nothing.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

import asyncpg

from services.loader.core import COLUMNS, Tally
from shared.infra.db import Conn

log = logging.getLogger(__name__)

_STAGE = """
CREATE TEMP TABLE IF NOT EXISTS loader_stage (LIKE responses.events INCLUDING DEFAULTS)
ON COMMIT DELETE ROWS
"""

_MERGE = """
WITH added AS (
    INSERT INTO responses.events (event_id, esp, account, broadcast_id, esp_message_id, communication_key,
                                  email, type, url, occurred_at, source, extra)
    SELECT event_id, esp, account, broadcast_id, esp_message_id, communication_key,
           email, type, url, occurred_at, source, extra
    FROM loader_stage
    ON CONFLICT (event_id) DO NOTHING
    RETURNING broadcast_id, type, occurred_at
), per_type AS (
    SELECT broadcast_id, type, count(*) AS events, min(occurred_at) AS first_at, max(occurred_at) AS last_at
    FROM added GROUP BY broadcast_id, type ORDER BY broadcast_id, type
), counted AS (
    INSERT INTO responses.broadcast_type_counts AS c (broadcast_id, type, events, first_at, last_at)
    SELECT broadcast_id, type, events, first_at, last_at FROM per_type
    ON CONFLICT (broadcast_id, type) DO UPDATE
    SET events = c.events + excluded.events,
        first_at = least(c.first_at, excluded.first_at),
        last_at = greatest(c.last_at, excluded.last_at)
)
SELECT broadcast_id, sum(events)::bigint AS added FROM per_type GROUP BY broadcast_id
"""


assert ", ".join(COLUMNS) in " ".join(_MERGE.split()), "the merge must list core.COLUMNS in order"


_ADD_COUNTS = """
INSERT INTO responses.broadcast_type_counts AS c (broadcast_id, type, events, first_at, last_at)
SELECT * FROM unnest($1::text[], $2::text[], $3::bigint[], $4::timestamptz[], $5::timestamptz[])
ON CONFLICT (broadcast_id, type) DO UPDATE
SET events = c.events + excluded.events,
    first_at = least(c.first_at, excluded.first_at),
    last_at = greatest(c.last_at, excluded.last_at)
"""


async def _whole(data: bytes) -> AsyncIterator[bytes]:
    """COPY data in one piece: written to the connection at once (a file object would be read in
    512 KiB pieces on a thread, each waiting for the event loop)."""
    yield data


async def load(conn: Conn, copy_text: bytes, tally: Tally) -> dict[str, int]:
    """Insert the new events among the lines of ``copy_text`` (COPY text format, :data:`COLUMNS`;
    ``tally`` counts them); returns new events per broadcast.

    A batch is first COPYed straight into responses.events and its tally added to the counts: when
    every event is new (nearly always), that is all. If one is there already (a batch delivered
    again, an event gathered twice), the COPY fails on its event_id, is rolled back to its savepoint,
    and the batch is merged through a staging table instead, counting only what was added.
    """
    async with conn.transaction():
        try:
            async with conn.transaction():
                await conn.copy_to_table(
                    "events",
                    schema_name="responses",
                    source=_whole(copy_text),
                    columns=list(COLUMNS),
                    format="text",
                )
        except asyncpg.UniqueViolationError:
            added = await _merge(conn, copy_text)
            log.info(
                "batch has events loaded before: merged",
                extra={"new": sum(added.values()), "events": copy_text.count(b"\n")},
            )
            return added
        rows = tally.rows()
        await conn.execute(_ADD_COUNTS, *(list(column) for column in zip(*rows, strict=True)))
        return tally.per_broadcast()


async def _merge(conn: Conn, copy_text: bytes) -> dict[str, int]:
    """Stage the lines and insert those whose event_id is new (inside the caller's transaction)."""
    added: dict[str, int] = {}
    await conn.execute(_STAGE)
    await conn.copy_to_table("loader_stage", source=_whole(copy_text), columns=list(COLUMNS), format="text")
    for record in await conn.fetch(_MERGE):
        added[record["broadcast_id"]] = added.get(record["broadcast_id"], 0) + record["added"]
    return added


async def totals(conn: Conn, broadcast_ids: Sequence[str]) -> dict[str, dict[str, int]]:
    """Event totals per type of some broadcasts."""
    out: dict[str, dict[str, int]] = {b: {} for b in broadcast_ids}
    for r in await conn.fetch(
        "SELECT broadcast_id, type, events FROM responses.broadcast_type_counts WHERE broadcast_id = ANY($1)",
        list(broadcast_ids),
    ):
        out[r["broadcast_id"]][r["type"]] = r["events"]
    return out
