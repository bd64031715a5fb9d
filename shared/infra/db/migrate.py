"""Ordered SQL migrations (``NNNN_name.sql``), each applied once in its own transaction and recorded.

Two sets, each with its own folder and ledger: espbridge's own tables (:data:`ESPBRIDGE_MIGRATIONS`)
and the CRM's (:data:`CRM_MIGRATIONS`), the second applied to the CRM database after the first.
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

from shared.infra.db.core import connect
from shared.infra.db.sql import quote_ident, quote_qualified
from shared.infra.settings import PostgresSettings
from shared.model.errors import ConfigurationError

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
CRM_MIGRATIONS_DIR = Path(__file__).with_name("migrations_crm")
_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
_LOCK_KEY = 0x65737062  # "espb": one advisory lock key for all migration runners, of either set


@dataclass(frozen=True, slots=True)
class MigrationSet:
    """A folder of migrations and the ledger table that records those applied."""

    name: str
    directory: Path
    ledger: str
    """The schema-qualified ledger table; its schema is created with it."""

    @property
    def schema(self) -> str:
        """The ledger's schema."""
        return self.ledger.split(".", 1)[0]


ESPBRIDGE_MIGRATIONS = MigrationSet("espbridge", MIGRATIONS_DIR, "public.espbridge_migrations")
CRM_MIGRATIONS = MigrationSet("crm", CRM_MIGRATIONS_DIR, "crm.espbridge_crm_migrations")


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


async def applied_migrations(
    conn: asyncpg.Connection, migration_set: MigrationSet = ESPBRIDGE_MIGRATIONS
) -> dict[int, str]:
    """version → sha256 of the set's migrations recorded in the database."""
    exists = await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", migration_set.ledger)
    if not exists:
        return {}
    rows = await conn.fetch(f"SELECT version, sha256 FROM {quote_qualified(migration_set.ledger)}")  # noqa: S608
    return {r["version"]: r["sha256"] for r in rows}


async def migrate(
    conn: asyncpg.Connection,
    directory: Path | None = None,
    *,
    migration_set: MigrationSet = ESPBRIDGE_MIGRATIONS,
) -> list[Migration]:
    """Apply the set's pending migrations (from ``directory`` in its place, if given); returns those
    applied by this call."""
    migrations = load_migrations(directory or migration_set.directory)
    ledger = quote_qualified(migration_set.ledger)
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        # created only when missing: CREATE SCHEMA IF NOT EXISTS asks for CREATE on the database
        if await conn.fetchval("SELECT to_regnamespace($1) IS NULL", migration_set.schema):
            await conn.execute(f"CREATE SCHEMA {quote_ident(migration_set.schema)}")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {ledger} ("
            " version integer PRIMARY KEY, name text NOT NULL, sha256 text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = await applied_migrations(conn, migration_set)
        for m in migrations:
            if m.version in done and done[m.version] != m.sha256:
                raise ConfigurationError(
                    f"{migration_set.name} migration {m.version:04d}_{m.name} was changed after it was "
                    "applied; add a new migration instead"
                )
        applied: list[Migration] = []
        for m in migrations:
            if m.version in done:
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    f"INSERT INTO {ledger} (version, name, sha256) VALUES ($1, $2, $3)",  # noqa: S608
                    m.version,
                    m.name,
                    m.sha256,
                )
            log.info(
                "applied migration",
                extra={"migration_set": migration_set.name, "version": m.version, "migration": m.name},
            )
            applied.append(m)
        return applied
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)


@dataclass(frozen=True, slots=True)
class SetMigrated:
    """What one migration run applied of a set, in which database."""

    migration_set: MigrationSet
    database: str
    applied: list[Migration]


@dataclass(frozen=True, slots=True)
class SetStatus:
    """One migration set in one database: its migrations, and the versions recorded there."""

    migration_set: MigrationSet
    database: str
    migrations: list[Migration]
    recorded: dict[int, str]

    def pending(self) -> list[Migration]:
        """The set's migrations not recorded in the database."""
        return [m for m in self.migrations if m.version not in self.recorded]


def _targets(
    pg: PostgresSettings, crm: PostgresSettings
) -> tuple[tuple[MigrationSet, PostgresSettings], ...]:
    """Each set and its database, in the order they are applied: the CRM set may read espbridge's."""
    return ((ESPBRIDGE_MIGRATIONS, pg), (CRM_MIGRATIONS, crm))


async def migrate_databases(pg: PostgresSettings, crm: PostgresSettings) -> list[SetMigrated]:
    """Apply espbridge's set to ``pg``, then the CRM's set to ``crm`` (the same database or its own)."""
    results: list[SetMigrated] = []
    for migration_set, settings in _targets(pg, crm):
        conn = await connect(settings)
        try:
            applied = await migrate(conn, migration_set=migration_set)
        finally:
            await conn.close()
        results.append(SetMigrated(migration_set, settings.database, applied))
    return results


async def migration_status(pg: PostgresSettings, crm: PostgresSettings) -> list[SetStatus]:
    """Each set's migrations and those recorded in its database (espbridge's, then the CRM's)."""
    results: list[SetStatus] = []
    for migration_set, settings in _targets(pg, crm):
        conn = await connect(settings)
        try:
            recorded = await applied_migrations(conn, migration_set)
        finally:
            await conn.close()
        results.append(
            SetStatus(migration_set, settings.database, load_migrations(migration_set.directory), recorded)
        )
    return results
