"""The connector interface and the values that cross it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Protocol

from shared.esp.accounts import AccountConfig
from shared.messages import ResponseEvent


class ImportState(StrEnum):
    """Where an ESP's list import is."""

    QUEUED = "queued"
    """Accepted, not started."""
    RUNNING = "running"
    """Importing."""
    DONE = "done"
    """Imported; the list can be sent."""
    FAILED = "failed"
    """The ESP rejected the list."""


@dataclass(frozen=True, slots=True)
class ImportStatus:
    """An import as the ESP reports it."""

    import_id: str
    state: ImportState
    rows_valid: int = 0
    rows_invalid: int = 0
    errors: tuple[str, ...] = ()


class SendState(StrEnum):
    """Where an ESP's send is."""

    SCHEDULED = "scheduled"
    """Accepted; starts now or at its send time."""
    SENDING = "sending"
    """In progress."""
    SENT = "sent"
    """Finished."""
    FAILED = "failed"
    """Stopped with an error."""


@dataclass(frozen=True, slots=True)
class SendStatus:
    """A send as the ESP reports it."""

    send_id: str
    state: SendState
    recipients: int = 0
    detail: str = ""


@dataclass(frozen=True, slots=True)
class ListFormat:
    """How an ESP wants its recipient list file."""

    delimiter: str = ","
    encoding: str = "utf-8"
    line_terminator: str = "\n"
    email_field: str = "Email"
    key_field: str = "CommunicationKey"
    drop_folder: str = "drop"
    suffix: str = ".csv"

    def file_name(self, job_id: str) -> str:
        """The list file's name for a job (job ids are safe file names by their pattern)."""
        return f"{job_id}{self.suffix}"


@dataclass(frozen=True, slots=True)
class BadRow:
    """A response-file row that could not become an event, kept for the dead-letter topic."""

    line: int
    raw: bytes
    error: str


@dataclass(frozen=True, slots=True)
class ResponseSource:
    """A folder of response files on the ESP's SFTP site and the files in it to take."""

    folder: str
    pattern: str = "*.csv"
    extra: dict[str, str] = field(default_factory=dict)


class Connector(Protocol):
    """What every ESP connector provides."""

    account: AccountConfig
    list_format: ListFormat
    response_sources: tuple[ResponseSource, ...]
    archive_folder: str
    can_send: bool
    """False for file-only ESPs: only ``upload_only`` jobs can run on them."""

    async def start_import(self, remote_path: str, list_name: str, external_id: str) -> ImportStatus:
        """Start (or find, for the same external id) the import of an uploaded list file."""
        ...

    async def import_status(self, import_id: str) -> ImportStatus:
        """The import's current state."""
        ...

    async def find_send(self, external_id: str) -> SendStatus | None:
        """The send of a broadcast if the ESP has one (checked before any retried send call)."""
        ...

    async def send(
        self, import_id: str, message: str, external_id: str, send_at: datetime | None
    ) -> SendStatus:
        """Send the pre-created message to the imported list (now or at ``send_at``)."""
        ...

    async def send_status(self, send_id: str) -> SendStatus:
        """The send's current state."""
        ...

    def parse_response_file(self, local_path: Path, remote_path: str) -> Iterator[ResponseEvent | BadRow]:
        """Events (and rejected rows) of a downloaded response file, streamed from disk."""
        ...
