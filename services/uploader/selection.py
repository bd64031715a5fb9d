"""Reading a job's recipients: a CRM table or view (server-side cursor), a CSV file, inline rows.

Every source yields rows of the selected source columns as tuples, streamed; rows opted out by
the suppression column are counted, not yielded.
"""

from __future__ import annotations

import csv
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.uploader.core import is_suppressed
from shared.db import Conn, quote_ident, quote_qualified
from shared.errors import PermanentError
from shared.messages import CsvSelection, InlineSelection, TableSelection


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


async def from_table(
    conn: Conn,
    selection: TableSelection,
    wanted: Sequence[str],
    suppression_column: str,
    tally: Tally,
    prefetch: int,
) -> AsyncIterator[tuple[Any, ...]]:
    """Rows of a table or view, in a server-side cursor (call inside a transaction)."""
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
        tally.excluded = await conn.fetchval(
            f"SELECT count(*) FROM {source} WHERE {' AND '.join([*where, suppressed])}", *args
        )
        where.append(f"NOT {suppressed}")
    cols = ", ".join(quote_ident(c) for c in wanted)
    query = f"SELECT {cols} FROM {source}"
    if where:
        query += f" WHERE {' AND '.join(where)}"
    async for record in conn.cursor(query, *args, prefetch=prefetch):
        yield tuple(record.values())


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
