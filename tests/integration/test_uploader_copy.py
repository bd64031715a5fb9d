"""The uploader's two ways of writing a table selection agree byte for byte: the server's CSV COPY
(used where the list format allows) and the row-by-row writer (other formats, CSV files, inline)."""

from __future__ import annotations

import asyncpg

from shared.model.messages import TableSelection
from shared.operations import lists, selection

ROWS = """
INSERT INTO crm.mixed VALUES
  ('a@x.com', 'plain', true, '2026-11-22 10:00:00+01', '2026-11-22', 12.50, 7, '{"tier": "gold"}', false,
   'K-1'),
  ('b@x.com', 'comma, "quote"
and a line break', false, '2026-11-22 10:00:00.120000+00', '1999-01-01', 0.1, -3, '[1, 2]', null, ''),
  ('c@x.com', '', null, null, null, null, null, null, false, null),
  ('d@x.com', 'Zoë ünïcode', true, '2026-06-01 23:59:59.999999-07', '2026-06-01', 1e20, 0, 'null', false,
   'Ünï "q"'),
  ('e@x.com', 'opted out', true, now(), current_date, 1, 1, '{}', true, 'x')
"""
OPTED_OUT = selection.Suppression("opted_out")
"""The table's own flag column; no subscription state (no account)."""
COLUMNS = ["email", "note", "flag", "seen_at", "born", "amount", "n", "attrs", "code"]


async def test_copy_and_the_row_writer_write_the_same_list(db: asyncpg.Connection) -> None:
    await db.execute(
        """
        CREATE TABLE crm.mixed (email text, note text, flag boolean, seen_at timestamptz, born date,
                                amount numeric, n integer, attrs jsonb, opted_out boolean,
                                code varchar(12))
        """
    )
    await db.execute(ROWS)
    sel = TableSelection(kind="table", table="crm.mixed", columns=tuple(COLUMNS))
    by_rows = selection.Tally()
    async with db.transaction(readonly=True):
        rows = [r async for r in selection.from_table(db, sel, COLUMNS, OPTED_OUT, by_rows, 100)]
    written = lists.encode_rows(rows, ";", "\n", "utf-8")

    pieces: list[bytes] = []

    async def output(data: bytes) -> None:
        pieces.append(bytes(data))

    by_copy = selection.Tally()
    async with db.transaction(readonly=True):
        n = await selection.copy_table_csv(db, sel, COLUMNS, OPTED_OUT, by_copy, ";", output)
    assert (n, by_copy.excluded) == (len(rows), by_rows.excluded) == (4, 1)
    assert b"".join(pieces) == written
