"""The entry point of ``python -m services.<name>``: arguments, settings, logging, tuning, run.

``--print-settings`` prints the settings (secrets masked); ``--check`` reads and reports what the
service needs (Kafka, its topics, PostgreSQL when it has one) and changes nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from pydantic import ValidationError

from shared.infra.db import applied_migrations, connect, load_migrations
from shared.infra.db.migrate import CRM_MIGRATIONS, ESPBRIDGE_MIGRATIONS, MigrationSet
from shared.infra.kafka import back_off_failed_metadata_updates, check_topics
from shared.infra.logs import configure
from shared.infra.settings import CrmSettings, PostgresSettings
from shared.model.errors import EspbridgeError, UnavailableError
from shared.runtime.run import run_service
from shared.runtime.runtime import ServiceSpec
from shared.runtime.settings import DatabaseServiceSettings, ServiceSettings
from shared.runtime.tuning import tune_gc, tune_malloc

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Check:
    """One line of ``--check``."""

    what: str
    detail: str
    ok: bool = True

    def line(self) -> str:
        """The line as printed."""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.what}: {self.detail}"


async def check(settings: ServiceSettings) -> list[Check]:
    """What the service needs, read and reported: Kafka and the registry topics, and PostgreSQL
    with its migrations when the service has a database. Creates and changes nothing."""
    checks: list[Check] = []
    kafka = settings.kafka
    try:
        topics = await check_topics(kafka)
    except UnavailableError as exc:
        checks.append(Check(f"Kafka at {kafka.bootstrap_servers}", str(exc), ok=False))
    else:
        checks.append(Check(f"Kafka at {kafka.bootstrap_servers}", "answers"))
        for topic in topics:
            problem = topic.problem
            # a missing topic is no failure: the service creates the registry topics as it starts
            checks.append(
                Check(
                    f"topic {topic.name}",
                    problem or f"{topic.partitions} partitions",
                    ok=problem is None or topic.partitions is None,
                )
            )
    if isinstance(settings, DatabaseServiceSettings):
        targets = [(ESPBRIDGE_MIGRATIONS, settings.pg)]
        crm = getattr(settings, "crm", None)
        if isinstance(crm, CrmSettings):  # a service that reads the CRM: its migration set too
            targets.append((CRM_MIGRATIONS, crm.resolve(settings.pg)))
        for migration_set, pg in targets:
            checks.append(await _database_check(migration_set, pg))
    return checks


async def _database_check(migration_set: MigrationSet, pg: PostgresSettings) -> Check:
    """Whether the database answers and holds every migration of the set."""
    where = f"PostgreSQL at {pg.host}:{pg.port}/{pg.database}"
    if migration_set is not ESPBRIDGE_MIGRATIONS:
        where += f" ({migration_set.name} migrations)"
    try:
        conn = await connect(pg)
    except EspbridgeError as exc:
        return Check(where, str(exc), ok=False)
    try:
        applied = await applied_migrations(conn, migration_set)
    finally:
        await conn.close()
    pending = [
        f"{m.version:04d}_{m.name}"
        for m in load_migrations(migration_set.directory)
        if m.version not in applied
    ]
    detail = f"answers; {len(applied)} migrations applied" + (
        f", pending: {', '.join(pending)} (run `espbridge db migrate`)" if pending else ""
    )
    return Check(where, detail, ok=not pending)


def service_main(spec: ServiceSpec, argv: Sequence[str] | None = None) -> int:
    """The entry point of ``python -m services.<name>``; returns the process exit code."""
    name = spec.name
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}",
        description=spec.description,
        epilog=(
            "Configuration comes from environment variables (ESPBRIDGE_KAFKA_*, ESPBRIDGE_PG_*, "
            "ESPBRIDGE_SFTP_*, ESPBRIDGE_HTTP_*, ESPBRIDGE_LOG_*); see the service's README. "
            "SIGTERM stops the service after in-flight messages are done."
        ),
    )
    parser.add_argument(
        "--print-settings", action="store_true", help="print the settings (secrets masked) and exit"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="report whether Kafka, the topics and the database are ready for the service (exit 1 if "
        "not); creates and changes nothing",
    )
    args = parser.parse_args(argv)
    try:
        settings = spec.settings()
    except ValidationError as exc:
        print(f"{name}: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.print_settings:
        sys.stdout.write(orjson.dumps(settings.masked(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    back_off_failed_metadata_updates()
    if args.check:
        configure(name, "ERROR", settings.log.format)  # the report is the output
        checks = asyncio.run(check(settings))
        for c in checks:
            print(c.line())
        return 0 if all(c.ok for c in checks) else 1
    configure(name, settings.log.level, settings.log.format)
    log.info("starting", extra={"settings": settings.masked()})
    tune_gc()
    tune_malloc()
    try:
        asyncio.run(run_service(name, settings, spec.create_app))
    except EspbridgeError as exc:
        log.error("fatal: %s", exc, extra={"error_class": type(exc).__name__})
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
