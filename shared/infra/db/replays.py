"""control.dead_letter_replays: the outcome of each dead letter's replay, so a replay happens once.

A dead letter is identified by its place on the dead-letter topic and the fingerprint of its bytes
(a recreated topic reuses offsets; an entry of another letter at the same place does not count).
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from shared.infra.db.core import Conn
from shared.model.deadletters import Replay
from shared.model.errors import ConfigurationError


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """What the ledger holds for the dead letter at one place of the topic."""

    partition: int
    offset: int
    fingerprint: str
    replay: Replay


async def entries(conn: Conn, topic: str) -> list[LedgerEntry]:
    """Every entry of a dead-letter topic's ledger."""
    try:
        rows = await conn.fetch(
            """
            SELECT dl_partition, dl_offset, fingerprint, state, detail, events, replayed_to, attempts,
                   last_at, replayed_at
            FROM control.dead_letter_replays WHERE topic = $1
            """,
            topic,
        )
    except asyncpg.UndefinedTableError:
        raise ConfigurationError(
            "the database has no replay ledger (control.dead_letter_replays): run `espbridge db migrate`"
        ) from None
    return [
        LedgerEntry(
            r["dl_partition"],
            r["dl_offset"],
            r["fingerprint"],
            Replay(
                state=r["state"],
                detail=r["detail"],
                events=r["events"],
                replayed_to=r["replayed_to"],
                attempts=r["attempts"],
                last_at=r["last_at"],
                replayed_at=r["replayed_at"],
            ),
        )
        for r in rows
    ]


async def record(
    conn: Conn,
    topic: str,
    partition: int,
    offset: int,
    fingerprint: str,
    *,
    state: str,
    detail: str,
    events: int,
    replayed_to: str | None,
) -> None:
    """Record a replay's outcome (``replayed`` or ``failing``); attempts count up for the same letter."""
    await conn.execute(
        """
        INSERT INTO control.dead_letter_replays AS r
            (topic, dl_partition, dl_offset, fingerprint, state, detail, events, replayed_to, replayed_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, CASE WHEN $5::text = 'replayed' THEN now() END)
        ON CONFLICT (topic, dl_partition, dl_offset) DO UPDATE SET
            state = excluded.state, detail = excluded.detail, events = excluded.events,
            replayed_to = excluded.replayed_to,
            attempts = CASE WHEN r.fingerprint = excluded.fingerprint THEN r.attempts + 1 ELSE 1 END,
            first_at = CASE WHEN r.fingerprint = excluded.fingerprint THEN r.first_at ELSE now() END,
            replayed_at = coalesce(
                excluded.replayed_at,
                CASE WHEN r.fingerprint = excluded.fingerprint THEN r.replayed_at END
            ),
            fingerprint = excluded.fingerprint, last_at = now()
        """,
        topic,
        partition,
        offset,
        fingerprint,
        state,
        detail[:10_000],
        events,
        replayed_to,
    )


async def try_lock(conn: Conn, topic: str) -> bool:
    """Take the deployment's replay lock for this session (one replay at a time per topic)."""
    return bool(
        await conn.fetchval(
            "SELECT pg_try_advisory_lock(hashtextextended($1, 0))", f"espbridge-dlq-replay:{topic}"
        )
    )
