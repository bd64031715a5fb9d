"""``espbridge subscriptions``: the unsubscriber file for the CRM, a contact's state in the CRM, and
a subscription request published as any producer would."""

from __future__ import annotations

import argparse
from datetime import UTC
from pathlib import Path
from typing import Any

import asyncpg
from pydantic import TypeAdapter, ValidationError

from cli.output import as_json, table
from shared.infra.db import connect
from shared.infra.db.subscriptions import contact_rows
from shared.infra.db.unsubscribers import NO_TABLE
from shared.infra.settings import CrmSettings, KafkaSettings, PostgresSettings
from shared.model.errors import ConfigurationError, InvalidMessageError
from shared.model.messages import Email, SubscriptionState, utcnow
from shared.model.topics import Topic
from shared.operations.exporting import (
    Export,
    ExportSettings,
    Period,
    check_folder,
    export_unsubscribers,
    parse_list_pattern,
    parse_zone,
)
from shared.operations.subscriptions import build_request, publish_request


def _items(values: list[str] | None) -> list[str]:
    """A repeatable flag's values, each of which may hold several, comma-separated."""
    return [part.strip() for value in values or [] for part in value.split(",") if part.strip()]


def export_of(args: argparse.Namespace, settings: ExportSettings) -> Export:
    """The export the flags ask for; the folder and time zone default to the syncer's settings
    (ESPBRIDGE_SYNCER_EXPORT_DIR, _TIME_ZONE)."""
    folder = Path(args.dir) if args.dir else settings.dir
    if folder is None:
        raise InvalidMessageError("give the folder to write into: --dir (or ESPBRIDGE_SYNCER_EXPORT_DIR)")
    try:
        return Export(
            folder=folder,
            period=Period(args.period),
            zone=parse_zone(args.time_zone or settings.time_zone),
            include_lists=tuple(parse_list_pattern(t) for t in _items(args.include_list)),
            exclude_lists=tuple(parse_list_pattern(t) for t in _items(args.exclude_list)),
            include_reasons=tuple(_items(args.include_reason)),
            exclude_reasons=tuple(_items(args.exclude_reason)),
        )
    except ValueError as exc:
        raise InvalidMessageError(str(exc)) from None


async def subscriptions_export(args: argparse.Namespace) -> int:
    """``subscriptions export``: write the unsubscriber file now; print it and its row count."""
    export = export_of(args, ExportSettings())
    check_folder(export.folder)  # said before the CRM is asked anything
    conn = await connect(CrmSettings().resolve(PostgresSettings()))
    try:
        outcome = await export_unsubscribers(conn, export, utcnow())
    finally:
        await conn.close()
    replaced = " (it replaced the earlier file of that name)" if outcome.replaced else ""
    print(f"{outcome.path}\t{outcome.rows} unsubscriber(s){replaced}")
    return 0


_EMAIL = TypeAdapter(Email)


async def subscriptions_show(args: argparse.Namespace) -> int:
    """``subscriptions show EMAIL``: the contact's state on each list of each account, from the CRM."""
    try:
        email = _EMAIL.validate_python(args.email)
    except ValidationError:
        raise InvalidMessageError(f"{args.email!r} is not an email address") from None
    conn = await connect(CrmSettings().resolve(PostgresSettings()))
    try:
        rows = await contact_rows(conn, email)
    except asyncpg.UndefinedTableError:
        raise ConfigurationError(NO_TABLE) from None
    finally:
        await conn.close()
    if args.json:
        print(
            as_json(
                [
                    {
                        "esp": r.key.esp,
                        "account": r.key.account,
                        "list": r.key.list,
                        "state": r.state,
                        "reason": r.reason,
                        "source": r.source,
                        "changed_at": r.changed_at.isoformat(),
                    }
                    for r in rows
                ]
            )
        )
        return 0
    if not rows:
        print(f"{email} has no subscription state in the CRM")
        return 0
    header = ["ESP", "ACCOUNT", "LIST", "STATE", "REASON", "SOURCE", "CHANGED (UTC)"]
    print(
        table(
            [header]
            + [
                [
                    r.key.esp,
                    r.key.account,
                    r.key.list,
                    r.state,
                    r.reason or "-",
                    r.source,
                    f"{r.changed_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}",
                ]
                for r in rows
            ]
        )
    )
    return 0


def _fields(values: list[str] | None) -> dict[str, str]:
    fields: dict[str, str] = {}
    for text in values or []:
        name, sep, value = text.partition("=")
        if not sep or not name.strip():
            raise InvalidMessageError(f"--field wants NAME=VALUE, got {text!r}")
        fields[name.strip()] = value
    return fields


async def subscriptions_request(args: argparse.Namespace) -> int:
    """``subscriptions request EMAIL``: publish a subscription request (origin producer) and say what
    was published."""
    request = build_request(
        args.email,
        args.esp,
        args.account,
        list_id=args.list,
        state=None if args.state is None else SubscriptionState(args.state),
        fields=_fields(args.field),
        reason=args.reason,
    )
    kafka = KafkaSettings()
    await publish_request(kafka, request)
    what = request.state.value if request.state is not None else "update the fields of"
    where = f"list {request.list}" if request.list else "its broadcast list"
    fields = f", fields {', '.join(sorted(request.fields))}" if request.fields else ""
    print(
        f"request {request.request_id}: {what} {request.email} at {request.esp}/{request.account}, {where}"
        f"{fields} (on {kafka.topic(Topic.SUBSCRIPTION_REQUESTS)})"
    )
    print(
        f"the syncer writes it to the CRM and pushes it to the ESP: espbridge subscriptions show "
        f"{request.email} (a refused request is a dead letter: espbridge dlq list)"
    )
    return 0


EXPORT_HELP = """\
Write the unsubscriber file for the CRM now: the contacts the ESPs unsubscribed or removed (the
crm.subscriptions rows in state unsubscribed or removed whose source is an ESP, never the CRM's own),
one per row, oldest change first, as UTF-8 with a header, `;`-separated: email, esp, account, list,
state, reason, source, changed_at (ISO 8601, in --time-zone). The file appears whole under its final
name: unsubscribers_all_<UTC time>.csv, or unsubscribers_<day>.csv for --period previous-day (the
day before today in --time-zone; a file of that day already there is replaced). A list filter is
esp/account/list or esp/account/*; an included list takes its account's opt-outs of every list
too, an excluded list leaves out only its own rows. Reasons compare without regard to case.
Reads the CRM database (ESPBRIDGE_CRM_*, by default ESPBRIDGE_PG_*); --dir and --time-zone default
to ESPBRIDGE_SYNCER_EXPORT_DIR and _TIME_ZONE. Prints the file and its row count. Exit 2 for a bad
filter, 1 for a folder that is missing or not writable, or a server that is down."""

REQUEST_HELP = """\
Publish a subscription request on subscriptions.requests.v1, as any producer would: the syncer
writes it to the CRM (source crm) and pushes it to the ESP account (a new subscriber goes through
the account's double opt-in where its policy asks for one). Without --list the account's broadcast
list is meant. --field NAME=VALUE (repeatable) sets the contact's data at the ESP, by the ESP's
field names; with fields and no state only the contact's data is updated. Exit 2 for a bad email,
name or field, 1 if Kafka cannot be reached."""


def add_parser(groups: Any) -> None:
    """The ``subscriptions`` commands and their arguments."""
    subs = groups.add_parser(
        "subscriptions", help="contacts' subscription state, CRM and ESPs"
    ).add_subparsers(dest="cmd", required=True)
    export = subs.add_parser(
        "export",
        help="write the unsubscriber file for the CRM now",
        description=EXPORT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("--dir", help="the CRM-side folder to write into")
    export.add_argument("--period", choices=[p.value for p in Period], default=Period.ALL.value)
    export.add_argument("--include-list", action="append", metavar="ESP/ACCOUNT/LIST", help="repeatable")
    export.add_argument("--exclude-list", action="append", metavar="ESP/ACCOUNT/LIST", help="repeatable")
    export.add_argument("--include-reason", action="append", metavar="REASON", help="repeatable")
    export.add_argument("--exclude-reason", action="append", metavar="REASON", help="repeatable")
    export.add_argument("--time-zone", help="the previous day's and the times' zone (default UTC)")
    show = subs.add_parser("show", help="a contact's state on each list of each ESP account, from the CRM")
    show.add_argument("email", metavar="EMAIL")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    request = subs.add_parser(
        "request",
        help="publish a subscription request for one contact at one ESP account",
        description=REQUEST_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    request.add_argument("email", metavar="EMAIL")
    request.add_argument("--esp", required=True)
    request.add_argument("--account", required=True)
    request.add_argument("--list", default="", help="the ESP's list (default: the account's broadcast list)")
    state = request.add_mutually_exclusive_group()
    for flag, wanted in (
        ("--subscribe", SubscriptionState.SUBSCRIBED),
        ("--unsubscribe", SubscriptionState.UNSUBSCRIBED),
        ("--remove", SubscriptionState.REMOVED),
    ):
        state.add_argument(flag, dest="state", action="store_const", const=wanted.value)
    request.add_argument("--field", action="append", metavar="NAME=VALUE", help="contact data (repeatable)")
    request.add_argument("--reason", default="", help="why, for the CRM's log (one line)")
