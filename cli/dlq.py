"""``espbridge dlq``: dead letters listed with their reason and replay state, and replayed."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Iterable
from datetime import UTC
from typing import Any

from cli.output import as_json, one_line, table
from shared.esp import AccountsSettings
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model import deadletters as dlq
from shared.model.deadletters import Letter, Replay, broadcast_of, not_replayable
from shared.model.errors import InvalidMessageError
from shared.model.messages import EventSource, utcnow
from shared.model.topics import Topic
from shared.operations.replay import list_letters, replay

REASON_WIDTH = 100
"""How much of a dead letter's message the list shows."""


def describe_source(source: EventSource) -> str:
    """Where a dead letter came from, in one short phrase."""
    text = f"{source.kind} {source.name}"
    if source.line is not None:
        text += f" line {source.line}"
    if source.page is not None:
        text += f" page {source.page}"
    if source.partition is not None:
        text += f" [{source.partition}]@{source.offset}"
    return text


def list_rows(items: Iterable[tuple[Letter, str]]) -> list[list[str]]:
    """The list's table: a header, then one row per dead letter with its state text."""
    rows = [["ID", "AT", "SERVICE", "SOURCE", "ERROR", "STATE", "REASON"]]
    for item, state in items:
        dl = item.letter
        rows.append(
            [
                item.id,
                f"{dl.at.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
                dl.service or "-",
                describe_source(dl.source),
                dl.error_class,
                state,
                one_line(dl.message, REASON_WIDTH),
            ]
        )
    return rows


def letter_json(
    item: Letter, state: str, state_detail: str, replay: Replay | None, prefix: str
) -> dict[str, object]:
    """One dead letter for ``--json``: everything but a webhook's payload, which may hold secrets."""
    dl = item.letter
    out: dict[str, object] = {
        "id": item.id,
        "at": dl.at.isoformat(),
        "service": dl.service,
        "source": dl.source.model_dump(mode="json", exclude_none=True),
        "error_class": dl.error_class,
        "message": dl.message,
        "broadcast": broadcast_of(dl),
        "context": {k: v for k, v in dl.context.items() if k != "header"},
        "payload_bytes": len(dl.payload),
        "state": state,
        "state_text": state_detail,
        "not_replayable": not_replayable(dl, prefix),
    }
    if dl.source.kind != "webhook":
        out["payload"] = dl.payload.decode("utf-8", "replace")
    if replay is not None:
        out["replay"] = {
            "state": replay.state,
            "detail": replay.detail,
            "events": replay.events,
            "replayed_to": replay.replayed_to,
            "attempts": replay.attempts,
            "last_at": replay.last_at.isoformat(),
            "replayed_at": replay.replayed_at.isoformat() if replay.replayed_at else None,
        }
    return out


def filters_of(args: argparse.Namespace) -> dlq.Filters:
    """The filters the arguments give."""
    return dlq.Filters(
        service=args.service,
        kind=args.kind,
        broadcast=args.broadcast,
        since=dlq.parse_since(args.since, utcnow()) if args.since else None,
        state=args.state,
        ids=tuple(dlq.parse_id(i) for i in getattr(args, "id", None) or ()),
    )


async def dlq_list(args: argparse.Namespace) -> int:
    """``dlq list``."""
    kafka = KafkaSettings()
    listed, total, unreadable = await list_letters(kafka, PostgresSettings(), filters_of(args), args.limit)
    if unreadable:
        print(
            f"espbridge: {unreadable} record(s) on the topic are not dead letters this build reads",
            file=sys.stderr,
        )
    if args.json:
        print(
            as_json(
                [letter_json(x.letter, x.state, x.state_text, x.replay, kafka.topic_prefix) for x in listed]
            )
        )
        return 0
    topic = kafka.topic(Topic.DEADLETTER)
    if not listed:
        print(f"no dead letters on {topic}" if not total else f"no dead letters match ({total} on {topic})")
        return 0
    print(table(list_rows((x.letter, x.state_text) for x in listed)))
    return 0


async def dlq_replay(args: argparse.Namespace) -> int:
    """``dlq replay``: exit 1 when a letter is still failing, refused or not found."""
    filters = filters_of(args)
    if not filters.any and not args.all:
        raise InvalidMessageError("say which dead letters to replay: --id, a filter, or --all for every one")
    if filters.ids and (args.all or args.limit or dataclasses.replace(filters, ids=()).any):
        raise InvalidMessageError("--id names the dead letters itself: no filters, --limit or --all with it")
    outcomes = await replay(
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
    print(table([[o.id, o.action, one_line(o.detail, 300)] for o in outcomes]))
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.action] = counts.get(o.action, 0) + 1
    print(("dry run: " if args.dry_run else "") + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0 if all(o.ok for o in outcomes) else 1


def add_parser(groups: Any) -> None:
    """The ``dlq`` commands and their arguments."""
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
