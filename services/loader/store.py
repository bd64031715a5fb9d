"""The loader's database work: stage with COPY, merge idempotently, keep the per-broadcast counts.

All in one transaction, committed before the Kafka offsets are: a crash anywhere loses nothing,
and a redelivered event finds its event_id present and adds nothing.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from services.loader.core import COLUMNS
from shared.db import Conn

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


async def load(conn: Conn, copy_text: bytes) -> dict[str, int]:
    """Insert the new events among the lines of ``copy_text`` (COPY text format, :data:`COLUMNS`);
    returns new events per broadcast."""
    added: dict[str, int] = {}
    async with conn.transaction():
        await conn.execute(_STAGE)
        await conn.copy_to_table(
            "loader_stage", source=io.BytesIO(copy_text), columns=list(COLUMNS), format="text"
        )
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


async def known_broadcasts(conn: Conn, broadcast_ids: Sequence[str]) -> set[str]:
    """Those of ``broadcast_ids`` that are jobs in control.jobs."""
    rows = await conn.fetch("SELECT job_id FROM control.jobs WHERE job_id = ANY($1)", list(broadcast_ids))
    return {r["job_id"] for r in rows}
