"""Reading a job's recipients: a CRM table or view (server-side cursor), a CSV file, inline rows.

Every source yields rows of the selected source columns as tuples, streamed; rows opted out by
the suppression column are counted, not yielded.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.uploader.core import is_suppressed
from shared.infra.db import Conn, quote_ident, quote_qualified
from shared.model.errors import PermanentError
from shared.model.messages import CsvSelection, InlineSelection, TableSelection


class SelectionError(PermanentError):
    """A selection that cannot be read: no such table or column, a CSV outside the allowed folder."""


@dataclass
class Tally:
    """Rows excluded while streaming a selection."""

    excluded: int = 0


async def table_columns(conn: Conn, table: str) -> set[str]:
    """The columns of a table or view; a missing one is a clear permanent error."""
    rows = await conn.fetch(
        """
        SELECT attname FROM pg_attribute
        WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped
        """,
        quote_qualified(table),
    )
    if not rows:
        raise SelectionError(f"table or view {table} does not exist")
    return {r["attname"] for r in rows}


async def _table_query(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression_column: str,
    tally: Tally | None,
    expressions: Sequence[str],
) -> tuple[str, list[Any]]:
    """The SELECT of a table selection's ``expressions`` (one per wanted column), and its
    arguments; counts the opted-out rows into ``tally`` (unless None)."""
    available = await table_columns(conn, selection.table)
    missing = sorted({*wanted, *selection.filters} - available)
    if missing:
        raise SelectionError(f"{selection.table} has no column {', '.join(missing)}")
    where: list[str] = []
    args: list[Any] = []
    for column, value in selection.filters.items():
        if value is None:
            where.append(f"{quote_ident(column)} IS NULL")
        else:
            args.append(value)
            where.append(f"{quote_ident(column)} = ${len(args)}")
    source = quote_qualified(selection.table)
    if suppression_column in available:
        suppressed = f"coalesce({quote_ident(suppression_column)}, false)"
        if tally is not None:
            tally.excluded = await conn.fetchval(
                f"SELECT count(*) FROM {source} WHERE {' AND '.join([*where, suppressed])}", *args
            )
        where.append(f"NOT {suppressed}")
    query = f"SELECT {', '.join(expressions)} FROM {source}"
    if where:
        query += f" WHERE {' AND '.join(where)}"
    return query, args


async def from_table(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression_column: str,
    tally: Tally,
    prefetch: int,
) -> AsyncIterator[tuple[Any, ...]]:
    """Rows of a table or view, in a server-side cursor (call inside a transaction)."""
    columns = [quote_ident(c) for c in wanted]
    query, args = await _table_query(conn, selection, wanted, suppression_column, tally, columns)
    async for record in conn.cursor(query, *args, prefetch=prefetch):
        yield tuple(record.values())


def list_text(column: str, pg_type: str) -> str:
    """SQL for a column's list-file text as :func:`services.uploader.core.text` renders a value:
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


async def column_types(conn: Conn, table: str) -> dict[str, str]:
    """The type of each column of a table or view, as ``format_type`` names it."""
    rows = await conn.fetch(
        """
        SELECT attname, format_type(atttypid, atttypmod) AS type FROM pg_attribute
        WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped
        """,
        quote_qualified(table),
    )
    return {r["attname"]: r["type"] for r in rows}


async def copy_table_csv(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression_column: str,
    tally: Tally,
    delimiter: str,
    output: Callable[[bytes], Coroutine[Any, Any, None]],
) -> int:
    """The selection's rows as CSV (no header) from the server's COPY, streamed to ``output``;
    the number of rows. Call inside a transaction: times are rendered in UTC, as asyncpg's are."""
    types = await column_types(conn, selection.table)
    columns = [list_text(c, types.get(c, "")) for c in wanted]
    query, args = await _table_query(conn, selection, wanted, suppression_column, tally, columns)
    await conn.execute("SET LOCAL TIME ZONE 'UTC'")
    done = await conn.copy_from_query(query, *args, output=output, format="csv", delimiter=delimiter)
    return int(done.split()[-1])


async def key_query(
    conn: Conn, selection: TableSelection, key_column: str, suppression_column: str
) -> tuple[str, list[Any]]:
    """The SELECT of a table selection's communication keys as its list file writes them (one
    text column; NULL for none), and its arguments."""
    types = await column_types(conn, selection.table)
    key = [list_text(key_column, types.get(key_column, ""))]
    return await _table_query(conn, selection, [key_column], suppression_column, None, key)


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
        missing = sorted(set(wanted) - set(reader.fieldnames or ()))
        if missing:
            raise SelectionError(f"CSV file {path.name} has no column {', '.join(missing)}")
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
