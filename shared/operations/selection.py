"""Reading a job's recipients: a CRM table or view (server-side cursor or COPY), a CSV file, inline
rows — for the uploader's list file and for ``espbridge job check``, which run the same code.

Every source yields rows of the selected source columns as tuples, streamed; suppressed rows are
counted, not yielded (:class:`Suppression`): an email the CRM's subscription state suppresses for the
job's account (a row of ``crm.suppressions``), or a row the table's own suppression column flags. A
table selection's every column (selected, mapped or filtered) must exist, or nothing is read.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.infra.db import Conn, quote_ident, quote_qualified
from shared.infra.settings import CrmSettings
from shared.model.errors import PermanentError
from shared.model.messages import CsvSelection, Identifier, InlineSelection, TableSelection

TRUTHY = frozenset({"true", "t", "1", "yes", "y"})
NAMED_AT_MOST = 20
"""How many missing columns an error names before it counts the rest."""
SUPPRESSIONS = "crm.suppressions"
"""The CRM's view of the emails not to be mailed, per (esp, account, list); ``*`` rows: every list
of the account, or with esp and account ``*`` too, everywhere."""


class SelectionError(PermanentError):
    """A selection that cannot be read: no such table or column, a CSV outside the allowed folder."""


class SelectionSettings(BaseSettings):
    """How recipients are read (the uploader's keys, which ``espbridge job check`` reads too)."""

    model_config = SettingsConfigDict(env_prefix="ESPBRIDGE_UPLOADER_", frozen=True, extra="ignore")

    suppression_column: Identifier = Field(
        default="opted_out", description="a boolean column; rows where it is true are left out"
    )
    csv_dir: Path | None = Field(default=None, description="the only folder CSV selections may be read from")
    fetch_rows: int = Field(default=5000, ge=100, description="rows per round trip of the selection cursor")
    crm: CrmSettings = Field(
        default_factory=CrmSettings, description="the CRM database selections are read from"
    )


@dataclass(frozen=True, slots=True)
class SubscriptionScope:
    """The account and list whose suppression rows leave an email out of a job's list."""

    esp: str
    account: str
    list: str
    """The account's broadcast list (``*`` when it syncs none)."""

    def __str__(self) -> str:
        return f"{self.esp}/{self.account} list {self.list!r}"


@dataclass(frozen=True, slots=True)
class Suppression:
    """What leaves a selected row out: the subscription state of its email for ``scope`` (in SQL
    for a table selection, ``emails`` read once for a CSV or inline one), then the ``column`` flag."""

    column: str
    """The source's own boolean suppression column (ignored where the source has none)."""
    scope: SubscriptionScope | None = None
    """None: no subscription state is checked (the CRM keeps none, or the job has no account)."""
    email_column: str = "email"
    """The source column holding the email (the one mapped to the ESP's email field)."""
    emails: frozenset[str] = frozenset()
    """For CSV and inline selections: the lower-cased emails ``scope`` suppresses."""

    def state_suppresses(self, row: Mapping[str, Any]) -> bool:
        """Whether a CSV or inline row's email is suppressed by the subscription state."""
        value = row.get(self.email_column)
        return self.scope is not None and value is not None and str(value).strip().lower() in self.emails


@dataclass
class Tally:
    """Rows excluded while streaming a selection: by the subscription state, and (of the rest) by
    the suppression column."""

    by_state: int = 0
    by_column: int = 0

    @property
    def excluded(self) -> int:
        """Every row left out."""
        return self.by_state + self.by_column


@dataclass(frozen=True, slots=True)
class Counted:
    """A selection's size: the recipients a list file would hold, and those left out as opted out
    by the suppression column and by the subscription state."""

    recipients: int
    by_column: int
    suppression_checked: bool
    """Whether the source has the suppression column at all (else nobody is excluded by it)."""
    by_state: int = 0
    state_checked: bool = False
    """Whether the CRM keeps subscription state that was checked (else nobody is excluded by it)."""

    @property
    def excluded(self) -> int:
        """Every row left out."""
        return self.by_state + self.by_column


async def subscription_state_kept(conn: Conn) -> bool:
    """Whether the CRM database keeps subscription state (has the :data:`SUPPRESSIONS` view)."""
    return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", SUPPRESSIONS))


_SCOPE_SQL = (
    "((s.esp = ${esp} AND s.account = ${account} AND s.list IN (${list}, '*'))"
    " OR (s.esp = '*' AND s.account = '*' AND s.list = '*'))"
)
"""The suppression rows of a scope: its account's list, every list of it, everywhere."""


def _scope_condition(scope: SubscriptionScope, args: list[Any]) -> str:
    """:data:`_SCOPE_SQL` with the scope's values appended to ``args`` as parameters."""
    at = len(args)
    args += [scope.esp, scope.account, scope.list]
    return _SCOPE_SQL.format(esp=at + 1, account=at + 2, list=at + 3)


async def suppressed_emails(conn: Conn, scope: SubscriptionScope) -> frozenset[str]:
    """The emails the CRM's subscription state suppresses for ``scope``, read once for a CSV or
    inline selection."""
    args: list[Any] = []
    where = _scope_condition(scope, args)
    rows = await conn.fetch(f"SELECT DISTINCT s.email FROM {SUPPRESSIONS} AS s WHERE {where}", *args)
    return frozenset(str(r["email"]).lower() for r in rows)


async def suppression_for(
    conn: Conn,
    sel: TableSelection | CsvSelection | InlineSelection,
    column: str,
    scope: SubscriptionScope | None,
    email_column: str,
) -> Suppression:
    """The suppression of a job's selection read through the CRM connection ``conn``: the
    subscription state for ``scope`` where the CRM keeps it, and the ``column`` flag."""
    if scope is None or not await subscription_state_kept(conn):
        return Suppression(column, email_column=email_column)
    emails = frozenset() if isinstance(sel, TableSelection) else await suppressed_emails(conn, scope)
    return Suppression(column, scope, email_column, emails)


def missing_text(where: str, missing: Collection[str]) -> str:
    """``<where> has no column a, b`` naming at most :data:`NAMED_AT_MOST`, then how many more."""
    names = sorted(missing)
    text = ", ".join(names[:NAMED_AT_MOST])
    if len(names) > NAMED_AT_MOST:
        text += f" and {len(names) - NAMED_AT_MOST} more"
    return f"{where} has no column {text}"


def is_suppressed(row: Mapping[str, Any], column: str) -> bool:
    """Whether a CSV or inline row is opted out by its suppression column."""
    value = row.get(column)
    if isinstance(value, bool):
        return value
    return value is not None and str(value).strip().lower() in TRUTHY


async def table_columns(conn: Conn, table: str) -> dict[str, str]:
    """The columns of a table or view with their types (as ``format_type`` names them); a missing
    table is a clear permanent error."""
    rows = await conn.fetch(
        """
        SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
        WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped
        """,
        quote_qualified(table),
    )
    if not rows:
        raise SelectionError(f"table or view {table} does not exist")
    return {r["attname"]: r["type"] for r in rows}


_ALIAS = "recipient"
"""The selection's table in its queries, so the suppression join names its email column."""
_SUPPRESSED = "espbridge_suppressed"
"""The suppressed emails joined to a selection: the subquery's name and its one column's."""


@dataclass(frozen=True, slots=True)
class _Where:
    """A table selection's source and conditions, checked against its columns."""

    source: str
    conditions: list[str]
    args: list[Any]
    by_state: str | None
    """The SQL that is true for a row the subscription state suppresses; None when not checked."""
    by_column: str | None
    """The SQL that is true for a row the suppression column flags; None when the table has none."""
    types: dict[str, str]

    @property
    def kept(self) -> list[str]:
        """The conditions of the rows the list holds."""
        return [*self.conditions, *(f"NOT {s}" for s in (self.by_state, self.by_column) if s is not None)]


async def _where(
    conn: Conn, selection: TableSelection, wanted: Sequence[str], suppression: Suppression
) -> _Where:
    """The selection's conditions (filter values as parameters), once every column it names exists."""
    types = await table_columns(conn, selection.table)
    checked = {suppression.email_column} if suppression.scope is not None else set()
    missing = {*selection.columns, *wanted, *selection.filters, *checked} - types.keys()
    if missing:
        raise SelectionError(missing_text(selection.table, missing))
    conditions: list[str] = []
    args: list[Any] = []
    for column, value in selection.filters.items():
        if value is None:
            conditions.append(f"{quote_ident(column)} IS NULL")
        else:
            args.append(value)
            conditions.append(f"{quote_ident(column)} = ${len(args)}")
    source = f"{quote_qualified(selection.table)} AS {_ALIAS}"
    by_state = None
    if suppression.scope is not None:
        # A join with the scope's suppressed emails, each once: the planner hashes them (one scan
        # of each side), where a correlated EXISTS probed the index once per row (5 times slower).
        email = f"lower({_ALIAS}.{quote_ident(suppression.email_column)}::text)"
        scope = _scope_condition(suppression.scope, args)
        source += (
            f" LEFT JOIN (SELECT DISTINCT s.email AS {_SUPPRESSED} FROM {SUPPRESSIONS} AS s WHERE {scope})"
            f" AS {_SUPPRESSED} ON {_SUPPRESSED}.{_SUPPRESSED} = {email}"
        )
        by_state = f"{_SUPPRESSED}.{_SUPPRESSED} IS NOT NULL"
    column = suppression.column
    by_column = f"coalesce({_ALIAS}.{quote_ident(column)}, false)" if column in types else None
    return _Where(source, conditions, args, by_state, by_column, types)


async def _count_excluded(conn: Conn, where: _Where) -> Counted:
    """The rows a table selection keeps and those it leaves out (by the state, then by the column
    of the rest), in one scan."""
    by_state = where.by_state or "false"
    by_column = f"{where.by_column} AND NOT {by_state}" if where.by_column else "false"
    row = await conn.fetchrow(
        _sql(
            f"count(*) FILTER (WHERE {' AND '.join(where.kept) or 'true'}) AS kept, "
            f"count(*) FILTER (WHERE {by_state}) AS by_state, "
            f"count(*) FILTER (WHERE {by_column}) AS by_column",
            where.source,
            where.conditions,
        ),
        *where.args,
    )
    assert row is not None  # an aggregate always answers one row
    return Counted(
        row["kept"],
        row["by_column"],
        suppression_checked=where.by_column is not None,
        by_state=row["by_state"],
        state_checked=where.by_state is not None,
    )


def _sql(select: str, source: str, conditions: Sequence[str]) -> str:
    return f"SELECT {select} FROM {source}" + (f" WHERE {' AND '.join(conditions)}" if conditions else "")


async def _table_query(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression: Suppression,
    tally: Tally | None,
    expressions: Callable[[dict[str, str]], Sequence[str]],
    limit: int | None = None,
) -> tuple[str, list[Any]]:
    """The SELECT of a table selection's ``expressions`` (made from the column types; one per
    wanted column), and its arguments; counts the excluded rows into ``tally`` (unless None)."""
    where = await _where(conn, selection, wanted, suppression)
    args = list(where.args)
    if tally is not None and (where.by_state or where.by_column):
        counted = await _count_excluded(conn, where)
        tally.by_state, tally.by_column = counted.by_state, counted.by_column
    query = _sql(", ".join(expressions(where.types)), where.source, where.kept)
    if limit is not None:
        args.append(limit)
        query += f" LIMIT ${len(args)}"
    return query, args


async def count_table(
    conn: Conn, selection: TableSelection, wanted: Sequence[str], suppression: Suppression
) -> Counted:
    """How many rows a table selection would upload and leave out, in one scan."""
    return await _count_excluded(conn, await _where(conn, selection, wanted, suppression))


async def from_table(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression: Suppression,
    tally: Tally,
    prefetch: int,
    limit: int | None = None,
) -> AsyncIterator[tuple[Any, ...]]:
    """Rows of a table or view, in a server-side cursor (call inside a transaction)."""
    columns = [quote_ident(c) for c in wanted]
    query, args = await _table_query(conn, selection, wanted, suppression, tally, lambda _: columns, limit)
    async for record in conn.cursor(query, *args, prefetch=prefetch):
        yield tuple(record.values())


def list_text(column: str, pg_type: str) -> str:
    """SQL for a column's list-file text as :func:`shared.operations.lists.text` renders a value:
    JSON's scalar forms (``true``/``false``), times as Python's ``isoformat`` writes them (all six
    digits of a fraction, none when it is zero; UTC as ``+00:00``), and nothing for NULL or ''."""
    col = quote_ident(column)
    if pg_type.startswith("timestamp"):
        zone = " || '+00:00'" if "with time zone" in pg_type else ""
        whole = f"date_part('microseconds', {col})::bigint % 1000000 = 0"
        fraction = f"CASE WHEN {whole} THEN '' ELSE to_char({col}, '.US') END"
        return f"to_char({col}, 'YYYY-MM-DD\"T\"HH24:MI:SS') || {fraction}{zone}"
    if pg_type in ("json", "jsonb"):
        return f"NULLIF({col}::text, '')"  # the JSON text itself, as asyncpg returns it
    if pg_type == "text" or pg_type.startswith("character varying"):
        return f"NULLIF({col}, '')"  # text is its own rendering (to_json and back would cost 3x)
    return f"NULLIF(to_json({col}) #>> '{{}}', '')"


def _list_texts(wanted: Sequence[str]) -> Callable[[dict[str, str]], list[str]]:
    return lambda types: [list_text(c, types.get(c, "")) for c in wanted]


async def copy_table_csv(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression: Suppression,
    tally: Tally,
    delimiter: str,
    output: Callable[[bytes], Coroutine[Any, Any, None]],
    limit: int | None = None,
) -> int:
    """The selection's rows as CSV (no header) from the server's COPY, streamed to ``output``;
    the number of rows. Call inside a transaction: times are rendered in UTC, as asyncpg's are."""
    query, args = await _table_query(conn, selection, wanted, suppression, tally, _list_texts(wanted), limit)
    await conn.execute("SET LOCAL TIME ZONE 'UTC'")
    done = await conn.copy_from_query(query, *args, output=output, format="csv", delimiter=delimiter)
    return int(done.split()[-1])


async def key_query(
    conn: Conn, selection: TableSelection, key_column: str, suppression: Suppression
) -> tuple[str, list[Any]]:
    """The SELECT of a table selection's communication keys as its list file writes them (one
    text column; NULL for none), and its arguments."""
    return await _table_query(conn, selection, [key_column], suppression, None, _list_texts([key_column]))


def resolve_csv(csv_dir: Path | None, path: str) -> Path:
    """A CSV selection's file, which must lie inside the configured folder."""
    if csv_dir is None:
        raise SelectionError("CSV selections are not enabled (set ESPBRIDGE_UPLOADER_CSV_DIR)")
    base = csv_dir.resolve()
    candidate = (base / path).resolve()
    if not candidate.is_relative_to(base):
        raise SelectionError(f"CSV path {path!r} is outside {base}")
    if not candidate.is_file():
        raise SelectionError(f"CSV file {path!r} does not exist in {base}")
    return candidate


def _kept(row: Mapping[str, Any], suppression: Suppression, tally: Tally) -> bool:
    """Whether a CSV or inline row goes in the list; counts it into ``tally`` if not."""
    if suppression.state_suppresses(row):
        tally.by_state += 1
        return False
    if is_suppressed(row, suppression.column):
        tally.by_column += 1
        return False
    return True


async def from_csv(
    path: Path, selection: CsvSelection, wanted: Sequence[str], suppression: Suppression, tally: Tally
) -> AsyncIterator[tuple[Any, ...]]:
    """Rows of a UTF-8 CSV file with a header row, read as a stream."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=selection.delimiter)
        missing = set(wanted) - set(reader.fieldnames or ())
        if missing:
            raise SelectionError(missing_text(f"CSV file {path.name}", missing))
        for row in reader:
            if _kept(row, suppression, tally):
                yield tuple(row[c] for c in wanted)


async def from_inline(
    selection: InlineSelection, wanted: Sequence[str], suppression: Suppression, tally: Tally
) -> AsyncIterator[tuple[Any, ...]]:
    """Rows carried in the job."""
    for n, row in enumerate(selection.rows, start=1):
        missing = sorted(set(wanted) - set(row))
        if missing:
            raise SelectionError(f"inline row {n} has no {', '.join(missing)}")
        if _kept(row, suppression, tally):
            yield tuple(row[c] for c in wanted)
