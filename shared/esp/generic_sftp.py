"""The ``generic_sftp`` connector: export and upload a file, gather FERG-style response files.

Written from docs/connectors/generic_sftp.md. There is no API: jobs must be ``upload_only``; the
import counts as done once the file is on the site; responses come as delimited files with a
``MessageType`` column, every part of whose format is configurable per account (``options``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, ClassVar, Self

from pydantic import AfterValidator, Field, model_validator

from shared.esp import base, rows
from shared.esp.accounts import AccountConfig
from shared.esp.delimited import check_line_encoding
from shared.esp.options import ConnectorOptions, TimeZone
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
REQUIRED_ROLES = ("message_type", "broadcast_id", "timestamp", ("communication_key", "email"))
"""Columns a response file's header must have (a key or an email column at least)."""


def _line_encoding(name: str) -> str:
    check_line_encoding(name)
    return name


class Options(ConnectorOptions):
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
    timestamp_format: str = Field(default=rows.UNIX, description="'unix' or a strptime pattern")
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


class GenericSftpConnector(base.Connector):
    """Connector for ESPs reached by files alone."""

    can_send = False

    def __init__(self, account: AccountConfig, context: base.ConnectorContext) -> None:
        super().__init__(account, context)
        self.options = Options.of(account)
        opts = self.options
        self._table = rows.ResponseTable(
            opts.columns,
            REQUIRED_ROLES,
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
        """Rows of a response file as events; rows that do not fit become BadRows with their line."""
        return self._table.events(local_path, lambda row: self._event(remote_path, row))

    def _event(self, remote_path: str, row: rows.Row) -> ResponseEvent:
        kind = row.get("message_type")
        bounce = row.get("bounce_type")
        mapped = self.options.message_types.get(f"{kind}:{bounce}") or self.options.message_types.get(kind)
        if mapped is None:
            raise ValueError(
                f"unknown MessageType {kind!r}" + (f" with bounce type {bounce!r}" if bounce else "")
            )
        broadcast = row.get("broadcast_id")
        if not broadcast:
            raise ValueError("empty broadcast id")
        key, email, url = row.get("communication_key"), row.get("email"), row.get("url") or None
        if not key and not email:
            raise ValueError("neither a communication key nor an email")
        return self._events.make(
            broadcast_id=broadcast,
            type=EventType(mapped),
            occurred_at=row.time("timestamp"),
            source=rows.file_source(remote_path, row.line),
            recipient=key or email,
            url=url,
            communication_key=key or None,
            email=email or None,
            extra=row.unmapped(),
        )
