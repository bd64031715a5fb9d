"""Ordered SQL migrations (``NNNN_name.sql``), each applied once in its own transaction and recorded.

A recorded migration whose file has changed since is an error: migrations are append-only.
Concurrent runners are serialized with an advisory lock.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from shared.model.errors import ConfigurationError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x65737062  # "espb": one advisory lock key for all migration runners

_LEDGER = """
CREATE TABLE IF NOT EXISTS public.espbridge_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    sha256     text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file."""

    version: int
    name: str
    sql: str

    @property
    def sha256(self) -> str:
        """Checksum of the file's text, to detect edits after it was applied."""
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """The migrations in a directory, in version order; a misnamed or duplicate file is an error."""
    found: dict[int, Migration] = {}
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if not match:
            raise ConfigurationError(f"migration file {path.name} is not named NNNN_name.sql")
        version = int(match.group(1))
        if version in found:
            raise ConfigurationError(f"two migrations have version {version:04d}")
        found[version] = Migration(version, match.group(2), path.read_text(encoding="utf-8"))
    return [found[v] for v in sorted(found)]


async def applied_migrations(conn: asyncpg.Connection) -> dict[int, str]:
    """version → sha256 of the migrations recorded in the database."""
    exists = await conn.fetchval("SELECT to_regclass('public.espbridge_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, sha256 FROM public.espbridge_migrations")
    return {r["version"]: r["sha256"] for r in rows}


async def migrate(conn: asyncpg.Connection, directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    """Apply the pending migrations; returns those applied by this call."""
    migrations = load_migrations(directory)
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(_LEDGER)
        done = await applied_migrations(conn)
        for m in migrations:
            if m.version in done and done[m.version] != m.sha256:
                raise ConfigurationError(
                    f"migration {m.version:04d}_{m.name} was changed after it was applied; "
                    "add a new migration instead"
                )
        applied: list[Migration] = []
        for m in migrations:
            if m.version in done:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO public.espbridge_migrations (version, name, sha256) VALUES ($1, $2, $3)",
                    m.version,
                    m.name,
                    m.sha256,
                )
            log.info("applied migration", extra={"version": m.version, "migration": m.name})
            applied.append(m)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
