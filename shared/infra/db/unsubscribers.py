"""The unsubscribers the CRM gets back as a file: the crm.subscriptions rows an ESP unsubscribed or
removed (source not ``crm``), filtered by list, time and reason, read through a server-side cursor;
and the lock that lets one export at a time write a period's file."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from shared.infra.db.core import Conn
from shared.model.errors import ConfigurationError

NO_TABLE = "the CRM database has no crm.subscriptions: run `espbridge db migrate`"
"""What a CRM database without the subscription tables is told."""

EVERY = "*"
"""A list pattern's list (and a row's esp, account or list) that stands for all of them."""


@dataclass(frozen=True, slots=True)
class ListPattern:
    """One ESP list, or every list of an account (``list`` ``*``), in an export's list filter."""

    esp: str
    account: str
    list: str

    def __str__(self) -> str:
        return f"{self.esp}/{self.account}/{self.list}"


@dataclass(frozen=True, slots=True)
class UnsubscriberFilter:
    """Which unsubscribers an export holds; an empty include filter takes every one."""

    include_lists: Sequence[ListPattern] = ()
    """A row is taken when it applies to one of these: its own list, or its account's ``*`` row
    (an opt-out of every list of the account), or an opt-out of everywhere."""
    exclude_lists: Sequence[ListPattern] = ()
    """A row of one of these lists (with ``*``: of the account) is left out."""
    include_reasons: Sequence[str] = ()
    exclude_reasons: Sequence[str] = ()
    """Reasons compare without regard to case."""
    changed_from: datetime | None = None
    changed_before: datetime | None = None
    """The rows whose state changed in ``[changed_from, changed_before)``; None: no bound."""


@dataclass(frozen=True, slots=True)
class Unsubscriber:
    """One contact unsubscribed from (or removed from) one list by an ESP, as the CRM gets it."""

    email: str
    esp: str
    account: str
    list: str
    state: str
    reason: str
    source: str
    """The ``esp/account`` that reported it (or whose change it followed on)."""
    changed_at: datetime


_SELECT = """
SELECT s.email, s.esp, s.account, s.list, s.state, s.reason, s.source, s.changed_at
FROM crm.subscriptions AS s
WHERE s.state IN ('unsubscribed', 'removed')
  AND s.source <> 'crm'
  AND (cardinality($1::text[]) = 0 OR EXISTS (
        SELECT 1 FROM unnest($1::text[], $2::text[], $3::text[]) AS i (esp, account, list)
        WHERE ((s.esp = i.esp AND s.account = i.account) OR s.esp = '*')
          AND (i.list = '*' OR s.list = i.list OR s.list = '*')))
  AND NOT EXISTS (
        SELECT 1 FROM unnest($4::text[], $5::text[], $6::text[]) AS x (esp, account, list)
        WHERE s.esp = x.esp AND s.account = x.account AND (x.list = '*' OR s.list = x.list))
  AND (cardinality($7::text[]) = 0 OR lower(s.reason) = ANY ($7::text[]))
  AND NOT (lower(s.reason) = ANY ($8::text[]))
  AND ($9::timestamptz IS NULL OR s.changed_at >= $9)
  AND ($10::timestamptz IS NULL OR s.changed_at < $10)
ORDER BY s.changed_at, s.email, s.esp, s.account, s.list
"""


async def unsubscribers(
    conn: Conn, selection: UnsubscriberFilter, chunk: int = 2000
) -> AsyncIterator[list[Unsubscriber]]:
    """The unsubscribers ``selection`` takes, oldest change first, ``chunk`` rows at a time from a
    server-side cursor (memory stays flat however many there are). Run it in a transaction."""

    def columns(patterns: Sequence[ListPattern]) -> tuple[list[str], list[str], list[str]]:
        return [p.esp for p in patterns], [p.account for p in patterns], [p.list for p in patterns]

    args = (
        *columns(selection.include_lists),
        *columns(selection.exclude_lists),
        [r.lower() for r in selection.include_reasons],
        [r.lower() for r in selection.exclude_reasons],
        selection.changed_from,
        selection.changed_before,
    )
    batch: list[Unsubscriber] = []
    try:
        async for r in conn.cursor(_SELECT, *args, prefetch=chunk):
            batch.append(Unsubscriber(*r.values()))
            if len(batch) >= chunk:
                yield batch
                batch = []
    except asyncpg.UndefinedTableError:
        raise ConfigurationError(NO_TABLE) from None
    if batch:
        yield batch


async def lock_period(conn: Conn, name: str) -> None:
    """Wait for the lock of the export file ``name`` (every process of the deployment that exports
    it takes the same one), held until the transaction ends."""
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", f"espbridge-unsubscriber-export:{name}"
    )
