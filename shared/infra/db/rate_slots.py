"""control.esp_rate_slots: the calls an ESP account may take, shared by every process.

An account limited to ``calls`` calls in any ``per_s`` seconds has ``calls`` slots. A call takes a
free slot before it starts (:func:`take_slot`, one statement) and gives it back when it has ended
(:func:`end_slot`): the slot is free again ``per_s`` after that end. A slot whose call never ends
(its process died) is free again when its lease ends. Every time is PostgreSQL's ``now()``, so the
processes' own clocks never meet.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from shared.infra.db.core import Conn

_TAKE = """
WITH free AS (
    SELECT slot FROM control.esp_rate_slots
    WHERE esp = $1 AND account = $2 AND slot < $3 AND free_at <= now()
    ORDER BY free_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
), taken AS (
    UPDATE control.esp_rate_slots AS s
    SET free_at = now() + make_interval(secs => $4), lease = $5
    FROM free
    WHERE s.esp = $1 AND s.account = $2 AND s.slot = free.slot
    RETURNING s.slot
)
SELECT
    (SELECT slot FROM taken) AS slot,
    count(*) AS slots,
    extract(epoch FROM min(free_at) FILTER (WHERE lease IS NULL) - now())::float8 AS cooling_s,
    extract(epoch FROM min(free_at) - now())::float8 AS first_free_s
FROM control.esp_rate_slots
WHERE esp = $1 AND account = $2 AND slot < $3
"""


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one attempt to take a slot found."""

    slot: int | None
    """The slot taken, or None when none was free."""
    slots: int
    """The account's slots (fewer than its calls: add the missing ones)."""
    cooling_s: float | None
    """Seconds until the first slot whose call has ended is free again (None: every slot is held
    by a call still running)."""
    first_free_s: float | None
    """Seconds until the first slot is free, counting a running call's lease as its end."""


async def add_slots(conn: Conn, esp: str, account: str, calls: int) -> None:
    """Make sure the account has slots 0 … ``calls`` - 1 (more, from a larger limit before, are ignored)."""
    await conn.execute(
        """
        INSERT INTO control.esp_rate_slots (esp, account, slot)
        SELECT $1, $2, generate_series(0, $3 - 1)
        ON CONFLICT DO NOTHING
        """,
        esp,
        account,
        calls,
    )


async def take_slot(
    conn: Conn, esp: str, account: str, calls: int, lease: uuid.UUID, lease_s: float, timeout_s: float
) -> Attempt:
    """Take the account's free slot that has been free longest, held by ``lease`` for at most
    ``lease_s`` seconds; or, when none is free, what the account's slots say about waiting."""
    row = await conn.fetchrow(_TAKE, esp, account, calls, lease_s, lease, timeout=timeout_s)
    assert row is not None  # an aggregate answers one row
    return Attempt(row["slot"], row["slots"], row["cooling_s"], row["first_free_s"])


async def end_slot(
    conn: Conn, esp: str, account: str, slot: int, lease: uuid.UUID, per_s: float, timeout_s: float
) -> None:
    """The call holding ``slot`` under ``lease`` has ended: the slot is free ``per_s`` from now.

    A lease that ran out (the slot went to another call meanwhile) changes nothing.
    """
    await conn.execute(
        """
        UPDATE control.esp_rate_slots SET free_at = now() + make_interval(secs => $4), lease = NULL
        WHERE esp = $1 AND account = $2 AND slot = $3 AND lease = $5
        """,
        esp,
        account,
        slot,
        per_s,
        lease,
        timeout=timeout_s,
    )
