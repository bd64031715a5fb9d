"""The ``generic_sftp`` flavor: the file-only ESP of docs/connectors/generic_sftp.md.

The ESP has no API; the sandbox acts as the person at the ESP. It watches each account's
``drop/`` folder, every ``WATCH_INTERVAL_S``: each new visible ``<mailingId>.txt`` list file
(tab-delimited) is imported, with ``mailingId`` as the ``external_id`` of the import and of the
send, and sent once imported. Response files are FERG-style: ``<yyyyMMddHHmmss>_FERGE_<kind>.txt``,
tab-delimited, Unix-second timestamps, no event id, no delivery or complaint rows.

A file is handled once: its import is in the saved state, so a restarted sandbox neither imports
nor sends it again, and sends what it had imported but not sent yet.

Contacts: a list's recipients are subscribed to ``GENERIC_SFTP_LIST`` once imported; each new
visible ``*.txt`` contacts file in ``contacts/`` (tab-delimited ``Email``, ``List``, ``Status``,
optional ``Reason`` and field columns) is applied to the contact book and moved to
``contacts/processed/``, with its refused rows in ``<name>.rejected.txt`` beside it. An opt-out on
the ESP side is reported as a row of the broadcast it came from (the control route's ``job``).
"""

from __future__ import annotations

import asyncio
import csv
import functools
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from pydantic import Field

from sandbox.contacts import ContactChange, ContactEvent, ContactState, Via, valid_email
from sandbox.engine import Account
from sandbox.errors import EspError
from sandbox.files import atomic_writer, csv_line
from sandbox.flavors.base import Flavor
from sandbox.listfile import ImportResult, import_list
from sandbox.protocol import (
    ACCOUNT_FOLDERS,
    DROP,
    EXTERNAL_ID_RE,
    MAX_LISTED_ERRORS,
    RESPONSES,
    EventType,
    ImportState,
)
from sandbox.responses import Broadcast, PendingFile, ResponseFormat, ResponsePhase, usual_phases
from sandbox.settings import SandboxSettings
from sandbox.simulate import Event

log = logging.getLogger(__name__)

DELIMITER = "\t"
LIST_SUFFIX = ".txt"
CONTACTS = "contacts"
PROCESSED = f"{CONTACTS}/processed"
CONTACT_COLUMNS = ("Email", "List", "Status")
"""The columns a contacts file must have; ``Reason`` is optional, any other column is a field."""
LIST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
FIELD_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
FILE_STATES = {"subscribed": ContactState.SUBSCRIBED, "unsubscribed": ContactState.UNSUBSCRIBED}
FILE_STATES["removed"] = ContactState.REMOVED


class GenericSftpSettings(SandboxSettings):
    """The flavor's own settings (prefix ``ESPBRIDGE_SANDBOX_``)."""

    generic_sftp_list: str = Field(
        default="newsletter",
        pattern=r"^([A-Za-z0-9_.:-]{1,100})?$",
        description="the contact list an imported list's recipients are subscribed to (empty: none)",
    )


generic_sftp_settings = functools.cache(GenericSftpSettings)
"""The flavor's settings, read from the environment once."""

HEADER = (
    "MessageType",
    "urn",
    "email",
    "mailingId",
    "mailingName",
    "timestamp",
    "link",
    "bouncetype",
    "bouncereason",
)

# (MessageType, bouncetype, bouncereason) of each event type written; the quotes make readers
# prove they honour the csv module's quoting.
ROW_KINDS: dict[EventType, tuple[str, str, str]] = {
    EventType.SENT: ("Send", "", ""),
    EventType.BOUNCE_HARD: ("Bounce", "hardbounce", '550 5.1.1 "user unknown"'),
    EventType.BOUNCE_SOFT: ("Bounce", "softbounce", "452 4.2.2 mailbox full"),
    EventType.OPEN: ("Open", "", ""),
    EventType.CLICK: ("Click", "", ""),
    EventType.UNSUBSCRIBE: ("Unsubscription", "", ""),
}


def read_list(source: Path, store: Path, stop: threading.Event) -> ImportResult:
    """A tab-delimited list file; rows without an email with ``@`` or without a key are left out."""
    return import_list(source, store, stop, delimiter=DELIMITER)


class FergResponses(ResponseFormat):
    """FERG-style response files, one ``kind`` per phase; delivered and complaint events are not written."""

    phases = usual_phases("sents", "bounces", "opens", "clicks", "unsubscribes", {EventType.UNSUBSCRIBE})
    # The reader derives event ids from (mailingId, urn, type, timestamp, link).
    distinct_seconds = True

    def file_name(self, file: PendingFile) -> str:
        """``responses/<yyyyMMddHHmmss>_FERGE_<kind>.txt`` (UTC, now); ``…_002.txt`` and on if taken."""
        stem = f"{RESPONSES}/{file.now.astimezone(UTC):%Y%m%d%H%M%S}_FERGE_{file.phase.name}"
        path, n = f"{stem}.txt", 1
        while file.taken(path):
            n += 1
            path = f"{stem}_{n:03d}.txt"
        return path

    def write(self, out: IO[str], broadcast: Broadcast, phase: ResponsePhase, events: list[Event]) -> None:
        """The header, then one row per event, in the columns of :data:`HEADER`."""
        out.write(csv_line(HEADER, DELIMITER))
        for e in events:
            message_type, bounce_type, reason = ROW_KINDS[e.event_type]
            row = (
                message_type,
                e.key,
                e.email,
                broadcast.external_id,
                broadcast.message,
                str(e.at),
                e.url,
                bounce_type,
                reason,
            )
            out.write(csv_line(row, DELIMITER))


def _list_files(drop: Path) -> list[str]:
    """The visible ``*.txt`` files in ``drop/``, by name."""
    return sorted(
        p.name
        for p in drop.iterdir()
        if not p.name.startswith(".") and p.name.endswith(LIST_SUFFIX) and p.is_file()
    )


async def _send_when_imported(account: Account, import_id: str) -> None:
    """Send an import's list once it is imported (nothing if it failed, or if the sandbox stops)."""
    try:
        record = await account.finished_import(import_id)
        if record.state is ImportState.DONE:
            mailing_id = record.external_id
            await account.create_send(import_id, record.list_name or mailing_id, mailing_id, None)
        elif record.state is ImportState.FAILED:
            log.warning(
                "list file not imported; not sent",
                extra={"account": account.name, "file": record.file, "errors": record.errors[:3]},
            )
    except Exception:
        log.exception("sending a list failed", extra={"account": account.name, "import_id": import_id})


async def _take(account: Account, file: str) -> bool:
    """Import a new list file and send it once imported; False if it is gone already."""
    mailing_id = file.removeprefix(f"{DROP}/").removesuffix(LIST_SUFFIX)
    if not EXTERNAL_ID_RE.fullmatch(mailing_id):
        log.warning("list file name not usable as a mailingId; ignored", extra={"file": file})
        return True
    contact_list = generic_sftp_settings().generic_sftp_list or None
    try:
        record, _ = await account.create_import(file, mailing_id, mailing_id, contact_list=contact_list)
    except EspError as exc:  # the file went away since it was listed
        log.warning("list file not imported", extra={"file": file, "error": exc.message})
        return False
    account.spawn(_send_when_imported(account, record.import_id), f"send {mailing_id}")
    return True


# Contacts files (client → ESP)


@dataclass
class ContactsFile:
    """What reading a contacts file found: its changes, and its refused rows with why."""

    changes: list[ContactChange] = field(default_factory=list)
    refused: list[tuple[int, str, str]] = field(default_factory=list)
    """(line, error, email) of each refused row (line 1: the file as a whole)."""


def _contact_row(book_state: ContactState | None, row: dict[str, str], fields: list[str]) -> ContactChange:
    """One row's change; ValueError says why the ESP refuses it."""
    email, list_id, status = row["Email"].strip(), row["List"].strip(), row["Status"].strip().lower()
    if not valid_email(email):
        raise ValueError("invalid email")
    if not LIST_ID_RE.fullmatch(list_id):
        raise ValueError(f"invalid List {list_id!r}")
    values = {name: row[name] for name in fields if row[name] != ""}  # empty: the field is left as it is
    if status:
        state = FILE_STATES.get(status)
        if state is None:
            raise ValueError(f"unknown Status {status!r} (subscribed, unsubscribed, removed, or empty)")
    elif book_state is None:
        raise ValueError(f"not on list {list_id}: an empty Status only updates a contact's fields")
    else:
        state = book_state
    return ContactChange(list_id, email, state, row.get("Reason", "").strip(), Via.FILE, values)


def read_contacts(account: Account, path: Path) -> ContactsFile:
    """Read a contacts file (blocking): every valid row's change, every refused row's reason."""
    found = ContactsFile()
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.reader(handle, delimiter=DELIMITER)
        header = next(reader, None) or []
        missing = [c for c in CONTACT_COLUMNS if c not in header]
        odd = [c for c in header if c not in (*CONTACT_COLUMNS, "Reason") and not FIELD_NAME_RE.fullmatch(c)]
        if missing or odd or len(set(header)) != len(header):
            problem = (
                f"missing columns {missing}" if missing else f"bad or repeated column names {odd or header}"
            )
            found.refused.append((1, problem, ""))
            return found
        fields = [c for c in header if c not in (*CONTACT_COLUMNS, "Reason")]
        states: dict[tuple[str, str], ContactState] = {}  # the file's own changes so far
        line = reader.line_num
        for values in reader:
            start, line = line + 1, reader.line_num
            if not values:
                continue
            if len(values) != len(header):
                found.refused.append((start, f"expected {len(header)} fields, found {len(values)}", ""))
                continue
            row = dict(zip(header, values, strict=True))
            key = (row["List"].strip(), row["Email"].strip().lower())
            record = account.contacts.get(*key)
            try:
                change = _contact_row(states.get(key) or (record.state if record else None), row, fields)
            except ValueError as exc:
                found.refused.append((start, str(exc), row["Email"]))
                continue
            states[key] = ContactState(change.state)
            found.changes.append(change)
    return found


def apply_contacts_file(account: Account, name: str) -> ContactsFile:
    """Apply ``contacts/<name>`` to the contact book, then move it (and a report of its refused
    rows) to ``contacts/processed/`` (blocking: called in a worker thread)."""
    source = account.folder / CONTACTS / name
    processed = account.folder / PROCESSED
    processed.mkdir(parents=True, exist_ok=True)
    try:
        found = read_contacts(account, source)
    except UnicodeDecodeError:
        found = ContactsFile(refused=[(1, "the file is not UTF-8", "")])
    except csv.Error as exc:
        found = ContactsFile(refused=[(1, f"malformed file: {exc}", "")])
    account.contacts.set_many(found.changes)
    if found.refused:
        with atomic_writer(processed / f"{Path(name).stem}.rejected.txt") as out:
            out.write(csv_line(("Line", "Error", "Email"), DELIMITER))
            for line, error, email in found.refused:
                out.write(csv_line((str(line), error, email), DELIMITER))
    os.replace(source, processed / name)
    return found


async def _take_contacts(account: Account, name: str) -> None:
    found = await asyncio.to_thread(apply_contacts_file, account, name)
    extra = {"account": account.name, "file": f"{CONTACTS}/{name}", "applied": len(found.changes)}
    if found.refused:
        errors = [{"line": line, "error": error} for line, error, _ in found.refused[:MAX_LISTED_ERRORS]]
        log.warning(
            "contacts file rows refused", extra={**extra, "refused": len(found.refused), "errors": errors[:3]}
        )
    else:
        log.info("contacts file applied", extra=extra)


def _contact_files(folder: Path) -> list[str]:
    """The visible ``*.txt`` files directly in ``contacts/``, by name."""
    if not folder.is_dir():
        return []
    return sorted(
        p.name
        for p in folder.iterdir()
        if not p.name.startswith(".") and p.name.endswith(LIST_SUFFIX) and p.is_file()
    )


# Opt-outs on the ESP side (ESP → client)

OPT_OUT_ROWS: dict[Via, tuple[EventType, str]] = {
    Via.LINK: (EventType.UNSUBSCRIBE, "unsubscribes"),
    Via.COMPLAINT: (EventType.UNSUBSCRIBE, "unsubscribes"),  # no complaint rows: the ESP unsubscribes
    Via.BOUNCE: (EventType.BOUNCE_HARD, "bounces"),
}


def opt_out_file(account: Account, event: ContactEvent, job: str) -> str | None:
    """Write the response file of an opt-out the broadcast ``job`` led to (blocking); its path."""
    send = account.send_of_job(job)
    kind = OPT_OUT_ROWS.get(event.record.via)
    if send is None or kind is None or event.record.state is not ContactState.UNSUBSCRIBED:
        return None
    record = event.record
    key = account.recipient_key(send.import_id, record.email) or ""
    message_type, bounce_type, reason = ROW_KINDS[kind[0]]
    stamp = datetime.fromtimestamp(record.changed_at, UTC)
    path = f"{RESPONSES}/{stamp:%Y%m%d%H%M%S}_FERGE_{kind[1]}_c{event.seq}.txt"
    row = (
        message_type,
        key,
        record.email,
        send.external_id,
        send.message,
        str(int(record.changed_at)),
        "",
        bounce_type,
        reason,
    )
    with atomic_writer(account.folder / path) as out:
        out.write(csv_line(HEADER, DELIMITER))
        out.write(csv_line(row, DELIMITER))
    return path


async def on_contact_event(account: Account, event: ContactEvent) -> None:
    """An opt-out of a broadcast is a row of that broadcast's response files; other changes on the
    ESP side have no way to the client (no API, no webhook): they stay in the contact book."""
    path = await asyncio.to_thread(opt_out_file, account, event, event.job) if event.job else None
    if path is None:
        log.info(
            "ESP-side change not reported: files carry only a broadcast's opt-outs",
            extra={"account": account.name},
        )
        return
    log.info("opt-out reported", extra={"account": account.name, "file": path})


async def watch(account: Account) -> None:
    """Import and send each new list file in the account's ``drop/`` folder, and apply each new
    contacts file in ``contacts/``, until the sandbox stops."""
    state = account.state
    for imp in list(state.imports.values()):
        if imp.state is not ImportState.FAILED and not state.sends_by_external_id(imp.external_id):
            account.spawn(_send_when_imported(account, imp.import_id), f"send {imp.external_id}")
    handled = {imp.file for imp in state.imports.values()}
    drop = account.folder / DROP
    contacts = account.folder / CONTACTS
    while True:
        try:
            for name in await asyncio.to_thread(_list_files, drop):
                file = f"{DROP}/{name}"
                if file not in handled and await _take(account, file):
                    handled.add(file)
            for name in await asyncio.to_thread(_contact_files, contacts):
                await _take_contacts(account, name)
        except Exception:
            log.exception(
                "watching drop/ and contacts/ failed; trying again", extra={"account": account.name}
            )
        await asyncio.sleep(account.settings.watch_interval_s)


FLAVOR = Flavor(
    name="generic_sftp",
    read_list=read_list,
    responses=FergResponses(),
    folders=(*ACCOUNT_FOLDERS, CONTACTS),
    watch=watch,
    check_settings=generic_sftp_settings,
    on_contact_event=on_contact_event,
    job_required_for=frozenset({"unsubscribe_link", "complaint", "bounce_hard"}),
)
