"""The ``generic_sftp`` flavor: the file-only ESP of docs/connectors/generic_sftp.md.

The ESP has no API; the sandbox acts as the person at the ESP. It watches each account's
``drop/`` folder, every ``WATCH_INTERVAL_S``: each new visible ``<mailingId>.txt`` list file
(tab-delimited) is imported, with ``mailingId`` as the ``external_id`` of the import and of the
send, and sent once imported. Response files are FERG-style: ``<yyyyMMddHHmmss>_FERGE_<kind>.txt``,
tab-delimited, Unix-second timestamps, no event id, no delivery or complaint rows.

A file is handled once: its import is in the saved state, so a restarted sandbox neither imports
nor sends it again, and sends what it had imported but not sent yet.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC
from pathlib import Path
from typing import IO

from sandbox.engine import Account
from sandbox.errors import EspError
from sandbox.files import csv_line
from sandbox.flavors.base import Flavor
from sandbox.listfile import ImportResult, import_list
from sandbox.protocol import DROP, EXTERNAL_ID_RE, RESPONSES, EventType, ImportState
from sandbox.responses import Broadcast, PendingFile, ResponseFormat, ResponsePhase, usual_phases
from sandbox.simulate import Event

log = logging.getLogger(__name__)

DELIMITER = "\t"
LIST_SUFFIX = ".txt"

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
    try:
        record, _ = await account.create_import(file, mailing_id, mailing_id)
    except EspError as exc:  # the file went away since it was listed
        log.warning("list file not imported", extra={"file": file, "error": exc.message})
        return False
    account.spawn(_send_when_imported(account, record.import_id), f"send {mailing_id}")
    return True


async def watch(account: Account) -> None:
    """Import and send each new list file in the account's ``drop/`` folder, until the sandbox stops."""
    state = account.state
    for imp in list(state.imports.values()):
        if imp.state is not ImportState.FAILED and not state.sends_by_external_id(imp.external_id):
            account.spawn(_send_when_imported(account, imp.import_id), f"send {imp.external_id}")
    handled = {imp.file for imp in state.imports.values()}
    drop = account.folder / DROP
    while True:
        try:
            for name in await asyncio.to_thread(_list_files, drop):
                file = f"{DROP}/{name}"
                if file not in handled and await _take(account, file):
                    handled.add(file)
        except Exception:
            log.exception("watching drop/ failed; trying again", extra={"account": account.name})
        await asyncio.sleep(account.settings.watch_interval_s)


FLAVOR = Flavor(name="generic_sftp", read_list=read_list, responses=FergResponses(), watch=watch)
