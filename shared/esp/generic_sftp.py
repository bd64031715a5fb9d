"""The ``generic_sftp`` connector: export and upload a file, gather FERG-style response files.

Written from docs/connectors/generic_sftp.md. There is no API: jobs must be ``upload_only``; the
import counts as done once the file is on the site; responses come as delimited files with a
``MessageType`` column, every part of whose format is configurable per account (``options``).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Mapping
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from shared.esp.accounts import AccountConfig
from shared.esp.base import (
    BadRow,
    Connector,
    ConnectorContext,
    ImportState,
    ImportStatus,
    ListFormat,
    ResponseSource,
    SendStatus,
)
from shared.esp.delimited import check_line_encoding, read_records, undecodable
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.messages import BroadcastJob, EventSource, EventType, ResponseEvent, event_id_for

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


class Options(BaseModel):
    """The account ``options`` this connector reads (see its documentation page)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    delimiter: str = Field(default="\t", min_length=1, max_length=1)
    encoding: str = "utf-8"
    file_pattern: str = "*_FERGE_*.txt"
    columns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    message_types: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_TYPES),
        description="MessageType (or 'MessageType:bouncetype' for bounces) → espbridge event type",
    )
    timestamp_format: str = Field(default="unix", description="'unix' or a strptime pattern")
    timezone: str = "UTC"
    list_delimiter: str = Field(default="\t", min_length=1, max_length=1)
    list_suffix: str = ".txt"


class UploadOnlyError(PermanentError):
    """A send was asked of an ESP that has no send API."""


class GenericSftpConnector(Connector):
    """Connector for ESPs reached by files alone."""

    can_send = False

    def __init__(self, account: AccountConfig, context: ConnectorContext) -> None:
        super().__init__(account, context)
        try:
            self.options = Options.model_validate(account.options)
        except ValidationError as exc:
            raise ConfigurationError(f"account {account.esp}/{account.account} options: {exc}") from None
        columns = {**DEFAULT_COLUMNS, **self.options.columns}
        unknown_roles = set(columns) - set(DEFAULT_COLUMNS)
        if unknown_roles:
            raise ConfigurationError(
                f"unknown column roles {sorted(unknown_roles)} (known: {sorted(DEFAULT_COLUMNS)})"
            )
        bad_types = {v for v in self.options.message_types.values() if v not in {t.value for t in EventType}}
        if bad_types:
            raise ConfigurationError(f"message_types map to unknown event types {sorted(bad_types)}")
        try:
            check_line_encoding(self.options.encoding)
        except ValueError as exc:
            raise ConfigurationError(f"account {account.esp}/{account.account} options: {exc}") from None
        try:
            self._zone: tzinfo = ZoneInfo(self.options.timezone)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigurationError(f"unknown time zone {self.options.timezone!r}") from None
        self._columns = columns
        self.list_format = ListFormat(delimiter=self.options.list_delimiter, suffix=self.options.list_suffix)
        self.response_sources: tuple[ResponseSource, ...] = (
            ResponseSource("responses", self.options.file_pattern),
        )

    # --- no API: the import is the upload, and there is no send --------------------------------------

    async def start_import(self, remote_path: str, job: BroadcastJob) -> ImportStatus:
        """The list is on the site: that is all this ESP needs."""
        return ImportStatus(import_id=f"file:{posixpath.basename(remote_path)}", state=ImportState.DONE)

    async def import_status(self, import_id: str) -> ImportStatus:
        """Always done (see :meth:`start_import`)."""
        return ImportStatus(import_id=import_id, state=ImportState.DONE)

    async def send(self, import_id: str, job: BroadcastJob) -> SendStatus:
        """Refused: the message is sent at the ESP by a person or its own automation."""
        raise UploadOnlyError(
            f"{self.account.esp}/{self.account.account} has no send API: publish upload_only jobs"
        )

    # --- response files --------------------------------------------------------------------------------

    def parse_response_file(self, local_path: Path, remote_path: str) -> Iterator[ResponseEvent | BadRow]:
        """Rows of a response file as events; rows that do not fit become BadRows with their line."""
        opts = self.options
        records = read_records(local_path, delimiter=opts.delimiter, encoding=opts.encoding)
        first = next(records, None)
        if first is None:
            return
        header = first.fields or []
        index = {name: i for i, name in enumerate(header)}
        required = [self._columns[r] for r in ("message_type", "broadcast_id", "timestamp")]
        missing = [c for c in required if c not in index]
        if missing or (
            self._columns["communication_key"] not in index and self._columns["email"] not in index
        ):
            yield BadRow(1, first.raw, f"header lacks {', '.join(missing) or 'urn/email'}")
            return
        for record in records:
            if record.fields == []:
                continue  # a blank line is no record
            try:
                if record.fields is None:
                    raise ValueError(record.error)
                yield self._event(remote_path, record.line, record.fields, header, index)
            except ValueError as exc:
                yield BadRow(record.line, record.raw, str(exc))

    def _event(
        self, remote_path: str, line: int, row: list[str], header: list[str], index: Mapping[str, int]
    ) -> ResponseEvent:
        if len(row) != len(header):
            raise ValueError(f"{len(row)} fields, want {len(header)}")
        bad_bytes = undecodable(row, self.options.encoding)
        if bad_bytes:
            raise ValueError(bad_bytes)

        def get(role: str) -> str:
            column = self._columns[role]
            return row[index[column]].strip() if column in index else ""

        kind = get("message_type")
        bounce = get("bounce_type")
        mapped = self.options.message_types.get(f"{kind}:{bounce}") or self.options.message_types.get(kind)
        if mapped is None:
            raise ValueError(
                f"unknown MessageType {kind!r}" + (f" with bounce type {bounce!r}" if bounce else "")
            )
        broadcast = get("broadcast_id")
        if not broadcast:
            raise ValueError("empty broadcast id")
        key, email, url = get("communication_key"), get("email"), get("url") or None
        if not key and not email:
            raise ValueError("neither a communication key nor an email")
        occurred = self._time(get("timestamp"))
        event_type = EventType(mapped)
        return ResponseEvent(
            event_id=event_id_for(
                self.account.esp,
                broadcast_id=broadcast,
                recipient=key or email,
                event_type=event_type.value,
                occurred_at=occurred,
                url=url,
            ),
            esp=self.account.esp,
            account=self.account.account,
            broadcast_id=broadcast,
            communication_key=key or None,
            email=email or None,
            type=event_type,
            url=url,
            occurred_at=occurred,
            source=EventSource(kind="file", name=posixpath.normpath(remote_path), line=line),
            extra=_extra(row, header, set(self._columns.values())),
        )

    def _time(self, value: str) -> datetime:
        if not value:
            raise ValueError("empty timestamp")
        if self.options.timestamp_format == "unix":
            try:
                return datetime.fromtimestamp(float(value), UTC)
            except (ValueError, OverflowError, OSError):
                raise ValueError(f"timestamp {value!r} is not Unix seconds") from None
        try:
            parsed = datetime.strptime(value, self.options.timestamp_format)
        except ValueError:
            raise ValueError(
                f"timestamp {value!r} does not match {self.options.timestamp_format!r}"
            ) from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=self._zone)).astimezone(UTC)


def _extra(row: list[str], header: list[str], mapped: set[str]) -> dict[str, Any]:
    return {name: value for name, value in zip(header, row, strict=False) if name not in mapped and value}
