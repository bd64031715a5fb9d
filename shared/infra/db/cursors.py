"""control.api_cursors: where each broadcast's API pull goes on from, and who is pulling it now.

The cursor itself is the connector's own text; this store keeps it, with running counts, and a
session advisory lock keeps two gatherers off the same broadcast.
"""

from __future__ import annotations

from shared.infra.db.core import Conn

_PULL_LOCK = 42
"""The second key of the per-broadcast advisory lock (``hashtextextended(job_id, 42)``)."""


async def try_lock_pull(conn: Conn, job_id: str) -> bool:
    """Take the broadcast's pull lock for this session; False if another session holds it."""
    return bool(
        await conn.fetchval("SELECT pg_try_advisory_lock(hashtextextended($1, $2))", job_id, _PULL_LOCK)
    )


async def unlock_pull(conn: Conn, job_id: str) -> None:
    """Release the broadcast's pull lock."""
    await conn.execute("SELECT pg_advisory_unlock(hashtextextended($1, $2))", job_id, _PULL_LOCK)


async def api_cursor(conn: Conn, esp: str, account: str, job_id: str) -> str | None:
    """The stored cursor of a broadcast's pull (None: from the start)."""
    cursor = await conn.fetchval(
        "SELECT cursor FROM control.api_cursors WHERE esp = $1 AND account = $2 AND job_id = $3",
        esp,
        account,
        job_id,
    )
    return None if cursor is None else str(cursor)


async def store_api_cursor(
    conn: Conn, esp: str, account: str, job_id: str, cursor: str | None, events: int, bad_items: int
) -> None:
    """One more page pulled: the cursor to go on from, and what the page held."""
    await conn.execute(
        """
        INSERT INTO control.api_cursors (esp, account, job_id, cursor, pages, events, bad_items)
        VALUES ($1, $2, $3, $4, 1, $5, $6)
        ON CONFLICT (esp, account, job_id) DO UPDATE
        SET cursor = excluded.cursor, pages = api_cursors.pages + 1,
            events = api_cursors.events + excluded.events,
            bad_items = api_cursors.bad_items + excluded.bad_items, updated_at = now()
        """,
        esp,
        account,
        job_id,
        cursor,
        events,
        bad_items,
    )
