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
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from shared import jobs_cli
from shared.db.core import connect
from shared.db.migrate import applied_migrations, load_migrations, migrate
from shared.errors import EspbridgeError, InvalidMessageError
from shared.esp import AccountsSettings
from shared.kafka import ensure_topics
from shared.logs import configure
from shared.settings import KafkaSettings, PostgresSettings, SftpSettings
from shared.topics import REGISTRY, Topic


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


def _job_document(args: argparse.Namespace) -> dict[str, Any]:
    doc: dict[str, Any] = jobs_cli.read_document(Path(args.file)) if args.file else {}
    flags = {
        "job_id": args.job_id,
        "esp": args.esp,
        "account": args.account,
        "list_name": args.list_name,
        "message": args.message,
        "communication_key": args.communication_key,
        "send_at": args.send_at,
    }
    doc.update({k: v for k, v in flags.items() if v is not None})
    if args.upload_only:
        doc["mode"] = "upload_only"
    if args.field:
        doc["field_map"] = dict(_pair(f, "--field") for f in args.field)
    if args.table:
        filters = dict(_pair(f, "--filter") for f in args.filter or [])
        columns = args.column or sorted({*doc.get("field_map", {}), doc.get("communication_key", "")} - {""})
        doc["selection"] = {"kind": "table", "table": args.table, "columns": columns, "filters": filters}
    return doc


def _pair(text: str, flag: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise InvalidMessageError(f"{flag} wants COLUMN=VALUE, got {text!r}")
    return key, value


async def _job_publish(args: argparse.Namespace) -> int:
    job = jobs_cli.build_job(_job_document(args))
    await jobs_cli.publish_job(KafkaSettings(), job)
    print(job.job_id)
    return 0


async def _job_status(args: argparse.Namespace) -> int:
    statuses = await jobs_cli.read_statuses(KafkaSettings(), args.job_id)
    numbers = await jobs_cli.funnel(PostgresSettings(), args.job_id)
    if args.json:
        out = {
            "job_id": args.job_id,
            "statuses": [s.model_dump(mode="json") for s in statuses],
            "funnel": numbers,
        }
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return 0 if statuses else 1
    if not statuses:
        print(f"no status for job {args.job_id} on {KafkaSettings().topic(Topic.BROADCAST_STATUS)}")
        return 1
    print(jobs_cli.format_statuses(statuses))
    if numbers is not None:
        print("\nresponse funnel: " + "  ".join(f"{k}={v}" for k, v in numbers.items()))
    return 0


async def _gather_now() -> int:
    files = await jobs_cli.gather_now(KafkaSettings(), PostgresSettings(), SftpSettings(), AccountsSettings())
    for f in files:
        print(f"{f.esp}/{f.account}\t{f.path}\t{f.size}")
    print(f"{len(files)} new response file(s) announced")
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
    job = groups.add_parser("job", help="broadcast jobs").add_subparsers(dest="cmd", required=True)
    pub = job.add_parser("publish", help="publish a broadcast job from a YAML/JSON file and/or flags")
    pub.add_argument("file", nargs="?", help="a YAML or JSON file with the job's fields")
    pub.add_argument("--job-id")
    pub.add_argument("--esp")
    pub.add_argument("--account")
    pub.add_argument("--list-name")
    pub.add_argument("--message", help="the ESP's pre-created message / campaign id")
    pub.add_argument("--table", help="select recipients from this table or view (schema.table)")
    pub.add_argument("--column", action="append", help="a selected column (repeatable)")
    pub.add_argument("--filter", action="append", help="COLUMN=VALUE equality filter (repeatable)")
    pub.add_argument("--field", action="append", help="COLUMN=ESPField mapping (repeatable)")
    pub.add_argument("--communication-key", help="the column responses are matched on")
    pub.add_argument("--upload-only", action="store_true", help="upload and import, do not send")
    pub.add_argument("--send-at", help="ISO 8601 time with zone to send at")
    st = job.add_parser("status", help="a job's stages and response funnel")
    st.add_argument("job_id")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    gather = groups.add_parser("gather", help="response gathering").add_subparsers(dest="cmd", required=True)
    gather.add_parser("now", help="scan the ESP accounts for new response files now")
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
            case ("job", "publish"):
                return asyncio.run(_job_publish(args))
            case ("job", "status"):
                return asyncio.run(_job_status(args))
            case ("gather", "now"):
                return asyncio.run(_gather_now())
            case _:
                return _topics_list()
    except EspbridgeError as exc:
        print(f"espbridge: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidMessageError) else 1
    except ValidationError as exc:
        print(f"espbridge: invalid settings:\n{exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
