"""Logical replication slots and publications: what change data capture leaves in the CRM database.

A replication slot keeps every WAL segment its reader has not confirmed, even while nobody reads it:
a capture that is switched off must drop its slot, or the server's disk fills up. Names are
validated and quoted (:func:`~shared.infra.db.sql.quote_ident`) or passed as values, never
interpolated raw.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from shared.infra.db.core import Conn
from shared.infra.db.sql import quote_ident
from shared.model.errors import UnavailableError


@dataclass(frozen=True, slots=True)
class SlotInfo:
    """A replication slot as the server reports it."""

    name: str
    database: str
    active: bool
    """A reader (a walsender) is attached now."""
    active_pid: int | None
    confirmed_flush_lsn: str | None
    """The position the reader confirmed: WAL before it may be recycled."""
    retained_wal_bytes: int | None
    """WAL the slot holds back from recycling (the current position minus the confirmed one)."""
    wal_status: str | None
    """``reserved``, ``extended``, ``unreserved`` or ``lost`` (the server gave up the slot's WAL)."""


async def slot_info(conn: Conn, slot: str) -> SlotInfo | None:
    """The slot named ``slot``, or None when there is none."""
    row = await conn.fetchrow(
        "SELECT slot_name, database, active, active_pid, confirmed_flush_lsn::text AS confirmed,"
        " pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint AS retained, wal_status"
        " FROM pg_replication_slots WHERE slot_name = $1",
        slot,
    )
    if row is None:
        return None
    return SlotInfo(
        name=row["slot_name"],
        database=row["database"] or "",
        active=row["active"],
        active_pid=row["active_pid"],
        confirmed_flush_lsn=row["confirmed"],
        retained_wal_bytes=row["retained"],
        wal_status=row["wal_status"],
    )


async def drop_slot(conn: Conn, slot: str, *, timeout_s: float = 30.0) -> bool:
    """Drop the replication slot ``slot``; False when there was none.

    A slot in use cannot be dropped: its reader (a connector being stopped) is given ``timeout_s``
    to let go, then its walsender is ended — the slot is going, and nothing else reads it.
    """
    info = await _until_released(conn, slot, timeout_s)
    if info is not None and info.active:
        await conn.execute("SELECT pg_terminate_backend($1)", info.active_pid)
        info = await _until_released(conn, slot, 10.0)
        if info is not None and info.active:
            raise UnavailableError(f"replication slot {slot} is still in use; it was not dropped")
    if info is None:
        return False
    await conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", slot
    )
    return True


async def _until_released(conn: Conn, slot: str, timeout_s: float) -> SlotInfo | None:
    """The slot once no reader holds it (or as it is at the deadline); None when it is gone."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await slot_info(conn, slot)
        if info is None or not info.active or time.monotonic() >= deadline:
            return info
        await asyncio.sleep(0.2)


async def drop_publication(conn: Conn, publication: str) -> bool:
    """Drop the publication ``publication`` of the connected database; False when there was none."""
    exists = await conn.fetchval("SELECT true FROM pg_publication WHERE pubname = $1", publication)
    if not exists:
        return False
    await conn.execute(f"DROP PUBLICATION IF EXISTS {quote_ident(publication)}")
    return True


async def capture_problems(conn: Conn, table: str) -> list[str]:
    """What keeps logical decoding of ``table`` (``schema.table``) from working in the connected
    database: the table missing, ``wal_level`` not ``logical``. (The right to replicate is left to
    Debezium to check: managed servers grant it through roles of their own.)"""
    problems: list[str] = []
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
        problems.append(
            f"table {table} does not exist in database {await conn.fetchval('SELECT current_database()')}"
        )
    wal_level = await conn.fetchval("SELECT current_setting('wal_level')")
    if wal_level != "logical":
        problems.append(f"wal_level is {wal_level!r}, not 'logical' (set it and restart PostgreSQL)")
    return problems
