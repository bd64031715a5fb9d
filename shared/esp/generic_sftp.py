"""The ``generic_sftp`` connector: export and upload a file, gather FERG-style response files.

Written from docs/connectors/generic_sftp.md. There is no API: jobs must be ``upload_only``; the
import counts as done once the file is on the site; responses come as delimited files with a
``MessageType`` column, every part of whose format is configurable per account (``options``),
down to how a row's broadcast is found (:mod:`shared.esp.attribution`).
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, ClassVar, Self

from pydantic import AfterValidator, Field, model_validator

from shared.esp import base, rows
from shared.esp.accounts import AccountConfig
from shared.esp.attribution import AttributionOptions, FileAttribution, KeyAttributed, KeyLists
from shared.esp.delimited import check_line_encoding
from shared.esp.options import TimeFormats, TimeZone
from shared.model.errors import PermanentError
from shared.model.messages import BroadcastJob, EventType, ResponseEvent

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
