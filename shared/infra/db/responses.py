"""Reading the response database as an analyst does (the loader alone writes it)."""

from __future__ import annotations

from shared.infra.db.core import Conn

FUNNEL = ("sent", "delivered", "bounce_hard", "bounce_soft", "opens", "clicks", "unsubscribes", "complaints")
"""The columns of responses.broadcast_funnel, in funnel order."""


async def funnel(conn: Conn, broadcast_id: str) -> dict[str, int] | None:
    """A broadcast's response funnel from responses.broadcast_funnel (None if nothing is loaded)."""
    row = await conn.fetchrow(
        "SELECT * FROM responses.broadcast_funnel WHERE broadcast_id = $1", broadcast_id
    )
    return None if row is None else {k: int(row[k]) for k in FUNNEL}
