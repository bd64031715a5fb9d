"""PostgreSQL: migrations are applied once and recorded; COPY + merge is idempotent."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from shared.infra.db import (
    CRM_MIGRATIONS,
    ESPBRIDGE_MIGRATIONS,
    MIGRATIONS_DIR,
    MigrationSet,
    copy_merge,
    load_migrations,
    migrate,
)
from shared.model.errors import ConfigurationError
from shared.model.messages import event_id_for

COLUMNS = ("event_id", "esp", "account", "broadcast_id", "communication_key", "type", "occurred_at", "source")
T0 = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)


def events(start: int, count: int) -> list[tuple[object, ...]]:
    rows: list[tuple[object, ...]] = []
    for i in range(start, start + count):
        when = T0 + timedelta(seconds=i)
        eid = event_id_for(
            "sandbox", broadcast_id="b1", recipient=f"ck{i}", event_type="open", occurred_at=when
        )
        rows.append((eid, "sandbox", "demo", "b1", f"ck{i}", "open", when, f"file:opens.csv:{i + 2}"))
    return rows


async def test_migrations_create_the_schemas_and_are_recorded_once(db: asyncpg.Connection) -> None:
    tables = {
        (r["table_schema"], r["table_name"])
        for r in await db.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables "
            "WHERE table_schema IN ('control', 'responses', 'crm')"
        )
    }
    assert {
        ("control", "jobs"),
        ("control", "gathered_files"),
        ("responses", "events"),
        ("responses", "broadcast_funnel"),
        ("crm", "customers"),
    } <= tables
    recorded = await db.fetch("SELECT version, name FROM public.espbridge_migrations ORDER BY version")
    assert [(r["version"], r["name"]) for r in recorded] == [(m.version, m.name) for m in load_migrations()]
    assert await migrate(db) == []  # the second run applies nothing
    assert await db.fetchval("SELECT count(*) FROM public.espbridge_migrations") == len(recorded)


@pytest.mark.parametrize("migration_set", [ESPBRIDGE_MIGRATIONS, CRM_MIGRATIONS], ids=lambda m: m.name)
async def test_a_changed_migration_is_refused(
    db: asyncpg.Connection, tmp_path: Path, migration_set: MigrationSet
) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(migration_set.directory, copy)
    first = sorted(copy.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after release\n")
    with pytest.raises(ConfigurationError, match=f"{migration_set.name} migration 0001_.* was changed after"):
        await migrate(db, copy, migration_set=migration_set)


async def test_a_new_migration_is_applied_in_order(db: asyncpg.Connection, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS_DIR, copy)
    (copy / "9001_extra.sql").write_text("CREATE TABLE control.extra (id int PRIMARY KEY);")
    applied = await migrate(db, copy)
    assert [m.version for m in applied] == [9001]
    assert await db.fetchval("SELECT to_regclass('control.extra') IS NOT NULL")


async def test_copy_merge_twice_leaves_one_row_per_key(db: asyncpg.Connection) -> None:
    first = events(0, 1000)
    added = await copy_merge(db, "responses.events", COLUMNS, first, key=("event_id",))
    assert added == 1000
    # The same rows again, plus 500 new ones and a duplicate inside the batch itself.
    second = [*first, *events(1000, 500), events(1200, 1)[0]]
    added_again = await copy_merge(db, "responses.events", COLUMNS, second, key=("event_id",))
    assert added_again == 500
    assert await db.fetchval("SELECT count(*) FROM responses.events") == 1500
    assert await db.fetchval("SELECT count(DISTINCT event_id) FROM responses.events") == 1500
    row = await db.fetchrow(
        "SELECT communication_key, source FROM responses.events WHERE event_id = $1", first[7][0]
    )
    assert row is not None
    assert (row["communication_key"], row["source"]) == ("ck7", "file:opens.csv:9")


async def test_copy_merge_rolls_back_with_the_callers_transaction(db: asyncpg.Connection) -> None:
    tx = db.transaction()
    await tx.start()
    await copy_merge(db, "responses.events", COLUMNS, events(0, 10), key=("event_id",))
    assert await db.fetchval("SELECT count(*) FROM responses.events") == 10
    await tx.rollback()  # the caller fails before its commit
    assert await db.fetchval("SELECT count(*) FROM responses.events") == 0


async def test_copy_merge_refuses_names_that_are_not_identifiers(db: asyncpg.Connection) -> None:
    from shared.infra.db import InvalidIdentifierError

    with pytest.raises(InvalidIdentifierError):
        await copy_merge(db, "responses.events; DROP TABLE crm.customers", COLUMNS, [], key=("event_id",))
    with pytest.raises(InvalidIdentifierError):
        await copy_merge(db, "responses.events", (*COLUMNS[:-1], 'source" text'), [], key=("event_id",))
    assert await db.fetchval("SELECT to_regclass('crm.customers') IS NOT NULL")
    assert uuid.UUID(str(events(0, 1)[0][0])).version == 5
