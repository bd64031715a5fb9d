"""The Optimizely Campaign connector (``connector: optimizely``), written from docs/connectors/optimizely.md.

* Lists: the uploader puts a ``;``-delimited UTF-8 file on SFTP (``<sftp_root>/drop/<job_id>.csv``,
  columns ``email``, ``CommunicationKey`` and the job's field-map targets). :meth:`start_import`
  reads that file back and stages its rows through the REST *batch sending* API: it finds the
  job's batch by its ``tag`` (the encoded job id) or creates one (``POST /sending/batches``), then
  ``PUT``s the rows in chunks ``c000001``, ``c000002``, … (``chunk_concurrency`` in flight). The
  import id is ``<batchId>:<rows_valid>:<rows_invalid>`` so the counts survive a restart;
  ``upload_only`` jobs make no API call at all (``file:<name>``).
* Sends: ``POST /sending/batches/{id}`` (``202``; a ``409`` on a batch already ``sent`` is
  followed), then the batch state, the campaign status (``GET /smartcampaigns/{id}``) and its
  report (recipient total). Batch sending cannot be scheduled, so a job's ``send_at`` is held by
  the monitor, which calls the send at its time; a send call more than ``send_at_tolerance_s``
  ahead of it is refused.
* Responses: ``Response*`` files (``;``, dates in ``Europe/Berlin``); API pulls of bounces
  (``GET /responses`` by mailing; a full page is read again by ``recipientIds``, a page of the
  batch's recipient list at a time) and unsubscribes (``GET /unsubscribes``), one page per call
  with the connector's own JSON cursor; webhooks (``basicAuth`` or ``keyAuth`` against the
  account's token).
  Event ids are always derived from the facts (job id, recipient id, type, time to the second,
  URL), so one event read from a file, the API and a webhook is loaded once.
* Subscriptions (:meth:`~OptimizelyConnector.apply_contacts`): recipients of the account's synced
  recipient lists, keyed by their email address. A subscribe lifts the contact's unsubscribe
  (``DELETE /unsubscribes``), then adds it with the bulk ``PUT /recipients/{listId}``, or with
  ``POST /recipients/{listId}`` and the double opt-in process (``202``: pending); an unsubscribe
  is ``POST /unsubscribes``, a removal ``DELETE /recipients/{listId}``, fields
  ``PUT /recipients/{listId}/modify``. Contacts Optimizely does not take are asked about
  (``GET /recipients?recipientId=``) for its reason. Webhooks of the opt-in types, ``blocklist``,
  and unsubscribes, complaints and hard bounces without a broadcast are subscription changes.

Credentials: every REST call carries HTTP Basic ``Authorization`` of the account's ``username``
(the Optimizely API user) and ``password``/``password_file``; ``client_id`` is the clientId path
segment after ``api_url`` (``{api_url}/{client_id}/…``). ``token``/``token_file`` is the webhook
secret. Calls keep to ``max_concurrency`` in flight per process and ``requests_per_second`` per
account, together across every process with a database (:mod:`shared.esp.limits`). ``429`` and
``5xx`` are retried after their ``Retry-After`` (else 1 s, doubling, at most 60 s) while the total
wait of one call stays within the account's ``request_timeout_s``; beyond that the call raises
:class:`EspUnavailableError` with the server's ``retry_after_s``, and further calls wait for (or
fail fast before) that time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import csv
import hmac
import logging
import posixpath
import re
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self, cast
from urllib.parse import quote

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from shared.esp import base, contacts, rows
from shared.esp.accounts import AccountConfig
from shared.esp.cursor import Count, StoredCursor
from shared.esp.delimited import NotUtf8Error, stream_records
from shared.esp.generic import ListRejectedError
from shared.esp.limits import rate_limiter
from shared.esp.options import ConnectorOptions, DateFormat, Encoding, TimeZone
from shared.esp.rest import EspClient, EspUnavailableError, Retries, is_count, short_json
from shared.infra.db.jobs import SentBroadcast
from shared.infra.sftp import download_stream
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.messages import (
    BroadcastJob,
    EventSource,
    EventType,
    ResponseEvent,
    SendMode,
    SubscriptionChange,
    SubscriptionState,
)

log = logging.getLogger(__name__)

MAX_LIMIT = 9999
"""The largest ``limit`` of the list calls (``limit`` must be ``< 10000``)."""
MAX_RESPONSES_LIMIT = 10000
"""The largest ``limit`` of ``GET /responses`` (``400`` only when it is greater than 10000)."""
RECIPIENT_IDS_BUDGET = 6000
"""The longest ``recipientIds`` value of one request, percent-encoded, so that its whole URL stays
well under the 8 KB many servers take."""
MAX_ERRORS = 100
"""At most this many entries in an import's ``errors``."""
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0

DEFAULT_RESPONSE_COLUMNS = {
    "email": "Email",
    "recipient": "Urn",
    "communication_key": "CommunicationKey",
    "message_type": "MessageType",
    "delivery_date": "DeliveryDate",
    "click_url": "ClickUrl",
    "click_date": "ClickDate",
    "event_date": "EventTriggeredDate",
    "bounce_type": "BounceType",
    "broadcast": "BroadcastId",
}
DEFAULT_MESSAGE_TYPES = {
    "Send": "sent",
    "Open": "open",
    "Click": "click",
    "Bounce:hardbounce": "bounce_hard",
    "Bounce:softbounce": "bounce_soft",
    "Unsubscription": "unsubscribe",
}
REQUIRED_RESPONSE_ROLES = ("message_type", "recipient", "event_date", "broadcast")
"""Columns a response file's header must have; without one the whole file is one BadRow."""

BATCH_STATES = ("initiated", "has_recipients", "sent", "invalid")
CAMPAIGN_SEND_STATES = {
    "activationRequired": base.SendState.SCHEDULED,
    "activated": base.SendState.SCHEDULED,
    "running": base.SendState.SENDING,
    "paused": base.SendState.SENDING,
    "finished": base.SendState.SENT,
    "canceled": base.SendState.FAILED,
    "invalid": base.SendState.FAILED,
}
CANCELLABLE_CAMPAIGN_STATES = frozenset({"activationRequired", "activated", "running", "paused"})
"""Campaign statuses from which ``POST /smartcampaigns/{id}/stop`` can still keep mails from going out."""
PULLABLE_CAMPAIGN_STATES = frozenset({"running", "paused", "finished", "canceled"})
"""Campaign statuses from which on a broadcast's mailings may have responses to pull."""
BOUNCE_CATEGORIES = {"hardbounce": EventType.BOUNCE_HARD, "softbounce": EventType.BOUNCE_SOFT}
WEBHOOK_TYPES = {
    "sent": EventType.SENT,
    "open": EventType.OPEN,
    "click": EventType.CLICK,
    "unsubscribe": EventType.UNSUBSCRIBE,
    "spamcomplaint": EventType.COMPLAINT,
}
# The OpenAPI document spells the type "archive" where a webhook is registered and "archived" in
# RestWebhook; the payload's spelling is unpublished, so both are known.
IGNORED_WEBHOOK_TYPES = frozenset({"archive", "archived", "filteredbyblocklist"})
OPT_IN_WEBHOOK_TYPES = frozenset({"singleoptin", "confirmedoptin", "doubleoptin"})
"""A new recipient of a list, through an opt-in process of that type (double: once confirmed)."""
OPT_OUT_REASONS = {
    "unsubscribe": EventType.UNSUBSCRIBE.value,
    "spamcomplaint": EventType.COMPLAINT.value,
    "blocklist": "blocklist",
}
"""Webhook types that unsubscribe a contact, and the reason its change carries (the loader's
reasons: the event type)."""
MAX_UNSUBSCRIBE_IDS = 5000
"""``POST /unsubscribes`` takes at most this many recipient ids."""
MEDIA_TYPE = "EMAIL"
RESERVED_FIELDS = ("email",)
"""The recipient's address is its id on a synced list: never a field a change sets."""
VALIDATION_REASONS = {
    "blacklisted": "it is on the blocklist",
    "bounced": "it exceeded the bounce limit",
    "unsubscribed": "it is on the unsubscribe list",
    "not_found": "it is not on the list",
}
"""``RestRecipientValid.validationFailedReason`` in the words of a refused contact's detail."""
UNSUBSCRIBES = "unsubscribes"
_NOT_PULLED = object()
"""An element of a page that is not this broadcast's, or was pulled before."""

_TAG_ESCAPES = {"_": "_5F", ".": "_2E", ":": "_3A"}
_TAG_UNESCAPES = {v: k for k, v in _TAG_ESCAPES.items()}
_TAG_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,250}$")


def _backoff_s(attempt: int, error: EspUnavailableError) -> float:
    """Without a Retry-After, a repeated call waits 1 s, doubling each time, 60 s at most."""
    return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2.0 ** (attempt - 1))


def encode_tag(job_id: str) -> str:
    """The batch ``tag`` of a job id: ``_`` → ``_5F``, ``.`` → ``_2E``, ``:`` → ``_3A`` (A5)."""
    tag = "".join(_TAG_ESCAPES.get(ch, ch) for ch in job_id)
    if not _TAG_PATTERN.match(tag):
        raise PermanentError(f"job id {job_id!r} does not fit a batch tag ([A-Za-z0-9_-]{{1,250}}): {tag!r}")
    return tag


def decode_tag(tag: str) -> str:
    """The job id a batch ``tag`` carries (the reverse of :func:`encode_tag`)."""
    return re.sub(r"_(5F|2E|3A)", lambda m: _TAG_UNESCAPES[m.group(0)], tag)


class Options(ConnectorOptions):
    """The account ``options`` this connector reads (see docs/connectors/optimizely.md#configuration).

    ``response_columns`` and ``message_types`` are laid over their defaults, so an account names
    only what differs.
    """

    MERGED: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "response_columns": DEFAULT_RESPONSE_COLUMNS,
        "message_types": DEFAULT_MESSAGE_TYPES,
    }
    ROLE_KEYED: ClassVar = ("response_columns",)

    campaign_action: Literal["copy", "use"] = "copy"
    chunk_size: int = Field(default=1000, ge=1)
    chunk_concurrency: int = Field(default=4, ge=1)
    page_size: int = Field(default=1000, ge=1, le=MAX_LIMIT)
    max_concurrency: int = Field(default=8, ge=1)
    requests_per_second: float = Field(default=10.0, gt=0)
    send_at_tolerance_s: float = Field(default=300.0, ge=0)
    recipient_id_column: str = Field(default="CommunicationKey", min_length=1)
    job_attribute: str = Field(default="BroadcastId", min_length=1)
    list_folder: str = Field(default="drop", min_length=1)
    list_delimiter: str = Field(default=";", min_length=1, max_length=1)
    list_suffix: str = ".csv"
    email_column: str = Field(default="email", min_length=1)
    response_folder: str = Field(default="responses", min_length=1)
    response_pattern: str = Field(default="Response*", min_length=1)
    archive_folder: str = Field(default="archive", min_length=1)
    response_delimiter: str = Field(default=";", min_length=1, max_length=1)
    response_encoding: Encoding = "utf-8"
    response_columns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_RESPONSE_COLUMNS))
    message_types: dict[str, EventType] = Field(
        default_factory=lambda: {k: EventType(v) for k, v in DEFAULT_MESSAGE_TYPES.items()},
        description="MessageType (or 'MessageType:BounceType') → espbridge event type",
    )
    date_format: DateFormat = "%d.%m.%Y %H:%M:%S"
    timezone: TimeZone = "Europe/Berlin"
    api_pulls: bool = True
    responses_limit: int = Field(default=MAX_RESPONSES_LIMIT, ge=1, le=MAX_RESPONSES_LIMIT)
    webhook_auth: Literal["basicAuth", "keyAuth", "none"] = "basicAuth"
    webhook_user: str = Field(default="espbridge", min_length=1)
    webhook_key_header: str = Field(default="Authorization", min_length=1)
    contacts_per_call: int = Field(default=1000, ge=1, le=MAX_UNSUBSCRIBE_IDS)
    double_opt_in_process_id: int | None = Field(
        default=None, ge=1, description="the double opt-in process of a subscribe that asks for one"
    )
    opt_in_process_id: int | None = Field(
        default=None, ge=1, description="the opt-in process of every other subscribe (none: no process)"
    )
    list_unsubscribes: bool = Field(
        default=False,
        description="the client's unsubscribe list is recipient-list based (support sets it up): "
        "unsubscribes name their recipient list; otherwise one unsubscribe holds for every list",
    )
    contact_fields: dict[str, str] = Field(
        default_factory=dict, description="CRM field → Optimizely attribute; others keep their name"
    )

    @model_validator(mode="before")
    @classmethod
    def _retired(cls, data: Any) -> Any:
        if isinstance(data, dict) and "responses_offset_paging" in data:
            log.warning(
                "option responses_offset_paging is ignored: GET /responses is paged as documented "
                "(by mailingId, then recipientIds), never by offset"
            )
            return {k: v for k, v in data.items() if k != "responses_offset_paging"}
        return data

    @model_validator(mode="after")
    def _named_columns(self) -> Self:
        if any(not name for name in self.response_columns.values()):
            raise ValueError("response_columns names an empty column")
        if any(not name.strip() for name in self.contact_fields.values()):
            raise ValueError("contact_fields maps a field to an empty attribute name")
        return self


# --- values -------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """A ``RestSendingBatch`` as far as espbridge reads it."""

    id: int
    state: str
    tag: str
    campaign_id: int | None
    recipient_list_id: int | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """Recipients of consecutive list-file rows, staged with one ``PUT``."""

    chunk_id: str
    first_line: int
    last_line: int
    recipients: tuple[dict[str, Any], ...]


@dataclass(frozen=True, slots=True)
class _Staged:
    chunk: Chunk
    count: int


class ListFileError(PermanentError):
    """The list file on the SFTP site cannot be read as the documented list format."""


class SendAtNotSupportedError(PermanentError):
    """A ``send_at`` further ahead than batch sending can honour (it starts after the import)."""


class _BatchSentError(Exception):
    """A chunk ``PUT`` answered 409: the batch was sent meanwhile."""


def _time_text(value: str | None) -> str | None:
    if value is not None:
        rows.aware_time("a cursor time", value)  # raises ValueError when it is not a time
    return value


CursorTime = Annotated[str | None, AfterValidator(_time_text)]
"""A ``created`` time as an unsubscribe scan stores it (RFC 3339), or None."""


class UnsubscribeScan(BaseModel):
    """Where the scan of ``GET /unsubscribes`` (newest first) is, and what the last one saw."""

    model_config = ConfigDict(strict=True, extra="ignore")

    high_water: CursorTime = None
    """The newest ``created`` of this broadcast's entries the last finished scan saw."""
    high_seen: list[str] = Field(default_factory=list)
    """The entries at ``high_water`` already pulled (absent in older cursors)."""
    offset: Count
    """Where the scan in progress goes on."""
    top: CursorTime = None
    """The newest ``created`` of the scan in progress."""
    top_seen: list[str] = Field(default_factory=list)
    """Its entries at ``top``."""


def _from_version_1(data: dict[str, Any]) -> dict[str, Any]:
    """A version 1 cursor as version 2: its bounce ``offsets`` (of the offset paging /responses
    does not have) are dropped, so each bounce stream is read again from its mailing's page."""
    return {**{k: v for k, v in data.items() if k != "offsets"}, "sweeps": {}}


class Cursor(StoredCursor):
    """The pull position of one broadcast: its mailings and recipient list, the stream being read,
    the sweeps of bounce streams too large for one page, the unsubscribe scan."""

    VERSION: ClassVar[int] = 2
    UPGRADES: ClassVar = {1: _from_version_1}

    batch: Count
    mailings: list[Count] | None = None
    recipient_list: Count | None = None
    """The batch's ``recipientListId`` (absent from version 1 cursors: read again when needed)."""
    pos: Count
    sweeps: dict[str, Count]
    """``<mailingId>:<category>`` → the offset in the recipient list of that stream's sweep in
    progress (a stream whose mailing page came back full)."""
    unsubscribes: UnsubscribeScan

    @classmethod
    def start(cls, batch: int) -> Cursor:
        """The position before the first page of a batch's broadcast."""
        return cls(batch=batch, pos=0, sweeps={}, unsubscribes=UnsubscribeScan(offset=0))


def _unsubscribe_key(element: Any) -> str:
    """An ``/unsubscribes`` entry's identity among entries of the same ``created`` time."""
    if not isinstance(element, dict):
        return orjson.dumps(element, option=orjson.OPT_SORT_KEYS).decode()
    return f"{element.get('recipientId')}|{element.get('mailingId')}|{element.get('created')}"


# --- the list file ------------------------------------------------------------------------------------


async def _records(data: AsyncIterable[bytes]) -> AsyncGenerator[tuple[int, str], None]:
    """Complete CSV records of a UTF-8 byte stream with the line each starts on
    (:func:`~shared.esp.delimited.stream_records`)."""
    try:
        async for start, lines in stream_records(data):
            yield start, "".join(lines)
    except NotUtf8Error as exc:
        raise ListFileError(
            f"the list file is not UTF-8 near line {exc.lines_read + 1}: {exc.reason}"
        ) from None


async def list_chunks(
    data: AsyncIterable[bytes],
    job_id: str,
    *,
    chunk_size: int = 1000,
    delimiter: str = ";",
    email_column: str = "email",
    recipient_id_column: str = "CommunicationKey",
    job_attribute: str = "BroadcastId",
) -> AsyncGenerator[Chunk | base.BadRow, None]:
    """The batch chunks of a list file's bytes, in file order, and the rows that cannot be read.

    Each data row becomes ``{"id": <recipient_id_column>, "data": {<non-empty fields>,
    <job_attribute>: <job_id>}}``; a row with the wrong number of fields is a :class:`BadRow`
    with its line. A header without the email or recipient id column raises :class:`ListFileError`.
    """
    header: list[str] | None = None
    id_index = 0
    recipients: list[dict[str, Any]] = []
    first = last = 0
    number = 0
    async for start, text in _records(data):
        row = next(csv.reader([text], delimiter=delimiter), [])
        if header is None:
            header = row
            missing = [c for c in (email_column, recipient_id_column) if c not in header]
            if missing:
                raise ListFileError(f"the list file's header lacks {', '.join(missing)}")
            if len(set(header)) != len(header):
                raise ListFileError("the list file's header names a column twice")
            id_index = header.index(recipient_id_column)
            continue
        if not row:
            continue  # an empty line
        if len(row) != len(header):
            yield base.BadRow(start, text.rstrip("\r\n").encode(), f"{len(row)} fields, want {len(header)}")
            continue
        fields = {name: value for name, value in zip(header, row, strict=True) if value != ""}
        fields[job_attribute] = job_id
        if not recipients:
            first = start
        last = start
        recipients.append({"id": row[id_index], "data": fields})
        if len(recipients) >= chunk_size:
            number += 1
            yield Chunk(f"c{number:06d}", first, last, tuple(recipients))
            recipients = []
    if header is None:
        raise ListFileError("the list file is empty (no header row)")
    if recipients:
        number += 1
        yield Chunk(f"c{number:06d}", first, last, tuple(recipients))


# --- the connector ------------------------------------------------------------------------------------


class OptimizelyConnector(base.Connector):
    """Connector for Optimizely Campaign (REST batch sending, SFTP files, webhooks)."""

    can_send = True

    def __init__(self, account: AccountConfig, context: base.ConnectorContext) -> None:
        super().__init__(account, context)
        name = account.name
        self.options = opts = Options.of(account)
        if not account.api_url:
            raise ConfigurationError(
                f"account {name} needs an api_url (e.g. https://api.campaign.episerver.net/rest)"
            )
        if not account.client_id:
            raise ConfigurationError(f"account {name} needs client_id (the Optimizely clientId)")
        if not account.username or account.password is None:
            raise ConfigurationError(
                f"account {name} needs username (the Optimizely API user) and password[_file]"
            )
        if ":" in account.username:
            raise ConfigurationError(f"account {name}: an HTTP Basic user name cannot contain ':'")
        _check_subscriptions(account, opts)
        self.contacts_per_call = opts.contacts_per_call
        self._name = name
        password = account.password.get_secret_value()
        credentials = f"{account.username}:{password}".encode()
        calls = max(1, int(opts.requests_per_second))
        self._api = EspClient(
            context.http,
            f"{account.api_url.rstrip('/')}/{quote(account.client_id, safe='')}",
            account=name,
            timeout_s=account.request_timeout_s,
            headers={"Authorization": "Basic " + base64.b64encode(credentials).decode("ascii")},
            secrets=(password,),
            limiter=rate_limiter(context, account, calls, calls / opts.requests_per_second),
            concurrency=opts.max_concurrency,
            retries=Retries(attempts=None, backoff_s=_backoff_s, total_wait_s=account.request_timeout_s),
            holds=True,
            answered=(200, 404, 409),
        )
        self._events = rows.Events(account)
        self._responses = rows.ResponseTable(
            opts.response_columns,
            REQUIRED_RESPONSE_ROLES,
            delimiter=opts.response_delimiter,
            encoding=opts.response_encoding,
            times=rows.LocalTimes(opts.date_format, opts.timezone),
        )
        self.pulls_api = opts.api_pulls
        self.archive_folder = opts.archive_folder
        self.response_sources: tuple[base.ResponseSource, ...] = (
            base.ResponseSource(opts.response_folder, opts.response_pattern),
        )
        self.list_format = opts.list_format(
            drop_folder=opts.list_folder
        )  # ListFormat gives UTF-8, LF and CommunicationKey

    # --- batches --------------------------------------------------------------------------------------

    async def _batches(self) -> AsyncIterator[Batch]:
        """Every batch of the client, paging ``GET /sending/batches`` to the short page."""
        limit, offset = self.options.page_size, 0
        while True:
            _, body = await self._api.call(
                "GET", "/sending/batches", params={"offset": str(offset), "limit": str(limit)}
            )
            elements = _elements(body, "GET /sending/batches")
            for element in elements:
                yield _batch(element)
            if len(elements) < limit:
                return
            offset += len(elements)

    async def _find_batch(self, tag: str) -> Batch | None:
        """The job's batch: one ``sent`` with the tag, else the newest that is not ``invalid``."""
        sent: Batch | None = None
        newest: Batch | None = None
        async for batch in self._batches():
            if batch.tag != tag:
                continue
            if batch.state == "sent" and sent is None:
                sent = batch
            elif batch.state != "invalid" and (newest is None or batch.id > newest.id):
                newest = batch
        return sent or newest

    async def _find_or_create_batch(self, job: BroadcastJob, tag: str) -> Batch:
        async def attempt() -> Batch:
            found = await self._find_batch(tag)
            if found is not None:
                return found
            fields = {"campaign": job.message, "campaignAction": self.options.campaign_action, "tag": tag}
            # not retried by itself: a lost answer may have created the batch, so it is looked up first
            status, body = await self._api.once(
                "POST", "/sending/batches", form=fields, multipart=True, answered=(201, 404, 409)
            )
            if status in (404, 409):
                raise ListRejectedError(
                    f"Optimizely refused a batch for campaign {job.message!r} ({status}): {_message(body)}"
                )
            return _batch(body)

        return await self._api.retrying(attempt)

    async def _get_batch(self, batch_id: int) -> Batch:
        status, body = await self._api.call("GET", f"/sending/batches/{batch_id}")
        if status == 404:
            raise ListRejectedError(f"Optimizely does not know batch {batch_id}")
        if status != 200:
            raise EspUnavailableError(f"GET /sending/batches/{batch_id} answered {status}: {_message(body)}")
        return _batch(body)

    async def _put_chunk(self, batch_id: int, chunk: Chunk) -> _Staged:
        path = f"/sending/batches/{batch_id}"
        status, body = await self._api.call(
            "PUT", path, json={"chunk": chunk.chunk_id, "recipients": list(chunk.recipients)}
        )
        if status == 409:
            raise _BatchSentError
        if status == 404:
            raise ListRejectedError(f"Optimizely does not know batch {batch_id}")
        if not isinstance(body, dict) or not is_count(body.get("count")):
            raise EspUnavailableError(
                f"PUT {path} ({chunk.chunk_id}) answered without a count: {short_json(body)}"
            )
        return _Staged(chunk, body["count"])

    # --- imports and sends ----------------------------------------------------------------------------

    def _too_early(self, job: BroadcastJob, now: datetime) -> str | None:
        """Why a send now would be early: batch sending has no schedule, so the send call is the
        send; the monitor holds it until ``send_at`` and this guards against a call ahead of it."""
        if job.send_at is None:
            return None
        ahead = (job.send_at - now).total_seconds()
        if ahead <= self.options.send_at_tolerance_s:
            return None
        return (
            f"Optimizely batch sending cannot be scheduled: send_at {job.send_at.isoformat()} is "
            f"{ahead:.0f}s ahead (at most {self.options.send_at_tolerance_s:.0f}s); it is sent at its time"
        )

    async def start_import(self, remote_path: str, job: BroadcastJob) -> base.ImportStatus:
        """Find or create the job's batch and stage the list file's rows in it (see the doc's Mapping)."""
        if job.mode is SendMode.UPLOAD_ONLY:
            return base.ImportStatus(
                import_id=f"file:{posixpath.basename(remote_path)}", state=base.ImportState.DONE
            )
        if self.context.sftp is None:
            raise ConfigurationError(f"the {self._name} connector needs the SFTP pool to read the list back")
        tag = encode_tag(job.job_id)
        batch = await self._find_or_create_batch(job, tag)
        if batch.state == "sent":
            return base.ImportStatus(import_id=f"{batch.id}:0:0", state=base.ImportState.DONE)
        async with (
            self.context.sftp.session() as sftp,
            aclosing(cast(AsyncGenerator[bytes, None], download_stream(sftp, remote_path))) as data,
        ):
            try:
                return await self.stage(batch.id, data, job.job_id)
            except _BatchSentError:
                pass
        if (await self._get_batch(batch.id)).state == "sent":
            return base.ImportStatus(import_id=f"{batch.id}:0:0", state=base.ImportState.DONE)
        raise ListRejectedError(f"Optimizely refused the chunks of batch {batch.id} (409) but it is not sent")

    async def stage(self, batch_id: int, data: AsyncIterable[bytes], job_id: str) -> base.ImportStatus:
        """``PUT`` the chunks of a list file's bytes into a batch, ``chunk_concurrency`` at a time."""
        opts = self.options
        staged: list[_Staged] = []
        bad: list[base.BadRow] = []
        pending: set[asyncio.Task[_Staged]] = set()

        async def collect(return_when: str) -> None:
            nonlocal pending
            done, pending = await asyncio.wait(pending, return_when=return_when)
            staged.extend(task.result() for task in done)  # a failed PUT raises here

        chunks = list_chunks(
            data,
            job_id,
            chunk_size=opts.chunk_size,
            delimiter=opts.list_delimiter,
            email_column=opts.email_column,
            recipient_id_column=opts.recipient_id_column,
            job_attribute=opts.job_attribute,
        )
        try:
            async for item in chunks:
                if isinstance(item, base.BadRow):
                    bad.append(item)
                    continue
                while len(pending) >= opts.chunk_concurrency:
                    await collect(asyncio.FIRST_COMPLETED)
                pending.add(asyncio.create_task(self._put_chunk(batch_id, item)))
            while pending:
                await collect(asyncio.FIRST_EXCEPTION)
        except ListFileError as exc:
            return base.ImportStatus(
                import_id=f"{batch_id}:0:0",
                state=base.ImportState.FAILED,
                errors=(f"batch {batch_id}: {exc}",),
            )
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await chunks.aclose()
        staged.sort(key=lambda s: s.chunk.chunk_id)
        sent = sum(len(s.chunk.recipients) for s in staged)
        valid = sum(s.count for s in staged)
        invalid = max(0, sent - valid) + len(bad)
        errors = [f"line {b.line}: {b.error}" for b in bad]
        errors += [
            f"chunk {s.chunk.chunk_id} (lines {s.chunk.first_line}-{s.chunk.last_line}): "
            f"{len(s.chunk.recipients) - s.count} of {len(s.chunk.recipients)} recipients failed "
            "Optimizely's pre-validation"
            for s in staged
            if s.count < len(s.chunk.recipients)
        ]
        if not staged:
            errors.append("the list file has no recipients")
        return base.ImportStatus(
            import_id=f"{batch_id}:{valid}:{invalid}",
            state=base.ImportState.DONE if valid > 0 else base.ImportState.FAILED,
            rows_valid=valid,
            rows_invalid=invalid,
            errors=tuple(errors[:MAX_ERRORS]),
        )

    async def import_status(self, import_id: str) -> base.ImportStatus:
        """``file:`` → done; else the batch's state with the counts kept in the import id."""
        if import_id.startswith("file:"):
            return base.ImportStatus(import_id=import_id, state=base.ImportState.DONE)
        batch_id, valid, invalid = _parse_import_id(import_id)
        batch = await self._get_batch(batch_id)
        if batch.state == "sent" or (batch.state == "has_recipients" and valid > 0):
            return base.ImportStatus(import_id, base.ImportState.DONE, rows_valid=valid, rows_invalid=invalid)
        reason = "no recipient passed pre-validation" if batch.state == "has_recipients" else batch.state
        return base.ImportStatus(
            import_id,
            base.ImportState.FAILED,
            rows_valid=valid,
            rows_invalid=invalid,
            errors=(f"batch {batch_id} is {batch.state}: {reason}",),
        )

    async def find_send(self, job: BroadcastJob) -> base.SendStatus | None:
        """The job's batch if it is ``sent`` (followed with :meth:`send_status`), else None."""
        batch = await self._find_batch(encode_tag(job.job_id))
        if batch is None or batch.state != "sent":
            return None
        return await self.send_status(str(batch.id))

    async def send(self, import_id: str, job: BroadcastJob) -> base.SendStatus:
        """``POST /sending/batches/{id}``: 202 → scheduled; 409 on a sent batch → followed."""
        if import_id.startswith("file:"):
            raise ListRejectedError(f"job {job.job_id} was uploaded only: there is no batch to send")
        early = self._too_early(job, datetime.now(UTC))
        if early is not None:
            raise SendAtNotSupportedError(early)
        batch_id = _parse_import_id(import_id)[0]
        status, body = await self._api.call("POST", f"/sending/batches/{batch_id}", answered=(202, 404, 409))
        if status == 202:
            return base.SendStatus(send_id=str(batch_id), state=base.SendState.SCHEDULED)
        if status == 404:
            raise ListRejectedError(f"Optimizely does not know batch {batch_id}: {_message(body)}")
        batch = await self._get_batch(batch_id)
        if batch.state == "sent":
            log.info("batch already sent, following it", extra={"account": self._name, "batch": batch_id})
            return await self.send_status(str(batch_id))
        raise ListRejectedError(f"Optimizely refused to send batch {batch_id} (409): {_message(body)}")

    async def send_status(self, send_id: str) -> base.SendStatus:
        """The batch's state, then its campaign's status and, when finished, its report's total."""
        batch_id = _batch_id(send_id)
        batch = await self._get_batch(batch_id)
        if batch.state == "invalid":
            return base.SendStatus(send_id, base.SendState.FAILED, detail=f"batch {batch_id} is invalid")
        if batch.state != "sent":
            return base.SendStatus(
                send_id, base.SendState.SCHEDULED, detail=f"batch {batch_id} is {batch.state}"
            )
        campaign = _campaign_of(batch)
        campaign_status = await self._campaign_status(campaign)
        state = CAMPAIGN_SEND_STATES[campaign_status]
        detail = f"campaign {campaign} {campaign_status}"
        if state is not base.SendState.SENT:
            return base.SendStatus(send_id, state, detail=detail)
        status, report = await self._api.call("GET", f"/smartcampaigns/{campaign}/report")
        recipients = report.get("recipients") if isinstance(report, dict) else None
        total = recipients.get("total") if isinstance(recipients, dict) else None
        if status != 200 or not is_count(total):
            raise EspUnavailableError(
                f"GET /smartcampaigns/{campaign}/report answered {status} without recipients.total: "
                f"{short_json(report)}"
            )
        return base.SendStatus(send_id, base.SendState.SENT, recipients=int(total or 0), detail=detail)

    async def _campaign_status(self, campaign: int) -> str:
        """``GET /smartcampaigns/{id}``: the campaign's status, one of :data:`CAMPAIGN_SEND_STATES`."""
        status, body = await self._api.call("GET", f"/smartcampaigns/{campaign}")
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("status"), str):
            raise EspUnavailableError(f"GET /smartcampaigns/{campaign} answered {status}: {short_json(body)}")
        if body["status"] not in CAMPAIGN_SEND_STATES:
            raise EspUnavailableError(f"campaign {campaign} has an unknown status {body['status']!r}")
        return str(body["status"])

    async def cancel_send(self, send_id: str, job: BroadcastJob) -> base.CancelResult:
        """Cancel the batch's Smart Campaign (``POST /smartcampaigns/{id}/stop``) unless it finished.

        A batch never started and a campaign already ``canceled`` or ``invalid`` send nothing more:
        cancelled without a call. A ``409`` (the campaign moved on meanwhile) is read again:
        ``finished`` is too late, a status still moving is a transient error (asked again later).
        """
        batch_id = _batch_id(send_id)
        batch = await self._get_batch(batch_id)
        if batch.state != "sent":
            return base.CancelResult(
                base.CancelOutcome.CANCELLED,
                f"batch {batch_id} is {batch.state}: never started, nothing sent",
            )
        campaign = _campaign_of(batch)
        before = await self._campaign_status(campaign)
        if before not in CANCELLABLE_CAMPAIGN_STATES:
            return _cancel_result(campaign, before)
        status, body = await self._api.call("POST", f"/smartcampaigns/{campaign}/stop")
        if status == 404:
            raise ListRejectedError(f"Optimizely does not know campaign {campaign}: {_message(body)}")
        if status == 200:
            reached = "recipients reached before it got the mailing"
            if before in ("activationRequired", "activated"):
                reached = "nothing was sent"
            return base.CancelResult(
                base.CancelOutcome.CANCELLED, f"campaign {campaign} cancelled while {before}: {reached}"
            )
        after = await self._campaign_status(campaign)
        if after in CANCELLABLE_CAMPAIGN_STATES:
            raise EspUnavailableError(
                f"campaign {campaign} could not be cancelled while {after} (409): {_message(body)}"
            )
        return _cancel_result(campaign, after)

    # --- contacts (subscription sync) -----------------------------------------------------------------

    async def apply_contacts(self, changes: Sequence[base.ContactChange]) -> list[base.ContactResult]:
        """Subscribe, unsubscribe, remove or update contacts, batched by kind and list (see the
        doc's Subscriptions); a contact Optimizely refuses is a refused result with its reason.

        The changes go in rounds in which each email appears once, so two changes of one contact
        are made in their order.
        """
        results: dict[int, base.ContactResult] = {}
        for round_ in _rounds(changes):
            plan = _ContactPlan()
            for index, change in round_:
                problem = self._contact_problem(change)
                if problem is not None:
                    results[index] = _refused(change, problem)
                else:
                    plan.add(index, change, self._double_opt_in(change))
            for list_id, batch in plan.subscribes.items():
                results |= await self._subscribe(list_id, batch)
            for list_id, batch in plan.double_opt_ins.items():
                results |= await self._subscribe_confirmed(list_id, batch)
            for list_id, batch in plan.updates.items():
                results |= await self._update(list_id, batch)
            for list_id, batch in plan.unsubscribes.items():
                results |= await self._unsubscribe(list_id, batch)
            for list_id, batch in plan.removals.items():
                results |= await self._remove(list_id, batch)
        return [results[i] for i in range(len(changes))]

    def _double_opt_in(self, change: base.ContactChange) -> bool:
        """Whether a subscribe goes through the double opt-in process (a pending one always does)."""
        return change.double_opt_in or change.state is SubscriptionState.PENDING

    def _contact_problem(self, change: base.ContactChange) -> str | None:
        """Why the change cannot be made at all (said before any call), or None."""
        if not _is_list_id(change.list):
            return f"{change.list!r} is not an Optimizely recipient list id (a number)"
        fields = contacts.contact_fields(change, RESERVED_FIELDS)
        if isinstance(fields, str):
            return fields
        subscribing = change.state in (SubscriptionState.SUBSCRIBED, SubscriptionState.PENDING)
        if subscribing and self._double_opt_in(change) and self.options.double_opt_in_process_id is None:
            return f"a double opt-in subscribe needs option double_opt_in_process_id in account {self._name}"
        return None

    def _data(self, change: base.ContactChange) -> dict[str, str]:
        """The contact's fields by their Optimizely attribute names (option ``contact_fields``)."""
        names = self.options.contact_fields
        return {names.get(name, name): value for name, value in change.fields.items()}

    def _unsubscribe_scope(self, list_id: str) -> dict[str, str]:
        """The parameters that say which unsubscribe list: the recipient list's, or the client's."""
        scope = {"mediaType": MEDIA_TYPE}
        if self.options.list_unsubscribes:
            scope["recipientListId"] = list_id
        return scope

    async def _subscribe(self, list_id: str, batch: list[_Planned]) -> dict[int, base.ContactResult]:
        """Lift their unsubscribes, then ``PUT /recipients/{listId}`` (the bulk add, with option
        ``opt_in_process_id``); a recipient already on the list gets its fields set instead."""
        problem = await self._lift_unsubscribes(list_id, batch)
        if problem is not None:
            return _all_refused(batch, problem)
        body: dict[str, Any] = {
            "recipients": [{"id": p.change.email, "data": self._data(p.change)} for p in batch]
        }
        if self.options.opt_in_process_id is not None:
            body["optinProcessId"] = self.options.opt_in_process_id
        path = f"/recipients/{list_id}"
        status, answer = await self._api.call("PUT", path, json=body, answered=CONTACT_ANSWERS)
        if status != 200:
            return _all_refused(batch, _list_refusal("PUT", list_id, status, answer))
        failed = _failed_ids(answer, f"PUT {path}")
        results = _accepted(batch, SubscriptionState.SUBSCRIBED)
        again = [p for p in batch if p.change.email in failed]
        verdicts = await self._validity(list_id, [p.change.email for p in again])
        present = [p for p in again if verdicts.get(p.change.email) is None]
        results |= {
            p.index: _refused(p.change, f"Optimizely did not add it to recipient list {list_id}: {reason}")
            for p in again
            if (reason := verdicts.get(p.change.email)) is not None
        }
        with_fields = [p for p in present if p.change.fields]
        if with_fields:  # already on the list: the add left its data as it was
            results |= await self._update(list_id, with_fields, SubscriptionState.SUBSCRIBED)
        return results

    async def _subscribe_confirmed(
        self, list_id: str, batch: list[_Planned]
    ) -> dict[int, base.ContactResult]:
        """Lift their unsubscribes, then ``POST /recipients/{listId}`` with the double opt-in
        process, one contact a call: ``202`` pending until it confirms, ``201`` subscribed."""
        problem = await self._lift_unsubscribes(list_id, batch)
        if problem is not None:
            return _all_refused(batch, problem)
        process = self.options.double_opt_in_process_id
        results: dict[int, base.ContactResult] = {}
        for planned in batch:
            change = planned.change
            form = {"recipientId": change.email, "optinProcessId": str(process)}
            form |= {f"data.{name}": value for name, value in self._data(change).items()}
            path = f"/recipients/{list_id}"
            status, answer = await self._api.call("POST", path, form=form, answered=CONTACT_ANSWERS)
            if status in (201, 202):
                state = SubscriptionState.PENDING if status == 202 else SubscriptionState.SUBSCRIBED
                results[planned.index] = contacts.applied(change, state)
                continue
            if status == 409:
                reason = (await self._validity(list_id, [change.email])).get(change.email)
                if reason is None:  # "exists already": on the list, in whatever opt-in state it is
                    already = f"already on recipient list {list_id}"
                    results[planned.index] = contacts.applied(change, None, already)
                    continue
                detail = f"Optimizely did not add it to recipient list {list_id} (409): {reason}"
            else:
                detail = _list_refusal("POST", list_id, status, answer)
            results[planned.index] = _refused(change, detail)
        return results

    async def _update(
        self,
        list_id: str,
        batch: list[_Planned],
        state: SubscriptionState | None = None,
    ) -> dict[int, base.ContactResult]:
        """``PUT /recipients/{listId}/modify``: set the contacts' fields (``updateMode`` set)."""
        body = {
            "updateMode": "set",
            "recipients": [{"id": p.change.email, "data": self._data(p.change)} for p in batch],
        }
        path = f"/recipients/{list_id}/modify"
        status, answer = await self._api.call("PUT", path, json=body, answered=CONTACT_ANSWERS)
        if status != 200:
            return _all_refused(batch, _list_refusal("PUT", list_id, status, answer))
        failed = _failed_ids(answer, f"PUT {path}")
        verdicts = await self._validity(list_id, [p.change.email for p in batch if p.change.email in failed])
        results = _accepted(batch, state)
        for planned in batch:
            if planned.change.email in failed:
                reason = verdicts.get(planned.change.email) or "Optimizely gave no reason"
                detail = f"Optimizely did not update its fields on recipient list {list_id}: {reason}"
                results[planned.index] = _refused(planned.change, detail)
        return results

    async def _unsubscribe(self, list_id: str, batch: list[_Planned]) -> dict[int, base.ContactResult]:
        """Set the fields of those that carry some, then ``POST /unsubscribes`` (at most 5000
        ids); ids Optimizely did not take but already holds as unsubscribed count as done."""
        with_fields = [p for p in batch if p.change.fields]
        notes: dict[int, str] = {}
        if with_fields:
            updated = await self._update(list_id, with_fields)
            notes = {i: r.detail for i, r in updated.items() if not r.accepted}
        scope = self._unsubscribe_scope(list_id)
        ids = list(dict.fromkeys(p.change.email for p in batch))
        form = {"recipientIds": ",".join(ids), **scope}
        status, answer = await self._api.call("POST", "/unsubscribes", form=form, answered=CONTACT_ANSWERS)
        if status == 200:
            missed = set(ids) - _id_list(answer, "successfulIds", "POST /unsubscribes")
        elif status == 400:
            missed = set(ids)
        else:
            return _all_refused(batch, f"POST /unsubscribes answered {status}: {_message(answer)}")
        if missed:
            missed -= await self._unsubscribed(sorted(missed), scope)
        results: dict[int, base.ContactResult] = {}
        for planned in batch:
            change = planned.change
            if change.email in missed:
                why = _message(answer) if status == 400 else "not among its successfulIds"
                results[planned.index] = _refused(change, f"Optimizely did not unsubscribe it: {why}")
            else:
                note = notes.get(planned.index, "")
                results[planned.index] = contacts.applied(change, SubscriptionState.UNSUBSCRIBED, note)
        return results

    async def _remove(self, list_id: str, batch: list[_Planned]) -> dict[int, base.ContactResult]:
        """``DELETE /recipients/{listId}?recipientIds=…``, as many ids a call as a URL holds."""
        ids = [p.change.email for p in batch]
        for part in recipient_slices(ids):
            if not part:  # without recipientIds the call deletes every recipient of the list
                raise AssertionError("a removal names no recipient")
            params = {"recipientIds": ",".join(part)}
            status, answer = await self._api.call(
                "DELETE", f"/recipients/{list_id}", params=params, answered=CONTACT_ANSWERS
            )
            if status != 204:
                return _all_refused(batch, _list_refusal("DELETE", list_id, status, answer))
        return _accepted(batch, SubscriptionState.REMOVED)

    async def _lift_unsubscribes(self, list_id: str, batch: list[_Planned]) -> str | None:
        """``DELETE /unsubscribes?recipientIds=…``: a subscribe from the CRM is later than the
        contact's unsubscribe (the syncer keeps time order), so Optimizely must mail it again
        (``404``: none of them was unsubscribed). Why the subscribes cannot go on, or None."""
        scope = self._unsubscribe_scope(list_id)
        for part in recipient_slices([p.change.email for p in batch]):
            params = {"recipientIds": ",".join(part), **scope}
            status, answer = await self._api.call(
                "DELETE", "/unsubscribes", params=params, answered=CONTACT_ANSWERS
            )
            if status not in (204, 404):
                return f"DELETE /unsubscribes answered {status}: {_message(answer)}"
        return None

    async def _unsubscribed(self, ids: list[str], scope: Mapping[str, str]) -> set[str]:
        """Those of the ids on the unsubscribe list (``GET /unsubscribes?recipientIds=…``)."""
        found: set[str] = set()
        for part in recipient_slices(ids):
            params = {"recipientIds": ",".join(part), "limit": str(MAX_LIMIT), **scope}
            _, body = await self._api.call("GET", "/unsubscribes", params=params)
            elements = _elements(body, "GET /unsubscribes")
            found |= {str(e.get("recipientId")).lower() for e in elements if isinstance(e, dict)}
        return found & set(ids)

    async def _validity(self, list_id: str, ids: list[str]) -> dict[str, str | None]:
        """Why each contact cannot be mailed on the list (``GET /recipients?recipientId=…``):
        None when it is valid there."""
        verdicts: dict[str, str | None] = {}
        for recipient in ids:
            params = {"recipientId": recipient, "recipientListIds": list_id, "mediaType": MEDIA_TYPE}
            status, body = await self._api.call("GET", "/recipients", params=params)
            entry = next(
                (
                    e
                    for e in (body if status == 200 and isinstance(body, list) else [])
                    if isinstance(e, dict) and str(e.get("recipientListId")) == list_id
                ),
                None,
            )
            if entry is None:
                verdicts[recipient] = f"recipient list {list_id} is unknown to Optimizely"
            elif entry.get("valid") is True:
                verdicts[recipient] = None
            else:
                said = entry.get("validationFailedReason")
                verdicts[recipient] = VALIDATION_REASONS.get(str(said), f"not valid there ({said})")
        return verdicts

    # --- API pulls ------------------------------------------------------------------------------------

    def _streams(self, mailings: list[int]) -> list[tuple[int, str] | str]:
        out: list[tuple[int, str] | str] = []
        for mailing in mailings:
            out += [(mailing, "hardbounce"), (mailing, "softbounce")]
        out.append(UNSUBSCRIBES)
        return out

    async def pull_responses(self, broadcast: SentBroadcast, cursor: str | None) -> base.PullPage:
        """One page: bounces per mailing and category, then a scan of the newest unsubscribes.

        The first call resolves batch → campaign → mailings (nothing before the campaign runs).
        ``more`` stays true until one round has visited every stream to its last (short) page.
        """
        batch_id = _batch_of(broadcast)
        if batch_id is None:
            return base.PullPage((), cursor, more=False)
        state = self._read_cursor(cursor, batch_id)
        if state.mailings is None:
            return await self._resolve(state, cursor)
        streams = self._streams(state.mailings)
        if state.pos >= len(streams):
            state.pos = 0
        stream = streams[state.pos]
        if isinstance(stream, tuple):
            items, finished = await self._bounce_page(broadcast, state, *stream)
        else:
            items, finished = await self._unsubscribe_page(broadcast, state)
        more = True
        if finished:
            state.pos += 1
            if state.pos >= len(streams):
                state.pos, more = 0, False
        return base.PullPage(tuple(items), state.dump(), more=more)

    def _read_cursor(self, cursor: str | None, batch_id: int) -> Cursor:
        """The stored position for the broadcast's batch; else (or when unreadable) the start."""
        state = Cursor.read(cursor, self._name)
        return state if state is not None and state.batch == batch_id else Cursor.start(batch_id)

    async def _resolve(self, state: Cursor, cursor: str | None) -> base.PullPage:
        """Batch → campaignId → ``messages[].mailingId``, kept in the cursor once the campaign runs."""
        try:
            batch = await self._get_batch(state.batch)
        except ListRejectedError as exc:
            log.warning("cannot pull responses", extra={"account": self._name, "error": str(exc)})
            return base.PullPage((), cursor, more=False)
        if batch.state != "sent" or batch.campaign_id is None:
            return base.PullPage((), cursor, more=False)
        status, body = await self._api.call("GET", f"/smartcampaigns/{batch.campaign_id}")
        if status != 200 or not isinstance(body, dict):
            return base.PullPage((), cursor, more=False)  # not visible yet: next round
        messages = body.get("messages")
        mailings = (
            [m["mailingId"] for m in messages if isinstance(m, dict) and is_count(m.get("mailingId"))]
            if isinstance(messages, list)
            else []
        )
        if body.get("status") not in PULLABLE_CAMPAIGN_STATES or not mailings:
            return base.PullPage((), cursor, more=False)
        state.mailings = mailings
        state.recipient_list = batch.recipient_list_id
        return base.PullPage((), state.dump(), more=True)

    async def _bounce_page(
        self, broadcast: SentBroadcast, state: Cursor, mailing: int, category: str
    ) -> tuple[list[ResponseEvent | base.BadRow], bool]:
        """One page of a mailing's bounces of one category, and whether the stream is finished.

        ``GET /responses`` has no ``offset``: the mailing's page (``responses_limit``) is complete
        when it is short. A full one starts a sweep of the batch's recipient list, whose recipients'
        bounces are then asked for by ``recipientIds``, one page of the list per call.
        """
        key = f"{mailing}:{category}"
        if key in state.sweeps:
            return await self._swept_page(broadcast, state, mailing, category)
        limit = self.options.responses_limit
        params = {"category": category, "mailingId": str(mailing), "limit": str(limit)}
        status, body = await self._api.call("GET", "/responses", params=params)
        if status == 404:
            log.warning(
                "Optimizely does not know the mailing, no bounces to pull",
                extra={"account": self._name, "mailing": mailing},
            )
            return [], True
        elements = _elements(body, "GET /responses")
        name = f"/responses?category={category}&mailingId={mailing}"
        items = self._api_items(broadcast, elements, 0, name, 0, mailing, BOUNCE_CATEGORIES[category])
        if len(elements) < limit:
            return items, True
        state.sweeps[key] = 0  # there may be more than one page holds: read them by recipients
        return items, False

    async def _swept_page(
        self, broadcast: SentBroadcast, state: Cursor, mailing: int, category: str
    ) -> tuple[list[ResponseEvent | base.BadRow], bool]:
        """The bounces of the recipients on the next page of the batch's recipient list."""
        key = f"{mailing}:{category}"
        offset, size = state.sweeps[key], self.options.page_size
        if state.recipient_list is None:
            with contextlib.suppress(ListRejectedError):  # the batch is gone: no list to read
                state.recipient_list = (await self._get_batch(state.batch)).recipient_list_id
        list_id = state.recipient_list
        status, body = 404, None
        if list_id is not None:
            params = {"offset": str(offset), "limit": str(size)}
            status, body = await self._api.call("GET", f"/recipients/{list_id}", params=params)
        if status == 404:
            log.warning(
                "the batch's recipient list cannot be read: bounces beyond the mailing's first page "
                "are not pulled",
                extra={"account": self._name, "batch": state.batch, "recipient_list": list_id},
            )
            del state.sweeps[key]
            return [], True
        recipients = _elements(body, f"GET /recipients/{list_id}")
        ids = [str(r["id"]) for r in recipients if isinstance(r, dict) and _is_id(r.get("id"))]
        askable = [i for i in ids if _askable(i)]
        if len(askable) < len(recipients):
            log.warning(
                "recipients whose id recipientIds cannot carry (none, a comma, too long): their "
                "bounces come only from the mailing's first page",
                extra={
                    "account": self._name,
                    "recipient_list": list_id,
                    "recipients": len(recipients) - len(askable),
                },
            )
        async with asyncio.TaskGroup() as group:
            asked = [
                group.create_task(self._bounces_of(mailing, category, ids))
                for ids in recipient_slices(askable)
            ]
        elements = [element for task in asked for element in task.result()]
        name = f"/responses?category={category}&mailingId={mailing}&recipientIds"
        page = offset // size + 1
        items = self._api_items(broadcast, elements, 0, name, page, mailing, BOUNCE_CATEGORIES[category])
        if len(recipients) < size:
            del state.sweeps[key]
            return items, True
        state.sweeps[key] = offset + len(recipients)
        return items, False

    async def _bounces_of(self, mailing: int, category: str, ids: list[str]) -> list[Any]:
        """The mailing's bounces of these recipients; a full answer is asked for again in halves."""
        limit = self.options.responses_limit
        params = {
            "category": category,
            "mailingId": str(mailing),
            "recipientIds": ",".join(ids),
            "limit": str(limit),
        }
        status, body = await self._api.call("GET", "/responses", params=params)
        if status == 404:
            return []  # none of these recipients is known (any more)
        elements = _elements(body, "GET /responses")
        if len(elements) < limit:
            return elements
        if len(ids) == 1:
            log.warning(
                "a recipient has a full page of bounces of one mailing: later ones are not pulled",
                extra={"account": self._name, "mailing": mailing, "category": category, "limit": limit},
            )
            return elements
        half = len(ids) // 2
        return [
            *await self._bounces_of(mailing, category, ids[:half]),
            *await self._bounces_of(mailing, category, ids[half:]),
        ]

    async def _unsubscribe_page(
        self, broadcast: SentBroadcast, state: Cursor
    ) -> tuple[list[ResponseEvent | base.BadRow], bool]:
        """One page of ``GET /unsubscribes`` newest first, down to the newest entry of this
        broadcast's mailings that the last scan saw (other mailings' entries do not count).

        Entries created at the last scan's newest time are read again (one may have arrived in the
        same second after that scan) but pulled only if that scan did not see them.
        """
        limit = self.options.page_size
        scan = state.unsubscribes
        offset = scan.offset
        high = rows.aware_time("high_water", scan.high_water) if scan.high_water else None
        floor = high or broadcast.requested_at
        _, body = await self._api.call(
            "GET",
            "/unsubscribes",
            params={"sort": "created", "direction": "DESC", "offset": str(offset), "limit": str(limit)},
        )
        elements = _elements(body, "GET /unsubscribes")
        mailings = set(state.mailings or ())
        top = rows.aware_time("top", scan.top) if scan.top else None
        top_seen = set(scan.top_seen)
        high_seen = set(scan.high_seen)
        pulled: list[Any] = []
        reached_floor = False
        for element in elements:
            created = _created(element)
            if created is not None and floor is not None and created < floor:
                reached_floor = True
                break
            if not isinstance(element, dict) or element.get("mailingId") is None:
                pulled.append(_NOT_PULLED)
                continue  # not attributable to a broadcast
            if element.get("mailingId") not in mailings:
                pulled.append(_NOT_PULLED)
                continue  # another broadcast's: it must not move this one's high water
            key = _unsubscribe_key(element)
            if created is not None:
                if top is None or created > top:
                    top, top_seen = created, {key}
                elif created == top:
                    top_seen.add(key)
                if created == high and key in high_seen:
                    pulled.append(_NOT_PULLED)
                    continue  # pulled by the last scan
            pulled.append(element)
        items = self._api_items(
            broadcast, pulled, offset, "/unsubscribes", offset // limit, None, EventType.UNSUBSCRIBE
        )
        if reached_floor or len(elements) < limit:
            if top is not None:
                scan.high_seen = sorted(top_seen | high_seen if top == high else top_seen)
                scan.high_water = top.isoformat()
            scan.offset, scan.top, scan.top_seen = 0, None, []
            return items, True
        scan.offset = offset + len(elements)
        scan.top = top.isoformat() if top is not None else None
        scan.top_seen = sorted(top_seen)
        return items, False

    def _api_items(
        self,
        broadcast: SentBroadcast,
        elements: list[Any],
        offset: int,
        name: str,
        page: int,
        mailing: int | None,
        event_type: EventType,
    ) -> list[ResponseEvent | base.BadRow]:
        """The events of a page's elements (but those :data:`_NOT_PULLED`), numbered after ``offset``."""
        return rows.item_events(
            elements,
            lambda _, element: self._api_event(broadcast, element, name, page, mailing, event_type),
            what=name,
            first_line=offset + 1,
        )

    def _api_event(
        self,
        broadcast: SentBroadcast,
        element: Any,
        name: str,
        page: int,
        mailing: int | None,
        event_type: EventType,
    ) -> ResponseEvent | None:
        if element is _NOT_PULLED:
            return None
        if not isinstance(element, dict):
            raise ValueError(f"not an object but {type(element).__name__}")
        if event_type is not EventType.UNSUBSCRIBE:
            category = element.get("category")
            if category is not None:
                if category not in BOUNCE_CATEGORIES:
                    raise ValueError(f"unknown category {category!r}")
                event_type = BOUNCE_CATEGORIES[category]
        mailing_id = element.get("mailingId", mailing)
        return self._make_event(
            broadcast.job_id,
            _recipient(element),
            event_type,
            rows.aware_time("created", element.get("created")),
            rows.api_source(name, page),
            message_id=str(mailing_id) if mailing_id is not None else None,
            extra=_element_extra(element),
        )

    def _make_event(
        self,
        broadcast_id: str,
        recipient: str,
        event_type: EventType,
        occurred: datetime,
        source: EventSource,
        *,
        message_id: str | None,
        extra: dict[str, str],
        url: str | None = None,
        email: str | None = None,
    ) -> ResponseEvent:
        """The event with the id of its facts (same for a file, the API and a webhook): the time to
        the second, the URL of a click only, the recipient id as the communication key."""
        when = occurred.astimezone(UTC).replace(microsecond=0)
        return self._events.make(
            broadcast_id=broadcast_id,
            type=event_type,
            occurred_at=when,
            source=source,
            recipient=recipient,
            url=url if event_type is EventType.CLICK else None,
            communication_key=recipient,
            email=email or None,
            esp_message_id=message_id,
            extra=extra,
        )

    # --- response files -------------------------------------------------------------------------------

    def parse_response_file(
        self, local_path: Path, remote_path: str
    ) -> Iterator[ResponseEvent | base.BadRow]:
        """Rows of a ``Response*`` file as events; rows that do not fit are BadRows with their line."""
        skipped = 0

        def event(row: rows.Row) -> ResponseEvent | None:
            nonlocal skipped
            made = self._file_event(remote_path, row)
            skipped += made is None
            return made

        yield from self._responses.events(local_path, event)
        if skipped:
            log.info(
                "response rows without a BroadcastId skipped (mailings espbridge did not send)",
                extra={"account": self._name, "file": remote_path, "rows": skipped},
            )

    def _file_event(self, remote_path: str, row: rows.Row) -> ResponseEvent | None:
        broadcast = row.get("broadcast")
        if not broadcast:
            return None
        kind, bounce = row.get("message_type"), row.get("bounce_type")
        types = self.options.message_types
        event_type = types.get(f"{kind}:{bounce}") or types.get(kind)
        if event_type is None:
            raise ValueError(
                f"unknown MessageType {kind!r}" + (f" with BounceType {bounce!r}" if bounce else "")
            )
        recipient = row.get("recipient")
        if not recipient:
            raise ValueError(f"empty {row.column('recipient')}")
        occurred = row.time("event_date")
        url = row.get("click_url")
        if event_type is EventType.CLICK and not url:
            raise ValueError(f"a click without {row.column('click_url')}")
        delivery = row.get("delivery_date")
        return self._make_event(
            broadcast,
            recipient,
            event_type,
            occurred,
            rows.file_source(remote_path, row.line),
            message_id=None,
            extra={"DeliveryDate": delivery} if delivery else {},
            url=url or None,
            email=row.get("email"),
        )

    # --- webhooks -------------------------------------------------------------------------------------

    def _verify_webhook(self, headers: Mapping[str, str]) -> None:
        mode = self.options.webhook_auth
        if mode == "none":
            return
        secret = self.account.token.get_secret_value() if self.account.token else ""
        if not secret:
            raise base.WebhookAuthError(f"account {self._name} has no token (the webhook secret) configured")
        if mode == "basicAuth":
            value = _header(headers, "Authorization")
            scheme, _, encoded = (value or "").partition(" ")
            if value is None or scheme.lower() != "basic":
                raise base.WebhookAuthError("the webhook call carries no Basic authorization")
            try:
                user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
            except (binascii.Error, ValueError):
                raise base.WebhookAuthError("the webhook call's Basic authorization is not base64") from None
            user_ok = hmac.compare_digest(user, self.options.webhook_user.encode())
            password_ok = hmac.compare_digest(password, secret.encode())
            if not (sep and user_ok and password_ok):
                raise base.WebhookAuthError("the webhook call's Basic authorization is wrong")
            return
        header = self.options.webhook_key_header
        value = _header(headers, header)
        if value is None:
            raise base.WebhookAuthError(f"the webhook call carries no {header} header")
        given = value.encode("utf-8", "surrogateescape")
        plain_ok = hmac.compare_digest(given, secret.encode())
        bearer_ok = hmac.compare_digest(given, f"Bearer {secret}".encode())
        if not (plain_ok or bearer_ok):
            raise base.WebhookAuthError(f"the webhook call's {header} header is wrong")

    def parse_webhook(
        self, headers: Mapping[str, str], body: bytes
    ) -> list[ResponseEvent | SubscriptionChange | base.BadRow]:
        """Verify the call (basicAuth/keyAuth against the account's token), then its items: a
        broadcast's responses as events, a contact's opt-in or opt-out as a subscription change."""
        self._verify_webhook(headers)
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise PermanentError("the webhook body is not JSON") from None
        items = parsed if isinstance(parsed, list) else [parsed] if isinstance(parsed, dict) else None
        if items is None:
            raise PermanentError(f"the webhook body is neither an event nor an array: {short_json(parsed)}")
        name = f"webhook:{self._name}"
        changes: list[SubscriptionChange] = []

        def item_event(number: int, item: Any) -> ResponseEvent | None:
            made = self._webhook_item(item, name, number)
            if isinstance(made, SubscriptionChange):
                changes.append(made)
                return None
            return made

        return [*rows.item_events(items, item_event), *changes]

    def _webhook_item(self, item: Any, name: str, number: int) -> ResponseEvent | SubscriptionChange | None:
        """An item as an event of a broadcast, or as a change of a contact's subscription: an
        opt-in, a blocklisting, and an unsubscribe, complaint or hard bounce without a broadcast."""
        if not isinstance(item, dict):
            raise ValueError(f"not an object but {type(item).__name__}")
        kind = item.get("type")
        if kind in IGNORED_WEBHOOK_TYPES:
            return None
        if kind in OPT_IN_WEBHOOK_TYPES:
            return self._webhook_change(item, SubscriptionState.SUBSCRIBED, str(kind))
        if kind == "blocklist":
            return self._webhook_change(item, SubscriptionState.UNSUBSCRIBED, OPT_OUT_REASONS[kind])
        data = item.get("data")
        broadcast = data.get(self.options.job_attribute) if isinstance(data, dict) else None
        if not broadcast:  # not a response to a broadcast espbridge sent
            if kind in OPT_OUT_REASONS:
                return self._webhook_change(item, SubscriptionState.UNSUBSCRIBED, OPT_OUT_REASONS[kind])
            if kind == "bounce" and item.get("category") == "hardbounce":
                return self._webhook_change(item, SubscriptionState.UNSUBSCRIBED, EventType.BOUNCE_HARD.value)
        return self._webhook_event(item, name, number)

    def _webhook_change(
        self, item: dict[str, Any], state: SubscriptionState, reason: str
    ) -> SubscriptionChange | None:
        """The change an item reports on its recipient list. A list espbridge does not sync (a
        batch's pool list, or none named) is the account's broadcast list for an opt-out; an opt-in
        to such a list is none of espbridge's business (None)."""
        data = item.get("data")
        email = data.get("email") if isinstance(data, dict) else None
        if not isinstance(email, str) or "@" not in email:
            email = item.get("recipientId")
        if not isinstance(email, str) or "@" not in email:
            raise ValueError("no email address: neither data.email nor recipientId is one")
        listed = item.get("recipientListId")
        list_id = str(listed) if _is_id(listed) else ""
        if list_id not in self.account.subscriptions.lists:
            if state is SubscriptionState.SUBSCRIBED:
                return None
            list_id = ""
        created = rows.aware_time("created", item.get("created"))
        return contacts.reported_change(
            self.account, email=email, list_id=list_id, state=state, reason=reason, occurred_at=created
        )

    def _webhook_event(self, item: dict[str, Any], name: str, number: int) -> ResponseEvent | None:
        kind = item.get("type")
        if kind == "bounce":
            category = item.get("category")
            if category not in BOUNCE_CATEGORIES:
                raise ValueError(f"a bounce with category {category!r}")
            event_type = BOUNCE_CATEGORIES[category]
        elif isinstance(kind, str) and kind in WEBHOOK_TYPES:
            event_type = WEBHOOK_TYPES[kind]
        else:
            raise ValueError(f"unknown type {kind!r}")
        recipient = _recipient(item)
        data = item.get("data")
        data = data if isinstance(data, dict) else {}
        broadcast = data.get(self.options.job_attribute)
        if not isinstance(broadcast, str) or not broadcast:
            raise ValueError(f"no data.{self.options.job_attribute}")
        created = rows.aware_time("created", item.get("created"))
        url = item.get("url")
        if event_type is EventType.CLICK and (not isinstance(url, str) or not url):
            raise ValueError("a click without url")
        email = data.get("email")
        mailing = item.get("mailingId")
        return self._make_event(
            broadcast,
            recipient,
            event_type,
            created,
            EventSource(kind="webhook", name=name, line=number),
            message_id=str(mailing) if mailing is not None else None,
            extra=_element_extra(item),
            url=url if isinstance(url, str) else None,
            email=email if isinstance(email, str) else None,
        )


# --- helpers ------------------------------------------------------------------------------------------


CONTACT_ANSWERS = (200, 201, 202, 204, 400, 404, 409)
"""What a contact call answers to the connector: success, and the refusals it reads as a refused
contact (or a list Optimizely does not know)."""


@dataclass(frozen=True, slots=True)
class _Planned:
    """A change of :meth:`OptimizelyConnector.apply_contacts` and where its result goes."""

    index: int
    change: base.ContactChange


@dataclass
class _ContactPlan:
    """One round's changes by the call that makes them, each by recipient list."""

    subscribes: dict[str, list[_Planned]] = field(default_factory=dict)
    double_opt_ins: dict[str, list[_Planned]] = field(default_factory=dict)
    updates: dict[str, list[_Planned]] = field(default_factory=dict)
    unsubscribes: dict[str, list[_Planned]] = field(default_factory=dict)
    removals: dict[str, list[_Planned]] = field(default_factory=dict)

    def add(self, index: int, change: base.ContactChange, double_opt_in: bool) -> None:
        """Plan one change (its list id already checked)."""
        if change.state is None:
            kind = self.updates
        elif change.state is SubscriptionState.UNSUBSCRIBED:
            kind = self.unsubscribes
        elif change.state is SubscriptionState.REMOVED:
            kind = self.removals
        else:
            kind = self.double_opt_ins if double_opt_in else self.subscribes
        kind.setdefault(change.list, []).append(_Planned(index, change))


def _rounds(changes: Sequence[base.ContactChange]) -> list[list[tuple[int, base.ContactChange]]]:
    """The changes in rounds, each email at most once a round and a contact's changes in order."""
    rounds: list[list[tuple[int, base.ContactChange]]] = []
    emails: list[set[str]] = []
    for index, change in enumerate(changes):
        after = max((n for n, seen in enumerate(emails) if change.email in seen), default=-1) + 1
        if after == len(rounds):
            rounds.append([])
            emails.append(set())
        rounds[after].append((index, change))
        emails[after].add(change.email)
    return rounds


def _is_list_id(value: str) -> bool:
    """An Optimizely recipient list id: a positive decimal number (int64)."""
    return value.isascii() and value.isdigit() and 0 < int(value) < 2**63


def _check_subscriptions(account: AccountConfig, options: Options) -> None:
    """The account's ``subscriptions:`` fit Optimizely: numeric list ids, and a double opt-in
    process when it asks for double opt-in (checked at start-up)."""
    policy = account.subscriptions
    odd = [list_id for list_id in policy.lists if not _is_list_id(list_id)]
    if odd:
        raise ConfigurationError(
            f"account {account.name}: subscriptions.lists names {', '.join(map(repr, odd))}, but an "
            "Optimizely recipient list id is a number"
        )
    if policy.double_opt_in and options.double_opt_in_process_id is None:
        raise ConfigurationError(
            f"account {account.name} asks for double opt-in (subscriptions.double_opt_in) but names no "
            "double_opt_in_process_id in its options (the id of its double opt-in process, shown "
            "under Administration > API Overview)"
        )


def _refused(change: base.ContactChange, detail: str) -> base.ContactResult:
    log.info("Optimizely refused a contact", extra={"list": change.list, "reason": detail})
    return contacts.refused(change, detail)


def _all_refused(batch: Iterable[_Planned], detail: str) -> dict[int, base.ContactResult]:
    return {p.index: _refused(p.change, detail) for p in batch}


def _accepted(batch: Iterable[_Planned], state: SubscriptionState | None) -> dict[int, base.ContactResult]:
    return {p.index: contacts.applied(p.change, state) for p in batch}


def _list_refusal(method: str, list_id: str, status: int, body: Any) -> str:
    """A refused recipient-list call in words: an unknown list, or Optimizely's own message."""
    if status == 404:
        return f"Optimizely does not know recipient list {list_id} ({method} answered 404): {_message(body)}"
    return f"{method} /recipients/{list_id} answered {status}: {_message(body)}"


def _id_list(body: Any, name: str, where: str) -> set[str]:
    """The ids of an answer's array ``name``; an answer without one fails the call (retried)."""
    ids = body.get(name, []) if isinstance(body, dict) else None
    if not isinstance(ids, list):
        raise EspUnavailableError(f"{where} answered without a list {name}: {short_json(body)}")
    return {str(i).lower() for i in ids}


def _failed_ids(body: Any, where: str) -> set[str]:
    """``RestRecipientsCreationModify.failedIds`` (absent: none failed)."""
    return _id_list(body, "failedIds", where)


def _message(body: Any) -> str:
    return str(body.get("message")) if isinstance(body, dict) and body.get("message") else short_json(body)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header by case-insensitive name (aiohttp's headers are already case-insensitive)."""
    value = headers.get(name)
    if value is not None:
        return value
    wanted = name.lower()
    return next((v for k, v in headers.items() if k.lower() == wanted), None)


def _created(element: Any) -> datetime | None:
    """An element's ``created`` time, None when it has none."""
    try:
        return rows.aware_time("created", element.get("created")) if isinstance(element, dict) else None
    except ValueError:
        return None


def _recipient(element: dict[str, Any]) -> str:
    recipient = element.get("recipientId")
    if not isinstance(recipient, str | int) or isinstance(recipient, bool) or recipient == "":
        raise ValueError("no recipientId")
    return str(recipient)


def _is_id(value: Any) -> bool:
    """A recipient id as the API gives one: a non-empty string or an integer."""
    return isinstance(value, str | int) and not isinstance(value, bool) and value != ""


def _encoded_length(recipient: str) -> int:
    return len(quote(recipient, safe=""))


def _askable(recipient: str) -> bool:
    """Whether ``recipientIds`` can carry the id: no comma (its separator), not over the budget."""
    return "," not in recipient and _encoded_length(recipient) <= RECIPIENT_IDS_BUDGET


def recipient_slices(ids: Iterable[str], budget: int = RECIPIENT_IDS_BUDGET) -> Iterator[list[str]]:
    """Consecutive groups of recipient ids whose comma-joined ``recipientIds``, every id
    percent-encoded, stays within ``budget`` characters (an id over it makes a group alone)."""
    group: list[str] = []
    length = 0
    for recipient in ids:
        size = _encoded_length(recipient) + (1 if group else 0)
        if group and length + size > budget:
            yield group
            group, length, size = [], 0, size - 1
        group.append(recipient)
        length += size
    if group:
        yield group


def _element_extra(element: dict[str, Any]) -> dict[str, str]:
    return {k: str(element[k]) for k in ("mailId", "ruleName", "reason") if element.get(k)}


def _elements(body: Any, where: str) -> list[Any]:
    """The ``elements`` of a collection; anything else fails the call (the cursor is kept)."""
    elements = body.get("elements") if isinstance(body, dict) else None
    if not isinstance(elements, list):
        raise EspUnavailableError(f"{where} answered a body that is not a collection: {short_json(body)}")
    return elements


def _batch(body: Any) -> Batch:
    if (
        not isinstance(body, dict)
        or not is_count(body.get("id"))
        or body.get("state") not in BATCH_STATES
        or not isinstance(body.get("tag", ""), str)
    ):
        raise EspUnavailableError(f"an answer that is not a sending batch: {short_json(body)}")
    campaign, recipient_list = body.get("campaignId"), body.get("recipientListId")
    return Batch(
        id=body["id"],
        state=body["state"],
        tag=body.get("tag") or "",
        campaign_id=campaign if is_count(campaign) else None,
        recipient_list_id=recipient_list if is_count(recipient_list) else None,
    )


def _batch_id(send_id: str) -> int:
    """The batch id a send id is."""
    try:
        return int(send_id)
    except ValueError:
        raise PermanentError(f"{send_id!r} is not an Optimizely batch id") from None


def _campaign_of(batch: Batch) -> int:
    """A sent batch's campaign (Optimizely names it once the batch is sent)."""
    if batch.campaign_id is None:
        raise EspUnavailableError(f"batch {batch.id} is sent but names no campaignId")
    return batch.campaign_id


def _cancel_result(campaign: int, status: str) -> base.CancelResult:
    """A cancel's outcome for a campaign that can no longer be stopped."""
    if status == "finished":
        return base.CancelResult(base.CancelOutcome.TOO_LATE, f"campaign {campaign} finished: it was sent")
    return base.CancelResult(
        base.CancelOutcome.CANCELLED, f"campaign {campaign} is {status}: nothing more is sent"
    )


def _parse_import_id(import_id: str) -> tuple[int, int, int]:
    parts = import_id.split(":")
    try:
        if len(parts) != 3:
            raise ValueError
        batch_id, valid, invalid = (int(p) for p in parts)
    except ValueError:
        raise PermanentError(f"{import_id!r} is not an import id <batchId>:<valid>:<invalid>") from None
    return batch_id, valid, invalid


def _batch_of(broadcast: SentBroadcast) -> int | None:
    """The broadcast's batch: its send id, else the import id's batch."""
    for candidate in (broadcast.send_id, (broadcast.import_id or "").split(":")[0]):
        if candidate and candidate.isdigit():
            return int(candidate)
    return None


__all__ = [
    "Batch",
    "Chunk",
    "Cursor",
    "ListFileError",
    "OptimizelyConnector",
    "Options",
    "SendAtNotSupportedError",
    "decode_tag",
    "encode_tag",
    "list_chunks",
    "recipient_slices",
]
