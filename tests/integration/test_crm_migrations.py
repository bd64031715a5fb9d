"""The CRM's migration set: beside espbridge's with a ledger of its own, in espbridge's database or
in a CRM database of its own; the demo CRM's opted_out flag becomes subscription rows."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest

from cli.db import db_migrate, db_status
from shared.infra.db import (
    CRM_MIGRATIONS,
    ESPBRIDGE_MIGRATIONS,
    MigrationSet,
    connect,
    load_migrations,
    migrate,
)
from shared.infra.settings import PostgresSettings
from shared.operations.selection import table_columns
from tests.fixtures.servers import Servers
from tools.scratch import create_database, drop_database

Scratch = Callable[[str, tuple[MigrationSet, ...]], Coroutine[Any, Any, PostgresSettings]]
T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


@pytest.fixture
async def scratch(servers: Servers, unique: str) -> AsyncIterator[Scratch]:
    """Makes databases of this test (``<name>_<unique>``) with the given migration sets applied;
    drops them after it."""
    made: list[str] = []

    async def make(name: str, sets: tuple[MigrationSet, ...]) -> PostgresSettings:
        made.append(f"{name}_{unique}")
        return await create_database(servers.pg, made[-1], sets)

    yield make
    for name in made:
        await drop_database(servers.pg, name, timeout_s=30)


async def recorded(conn: asyncpg.Connection, ledger: str) -> list[str]:
    """The migrations a ledger records, as ``NNNN_name``."""
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", ledger):
        return []
    rows = await conn.fetch(f"SELECT version, name FROM {ledger} ORDER BY version")
    return [f"{r['version']:04d}_{r['name']}" for r in rows]


def shipped(migration_set: MigrationSet) -> list[str]:
    return [f"{m.version:04d}_{m.name}" for m in load_migrations(migration_set.directory)]


async def columns(conn: asyncpg.Connection, table: str) -> set[str]:
    return set(await table_columns(conn, table))


async def test_a_fresh_database_holds_both_sets_each_recorded_in_its_own_ledger(
    db: asyncpg.Connection,
) -> None:
    assert await recorded(db, "public.espbridge_migrations") == shipped(ESPBRIDGE_MIGRATIONS)
    assert await recorded(db, "crm.espbridge_crm_migrations") == shipped(CRM_MIGRATIONS)
    assert shipped(CRM_MIGRATIONS)[:2] == ["0001_subscriptions", "0002_demo_opt_outs"]
    for table in ("crm.subscriptions", "crm.subscription_log", "crm.suppressions"):
        assert await db.fetchval("SELECT to_regclass($1) IS NOT NULL", table), table
    assert not {"opted_out", "opted_out_at", "opt_out_reason"} & await columns(db, "crm.customers")
    assert await migrate(db) == []
    assert await migrate(db, migration_set=CRM_MIGRATIONS) == []


async def test_an_upgraded_database_turns_its_opted_out_customers_into_subscription_rows(
    scratch: Scratch,
) -> None:
    settings = await scratch("upgraded", (ESPBRIDGE_MIGRATIONS,))
    conn = await connect(settings)
    try:
        await conn.execute(
            """
            INSERT INTO crm.customers (email, opted_out, opted_out_at, opt_out_reason, segment, created_at)
            VALUES ('Ann@Example.com', true, $1, 'too many mails', 'gold', $2),
                   ('bo@example.com', true, NULL, NULL, 'gold', $2),
                   ('cy@example.com', true, $1, '', 'silver', $2),
                   ('di@example.com', false, NULL, NULL, 'gold', $2)
            """,
            T0,
            T0.replace(month=1),
        )
        applied = await migrate(conn, migration_set=CRM_MIGRATIONS)
        rows = await conn.fetch(
            "SELECT email, esp, account, list, state, reason, source, changed_at, written_by, change_id "
            "FROM crm.subscriptions ORDER BY email"
        )
        segment_index = await conn.fetchval(
            "SELECT indexdef FROM pg_indexes WHERE schemaname = 'crm' AND indexname = 'customers_segment'"
        )
        customer_columns = await columns(conn, "crm.customers")
        suppressed = await conn.fetch("SELECT email FROM crm.suppressions ORDER BY email")
    finally:
        await conn.close()

    assert [f"{m.version:04d}_{m.name}" for m in applied] == shipped(CRM_MIGRATIONS)
    assert [tuple(r.values()) for r in rows] == [
        ("ann@example.com", "*", "*", "*", "unsubscribed", "too many mails", "crm", T0, "espbridge", None),
        (
            "bo@example.com",
            "*",
            "*",
            "*",
            "unsubscribed",
            "opted out",
            "crm",
            T0.replace(month=1),
            "espbridge",
            None,
        ),
        ("cy@example.com", "*", "*", "*", "unsubscribed", "opted out", "crm", T0, "espbridge", None),
    ]
    assert [r["email"] for r in suppressed] == ["ann@example.com", "bo@example.com", "cy@example.com"]
    assert not {"opted_out", "opted_out_at", "opt_out_reason"} & customer_columns
    assert segment_index == "CREATE INDEX customers_segment ON crm.customers USING btree (segment)"


async def test_db_migrate_puts_the_crm_set_in_a_crm_database_of_its_own_and_db_status_lists_both(
    servers: Servers, scratch: Scratch, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    espbridge, crm = await scratch("espbridge", ()), await scratch("crm", ())
    for name, value in servers.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("ESPBRIDGE_PG_DATABASE", espbridge.database)
    monkeypatch.setenv("ESPBRIDGE_CRM_DATABASE", crm.database)

    assert await db_migrate() == 0
    migrated = capsys.readouterr().out.splitlines()
    assert await db_migrate() == 0
    again = capsys.readouterr().out.splitlines()
    assert await db_status() == 0
    status = capsys.readouterr().out.splitlines()

    assert migrated == [
        *(f"applied espbridge {m} in {espbridge.database}" for m in shipped(ESPBRIDGE_MIGRATIONS)),
        *(f"applied crm {m} in {crm.database}" for m in shipped(CRM_MIGRATIONS)),
    ]
    assert again == [
        f"espbridge migrations in database {espbridge.database}: up to date",
        f"crm migrations in database {crm.database}: up to date",
    ]
    assert status == [
        f"espbridge migrations in database {espbridge.database}:",
        *(f"  {m}\tapplied" for m in shipped(ESPBRIDGE_MIGRATIONS)),
        f"crm migrations in database {crm.database}:",
        *(f"  {m}\tapplied" for m in shipped(CRM_MIGRATIONS)),
    ]
    conn = await connect(crm)
    try:
        # a CRM of its own has no demo crm.customers: 0002 is recorded and changed nothing
        assert await conn.fetchval("SELECT to_regclass('crm.customers')") is None
        assert await conn.fetchval("SELECT count(*) FROM crm.subscriptions") == 0
        assert await recorded(conn, "public.espbridge_migrations") == []
    finally:
        await conn.close()
    conn = await connect(espbridge)
    try:
        assert await recorded(conn, "crm.espbridge_crm_migrations") == []
        assert await conn.fetchval("SELECT to_regclass('crm.subscriptions')") is None
        assert "opted_out" in await columns(conn, "crm.customers")  # its CRM set went elsewhere
    finally:
        await conn.close()
