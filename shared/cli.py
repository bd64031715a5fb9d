"""The ``espbridge`` command line: operator tasks on the database and the topics.

espbridge db migrate        apply pending migrations (ESPBRIDGE_PG_*)
espbridge db status         list applied and pending migrations
espbridge topics create     create the registry topics (ESPBRIDGE_KAFKA_*)
espbridge topics list       the registry: topic, model, partitions
espbridge dlq list          dead letters with their reason and replay state
espbridge dlq replay        send dead letters back once their cause is fixed (once each)
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from shared import dlq, dlq_cli, jobs_cli
from shared.db.core import connect
from shared.db.migrate import applied_migrations, load_migrations, migrate
from shared.errors import EspbridgeError, InvalidMessageError
from shared.esp import AccountsSettings
from shared.kafka import ensure_topics
from shared.logs import configure
from shared.messages import utcnow
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


def _dlq_filters(args: argparse.Namespace) -> dlq.Filters:
    return dlq.Filters(
        service=args.service,
        kind=args.kind,
        broadcast=args.broadcast,
        since=dlq.parse_since(args.since, utcnow()) if args.since else None,
        state=args.state,
        ids=tuple(dlq.parse_id(i) for i in getattr(args, "id", None) or ()),
    )


async def _dlq_list(args: argparse.Namespace) -> int:
    kafka = KafkaSettings()
    listed, total, unreadable = await dlq_cli.list_letters(
        kafka, PostgresSettings(), _dlq_filters(args), args.limit
    )
    if unreadable:
        print(
            f"espbridge: {unreadable} record(s) on the topic are not dead letters this build reads",
            file=sys.stderr,
        )
    if args.json:
        out = [dlq.as_json(x.letter, x.state, x.state_text, x.replay, kafka.topic_prefix) for x in listed]
        print(orjson.dumps(out, option=orjson.OPT_INDENT_2).decode())
        return 0
    topic = kafka.topic(Topic.DEADLETTER)
    if not listed:
        print(f"no dead letters on {topic}" if not total else f"no dead letters match ({total} on {topic})")
        return 0
    print(dlq.table(dlq.list_rows((x.letter, x.state_text) for x in listed)))
    return 0


async def _dlq_replay(args: argparse.Namespace) -> int:
    filters = _dlq_filters(args)
    if not filters.any and not args.all:
        raise InvalidMessageError("say which dead letters to replay: --id, a filter, or --all for every one")
    if filters.ids and (args.all or args.limit or dataclasses.replace(filters, ids=()).any):
        raise InvalidMessageError("--id names the dead letters itself: no filters, --limit or --all with it")
    outcomes = await dlq_cli.replay(
        KafkaSettings(),
        PostgresSettings(),
        AccountsSettings(),
        filters,
        args.limit,
        force=args.force,
        dry_run=args.dry_run,
    )
    if not outcomes:
        print("no dead letters match")
        return 0
    print(dlq.table([[o.id, o.action, dlq.reason(o.detail, 300)] for o in outcomes]))
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.action] = counts.get(o.action, 0) + 1
    print(("dry run: " if args.dry_run else "") + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if all(o.ok for o in outcomes) else 1


def _dlq_parser(groups: Any) -> None:
    cmds = groups.add_parser("dlq", help="dead letters: what was rejected, and replaying it").add_subparsers(
        dest="cmd", required=True
    )
    ls = cmds.add_parser("list", help="dead letters with their reason and replay state, oldest first")
    rp = cmds.add_parser("replay", help="send dead letters back once their cause is fixed")
    rp.add_argument("--id", action="append", help="a dead letter's id, PARTITION:OFFSET (repeatable)")
    for p in (ls, rp):
        p.add_argument("--service", help="only those rejected by this service")
        p.add_argument("--kind", choices=dlq.KINDS, help="only those of this kind of source")
        p.add_argument("--broadcast", help="only those of this broadcast (job id), where known")
        p.add_argument("--since", help="only those since a time (ISO 8601) or for a duration (30m, 2h, 7d)")
        p.add_argument("--state", choices=dlq.STATES, help="only those in this replay state")
        p.add_argument("--limit", type=int, help="at most this many (the oldest)")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    rp.add_argument("--all", action="store_true", help="replay every dead letter that passes the filters")
    rp.add_argument("--force", action="store_true", help="replay again those replayed before")
    rp.add_argument("--dry-run", action="store_true", help="say what would be replayed; change nothing")


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
    _dlq_parser(groups)
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
            case ("dlq", "list"):
                return asyncio.run(_dlq_list(args))
            case ("dlq", "replay"):
                return asyncio.run(_dlq_replay(args))
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
