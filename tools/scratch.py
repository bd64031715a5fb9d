"""Throw-away resources on the shared servers, for the tests and the bench: a database with every
migration applied, and the topics under a prefix. Each is made for one run and removed after it."""

from __future__ import annotations

from collections.abc import Sequence

import asyncpg
from aiokafka.admin import AIOKafkaAdminClient

from shared.infra.db import CRM_MIGRATIONS, ESPBRIDGE_MIGRATIONS, MigrationSet, connect, migrate, quote_ident
from shared.infra.settings import KafkaSettings, PostgresSettings
from tools.demo import wait_until


async def create_database(
    admin: PostgresSettings,
    name: str,
    sets: Sequence[MigrationSet] = (ESPBRIDGE_MIGRATIONS, CRM_MIGRATIONS),
) -> PostgresSettings:
    """Create database ``name`` with the server's ``admin`` settings and apply the migration sets
    (by default both: espbridge's and its CRM in one database; ``(CRM_MIGRATIONS,)`` for a CRM of
    its own); the settings to reach it."""
    conn = await connect(admin)
    try:
        await conn.execute(f"CREATE DATABASE {quote_ident(name)}")
    finally:
        await conn.close()
    settings = admin.with_database(name)
    conn = await connect(settings)
    try:
        for migration_set in sets:
            await migrate(conn, migration_set=migration_set)
    finally:
        await conn.close()
    return settings


async def drop_database(admin: PostgresSettings, name: str, timeout_s: float = 60.0) -> None:
    """Drop a database, its sessions ended. The server's own background workers (autovacuum)
    cannot be ended by a non-superuser, so the drop is tried again until they have left."""
    conn = await connect(admin)

    async def dropped() -> bool:
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
        except (asyncpg.InsufficientPrivilegeError, asyncpg.ObjectInUseError):
            return False
        return True

    try:
        await wait_until(f"database {name} dropped", dropped, timeout_s, every_s=0.2)
    finally:
        await conn.close()


async def delete_topics(kafka: KafkaSettings, prefix: str) -> None:
    """Delete every topic whose name starts with ``prefix``."""
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()
