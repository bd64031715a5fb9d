"""``espbridge db``: the database's migrations."""

from __future__ import annotations

from shared.infra.db import Migration, applied_migrations, connect, load_migrations, migrate
from shared.infra.settings import PostgresSettings


async def db_migrate() -> int:
    """``db migrate``: apply the pending migrations."""
    conn = await connect(PostgresSettings())
    try:
        applied: list[Migration] = await migrate(conn)
    finally:
        await conn.close()
    for m in applied:
        print(f"applied {m.version:04d}_{m.name}")
    if not applied:
        print("database is up to date")
    return 0


async def db_status() -> int:
    """``db status``: each migration, applied or pending."""
    conn = await connect(PostgresSettings())
    try:
        done = await applied_migrations(conn)
    finally:
        await conn.close()
    for m in load_migrations():
        print(f"{m.version:04d}_{m.name}\t{'applied' if m.version in done else 'pending'}")
    return 0
