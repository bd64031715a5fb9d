"""The ``espbridge`` command line: operator tasks on the database, the topics, jobs and dead letters.

espbridge db migrate        apply pending migrations (ESPBRIDGE_PG_*), then the CRM's (ESPBRIDGE_CRM_*)
espbridge db status         list applied and pending migrations of both sets
espbridge topics create     create the registry topics (ESPBRIDGE_KAFKA_*)
espbridge topics list       the registry: topic, model, partitions
espbridge job check         check a broadcast job against the live system; publish nothing
espbridge job publish       check a broadcast job (from a file and/or flags) and publish it
espbridge job list          the run history: jobs with their stage and state
espbridge job status        a job's stages and response funnel (--follow: live until it ends)
espbridge job cancel        ask for a broadcast to be cancelled (the monitor reports the outcome)
espbridge job validate      check a job file against BroadcastJob's schema, offline
espbridge schema [MESSAGE]  the messages, their topics and JSON Schemas; --asyncapi, --write
espbridge gather now        scan the ESP accounts for response files now
espbridge dlq list          dead letters with their reason and replay state
espbridge dlq replay        send dead letters back once their cause is fixed (once each)
espbridge subscriptions export   write the unsubscriber file for the CRM now
espbridge subscriptions show     a contact's state per ESP account and list, from the CRM
espbridge subscriptions request  publish a subscription request (subscribe, unsubscribe, remove, fields)
espbridge crm capture enable|disable|status   Debezium's capture of crm.subscriptions (ESPBRIDGE_CONNECT_URL)
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from pydantic import ValidationError

from cli import crm, dlq, history, jobs, schema, subscriptions
from cli.db import db_migrate, db_status
from cli.gather import gather_now_command
from cli.output import one_line
from cli.topics import topics_create, topics_list
from shared.infra.kafka import back_off_failed_metadata_updates
from shared.infra.logs import configure
from shared.model.errors import EspbridgeError, InvalidMessageError


def parser() -> argparse.ArgumentParser:
    """Every command and its arguments."""
    top = argparse.ArgumentParser(prog="espbridge", description="espbridge operator commands")
    groups = top.add_subparsers(dest="group", required=True)
    db = groups.add_parser("db", help="the response and control database").add_subparsers(
        dest="cmd", required=True
    )
    db.add_parser("migrate", help="apply pending migrations: espbridge's, then the CRM's")
    db.add_parser("status", help="list applied and pending migrations of both sets")
    jobs.add_parser(groups)
    gather = groups.add_parser("gather", help="response gathering").add_subparsers(dest="cmd", required=True)
    gather.add_parser("now", help="scan the ESP accounts for new response files now")
    topics = groups.add_parser("topics", help="the Kafka topics").add_subparsers(dest="cmd", required=True)
    topics.add_parser("create", help="create the registry topics that are missing")
    topics.add_parser("list", help="list the registry topics")
    dlq.add_parser(groups)
    subscriptions.add_parser(groups)
    crm.add_parser(groups)
    schema.add_parser(groups)
    return top


COMMANDS: dict[tuple[str, str], Callable[[argparse.Namespace], int | Coroutine[Any, Any, int]]] = {
    ("db", "migrate"): lambda _: db_migrate(),
    ("db", "status"): lambda _: db_status(),
    ("topics", "create"): lambda _: topics_create(),
    ("topics", "list"): lambda _: topics_list(),
    ("job", "check"): jobs.job_check,
    ("job", "publish"): jobs.job_publish,
    ("job", "list"): history.job_list,
    ("job", "status"): history.job_status,
    ("job", "cancel"): jobs.job_cancel,
    ("job", "validate"): schema.job_validate,
    ("gather", "now"): lambda _: gather_now_command(),
    ("dlq", "list"): dlq.dlq_list,
    ("dlq", "replay"): dlq.dlq_replay,
    ("subscriptions", "export"): subscriptions.subscriptions_export,
    ("subscriptions", "show"): subscriptions.subscriptions_show,
    ("subscriptions", "request"): subscriptions.subscriptions_request,
    ("crm", "capture"): crm.crm_capture,
    ("schema", "show"): schema.schema_command,
}
"""Each command's function: a coroutine function for those that talk to a server."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run one CLI command; returns the exit code."""
    args = parser().parse_args(argv)
    configure("cli", "WARNING")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # an outage is said once, by the command
    back_off_failed_metadata_updates()
    command = COMMANDS[(args.group, args.cmd)]
    try:
        outcome = command(args)
        return asyncio.run(outcome) if isinstance(outcome, Coroutine) else outcome
    except EspbridgeError as exc:
        print(f"espbridge: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, InvalidMessageError) else 1
    except ValidationError as exc:
        print(f"espbridge: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130  # Ctrl-C: the operator stopped it (following a job, say); nothing to explain
    except Exception as exc:  # no traceback reaches the operator: one line saying what broke
        print(
            f"espbridge: unexpected error ({type(exc).__name__}): {one_line(str(exc), 500)}", file=sys.stderr
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
