"""The connector interface and the values that cross it (see docs/connectors/README.md)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from shared.esp.accounts import AccountConfig
from shared.infra.db.jobs import SentBroadcast
from shared.model.errors import PermanentError
from shared.model.events import EncodedEvent, encode
from shared.model.messages import BroadcastJob, ResponseEvent, SubscriptionChange, SubscriptionState

if TYPE_CHECKING:  # the values module stays free of I/O libraries (services' core modules import it)
    import aiohttp

    from shared.esp.limits import RateLimits
    from shared.infra.sftp import SftpPool


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


class CancelOutcome(StrEnum):
    """What asking an ESP to cancel a send came to."""

    CANCELLED = "cancelled"
    """The ESP stopped the send (or withdrew it before it started)."""
    TOO_LATE = "too_late"
    """The send has already gone out or finished; nothing was stopped."""
    NOT_SUPPORTED = "not_supported"
    """The ESP has no way to cancel a send."""


@dataclass(frozen=True, slots=True)
class CancelResult:
    """The outcome of a cancel and what the ESP said, for the broadcast's status."""

    outcome: CancelOutcome
    detail: str


@dataclass(frozen=True, slots=True)
class ContactChange:
    """One contact's change to push to one list of the account (a subscription request, resolved)."""

    email: str
    list: str
    """The ESP's list (never empty: the syncer resolves the account's broadcast list)."""
    state: SubscriptionState | None
    """The state wanted; None: only update the contact's fields."""
    fields: Mapping[str, str] = field(default_factory=dict)
    """Contact data to set, by the ESP's field names."""
    double_opt_in: bool = False
    """A subscribe goes through the ESP's confirmation (the contact stays pending until it confirms)."""
    reason: str = ""


@dataclass(frozen=True, slots=True)
class ContactResult:
    """What the ESP made of one :class:`ContactChange`."""

    email: str
    list: str
    accepted: bool
    """False: the ESP refused this contact (a bad address, a blocklisted one); dead-lettered with
    ``detail``. Outages raise instead, and the whole batch is retried."""
    state: SubscriptionState | None = None
    """The state the ESP now holds, where it says (``pending`` for a double opt-in)."""
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
    """A response row or webhook item that could not become an event, kept for the dead-letter topic."""

    line: int
    """The line of the file it starts on, or the item's number in its page or call."""
    raw: bytes
    """Its bytes as the connector read them (a row's fields, an item's JSON)."""
    error: str
    """Why it is no event."""


@dataclass(frozen=True, slots=True)
class ResponseSource:
    """A folder of response files on the ESP's SFTP site and the files in it to take."""

    folder: str
    """Relative to the account's folder."""
    pattern: str = "*.csv"
    """The names of the files to take (fnmatch)."""
    extra: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PullPage:
    """One page of an API pull: its events (and rejected items), the cursor to resume from, more?"""

    items: tuple[ResponseEvent | BadRow, ...]
    cursor: str | None
    """Stored by the gatherer and passed to the next pull (None: start over)."""
    more: bool
    """Whether a next page is there now; False ends one round of pulls."""


@dataclass(frozen=True, slots=True)
class ConnectorContext:
    """The process's shared clients a connector may use."""

    http: aiohttp.ClientSession
    sftp: SftpPool | None = None
    rates: RateLimits | None = None
    """The accounts' rate limiters (shared by every process when it has a database); None: each
    connector keeps its own in memory."""


class WebhookAuthError(PermanentError):
    """A webhook call whose authentication is missing or wrong."""


class NotSupportedError(PermanentError):
    """The ESP has no such interface (a send, API pulls, webhooks)."""


def schedule_of(job: BroadcastJob) -> datetime | None:
    """The job's ``send_at`` while it is still ahead, else None: the monitor calls a send at its
    ``send_at``, so a due send goes out now instead of with a past time the ESP might refuse."""
    if job.send_at is None or job.send_at <= datetime.now(UTC):
        return None
    return job.send_at


class Connector:
    """Base of every connector: the defaults of an ESP with files and no extras.

    Subclasses set ``list_format`` and ``response_sources`` and override what their ESP has.
    """

    list_format = ListFormat()
    response_sources: tuple[ResponseSource, ...] = ()
    archive_folder = "archive"
    can_send = True
    pulls_api = False
    contacts_per_call = 1
    """How many contact changes :meth:`apply_contacts` takes at once (the ESP's batch size)."""

    def __init__(self, account: AccountConfig, context: ConnectorContext) -> None:
        self.account = account
        self.context = context

    def list_path(self, job: BroadcastJob) -> str:
        """Where the list file goes, relative to the SFTP login directory."""
        fmt = self.list_format
        return f"{self.account.sftp_root}/{fmt.drop_folder}/{fmt.file_name(job.job_id)}"

    def in_account_folder(self, remote_path: str) -> str:
        """A path on the SFTP site relative to the account's folder (an ESP names files so)."""
        root = self.account.sftp_root.rstrip("/") + "/"
        if not remote_path.startswith(root):
            raise PermanentError(f"{remote_path} is not inside the account folder {root}")
        return remote_path[len(root) :]

    async def start_import(self, remote_path: str, job: BroadcastJob) -> ImportStatus:
        """Start (or find, for the same job) the import of an uploaded list file."""
        raise NotSupportedError(f"{self.account.connector} cannot import lists")

    async def import_status(self, import_id: str) -> ImportStatus:
        """The import's current state."""
        raise NotSupportedError(f"{self.account.connector} cannot import lists")

    async def find_send(self, job: BroadcastJob) -> SendStatus | None:
        """The send of a broadcast if the ESP has one (checked before any retried send call)."""
        return None

    async def send(self, import_id: str, job: BroadcastJob) -> SendStatus:
        """Send the job's pre-created message to the imported list (now or at ``send_at``)."""
        raise NotSupportedError(f"{self.account.connector} has no send: publish upload_only jobs")

    async def send_status(self, send_id: str) -> SendStatus:
        """The send's current state."""
        raise NotSupportedError(f"{self.account.connector} has no send")

    async def cancel_send(self, send_id: str, job: BroadcastJob) -> CancelResult:
        """Ask the ESP to stop a send it was asked for (``send_id`` as :meth:`send` returned it)."""
        return CancelResult(CancelOutcome.NOT_SUPPORTED, f"{self.account.connector} has no cancel of a send")

    def parse_response_file(self, local_path: Path, remote_path: str) -> Iterator[ResponseEvent | BadRow]:
        """Events (and rejected rows) of a downloaded response file, streamed from disk."""
        raise NotSupportedError(f"{self.account.connector} has no response files")

    def encode_response_file(self, local_path: Path, remote_path: str) -> Iterator[EncodedEvent | BadRow]:
        """:meth:`parse_response_file` with the events in their wire form (the gatherer's path);
        a connector with a fast parser writes the JSON without a model per event."""
        for item in self.parse_response_file(local_path, remote_path):
            yield item if isinstance(item, BadRow) else encode(item)

    async def pull_responses(self, broadcast: SentBroadcast, cursor: str | None) -> PullPage:
        """One page of the broadcast's responses from the ESP's API, from ``cursor`` on."""
        raise NotSupportedError(f"{self.account.connector} has no response API")

    def parse_webhook(
        self, headers: Mapping[str, str], body: bytes
    ) -> list[ResponseEvent | SubscriptionChange | BadRow]:
        """Verify a webhook call and turn its body into events and subscription changes (raises
        WebhookAuthError)."""
        raise NotSupportedError(f"{self.account.connector} receives no webhooks")

    async def apply_contacts(self, changes: Sequence[ContactChange]) -> list[ContactResult]:
        """Push at most :attr:`contacts_per_call` contact changes to the ESP, one result per change
        in order; a refused contact is a result, an outage an exception (the batch is retried)."""
        raise NotSupportedError(f"{self.account.connector} cannot change contacts at the ESP")
