"""Reading a job's recipients: a CRM table or view (server-side cursor or COPY), a CSV file, inline
rows — for the uploader's list file and for ``espbridge job check``, which run the same code.

Every source yields rows of the selected source columns as tuples, streamed; rows opted out by
the suppression column are counted, not yielded. A table selection's every column (selected,
mapped or filtered) must exist, or nothing is read.
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
from shared.model.errors import PermanentError
from shared.model.messages import CsvSelection, Identifier, InlineSelection, TableSelection

TRUTHY = frozenset({"true", "t", "1", "yes", "y"})
NAMED_AT_MOST = 20
"""How many missing columns an error names before it counts the rest."""


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


@dataclass
class Tally:
    """Rows excluded while streaming a selection."""

    excluded: int = 0


@dataclass(frozen=True, slots=True)
class Counted:
    """A selection's size: the recipients a list file would hold, and those left out as opted out."""

    recipients: int
    excluded: int
    suppression_checked: bool
    """Whether the source has the suppression column at all (else nobody is excluded)."""


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


@dataclass(frozen=True, slots=True)
class _Where:
    """A table selection's source and conditions, checked against its columns."""

    source: str
    conditions: list[str]
    args: list[Any]
    suppressed: str | None
    """The SQL that is true for an opted-out row; None when the table has no suppression column."""
    types: dict[str, str]


async def _where(
    conn: Conn, selection: TableSelection, wanted: Sequence[str], suppression_column: str
) -> _Where:
    """The selection's conditions (filter values as parameters), once every column it names exists."""
    types = await table_columns(conn, selection.table)
    missing = {*selection.columns, *wanted, *selection.filters} - types.keys()
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
    suppressed = (
        f"coalesce({quote_ident(suppression_column)}, false)" if suppression_column in types else None
    )
    return _Where(quote_qualified(selection.table), conditions, args, suppressed, types)


def _sql(select: str, source: str, conditions: Sequence[str]) -> str:
    return f"SELECT {select} FROM {source}" + (f" WHERE {' AND '.join(conditions)}" if conditions else "")


async def _table_query(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression_column: str,
    tally: Tally | None,
    expressions: Callable[[dict[str, str]], Sequence[str]],
    limit: int | None = None,
) -> tuple[str, list[Any]]:
    """The SELECT of a table selection's ``expressions`` (made from the column types; one per
    wanted column), and its arguments; counts the opted-out rows into ``tally`` (unless None)."""
    where = await _where(conn, selection, wanted, suppression_column)
    conditions, args = list(where.conditions), list(where.args)
    if where.suppressed is not None:
        if tally is not None:
            tally.excluded = await conn.fetchval(
                _sql("count(*)", where.source, [*conditions, where.suppressed]), *args
            )
        conditions.append(f"NOT {where.suppressed}")
    query = _sql(", ".join(expressions(where.types)), where.source, conditions)
    if limit is not None:
        args.append(limit)
        query += f" LIMIT ${len(args)}"
    return query, args


async def count_table(
    conn: Conn, selection: TableSelection, wanted: Sequence[str], suppression_column: str
) -> Counted:
    """How many rows a table selection would upload and leave out, in one scan."""
    where = await _where(conn, selection, wanted, suppression_column)
    if where.suppressed is None:
        total = await conn.fetchval(_sql("count(*)", where.source, where.conditions), *where.args)
        return Counted(total, 0, suppression_checked=False)
    row = await conn.fetchrow(
        _sql(
            f"count(*) FILTER (WHERE NOT {where.suppressed}) AS kept, "
            f"count(*) FILTER (WHERE {where.suppressed}) AS excluded",
            where.source,
            where.conditions,
        ),
        *where.args,
    )
    assert row is not None  # an aggregate always answers one row
    return Counted(row["kept"], row["excluded"], suppression_checked=True)


async def from_table(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression_column: str,
    tally: Tally,
    prefetch: int,
    limit: int | None = None,
) -> AsyncIterator[tuple[Any, ...]]:
    """Rows of a table or view, in a server-side cursor (call inside a transaction)."""
    columns = [quote_ident(c) for c in wanted]
    query, args = await _table_query(
        conn, selection, wanted, suppression_column, tally, lambda _: columns, limit
    )
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
    suppression_column: str,
    tally: Tally,
    delimiter: str,
    output: Callable[[bytes], Coroutine[Any, Any, None]],
    limit: int | None = None,
) -> int:
    """The selection's rows as CSV (no header) from the server's COPY, streamed to ``output``;
    the number of rows. Call inside a transaction: times are rendered in UTC, as asyncpg's are."""
    query, args = await _table_query(
        conn, selection, wanted, suppression_column, tally, _list_texts(wanted), limit
    )
    await conn.execute("SET LOCAL TIME ZONE 'UTC'")
    done = await conn.copy_from_query(query, *args, output=output, format="csv", delimiter=delimiter)
    return int(done.split()[-1])


async def key_query(
    conn: Conn, selection: TableSelection, key_column: str, suppression_column: str
) -> tuple[str, list[Any]]:
    """The SELECT of a table selection's communication keys as its list file writes them (one
    text column; NULL for none), and its arguments."""
    return await _table_query(
        conn, selection, [key_column], suppression_column, None, _list_texts([key_column])
    )


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


async def from_csv(
    path: Path, selection: CsvSelection, wanted: Sequence[str], suppression_column: str, tally: Tally
) -> AsyncIterator[tuple[Any, ...]]:
    """Rows of a UTF-8 CSV file with a header row, read as a stream."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.DictReader(f, delimiter=selection.delimiter)
        missing = set(wanted) - set(reader.fieldnames or ())
        if missing:
            raise SelectionError(missing_text(f"CSV file {path.name}", missing))
        for row in reader:
            if is_suppressed(row, suppression_column):
                tally.excluded += 1
                continue
            yield tuple(row[c] for c in wanted)


async def from_inline(
    selection: InlineSelection, wanted: Sequence[str], suppression_column: str, tally: Tally
) -> AsyncIterator[tuple[Any, ...]]:
    """Rows carried in the job."""
    for n, row in enumerate(selection.rows, start=1):
        missing = sorted(set(wanted) - set(row))
        if missing:
            raise SelectionError(f"inline row {n} has no {', '.join(missing)}")
        if is_suppressed(row, suppression_column):
            tally.excluded += 1
            continue
        yield tuple(row[c] for c in wanted)
