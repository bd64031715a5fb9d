"""The ``generic_sftp`` connector: export and upload a file, gather FERG-style response files.

Written from docs/connectors/generic_sftp.md. There is no API: jobs must be ``upload_only``; the
import counts as done once the file is on the site; responses come as delimited files with a
``MessageType`` column, every part of whose format is configurable per account (``options``),
down to how a row's broadcast is found (:mod:`shared.esp.attribution`).

Subscriptions: :meth:`GenericSftpConnector.apply_contacts` writes each batch as one contacts file
in the account's ``contacts/`` folder (uploaded under a hidden name and renamed), which the ESP
applies; it has no double opt-in and reports back only the opt-outs of broadcasts, as response rows.
"""

from __future__ import annotations

import contextlib
import csv
import io
import posixpath
import re
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, ClassVar, Self

import asyncssh
from pydantic import AfterValidator, Field, model_validator

from shared.esp import base, contacts, rows
from shared.esp.accounts import AccountConfig
from shared.esp.attribution import AttributionOptions, FileAttribution, KeyAttributed, KeyLists
from shared.esp.delimited import check_line_encoding
from shared.esp.options import TimeFormats, TimeZone
from shared.esp.rest import EspUnavailableError
from shared.infra.sftp import upload_stream_atomic
from shared.model.errors import ConfigurationError, PermanentError, UnavailableError
from shared.model.messages import BroadcastJob, EventType, ResponseEvent, SubscriptionState

DEFAULT_COLUMNS = {
    "message_type": "MessageType",
    "communication_key": "urn",
    "email": "email",
    "broadcast_id": "mailingId",
    "timestamp": "timestamp",
    "url": "link",
    "bounce_type": "bouncetype",
}
DEFAULT_TYPES = {
    "Send": "sent",
    "Open": "open",
    "Click": "click",
    "Unsubscription": "unsubscribe",
    "Bounce:hardbounce": "bounce_hard",
    "Bounce:softbounce": "bounce_soft",
}
CONTACT_COLUMNS = ("Email", "List", "Status", "Reason")
"""A contacts file's columns before the contacts' fields (docs/connectors/generic_sftp.md)."""
FILE_STATUS = {
    SubscriptionState.SUBSCRIBED: "subscribed",
    SubscriptionState.UNSUBSCRIBED: "unsubscribed",
    SubscriptionState.REMOVED: "removed",
    None: "",
}
"""A wanted state as the file's ``Status`` (empty: update the fields only); pending has none."""
ESP_ADDRESS = re.compile(
    r"^[^@\s\"(),:;<>\[\\\]]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$"
)
"""An address the ESP takes: no blanks, quotes or brackets before the ``@``, a dotted host name after
it (letters, digits, hyphens), 254 characters at most; it refuses the row of any other."""
REQUIRED_ROLES = ("message_type", "timestamp", ("communication_key", "email"))
"""Columns a response file's header must have (a key or an email column at least); the
broadcast-id column too when it is the only attribution rule."""


def _line_encoding(name: str) -> str:
    check_line_encoding(name)
    return name


class Options(AttributionOptions):
    """The account ``options`` this connector reads (see its documentation page).

    ``columns`` is laid over its defaults; ``message_types`` replaces them as a whole.
    """

    MERGED: ClassVar = {"columns": DEFAULT_COLUMNS}
    ROLE_KEYED: ClassVar = ("columns",)

    delimiter: str = Field(default="\t", min_length=1, max_length=1)
    encoding: Annotated[str, AfterValidator(_line_encoding)] = "utf-8"
    file_pattern: str = "*_FERGE_*.txt"
    columns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    message_types: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TYPES),
        description="MessageType (or 'MessageType:bouncetype' for bounces) → espbridge event type",
    )
    timestamp_format: TimeFormats = Field(
        default=(rows.UNIX,), description="'unix', 'iso' or strptime patterns, tried in order"
    )
    timezone: TimeZone = "UTC"
    list_delimiter: str = Field(default="\t", min_length=1, max_length=1)
    list_suffix: str = ".txt"
    contacts_folder: str = Field(
        default="contacts",
        pattern=r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$",
        description="where contacts files go, relative to the account's sftp_root",
    )
    contacts_per_file: int = Field(
        default=10_000, ge=1, le=100_000, description="contacts in one file at most"
    )

    @model_validator(mode="after")
    def _known_types(self) -> Self:
        bad_types = {v for v in self.message_types.values() if v not in {t.value for t in EventType}}
        if bad_types:
            raise ValueError(f"message_types map to unknown event types {sorted(bad_types)}")
        return self


class UploadOnlyError(PermanentError):
    """A send was asked of an ESP that has no send API."""


class GenericSftpConnector(base.Connector, KeyAttributed):
    """Connector for ESPs reached by files alone."""

    can_send = False

    def __init__(self, account: AccountConfig, context: base.ConnectorContext) -> None:
        super().__init__(account, context)
        self.options = Options.of(account)
        opts = self.options
        if account.subscriptions.double_opt_in:
            raise ConfigurationError(
                f"account {account.name}: subscriptions.double_opt_in cannot be on: an ESP reached by "
                "files alone has no opt-in mail to send"
            )
        self.contacts_per_call = opts.contacts_per_file
        self.attribution = opts.rules()
        self._table = rows.ResponseTable(
            opts.columns,
            (*REQUIRED_ROLES, "broadcast_id") if self.attribution.column_required else REQUIRED_ROLES,
            delimiter=opts.delimiter,
            encoding=opts.encoding,
            byte_exact=True,
            times=rows.LocalTimes(opts.timestamp_format, opts.timezone),
        )
        self._events = rows.Events(account)
        self.list_format = self.options.list_format()
        self.response_sources: tuple[base.ResponseSource, ...] = (
            base.ResponseSource("responses", self.options.file_pattern),
        )

    # --- no API: the import is the upload, and there is no send --------------------------------------

    async def start_import(self, remote_path: str, job: BroadcastJob) -> base.ImportStatus:
        """The list is on the site: that is all this ESP needs."""
        return base.ImportStatus(
            import_id=f"file:{posixpath.basename(remote_path)}", state=base.ImportState.DONE
        )

    async def import_status(self, import_id: str) -> base.ImportStatus:
        """Always done (see :meth:`start_import`)."""
        return base.ImportStatus(import_id=import_id, state=base.ImportState.DONE)

    async def send(self, import_id: str, job: BroadcastJob) -> base.SendStatus:
        """Refused: the message is sent at the ESP by a person or its own automation."""
        raise UploadOnlyError(f"{self.account.name} has no send API: publish upload_only jobs")

    # --- contacts files -------------------------------------------------------------------------------

    async def apply_contacts(self, changes: Sequence[base.ContactChange]) -> list[base.ContactResult]:
        """Write the changes the ESP takes as one contacts file on its site; a change it would refuse
        (an address it refuses, a double opt-in, a field it cannot have) is refused here, unwritten.
        The ESP reports no state back: it applies the file when its watch finds it."""
        refused: dict[int, base.ContactResult] = {}
        taken: list[base.ContactChange] = []
        for index, change in enumerate(changes):
            problem = _contact_problem(change)
            if problem:
                refused[index] = contacts.refused(change, problem)
            else:
                taken.append(change)
        where = await self._upload_contacts(taken) if taken else ""
        accepted = iter(contacts.applied(c, None, f"in {where}") for c in taken)
        return [refused[i] if i in refused else next(accepted) for i in range(len(changes))]

    async def _upload_contacts(self, taken: Sequence[base.ContactChange]) -> str:
        """One contacts file of ``taken``, uploaded under a hidden name and renamed; its path."""
        opts = self.options
        names = sorted({name for c in taken for name in c.fields})
        buffer = io.StringIO()
        out = csv.writer(buffer, delimiter=opts.list_delimiter, lineterminator="\n")
        out.writerow([*CONTACT_COLUMNS, *names])
        for c in taken:
            status = FILE_STATUS[c.state]
            out.writerow(
                [c.email, c.list, status, c.reason if status else "", *(c.fields.get(n, "") for n in names)]
            )
        stamp = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
        remote = posixpath.join(
            self.account.sftp_root, opts.contacts_folder, f"{stamp}_{uuid.uuid4().hex[:12]}.txt"
        )
        data = buffer.getvalue().encode("utf-8")

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        async with self._site(f"upload {remote}") as sftp:
            await upload_stream_atomic(sftp, chunks(), remote)
        return remote

    @contextlib.asynccontextmanager
    async def _site(self, what: str) -> AsyncIterator[asyncssh.SFTPClient]:
        """An SFTP session; a server out of reach is a transient ESP error, a refusal a configuration one."""
        if self.context.sftp is None:
            raise ConfigurationError(f"{self.account.name}: contacts files need an SFTP connection")
        try:
            async with self.context.sftp.session() as sftp:
                yield sftp
        except asyncssh.SFTPPermissionDenied as exc:
            raise ConfigurationError(f"the SFTP server refused to {what}: {exc.reason}") from None
        except (UnavailableError, asyncssh.Error, OSError) as exc:
            raise EspUnavailableError(f"SFTP could not {what}: {exc}") from exc

    # --- response files --------------------------------------------------------------------------------

    def parse_response_file(
        self, local_path: Path, remote_path: str
    ) -> Iterator[ResponseEvent | base.BadRow]:
        """Rows of a response file as events; rows that do not fit become BadRows with their line.
        Rows left to their communication key need :meth:`parse_with_lists`."""
        return self._parse(local_path, remote_path, None)

    def parse_with_lists(
        self, local_path: Path, remote_path: str, lists: KeyLists
    ) -> Iterator[ResponseEvent | base.BadRow]:
        """:meth:`parse_response_file` with the uploaded lists that held the file's keys."""
        return self._parse(local_path, remote_path, lists)

    def keys_to_look_up(self, local_path: Path, remote_path: str) -> set[str]:
        """The communication keys of a file's rows that only their key can attribute."""
        keys: set[str] = set()

        def per_file(columns: rows.Columns) -> Callable[[rows.Row], None]:
            attribution = self._file_attribution(columns, remote_path, None)

            def note(row: rows.Row) -> None:
                if attribution.needs_lookup(row.get("broadcast_id")):
                    keys.add(row.get("communication_key"))

            return note

        for _ in self._table.events_under(local_path, per_file):
            pass  # the rows' keys are noted; bad rows are reported by the parse itself
        keys.discard("")
        return keys

    def _file_attribution(
        self, columns: rows.Columns, remote_path: str, lists: KeyLists | None
    ) -> FileAttribution:
        broadcast = columns.position("broadcast_id")
        return self.attribution.for_file(
            remote_path,
            None if broadcast is None else columns.header[broadcast],
            columns.position("communication_key") is not None,
            lists,
        )

    def _parse(
        self, local_path: Path, remote_path: str, lists: KeyLists | None
    ) -> Iterator[ResponseEvent | base.BadRow]:
        def per_file(columns: rows.Columns) -> Callable[[rows.Row], ResponseEvent]:
            attribution = self._file_attribution(columns, remote_path, lists)
            return lambda row: self._event(remote_path, row, attribution)

        return self._table.events_under(local_path, per_file)

    def _event(self, remote_path: str, row: rows.Row, attribution: FileAttribution) -> ResponseEvent:
        kind = row.get("message_type")
        bounce = row.get("bounce_type")
        mapped = self.options.message_types.get(f"{kind}:{bounce}") or self.options.message_types.get(kind)
        if mapped is None:
            raise ValueError(
                f"unknown MessageType {kind!r}" + (f" with bounce type {bounce!r}" if bounce else "")
            )
        key, email, url = row.get("communication_key"), row.get("email"), row.get("url") or None
        if not key and not email:
            raise ValueError("neither a communication key nor an email")
        occurred_at = row.time("timestamp")
        return self._events.make(
            broadcast_id=attribution.broadcast(row.get("broadcast_id"), key, occurred_at),
            type=EventType(mapped),
            occurred_at=occurred_at,
            source=rows.file_source(remote_path, row.line),
            recipient=key or email,
            url=url,
            communication_key=key or None,
            email=email or None,
            extra=row.unmapped(),
        )


def _contact_problem(change: base.ContactChange) -> str:
    """Why the ESP would refuse a change ("" if it takes it)."""
    if change.state is SubscriptionState.PENDING or change.double_opt_in:
        return "generic_sftp has no double opt-in: a contact is subscribed or not"
    if len(change.email) > 254 or not ESP_ADDRESS.fullmatch(change.email):
        return f"the ESP refuses the address {change.email!r}"
    fields = contacts.contact_fields(change, CONTACT_COLUMNS)
    return fields if isinstance(fields, str) else ""
