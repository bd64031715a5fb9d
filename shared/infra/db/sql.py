"""Identifiers in SQL: validated against a strict pattern and quoted, never interpolated raw.

Values always travel as query parameters or through COPY; only names pass through here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from shared.infra.db.core import Conn
from shared.model.errors import PermanentError
from shared.model.messages import IDENTIFIER_PATTERN

_IDENT = re.compile(IDENTIFIER_PATTERN)


class InvalidIdentifierError(PermanentError):
    """A table or column name that is not a plain SQL identifier."""


def quote_ident(name: str) -> str:
    """``name`` as a quoted SQL identifier, after checking it is a plain identifier."""
    if not _IDENT.match(name):
        raise InvalidIdentifierError(f"{name!r} is not a valid SQL identifier")
    return f'"{name}"'


def quote_qualified(name: str) -> str:
    """A table name, optionally schema-qualified (``crm.customers``), validated and quoted."""
    parts = name.split(".")
    if len(parts) > 2:
        raise InvalidIdentifierError(f"{name!r} is not a table name (schema.table at most)")
    return ".".join(quote_ident(p) for p in parts)


async def copy_merge(
    conn: Conn,
    table: str,
    columns: Sequence[str],
    records: Iterable[Sequence[object]],
    key: Sequence[str],
) -> int:
    """COPY records into a temporary stage, then insert those whose key is new; returns rows added.

    Run twice with the same records it adds nothing the second time: ``ON CONFLICT DO NOTHING``
    on the key makes the load idempotent. Runs in the caller's transaction (or its own).
    """
    target = quote_qualified(table)
    cols = ", ".join(quote_ident(c) for c in columns)
    conflict = ", ".join(quote_ident(k) for k in key)
    stage = "espbridge_stage_" + table.replace(".", "_")
    quoted_stage = quote_ident(stage)
    async with conn.transaction():
        await conn.execute(
            f"CREATE TEMP TABLE IF NOT EXISTS {quoted_stage} "
            f"(LIKE {target} INCLUDING DEFAULTS) ON COMMIT DELETE ROWS"
        )
        await conn.execute(f"TRUNCATE {quoted_stage}")
        await conn.copy_records_to_table(stage, records=records, columns=list(columns))
        status = await conn.execute(
            f"INSERT INTO {target} ({cols}) SELECT {cols} FROM {quoted_stage} "
            f"ON CONFLICT ({conflict}) DO NOTHING"
        )
    return int(status.rsplit(" ", 1)[-1])
