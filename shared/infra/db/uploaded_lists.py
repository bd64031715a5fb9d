"""control.uploaded_lists and control.list_keys: which communication keys each uploaded list held.

Recorded by the uploader for the accounts whose response rows are attributed by communication key,
read by the gatherer (and a dead-letter replay) to find the broadcasts a file's keys were sent in.
A list's keys are written by COPY (or by one INSERT … SELECT of the list's own selection), so
recording a million keys costs about what writing their file does.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from shared.infra.db.core import Conn

LOOKUP_BATCH = 10_000
"""Keys asked for in one query."""


@dataclass(frozen=True, slots=True)
class UploadedList:
    """A list espbridge uploaded: its broadcast and when it was complete on the ESP's site."""

    job_id: str
    uploaded_at: datetime


async def start_list(conn: Conn, job_id: str, esp: str, account: str, uploaded_at: datetime) -> int:
    """Record a list (replacing the record of an earlier upload of the same job); its list id.
    Call in the transaction that adds its keys, so a list is never seen half recorded."""
    old = await conn.fetch("DELETE FROM control.uploaded_lists WHERE job_id = $1 RETURNING list_id", job_id)
    if old:
        await _forget_keys(conn, [r["list_id"] for r in old])
    list_id = await conn.fetchval(
        """
        INSERT INTO control.uploaded_lists (job_id, esp, account, uploaded_at)
        VALUES ($1, $2, $3, $4) RETURNING list_id
        """,
        job_id,
        esp,
        account,
        uploaded_at,
    )
    return int(list_id)


async def copy_keys(conn: Conn, list_id: int, keys: Iterable[str]) -> int:
    """Add a list's keys by COPY; how many were added."""
    done = await conn.copy_records_to_table(
        "list_keys",
        schema_name="control",
        columns=["list_id", "communication_key"],
        records=((list_id, key) for key in keys),
    )
    return await _counted(conn, list_id, done)


async def insert_selected_keys(conn: Conn, list_id: int, select: str, args: Sequence[Any]) -> int:
    """Add a list's keys as a query of one text column returns them (NULLs left out): the list's
    own selection, run in the snapshot its file was written from; how many were added."""
    done = await conn.execute(
        # The selection's own SELECT, whose names the uploader validated and quoted; values are $n.
        f"INSERT INTO control.list_keys (list_id, communication_key) "  # noqa: S608
        f"SELECT ${len(args) + 1}, selected.key FROM ({select}) AS selected(key) "
        "WHERE selected.key IS NOT NULL",
        *args,
        list_id,
    )
    return await _counted(conn, list_id, done)


async def _counted(conn: Conn, list_id: int, status: str) -> int:
    keys = int(status.split()[-1])
    await conn.execute("UPDATE control.uploaded_lists SET keys = $2 WHERE list_id = $1", list_id, keys)
    return keys


async def forget_lists(conn: Conn, esp: str, account: str, before: datetime) -> int:
    """Remove the account's lists uploaded before ``before``, with their keys; how many."""
    async with conn.transaction():
        old = await conn.fetch(
            """
            DELETE FROM control.uploaded_lists
            WHERE esp = $1 AND account = $2 AND uploaded_at < $3 RETURNING list_id
            """,
            esp,
            account,
            before,
        )
        if old:
            await _forget_keys(conn, [r["list_id"] for r in old])
    return len(old)


async def _forget_keys(conn: Conn, list_ids: list[int]) -> None:
    await conn.execute("DELETE FROM control.list_keys WHERE list_id = ANY($1::bigint[])", list_ids)


async def lists_holding(
    conn: Conn, esp: str, account: str, keys: Collection[str]
) -> dict[str, tuple[UploadedList, ...]]:
    """The account's recorded lists that held each of ``keys``, oldest first (keys in none are
    absent). Keys held by the same lists share one tuple, so a file of a million keys stays small."""
    lists: dict[str, UploadedList] = {}
    shared: dict[tuple[UploadedList, ...], tuple[UploadedList, ...]] = {}
    held: dict[str, tuple[UploadedList, ...]] = {}
    ordered = sorted(keys)
    for start in range(0, len(ordered), LOOKUP_BATCH):
        rows = await conn.fetch(
            """
            SELECT DISTINCT k.communication_key, l.job_id, l.uploaded_at
            FROM control.list_keys AS k JOIN control.uploaded_lists AS l USING (list_id)
            WHERE k.communication_key = ANY($3::text[]) AND l.esp = $1 AND l.account = $2
            ORDER BY k.communication_key, l.uploaded_at, l.job_id
            """,
            esp,
            account,
            ordered[start : start + LOOKUP_BATCH],
        )
        for key, group in itertools.groupby(rows, key=lambda r: str(r["communication_key"])):
            found = tuple(
                lists.setdefault(r["job_id"], UploadedList(r["job_id"], r["uploaded_at"])) for r in group
            )
            held[key] = shared.setdefault(found, found)
    return held
