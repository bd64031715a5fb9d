"""``espbridge db``: the migrations of espbridge's database and of the CRM's."""

from __future__ import annotations

from shared.infra.db import migrate_databases, migration_status
from shared.infra.settings import CrmSettings, PostgresSettings


async def db_migrate() -> int:
    """``db migrate``: apply espbridge's pending migrations, then the CRM's (to the CRM database,
    the same one unless ESPBRIDGE_CRM_* moves it)."""
    pg = PostgresSettings()
    for result in await migrate_databases(pg, CrmSettings().resolve(pg)):
        for m in result.applied:
            print(f"applied {result.migration_set.name} {m.version:04d}_{m.name} in {result.database}")
        if not result.applied:
            print(f"{result.migration_set.name} migrations in database {result.database}: up to date")
    return 0


async def db_status() -> int:
    """``db status``: each migration of both sets, applied or pending."""
    pg = PostgresSettings()
    for status in await migration_status(pg, CrmSettings().resolve(pg)):
        print(f"{status.migration_set.name} migrations in database {status.database}:")
        for m in status.migrations:
            print(f"  {m.version:04d}_{m.name}\t{'applied' if m.version in status.recorded else 'pending'}")
    return 0
