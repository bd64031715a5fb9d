"""The ``espbridge`` command line: operator tasks on the database and the topics.

espbridge db migrate        apply pending migrations (ESPBRIDGE_PG_*)
espbridge db status         list applied and pending migrations
espbridge topics create     create the registry topics (ESPBRIDGE_KAFKA_*)
espbridge topics list       the registry: topic, model, partitions
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from shared.db.core import connect
from shared.db.migrate import applied_migrations, load_migrations, migrate
from shared.errors import EspbridgeError
from shared.kafka import ensure_topics
from shared.logs import configure
from shared.settings import KafkaSettings, PostgresSettings
from shared.topics import REGISTRY


async def _db_migrate() -> int:
    conn = await connect(PostgresSettings())
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    if applied:
        for m in applied:
            print(f"applied {m.version:04d}_{m.name}")
    else:
        print("database is up to date")
    return 0


async def _db_status() -> int:
    conn = await connect(PostgresSettings())
    try:
        done = await applied_migrations(conn)
    finally:
        await conn.close()
    for m in load_migrations():
        state = "applied" if m.version in done else "pending"
        print(f"{m.version:04d}_{m.name}\t{state}")
    return 0


async def _topics_create() -> int:
    settings = KafkaSettings()
    created = await ensure_topics(settings)
    for name in created:
        print(f"created {name}")
    if not created:
        print("all topics exist")
    return 0


def _topics_list() -> int:
    settings = KafkaSettings()
    for spec in REGISTRY.values():
        print(f"{settings.topic(spec.topic)}\t{spec.model.__name__}\t{settings.partitions(spec.topic)}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run one CLI command; returns the exit code."""
    parser = argparse.ArgumentParser(prog="espbridge", description="espbridge operator commands")
    groups = parser.add_subparsers(dest="group", required=True)
    db = groups.add_parser("db", help="the response and control database").add_subparsers(
        dest="cmd", required=True
    )
    db.add_parser("migrate", help="apply pending migrations")
    db.add_parser("status", help="list applied and pending migrations")
    topics = groups.add_parser("topics", help="the Kafka topics").add_subparsers(dest="cmd", required=True)
    topics.add_parser("create", help="create the registry topics that are missing")
    topics.add_parser("list", help="list the registry topics")
    args = parser.parse_args(argv)
    configure("cli", "WARNING")
    try:
        match (args.group, args.cmd):
            case ("db", "migrate"):
                return asyncio.run(_db_migrate())
            case ("db", "status"):
                return asyncio.run(_db_status())
            case ("topics", "create"):
                return asyncio.run(_topics_create())
            case _:
                return _topics_list()
    except EspbridgeError as exc:
        print(f"espbridge: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
