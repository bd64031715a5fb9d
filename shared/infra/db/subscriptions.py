"""crm.subscriptions, crm.subscription_log and crm.subscription_pushes: the syncer's SQL.

Every write here is espbridge's (``SET LOCAL espbridge.writer = 'espbridge'``), so the CRM's trigger
marks it so and change data capture never pushes it back (no echo). A batch is applied in one
transaction of a few statements, whatever its size: its rows are locked in key order (email, esp,
account, list) — so two syncers never deadlock — and read with the batch's ids already logged;
:func:`decide` applies the time-order rules; the rows and the log are then written set-based.

The rules: each change is applied once (its id in the log); per row a later ``occurred_at`` wins,
an older one is logged ``stale`` and changes nothing, the same state is ``unchanged``.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING

import orjson

if TYPE_CHECKING:  # the values and rules here serve the syncer's core, which does no I/O
    import asyncpg

    from shared.infra.db.core import Conn

WRITER_GUC = "espbridge.writer"
"""The setting espbridge's transactions set to ``espbridge``: the trigger then keeps their source."""
LOCK_CLASS = 15
"""The second key of the per-row advisory locks (``hashtextextended(row key, 15)``)."""


class Outcome(StrEnum):
    """What became of one change or request."""

    APPLIED = "applied"
    """Written to its row (or, already in the CRM, still its latest)."""
    STALE = "stale"
    """Older than its row's change: logged, the row untouched."""
    UNCHANGED = "unchanged"
    """The row holds that state (and those fields) already."""
    IGNORED = "ignored"
    """Logged only, as a policy says (a hard bounce an account ignores; fields for no row)."""
    DUPLICATE = "duplicate"
    """Its id is in the log already: received before (not logged again)."""


class Origin(StrEnum):
    """Where a logged write came from (crm.subscription_log.origin)."""

    ESP = "esp"
    """A change an ESP reported (subscriptions.changes.v1), or the state it answered a push with."""
    PRODUCER = "producer"
    CAPTURE = "capture"
    FOLLOW_ON = "follow_on"


@dataclass(frozen=True, slots=True, order=True)
class Key:
    """A row of crm.subscriptions: one contact on one list of one ESP account."""

    email: str
    esp: str
    account: str
    list: str

    @property
    def lock_text(self) -> str:
        """The text its advisory lock is hashed from (fields joined by a unit separator)."""
        return "\x1f".join((self.email, self.esp, self.account, self.list))


@dataclass(frozen=True, slots=True)
class Row:
    """A row of crm.subscriptions as read."""

    key: Key
    state: str
    reason: str
    source: str
    changed_at: datetime
    written_by: str
    change_id: uuid.UUID | None
    fields: Mapping[str, str]


@dataclass(frozen=True, slots=True)
class Write:
    """One change or request to apply to one row (and log under its id)."""

    change_id: uuid.UUID
    key: Key
    state: str | None
    """The state wanted; None: only the fields."""
    occurred_at: datetime
    """When it changed at its source: a later one wins."""
    origin: Origin
    source: str
    """Who made the change: ``crm`` or ``esp/account``."""
    reason: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)
    """Contact data, merged into the row's."""
    in_crm: bool = False
    """Already in the CRM (a captured change, a follow-on at its push): checked and logged only."""
    ignored: bool = False
    """Logged as ``ignored``; the row is left alone."""
    after: uuid.UUID | None = None
    """A follow-on: applied only when the write with this id is applied in the same batch (or,
    when that one is a duplicate, reported as its own first outcome); otherwise left out."""


@dataclass(frozen=True, slots=True)
class Result:
    """What became of one :class:`Write`."""

    write: Write
    outcome: Outcome
    first: Outcome | None = None
    """A duplicate: the outcome it was logged with the first time."""
    superseded: bool = False
    """The row now holds a later change than this write (do not push it)."""

    @property
    def effective(self) -> Outcome:
        """The outcome, or for a duplicate the first one."""
        return self.first if self.outcome is Outcome.DUPLICATE and self.first is not None else self.outcome


@dataclass(frozen=True, slots=True)
class Push:
    """A request pushed to its ESP, and what the ESP answered."""

    request_id: uuid.UUID
    key: Key
    state: str | None
    origin: str
    accepted: bool
    result_state: str | None = None
    detail: str = ""


def decide(
    writes: Sequence[Write], rows: Mapping[Key, Row], logged: Mapping[uuid.UUID, Outcome]
) -> tuple[list[Result], dict[Key, Row]]:
    """The rules, without I/O: the result of each write, in the order given (a follow-on whose
    origin did not change its row is left out), and the rows the batch changed, to be written.

    Writes are taken in arrival order, follow-ons last: an older change that arrives after a newer
    one is stale, as it would be in a later batch. An id seen twice is a duplicate the second time.
    """
    current = dict(rows)
    changed: dict[Key, Row] = {}
    decided: dict[int, Result] = {}
    by_id: dict[uuid.UUID, Result] = {}
    order = sorted(range(len(writes)), key=lambda i: writes[i].after is not None)
    for i in order:
        w = writes[i]
        if w.after is not None and not _origin_applied(by_id.get(w.after)):
            continue
        row = current.get(w.key)
        seen = by_id.get(w.change_id)
        if seen is not None or w.change_id in logged:
            first = seen.effective if seen is not None else logged[w.change_id]
            decided[i] = Result(w, Outcome.DUPLICATE, first, _later(row, w))
            by_id.setdefault(w.change_id, decided[i])
            continue
        if w.after is not None and by_id[w.after].outcome is Outcome.DUPLICATE:
            continue  # its origin came before and had no follow-on under this id then
        outcome, new_row = _decide_one(w, row)
        if new_row is not None:
            current[w.key] = new_row
            changed[w.key] = new_row
        decided[i] = by_id[w.change_id] = Result(w, outcome, None, _later(current.get(w.key), w))
    return [decided[i] for i in sorted(decided)], changed


def _origin_applied(origin: Result | None) -> bool:
    """Whether a follow-on's origin changed its row (this time, or the first time it came)."""
    return origin is not None and origin.effective is Outcome.APPLIED


def _later(row: Row | None, w: Write) -> bool:
    return row is not None and row.changed_at > w.occurred_at


def _decide_one(w: Write, row: Row | None) -> tuple[Outcome, Row | None]:
    """One write against its row as it stands: the outcome, and the row to write (if any)."""
    if w.ignored:
        return Outcome.IGNORED, None
    if row is not None and _older(w, row):
        return Outcome.STALE, None
    if w.in_crm:
        return Outcome.APPLIED, None
    fields_known = row is not None and all(row.fields.get(k) == v for k, v in w.fields.items())
    if w.state is None:
        if row is None:
            return Outcome.IGNORED, None
        if fields_known:
            return Outcome.UNCHANGED, None
        return Outcome.APPLIED, replace(row, change_id=w.change_id, fields={**row.fields, **w.fields})
    if row is not None and row.state == w.state and fields_known:
        return Outcome.UNCHANGED, None
    merged = {**(row.fields if row is not None else {}), **w.fields}
    changed_at = w.occurred_at if row is None else max(w.occurred_at, row.changed_at)
    return Outcome.APPLIED, Row(
        w.key, w.state, w.reason, w.source, changed_at, "espbridge", w.change_id, merged
    )


OPT_OUTS = frozenset({"unsubscribed", "removed"})


def _older(w: Write, row: Row) -> bool:
    """Whether a write is older than its row. An opt-out an ESP reports in whole seconds is older
    only when its second ended before the row changed: within that second nobody can tell which came
    first, and an opt-out is honoured (a subscribe made in the same second does not hide it)."""
    if w.state in OPT_OUTS and w.occurred_at.microsecond == 0:
        return w.occurred_at + timedelta(seconds=1) <= row.changed_at
    return w.occurred_at < row.changed_at


_LOCK = """
SELECT set_config('espbridge.writer', 'espbridge', true),
       (SELECT count(pg_advisory_xact_lock(hashtextextended(k, $2))) FROM unnest($1::text[]) AS k)
"""

_ROWS = """
SELECT s.email, s.esp, s.account, s.list, s.state, s.reason, s.source, s.changed_at, s.written_by,
       s.change_id, s.fields
FROM crm.subscriptions AS s
JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[]) AS k (email, esp, account, list)
  USING (email, esp, account, list)
ORDER BY s.email, s.esp, s.account, s.list
FOR UPDATE OF s
"""

_LOGGED = "SELECT change_id, outcome FROM crm.subscription_log WHERE change_id = ANY($1::uuid[])"

_UPSERT = """
INSERT INTO crm.subscriptions AS s (email, esp, account, list, state, reason, source, changed_at,
                                    change_id, fields)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                     $7::text[], $8::timestamptz[], $9::uuid[], $10::jsonb[])
ON CONFLICT (email, esp, account, list) DO UPDATE
SET state = excluded.state, reason = excluded.reason, source = excluded.source,
    changed_at = excluded.changed_at, change_id = excluded.change_id, fields = excluded.fields
"""

_LOG = """
INSERT INTO crm.subscription_log (change_id, email, esp, account, list, state, reason, source, origin,
                                  occurred_at, outcome)
SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[],
                     $8::text[], $9::text[], $10::timestamptz[], $11::text[])
ON CONFLICT (change_id) DO NOTHING
"""


def _key_columns(keys: Sequence[Key]) -> list[list[str]]:
    return [[k.email for k in keys], [k.esp for k in keys], [k.account for k in keys], [k.list for k in keys]]


def _row(record: asyncpg.Record) -> Row:
    fields = record["fields"]
    if isinstance(fields, (str, bytes)):  # asyncpg's default jsonb codec hands back the text
        fields = orjson.loads(fields)
    return Row(
        Key(record["email"], record["esp"], record["account"], record["list"]),
        record["state"],
        record["reason"],
        record["source"],
        record["changed_at"],
        record["written_by"],
        record["change_id"],
        {str(k): str(v) for k, v in fields.items()},
    )


async def lock_and_read(conn: Conn, keys: Sequence[Key]) -> dict[Key, Row]:
    """In the caller's transaction: mark it as espbridge's, lock the rows of ``keys`` (in key
    order, existing or not) and read those that exist."""
    ordered = sorted(set(keys))
    await conn.execute(_LOCK, [k.lock_text for k in ordered], LOCK_CLASS)
    records = await conn.fetch(_ROWS, *_key_columns(ordered))
    return {row.key: row for row in map(_row, records)}


async def apply(conn: Conn, writes: Sequence[Write]) -> list[Result]:
    """Apply a batch of writes in one transaction (the caller's, if it has one): each applied at
    most once and in time order per row; the result of each (see :func:`decide`)."""
    if not writes:
        return []
    async with conn.transaction():
        rows = await lock_and_read(conn, [w.key for w in writes])
        ids = sorted({w.change_id for w in writes})
        logged = {r["change_id"]: Outcome(r["outcome"]) for r in await conn.fetch(_LOGGED, ids)}
        results, changed = decide(writes, rows, logged)
        if changed:
            new = [changed[k] for k in sorted(changed)]
            await conn.execute(
                _UPSERT,
                *_key_columns([r.key for r in new]),
                [r.state for r in new],
                [r.reason for r in new],
                [r.source for r in new],
                [r.changed_at for r in new],
                [r.change_id for r in new],
                [orjson.dumps(dict(r.fields)).decode() for r in new],
            )
        fresh = [r for r in results if r.outcome is not Outcome.DUPLICATE]
        if fresh:
            await conn.execute(
                _LOG,
                [r.write.change_id for r in fresh],
                *_key_columns([r.write.key for r in fresh]),
                [r.write.state for r in fresh],
                [r.write.reason for r in fresh],
                [r.write.source for r in fresh],
                [r.write.origin.value for r in fresh],
                [r.write.occurred_at for r in fresh],
                [r.outcome.value for r in fresh],
            )
    return results


async def contact_rows(
    conn: Conn, email: str, esp: str | None = None, account: str | None = None
) -> list[Row]:
    """A contact's rows (of one ESP, or one account of it, if given), in key order."""
    records = await conn.fetch(
        """
        SELECT email, esp, account, list, state, reason, source, changed_at, written_by, change_id, fields
        FROM crm.subscriptions
        WHERE email = lower($1) AND ($2::text IS NULL OR esp = $2) AND ($3::text IS NULL OR account = $3)
        ORDER BY email, esp, account, list
        """,
        email,
        esp,
        account,
    )
    return [_row(r) for r in records]


async def account_rows(
    conn: Conn, esp: str, account: str, lists: Sequence[str], emails: Sequence[str]
) -> list[Row]:
    """The rows of these contacts on these lists of an account (its ``*`` row included when asked)."""
    records = await conn.fetch(
        """
        SELECT email, esp, account, list, state, reason, source, changed_at, written_by, change_id, fields
        FROM crm.subscriptions
        WHERE esp = $1 AND account = $2 AND list = ANY($3::text[]) AND email = ANY($4::text[])
        ORDER BY email, esp, account, list
        """,
        esp,
        account,
        list(lists),
        [e.lower() for e in emails],
    )
    return [_row(r) for r in records]


async def accepted_pushes(conn: Conn, request_ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
    """The requests among these that an ESP has taken already (never pushed again)."""
    records = await conn.fetch(
        "SELECT request_id FROM crm.subscription_pushes WHERE request_id = ANY($1::uuid[]) AND accepted",
        list(request_ids),
    )
    return {r["request_id"] for r in records}


async def record_pushes(conn: Conn, pushes: Sequence[Push]) -> None:
    """Record what the ESP answered to pushed requests (a refused one pushed again is updated)."""
    if not pushes:
        return
    await conn.execute(
        """
        INSERT INTO crm.subscription_pushes (request_id, email, esp, account, list, state, origin, accepted,
                                             result_state, detail)
        SELECT * FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
                             $7::text[], $8::boolean[], $9::text[], $10::text[])
        ON CONFLICT (request_id) DO UPDATE
        SET accepted = excluded.accepted, result_state = excluded.result_state, detail = excluded.detail,
            pushed_at = clock_timestamp()
        WHERE NOT subscription_pushes.accepted
        """,
        [p.request_id for p in pushes],
        *_key_columns([p.key for p in pushes]),
        [p.state for p in pushes],
        [p.origin for p in pushes],
        [p.accepted for p in pushes],
        [p.result_state for p in pushes],
        [p.detail for p in pushes],
    )
