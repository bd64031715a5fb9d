"""The ``optimizely`` flavor: Optimizely Campaign as docs/connectors/optimizely.md describes it.

REST under ``/rest/{clientId}/…`` with HTTP Basic on every call (user ``OPT_API_USER``, password
the sandbox ``TOKEN``); ``OPT_CLIENT_IDS`` maps accounts to client ids. Recipients arrive through
**batch sending**: ``POST /sending/batches`` (multipart, with a ``tag`` = the encoded job id),
``PUT`` chunks, ``POST`` to start. The started batch's campaign is ``activated`` for
``IMPORT_DELAY_S``, then ``running``, and ``finished`` once the sends phase is released.

Responses are simulated over the batch's valid recipients (chunk order) with
``random.Random(f"{seed}:{job_id}")`` and released phase by phase (sends, bounces, opens, clicks,
optouts). Each event has one owner source, drawn from ``random.Random(f"{seed}:{job_id}:src")``
among the sources that can carry it: ``Response_*.csv`` files on the SFTP site, the REST
``/responses`` (bounces) and ``/unsubscribes`` elements, or a webhook call (only for types with an
activated webhook when the batch was started). ``OPT_DUPLICATE_RATE`` sends some events through
other capable sources too. The manifest counts what at least one source delivered.

A started batch is an engine send (its merged recipients an engine import) that starts once the
campaign was ``activated`` for ``IMPORT_DELAY_S``; the engine releases it phase by phase through
:class:`OptimizelyRelease`, whose steps are a response file, a step of the send's event log (the
API elements) and webhook calls. The flavor keeps ``<account>/.sandbox-optimizely.json`` (ids,
batches, campaigns, webhooks, each send's source parameters and webhook outcomes) and
``.sandbox-optimizely/batches/<id>/`` (staged chunks, the merged recipients' attributes). A
restarted sandbox resumes unfinished sends: the engine regenerates the events and only the files,
log steps and webhook calls not released yet are.

Choices where the page leaves room are listed in sandbox/README.md (flavor ``optimizely``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import hmac
import logging
import math
import random
import re
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Annotated, Any, Literal
from zoneinfo import ZoneInfo

import aiohttp
import orjson
from aiohttp import web
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_settings import NoDecode

from sandbox.api import CONTEXT, basic_credentials
from sandbox.contacts import ContactChange, ContactEvent, ContactRecord, ContactState, Via, valid_email
from sandbox.engine import Account
from sandbox.errors import ErrorStyle, EspError, bad_request, conflict, found, json_response, not_found
from sandbox.eventlog import SendInterruptedError
from sandbox.files import atomic_write_bytes, atomic_writer, csv_line
from sandbox.flavors.base import Flavor
from sandbox.limits import TokenBucket, retry_after_s
from sandbox.listfile import recipient_store
from sandbox.protocol import COUNTED_TYPES, EXTERNAL_ID_RE, RESPONSES, EventType, SendState, parse_utc
from sandbox.responses import (
    Broadcast,
    PendingFile,
    PhaseWriter,
    ResponseFormat,
    ResponsePhase,
    ResponseWriter,
    usual_phases,
)
from sandbox.settings import SandboxSettings
from sandbox.simulate import Event
from sandbox.state import SendRecord
from sandbox.validators import CommaList, HttpUrl, Pairs, Probability, optional, split_pairs

log = logging.getLogger(__name__)

BERLIN = ZoneInfo("Europe/Berlin")
DELIMITER = ";"
FILE_DATE = "%d.%m.%Y %H:%M:%S"
STATE_FILE = ".sandbox-optimizely.json"
DATA_FOLDER = ".sandbox-optimizely"
MAX_LIMIT = 9999
DEFAULT_LIMIT = 100
MAX_RESPONSES_LIMIT = 10000
"""``GET /responses`` answers 400 only above this ``limit`` (the list calls: from 10000 on)."""
RESPONSE_PARAMETERS = frozenset({"category", "mailingId", "recipientIds", "limit"})
"""The documented parameters of ``GET /responses`` (there is no ``offset``)."""
RESPONSE_CATEGORIES = ("hardbounce", "softbounce", "autoresponder", "unknown")
RECIPIENT_SORTS = frozenset({"id"})
"""The ``sort`` of ``GET /recipients/{listId}`` the sandbox serves (the documented default)."""
UNSIMULATED_RECIPIENT_PARAMETERS = frozenset({"targetGroup", "attributeNames", "includeOptinData"})
MAX_BODY = 64 * 1024 * 1024
WEBHOOK_TIMEOUT_S = 10.0
WEBHOOK_RETRIES_S = (1, 2, 4, 8, 16)

TAG_RE = re.compile(r"^[A-Za-z0-9_-]{1,250}$")
CHUNK_RE = TAG_RE
TAG_CODES = {"_5F": "_", "_2E": ".", "_3A": ":"}
_TAG_CODE_RE = re.compile("|".join(TAG_CODES))

REGISTRABLE_HOOK_TYPES = (
    "open",
    "click",
    "sent",
    "bounce",
    "unsubscribe",
    "spamcomplaint",
    "singleoptin",
    "confirmedoptin",
    "doubleoptin",
    "blocklist",
    "archive",
    "filteredbyblocklist",
)
"""The types a webhook is registered for (``WebhookRequestData.type``)."""
CONTACT_HOOK_TYPES = ("singleoptin", "doubleoptin")
"""The opt-in types the sandbox reports (a sign-up form, a double opt-in confirmation)."""
EVERY_LIST = "*"
"""The contact book's list of the client's unsubscribe list, when it is not recipient-list based."""
OPT_IN_TYPES = frozenset({"single", "confirmed", "double"})
MAX_UNSUBSCRIBE_IDS = 5000
"""``POST /unsubscribes`` takes at most this many ids (400 beyond)."""
REMOVAL_TYPES = {"unsubscribed": "unsubscribed", "blacklisted": "blacklisted", "bounced": "bounced"}

SOURCES = ("file", "api", "webhook")
FILE, API, WEBHOOK = 1, 2, 4
SOURCE_BIT = {"file": FILE, "api": API, "webhook": WEBHOOK}
WEBHOOK_TYPES = ("sent", "open", "click", "bounce", "unsubscribe", "spamcomplaint")

# Per event type: the sources that can carry it (the doc's ✓ table) and its webhook type.
CAPABLE: dict[EventType, tuple[str, ...]] = {
    EventType.SENT: ("file", "webhook"),
    EventType.BOUNCE_HARD: ("file", "api", "webhook"),
    EventType.BOUNCE_SOFT: ("file", "api", "webhook"),
    EventType.OPEN: ("file", "webhook"),
    EventType.CLICK: ("file", "webhook"),
    EventType.UNSUBSCRIBE: ("file", "api", "webhook"),
    EventType.COMPLAINT: ("webhook",),
}
WEBHOOK_TYPE = {
    EventType.SENT: "sent",
    EventType.BOUNCE_HARD: "bounce",
    EventType.BOUNCE_SOFT: "bounce",
    EventType.OPEN: "open",
    EventType.CLICK: "click",
    EventType.UNSUBSCRIBE: "unsubscribe",
    EventType.COMPLAINT: "spamcomplaint",
}
CATEGORY = {EventType.BOUNCE_HARD: "hardbounce", EventType.BOUNCE_SOFT: "softbounce"}
RULE_NAME = {EventType.BOUNCE_HARD: "mailbox unknown", EventType.BOUNCE_SOFT: "mailbox full"}
REPORT_KINDS = {
    EventType.SENT: "sent",
    EventType.BOUNCE_HARD: "hard",
    EventType.BOUNCE_SOFT: "soft",
    EventType.UNSUBSCRIBE: "unsubscribes",
    EventType.OPEN: "opens",
    EventType.CLICK: "clicks",
}
"""The campaign report's counter of each event type."""
UNSUBSCRIBE_STREAM = "unsubscribe"
UNSUBSCRIBE_REASON = "unsubscribe link"

HEADER = (
    "Email",
    "Urn",
    "CommunicationKey",
    "MessageType",
    "DeliveryDate",
    "ClickUrl",
    "ClickDate",
    "EventTriggeredDate",
    "BounceType",
    "BroadcastId",
)
MESSAGE_TYPES = {
    EventType.SENT: "Send",
    EventType.BOUNCE_HARD: "Bounce",
    EventType.BOUNCE_SOFT: "Bounce",
    EventType.OPEN: "Open",
    EventType.CLICK: "Click",
    EventType.UNSUBSCRIBE: "Unsubscription",
}
MALFORMED_KINDS = (
    "unknown MessageType",
    "bad EventTriggeredDate",
    "wrong field count",
    "Bounce without type",
)
"""The bad file rows, in rotation by the send's bad-row number."""

UNAUTHORIZED = {"WWW-Authenticate": 'Basic realm="Optimizely Campaign"'}


# Settings


def _parse_auth(text: str) -> dict[str, str]:
    """A webhook's ``authentication`` JSON: basicAuth (userName, password) or keyAuth (key, passphrase)."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        raise ValueError("authentication must be JSON") from None
    fields = {"basicAuth": ("userName", "password"), "keyAuth": ("key", "passphrase")}
    if not isinstance(value, dict) or value.get("type") not in fields:
        raise ValueError('authentication needs "type": "basicAuth" or "keyAuth"')
    auth_type = str(value["type"])
    needed = fields[auth_type]
    if not all(isinstance(value.get(k), str) and value[k] for k in needed):
        raise ValueError(f"{auth_type} needs {' and '.join(needed)}")
    return {"type": auth_type, **{k: str(value[k]) for k in needed}}


def _client_ids(value: dict[str, str]) -> dict[str, str]:
    for client in value.values():
        if "/" in client:
            raise ValueError(f"client id {client!r} contains '/'")
    return value


def _list_ids(value: tuple[str, ...]) -> tuple[str, ...]:
    for list_id in value:
        if not list_id.isascii() or not list_id.isdigit():
            raise ValueError(f"recipient list id {list_id!r} is not a number")
    return value


def _processes(value: dict[str, str]) -> dict[str, str]:
    for process, kind in value.items():
        if not process.isascii() or not process.isdigit():
            raise ValueError(f"opt-in process id {process!r} is not a number")
        if kind not in OPT_IN_TYPES:
            raise ValueError(f"opt-in process {process}: type {kind!r} is not one of {sorted(OPT_IN_TYPES)}")
    return value


def _weights(value: dict[str, float]) -> dict[str, float]:
    for source in value:
        if source not in SOURCES:
            raise ValueError(f"unknown source {source!r} (known: {', '.join(SOURCES)})")
    if any(w < 0 or not math.isfinite(w) for w in value.values()) or sum(value.values()) <= 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    return value


class OptimizelySettings(SandboxSettings):
    """The flavor's own settings (``ESPBRIDGE_SANDBOX_OPT_*``)."""

    opt_api_user: str = Field(default="api-user@example.com", min_length=1, description="the API user")
    opt_client_ids: Annotated[Pairs, AfterValidator(_client_ids)] = Field(
        default_factory=dict, description="account=clientId,… (default: the account name)"
    )
    opt_webhook_url: HttpUrl = Field(
        default=None, description="target of webhooks registered at start ({account}, {esp} replaced)"
    )
    opt_webhook_auth: Annotated[str | None, optional(_parse_auth)] = Field(
        default=None, description="their `authentication` JSON"
    )
    opt_webhook_batch: int = Field(default=100, ge=1, description="events per webhook call at most")
    opt_source_weights: Annotated[
        dict[str, float], NoDecode, BeforeValidator(split_pairs), AfterValidator(_weights)
    ] = Field(default_factory=lambda: {"file": 0.6, "api": 0.2, "webhook": 0.2})
    opt_duplicate_rate: Probability = 0.0
    opt_max_concurrent: int = Field(default=10, ge=1, description="in-flight requests per client")
    opt_rate_per_s: float = Field(default=0.0, ge=0.0, description="token bucket per client (0 = off)")
    opt_error_rate: Probability = 0.0
    opt_malformed_every: int = Field(default=0, ge=0, description="a bad row in every n-th file / call")
    opt_recipient_lists: Annotated[CommaList, AfterValidator(_list_ids)] = Field(
        default=("4001", "4002", "4003"),
        description="the recipient lists of every client besides the batches' pool lists",
    )
    opt_optin_processes: Annotated[Pairs, AfterValidator(_processes)] = Field(
        default_factory=lambda: {"100": "single", "101": "confirmed", "102": "double"},
        description="opt-in process id=single|confirmed|double,…",
    )
    opt_list_unsubscribes: bool = Field(
        default=False, description="the unsubscribe list is recipient-list based (else one per client)"
    )

    @property
    def webhook_auth(self) -> dict[str, str] | None:
        """The parsed ``OPT_WEBHOOK_AUTH`` (None: the calls carry no authentication)."""
        return _parse_auth(self.opt_webhook_auth) if self.opt_webhook_auth else None

    def client_id(self, account: str) -> str:
        """The account's ``clientId``."""
        return self.opt_client_ids.get(account, account)


opt_settings = functools.cache(OptimizelySettings)
"""The flavor's settings, read from the environment once."""


# Times


def rest_time(at: float) -> str:
    """An RFC 3339 date-time with milliseconds and the Europe/Berlin offset."""
    return datetime.fromtimestamp(at, BERLIN).isoformat(timespec="milliseconds")


def file_time(at: float) -> str:
    """``dd.MM.yyyy HH:mm:ss`` in Europe/Berlin."""
    return datetime.fromtimestamp(at, BERLIN).strftime(FILE_DATE)


def in_repeated_hour(at: float) -> bool:
    """Whether the local time falls in the hour that occurs twice at the autumn clock change."""
    local = datetime.fromtimestamp(at, BERLIN)
    return local.replace(fold=1 - local.fold).utcoffset() != local.utcoffset()


def decode_tag(tag: str) -> str:
    """The job id a batch ``tag`` carries (``_5F`` → ``_``, ``_2E`` → ``.``, ``_3A`` → ``:``)."""
    return _TAG_CODE_RE.sub(lambda m: TAG_CODES[m.group(0)], tag)


# Saved state


BatchState = Literal["initiated", "has_recipients", "sent", "invalid"]


class SendRun(BaseModel):
    """A started batch: what its engine send is simulated with beyond the engine's own parameters
    (seed, rates, file size), and what its webhook calls and report came to."""

    model_config = ConfigDict(extra="ignore")

    recipients: int
    malformed_every: int
    weights: dict[str, float]
    duplicate_rate: float
    webhook_batch: int
    webhook_types: list[str]
    sent_at: float
    duplicate_of: int | None = None
    """Another batch with this tag was started before: this one is counted but not simulated."""
    send_id: str | None = None
    """The engine send that releases its responses (once handed to the engine)."""
    calls: dict[int, bool] = Field(default_factory=dict)
    """Webhook call number → acknowledged with 2xx (False: finally failed)."""
    report: dict[str, int] = Field(default_factory=dict)


class Batch(BaseModel):
    """A sending batch."""

    model_config = ConfigDict(extra="ignore")

    id: int
    campaign_id: int
    recipient_list_id: int
    tag: str
    job_id: str
    created: float
    state: BatchState = "initiated"
    chunks: dict[str, int] = Field(default_factory=dict)
    """Staged chunk id → recipients that passed pre-validation."""
    run: SendRun | None = None

    def public(self) -> dict[str, Any]:
        """``RestSendingBatch``."""
        return {
            "id": self.id,
            "campaignId": self.campaign_id,
            "recipientListId": self.recipient_list_id,
            "tag": self.tag,
            "chunks": sorted(self.chunks),
            "state": self.state,
        }


class Campaign(BaseModel):
    """A smart campaign: a copy made for a batch, or a master used directly; one mailing each."""

    model_config = ConfigDict(extra="ignore")

    id: int
    name: str
    mailing_id: int
    created: float
    copy_of: int | None = None
    batch_ids: list[int] = Field(default_factory=list)
    started_by: int | None = None
    canceled: float | None = None
    """When ``POST /smartcampaigns/{id}/stop`` cancelled it: it sends nothing more."""


class Webhook(BaseModel):
    """A registered webhook."""

    model_config = ConfigDict(extra="ignore")

    id: int
    type: str
    target_url: str
    authentication: dict[str, str] | None = None
    status: str = "created"
    origin: Literal["api", "settings"] = "api"
    created: float

    def public(self) -> dict[str, Any]:
        """``RestWebhook``; its ``authentication`` shows the type only (``none`` without one), not the
        secret."""
        return {
            "id": self.id,
            "type": self.type,
            "format": "json",
            "targetUrl": self.target_url,
            "authentication": {"type": self.authentication["type"] if self.authentication else "none"},
            "status": self.status,
            "created": rest_time(self.created),
        }


class BlockEntry(BaseModel):
    """A blocklist entry: a pattern of addresses (``*`` any characters, ``?`` one)."""

    model_config = ConfigDict(extra="ignore")

    pattern: str
    reason: str = ""
    created: float

    def public(self) -> dict[str, Any]:
        """``RestBlacklistEntry``."""
        at = rest_time(self.created)
        return {"pattern": self.pattern, "reason": self.reason, "created": at, "modified": at}

    def matches(self, email: str) -> bool:
        """Whether the address falls under the pattern (case-insensitive; a backslash makes ``*``
        or ``?`` literal)."""
        parts = re.split(r"(\\[*?]|[*?])", self.pattern.lower())
        regex = "".join(
            ".*" if part == "*" else "." if part == "?" else re.escape(part.removeprefix("\\"))
            for part in parts
        )
        return re.fullmatch(regex, email.lower()) is not None


class ContactFeed(BaseModel):
    """How far the contact book's feed was reported through webhooks."""

    model_config = ConfigDict(extra="ignore")

    book: str = ""
    seq: int = 0


class OptData(BaseModel):
    """Everything the flavor saves per account."""

    model_config = ConfigDict(extra="ignore")

    version: int = 1
    next_batch: int = 5001
    next_campaign: int = 7001
    next_mailing: int = 8001
    next_list: int = 3001
    next_webhook: int = 1
    batches: dict[int, Batch] = Field(default_factory=dict)
    campaigns: dict[int, Campaign] = Field(default_factory=dict)
    webhooks: dict[int, Webhook] = Field(default_factory=dict)
    blocklist: dict[str, BlockEntry] = Field(default_factory=dict)
    reported: ContactFeed = Field(default_factory=ContactFeed)


class Store:
    """One account's flavor state, its request limits and its webhook HTTP client."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.settings = opt_settings()
        self.client_id = self.settings.client_id(account.name)
        self.path = account.folder / STATE_FILE
        self.data = OptData()
        self.lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()
        self.in_flight = 0
        rate = self.settings.opt_rate_per_s
        self.bucket = TokenBucket(rate, max(1, math.ceil(rate))) if rate else None
        self.faults = random.Random(f"{account.settings.seed}:{account.name}:faults")
        self._http: aiohttp.ClientSession | None = None
        self._members: dict[int, list[dict[str, Any]]] = {}
        self.contact_changes = asyncio.Event()
        """Set when the contact book has a change to report (:func:`report_contacts` waits on it)."""

    def batch_dir(self, batch_id: int) -> Path:
        return self.account.folder / DATA_FOLDER / "batches" / str(batch_id)

    def load(self) -> None:
        """Read the saved state, remove stale temporary files, register the settings' webhooks."""
        if self.path.is_file():
            self.data = OptData.model_validate_json(self.path.read_bytes())
        for stale in (self.account.folder / DATA_FOLDER).glob("batches/*/.*.tmp"):
            stale.unlink(missing_ok=True)
        if self._register_settings_webhooks():
            atomic_write_bytes(self.path, self._dump())

    def _dump(self) -> bytes:
        return orjson.dumps(self.data.model_dump(mode="json"), option=orjson.OPT_INDENT_2)

    async def save(self) -> None:
        """Write the state atomically (the snapshot is taken in the lock, so the last save wins)."""
        async with self._save_lock:
            data = self._dump()
            await asyncio.to_thread(atomic_write_bytes, self.path, data)

    def _register_settings_webhooks(self) -> bool:
        """Webhooks for the six response types and the two opt-in types the sandbox reports to
        ``OPT_WEBHOOK_URL``, activated; earlier settings' ones deleted."""
        url = self.settings.opt_webhook_url
        if url is not None:
            url = url.replace("{account}", self.account.name).replace("{esp}", self.account.settings.esp)
        auth = self.settings.webhook_auth
        changed = False
        for hook in self.data.webhooks.values():
            stale = url is None or (hook.target_url, hook.authentication) != (url, auth)
            if hook.origin == "settings" and hook.status != "deleted" and stale:
                hook.status = "deleted"
                changed = True
        if url is None:
            return changed
        for hook_type in (*WEBHOOK_TYPES, *CONTACT_HOOK_TYPES):
            if any(
                h.origin == "settings" and h.type == hook_type and h.status == "activated"
                for h in self.data.webhooks.values()
            ):
                continue
            hook = Webhook(
                id=self.data.next_webhook,
                type=hook_type,
                target_url=url,
                authentication=auth,
                status="activated",
                origin="settings",
                created=time.time(),
            )
            self.data.next_webhook += 1
            self.data.webhooks[hook.id] = hook
            changed = True
        return changed

    def webhook_for(self, hook_type: str) -> Webhook | None:
        """The newest activated webhook of a type (it receives that type's events)."""
        found = [h for h in self.data.webhooks.values() if h.type == hook_type and h.status == "activated"]
        return max(found, key=lambda h: h.id) if found else None

    def http(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WEBHOOK_TIMEOUT_S))
        return self._http

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()

    @contextlib.asynccontextmanager
    async def admitted(self) -> AsyncIterator[None]:
        """One request inside the limits: in flight (429), the token bucket (429), faults (503)."""
        if self.in_flight >= self.settings.opt_max_concurrent:
            self.account.counters["rate_limited"] += 1
            raise EspError(
                429, "too_many_requests", "Too many requests are used at the same time", {"Retry-After": "1"}
            )
        self.in_flight += 1
        try:
            if self.bucket is not None:
                wait_s = self.bucket.acquire()
                if wait_s > 0:
                    self.account.counters["rate_limited"] += 1
                    raise EspError(
                        429,
                        "too_many_requests",
                        "Too many requests; the request rate is limited",
                        {"Retry-After": str(retry_after_s(wait_s))},
                    )
            if self.settings.opt_error_rate and self.faults.random() < self.settings.opt_error_rate:
                raise EspError(503, "unavailable", "Service temporarily unavailable", {"Retry-After": "1"})
            yield
        finally:
            self.in_flight -= 1

    def campaign_of_mailing(self, mailing_id: int) -> Campaign | None:
        return next((c for c in self.data.campaigns.values() if c.mailing_id == mailing_id), None)

    def started_batch(self, campaign: Campaign) -> Batch | None:
        return self.data.batches.get(campaign.started_by) if campaign.started_by is not None else None

    def batch_of_list(self, list_id: int) -> Batch | None:
        return next((b for b in self.data.batches.values() if b.recipient_list_id == list_id), None)

    async def members(self, batch: Batch) -> list[dict[str, Any]]:
        """The ``RestRecipient``s of a batch's list in ``id`` order: its merged recipients once it
        is sent, none before (the import runs at the start)."""
        if batch.run is None:
            return []
        found = self._members.get(batch.id)
        if found is None:
            at = rest_time(batch.run.sent_at)
            ids = await asyncio.to_thread(_member_ids, self.batch_dir(batch.id) / "recipients.jsonl")
            found = self._members[batch.id] = [{"id": i, "created": at, "modified": at} for i in ids]
        return found

    def send_of(self, batch: Batch) -> SendRecord | None:
        """The engine send of a started batch (None before it is handed over, or for a duplicate)."""
        send_id = batch.run.send_id if batch.run is not None else None
        return self.account.state.sends.get(send_id) if send_id is not None else None

    # Contacts: the account's contact book as Optimizely's recipient lists

    def list_exists(self, list_id: str) -> bool:
        """A recipient list of the client: one of ``OPT_RECIPIENT_LISTS``, or a batch's pool list."""
        if list_id in self.settings.opt_recipient_lists:
            return True
        return list_id.isdigit() and self.batch_of_list(int(list_id)) is not None

    def blocked(self, email: str) -> bool:
        return any(entry.matches(email) for entry in self.data.blocklist.values())

    def unsubscribe_list(self, list_id: str) -> str:
        """The contact book's list that holds a recipient list's unsubscribes (see EVERY_LIST)."""
        return list_id if self.settings.opt_list_unsubscribes else EVERY_LIST

    def unsubscribed(self, list_id: str, email: str) -> ContactRecord | None:
        """The contact's unsubscribe (or hard bounce) that holds for the list, if any."""
        for key in dict.fromkeys((list_id, self.unsubscribe_list(list_id))):
            record = self.account.contacts.get(key, email)
            if record is not None and record.state is ContactState.UNSUBSCRIBED:
                return record
        return None

    def standing(self, list_id: str, email: str) -> str | None:
        """Why the contact cannot be mailed on the list (``validationFailedReason``), or None."""
        if self.blocked(email):
            return "blacklisted"
        stopped = self.unsubscribed(list_id, email)
        if stopped is not None:
            return "bounced" if stopped.via is Via.BOUNCE else "unsubscribed"
        record = self.account.contacts.get(list_id, email)
        if record is None or record.state is not ContactState.SUBSCRIBED:
            return "not_found"
        return None

    def refusal(self, list_id: str, email: str) -> str | None:
        """Why the contact cannot be added to the list: blocklisted, bounced, unsubscribed, or on
        it already (subscribed or pending); None when it can."""
        reason = self.standing(list_id, email)
        if reason != "not_found":
            return reason or "exists already"
        record = self.account.contacts.get(list_id, email)
        if record is not None and record.state is ContactState.PENDING:
            return "exists already (waiting for the double opt-in confirmation)"
        return None


def _member_ids(path: Path) -> list[str]:
    with path.open("rb") as people:
        return sorted(str(orjson.loads(line)["id"]) for line in people)


_STORES: dict[Path, Store] = {}


def store_of(account: Account) -> Store:
    """The account's flavor state, loaded at the first use."""
    found = _STORES.get(account.folder)
    if found is None:
        found = Store(account)
        found.load()
        _STORES[account.folder] = found
    return found


# Requests


ERRORS = ErrorStyle(lambda e: {"status": e.status, "message": e.message})
"""Optimizely Campaign's error body: ``{"status", "message"}``."""


def _basic_ok(request: web.Request) -> bool:
    credentials = basic_credentials(request)
    if credentials is None:
        return False
    user, password = credentials
    user_ok = hmac.compare_digest(user.encode(), opt_settings().opt_api_user.encode())
    return user_ok and request.app[CONTEXT].token_matches(password)


def _account(request: web.Request) -> Account:
    """The account of the path's ``clientId`` once the Basic credentials are right (401, then 403)."""
    if not _basic_ok(request):
        raise EspError(401, "unauthorized", "Unauthorized", UNAUTHORIZED)
    client = request.match_info.get("clientId", "")
    settings = opt_settings()
    for name, account in request.app[CONTEXT].accounts.items():
        if settings.client_id(name) == client:
            return account
    raise EspError(403, "forbidden", f"Access to client {client} is not allowed")


Handler = Callable[[web.Request, Store], Awaitable[web.StreamResponse]]


def endpoint(
    handler: Handler, limited: bool = True
) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A route: Basic auth (401), the client (403), the limits and faults (429, 503), then the call.

    Errors answer ``{"status", "message"}``.
    """

    async def handle(request: web.Request) -> web.StreamResponse:
        store = store_of(_account(request))
        if not limited:
            return await handler(request, store)
        async with store.admitted():
            return await handler(request, store)

    return ERRORS.guard(handle)


def _int(text: str | None, name: str, default: int) -> int:
    if text is None or text == "":
        return default
    if not text.isascii() or not text.isdigit():
        raise bad_request(f"{name} must be a non-negative integer")
    return int(text)


@dataclass(frozen=True)
class Window:
    """The part of a list that ``offset``/``limit`` (1 to 9999) ask for."""

    offset: int
    limit: int
    elements: list[Any]


def _window(request: web.Request, elements: list[Any]) -> Window:
    offset = _int(request.query.get("offset"), "offset", 0)
    limit = _int(request.query.get("limit"), "limit", DEFAULT_LIMIT)
    if not 1 <= limit <= MAX_LIMIT:
        raise bad_request(f"limit must be from 1 to {MAX_LIMIT} (less than 10000)")
    return Window(offset, limit, elements[offset : offset + limit])


def _page(request: web.Request, elements: list[Any]) -> web.Response:
    """The window asked for in the collection envelope (without ``links``, which the OpenAPI
    document marks write-only: never in an answer)."""
    window = _window(request, elements)
    page = window.elements
    return json_response(
        {"elements": page, "count": len(page), "offset": window.offset, "limit": window.limit}
    )


def _path_int(request: web.Request, name: str, what: str) -> int:
    text = request.match_info[name]
    if not text.isascii() or not text.isdigit():
        raise not_found(f"no {what} {text}")
    return int(text)


def _batch(request: web.Request, store: Store) -> Batch:
    batch_id = _path_int(request, "batchId", "batch")
    return found(store.data.batches.get(batch_id), f"no batch {batch_id}")


async def _json_body(request: web.Request) -> Any:
    """The JSON body, or None when there is none (a body over 64 MiB is 413)."""
    parts: list[bytes] = []
    size = 0
    while part := await request.content.readany():
        size += len(part)
        if size > MAX_BODY:
            raise EspError(413, "too_large", "the body is too large")
        parts.append(part)
    raw = b"".join(parts)
    if not raw.strip():
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise bad_request("the body is not JSON") from None


# Batches

Recipient = dict[str, Any]


def _valid_email(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    local, at, domain = value.partition("@")
    return bool(at) and bool(local.strip()) and bool(domain.strip())


def prevalidate(items: Iterable[Any]) -> list[Recipient]:
    """The recipients of a chunk that pass: a non-empty ``id`` not earlier in the chunk and a
    ``data.email`` with text on both sides of an ``@``. Attribute values become text (null: left out)."""
    seen: set[str] = set()
    passed: list[Recipient] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        rid = item.get("id")
        if not isinstance(rid, str) or not rid:
            continue
        earlier = rid in seen
        seen.add(rid)
        data = item.get("data")
        if earlier or not isinstance(data, dict) or not _valid_email(data.get("email")):
            continue
        attrs = {
            str(k): v if isinstance(v, str) else orjson.dumps(v).decode()
            for k, v in data.items()
            if v is not None
        }
        passed.append({"id": rid, "data": attrs})
    return passed


def _chunk_of(body: Any) -> tuple[str, list[Recipient]]:
    """A PUT body's chunk id and its passing recipients; 400 if there is no usable body."""
    if not isinstance(body, dict):
        raise bad_request("the body must be a JSON object with chunk and recipients")
    chunk = body.get("chunk")
    if not isinstance(chunk, str) or not CHUNK_RE.fullmatch(chunk):
        raise bad_request("chunk must match [A-Za-z0-9_-]{1,250}")
    items = body.get("recipients", [])
    if not isinstance(items, list):
        raise bad_request("recipients must be a list")
    return chunk, prevalidate(items)


async def _stage(store: Store, batch: Batch, chunk: str, passed: list[Recipient]) -> None:
    """Save a chunk (replacing one with the same id); the caller holds the store's lock."""
    if batch.state in ("sent", "invalid"):
        raise conflict(f"batch {batch.id} is {batch.state}")
    path = store.batch_dir(batch.id) / f"chunk-{chunk}.json"

    def write() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, orjson.dumps(passed))

    await asyncio.to_thread(write)
    batch.chunks[chunk] = len(passed)
    if batch.state == "initiated":
        batch.state = "has_recipients"
    await store.save()


def _form_value(form: Mapping[str, Any], name: str) -> str | None:
    value = form.get(name)
    return value.strip() if isinstance(value, str) and value.strip() else None


async def create_batch(request: web.Request, store: Store) -> web.Response:
    """``POST /sending/batches`` (multipart: ``campaign``, ``campaignAction``, ``tag``) → 201."""
    if request.content_type != "multipart/form-data":
        raise EspError(415, "unsupported_media_type", "batch creation takes multipart/form-data")
    form = await request.post()
    campaign_text, tag = _form_value(form, "campaign"), _form_value(form, "tag")
    action = _form_value(form, "campaignAction") or "copy"
    if campaign_text is None or tag is None:
        raise bad_request("campaign and tag are required")
    if not campaign_text.isascii() or not campaign_text.isdigit():
        raise bad_request("campaign must be the id of a master campaign")
    if action not in ("use", "copy"):
        raise bad_request("campaignAction must be use or copy")
    job_id = decode_tag(tag)
    if not TAG_RE.fullmatch(tag) or not EXTERNAL_ID_RE.fullmatch(job_id):
        raise bad_request("tag must match [A-Za-z0-9_-]{1,250}")
    master = int(campaign_text)
    async with store.lock:
        data = store.data
        known = data.campaigns.get(master)
        if known is not None and known.copy_of is not None:
            raise bad_request(f"campaign {master} is not a master campaign")
        now = time.time()
        if action == "use":
            if known is not None and known.started_by is not None:
                raise conflict(f"campaign {master} is already finished")
            campaign = known or Campaign(
                id=master, name=f"Campaign {master}", mailing_id=data.next_mailing, created=now
            )
            if known is None:
                data.next_mailing += 1
        else:
            while data.next_campaign in data.campaigns:
                data.next_campaign += 1
            campaign = Campaign(
                id=data.next_campaign,
                name=f"Campaign {master} ({tag})",
                mailing_id=data.next_mailing,
                created=now,
                copy_of=master,
            )
            data.next_campaign += 1
            data.next_mailing += 1
        data.campaigns[campaign.id] = campaign
        while str(data.next_list) in store.settings.opt_recipient_lists:
            data.next_list += 1  # the pool's lists are not the client's own
        batch = Batch(
            id=data.next_batch,
            campaign_id=campaign.id,
            recipient_list_id=data.next_list,
            tag=tag,
            job_id=job_id,
            created=now,
        )
        data.next_batch += 1
        data.next_list += 1
        data.batches[batch.id] = batch
        campaign.batch_ids.append(batch.id)
        await store.save()
    log.info("batch created", extra={"account": store.account.name, "batch_id": batch.id, "job_id": job_id})
    return json_response(batch.public(), 201)


async def list_batches(request: web.Request, store: Store) -> web.Response:
    """``GET /sending/batches``: ascending ``id``, paged."""
    return _page(request, [store.data.batches[i].public() for i in sorted(store.data.batches)])


async def get_batch(request: web.Request, store: Store) -> web.Response:
    """``GET /sending/batches/{id}``."""
    return json_response(_batch(request, store).public())


async def put_chunk(request: web.Request, store: Store) -> web.Response:
    """``PUT /sending/batches/{id}``: stage (or replace) a chunk; ``count`` = recipients that passed."""
    batch = _batch(request, store)
    body = await _json_body(request)
    if body is None:
        raise bad_request("a chunk body is required")
    chunk, passed = _chunk_of(body)
    async with store.lock:
        await _stage(store, batch, chunk, passed)
    return json_response({"chunk": chunk, "count": len(passed)})


def _list_of(batch: Batch) -> str:
    """The engine import of a started batch's recipients."""
    return f"batch-{batch.id}"


def _merge(store: Store, batch: Batch) -> int:
    """Write the batch's recipients in chunk order (an id kept from its lowest chunk); how many.

    Their attributes go to the batch's folder, (email, id) to the engine's store of its import.
    """
    folder = store.batch_dir(batch.id)
    seen: set[str] = set()
    emails: list[str] = []
    with (
        atomic_writer(folder / "recipients.jsonl") as people,
        recipient_store(store.account.list_store(_list_of(batch))) as add,
    ):
        for chunk in sorted(batch.chunks):
            for person in orjson.loads((folder / f"chunk-{chunk}.json").read_bytes()):
                if person["id"] in seen:
                    continue
                seen.add(person["id"])
                people.write(orjson.dumps(person).decode() + "\n")
                add(person["data"]["email"], person["id"])
                emails.append(person["data"]["email"])
    # the pool list holds them now: an unsubscribe by link has a contact to change
    store.account.contacts.add_subscribed(str(batch.recipient_list_id), emails, via=Via.API, reason="batch")
    return len(seen)


async def start_send(store: Store, batch: Batch) -> None:
    """Hand a started batch to the engine: its send starts once the campaign was ``activated`` for
    ``IMPORT_DELAY_S``, and releases through :class:`OptimizelyRelease`. Again: nothing new."""
    run, account = batch.run, store.account
    assert run is not None
    if store.data.campaigns[batch.campaign_id].canceled is not None:
        return  # stopped before its send was handed over
    mailing = store.data.campaigns[batch.campaign_id].mailing_id
    await account.imported_list(_list_of(batch), run.recipients)
    starts = datetime.fromtimestamp(run.sent_at + account.settings.import_delay_s, UTC)
    record, _ = await account.create_send(
        _list_of(batch), str(mailing), batch.job_id, starts, {BATCH: str(batch.id)}
    )
    run.send_id = record.send_id
    await store.save()


async def start_batch(request: web.Request, store: Store) -> web.Response:
    """``POST /sending/batches/{id}``: 202, the batch is ``sent``; the campaign starts in the background."""
    batch = _batch(request, store)
    body = await _json_body(request)
    final = _chunk_of(body) if body is not None else None
    account = store.account
    async with store.lock:
        if batch.state == "sent":
            raise conflict(f"batch {batch.id} was already sent")
        if final is not None:
            await _stage(store, batch, *final)
        if batch.state == "invalid":
            raise conflict(f"batch {batch.id} is invalid")
        if not batch.chunks:
            raise conflict(f"batch {batch.id} has no chunks")
        campaign = store.data.campaigns[batch.campaign_id]
        if campaign.started_by is not None:
            raise conflict(f"campaign {campaign.id} is invalid: it was started already")
        count = await asyncio.to_thread(_merge, store, batch)
        if count == 0:
            batch.state = "invalid"
            await store.save()
            raise conflict(f"batch {batch.id} has no valid recipients")
        earlier = next(
            (
                b.id
                for b in store.data.batches.values()
                if b.job_id == batch.job_id and b.state == "sent" and b.id != batch.id
            ),
            None,
        )
        settings = store.settings
        hook_types = sorted(t for t in WEBHOOK_TYPES if store.webhook_for(t) is not None)
        batch.run = SendRun(
            recipients=count,
            malformed_every=settings.opt_malformed_every,
            weights=dict(settings.opt_source_weights),
            duplicate_rate=settings.opt_duplicate_rate,
            webhook_batch=settings.opt_webhook_batch,
            webhook_types=hook_types,
            sent_at=time.time(),
            duplicate_of=earlier,
        )
        batch.state = "sent"
        campaign.started_by = batch.id
        await store.save()
    log.info(
        "batch sent",
        extra={"account": account.name, "batch_id": batch.id, "job_id": batch.job_id, "recipients": count},
    )
    if earlier is None:
        await start_send(store, batch)
    else:
        log.warning(
            "a second batch of a job was started; not simulated again",
            extra={"account": account.name, "batch_id": batch.id, "first_batch_id": earlier},
        )
    return web.Response(status=202)


# Campaigns


def campaign_status(store: Store, campaign: Campaign) -> str:
    """``activationRequired`` until a batch starts it, then ``activated`` → ``running`` → ``finished``
    (or ``canceled``, stopped on the way)."""
    if campaign.canceled is not None:
        return "canceled"
    batch = store.started_batch(campaign)
    if batch is None or batch.run is None:
        batches = [store.data.batches[i] for i in campaign.batch_ids]
        if batches and all(b.state == "invalid" for b in batches):
            return "invalid"
        return "activationRequired"
    if batch.run.duplicate_of is not None:
        return "canceled"
    record = store.send_of(batch)
    if record is None or record.started_at is None:
        return "activated"
    if record.finished_at is None:
        return "running"
    return "finished"


def _campaign(request: web.Request, store: Store) -> Campaign:
    campaign_id = _path_int(request, "campaignId", "campaign")
    return found(store.data.campaigns.get(campaign_id), f"no campaign {campaign_id}")


CANCELLABLE = ("activated", "running", "paused")
"""The statuses a Smart Campaign can be cancelled from: started, not finished."""


async def stop_campaign(request: web.Request, store: Store) -> web.Response:
    """``POST /smartcampaigns/{id}/stop``: 200 with the campaign, ``canceled``, while it is started
    and its send has not written its first step (nothing is sent); 409 otherwise."""
    campaign = _campaign(request, store)
    async with store.lock:
        status = campaign_status(store, campaign)
        if status not in CANCELLABLE:
            raise conflict(
                f"campaign {campaign.id} is {status}: it can be cancelled once started, until it finished"
            )
        batch = store.started_batch(campaign)
        record = store.send_of(batch) if batch is not None else None
        if (
            record is not None
            and (await store.account.cancel_send(record.send_id)).state is not SendState.CANCELLED
        ):
            raise conflict(f"campaign {campaign.id} is sending its last mails: it can no longer be cancelled")
        campaign.canceled = time.time()
        await store.save()
    log.info("campaign cancelled", extra={"account": store.account.name, "campaign_id": campaign.id})
    return await get_campaign(request, store)


async def get_campaign(request: web.Request, store: Store) -> web.Response:
    """``GET /smartcampaigns/{id}``; ``started`` and ``finished`` only once they happened (the
    OpenAPI document types them as date-times, never null)."""
    campaign = _campaign(request, store)
    status = campaign_status(store, campaign)
    batch = store.started_batch(campaign)
    record = store.send_of(batch) if batch is not None else None
    body: dict[str, Any] = {
        "id": campaign.id,
        "name": campaign.name,
        "status": status,
        "type": "regular",
        "created": rest_time(campaign.created),
        "messages": [{"mailingId": campaign.mailing_id, "status": status, "mediaType": "EMAIL"}],
    }
    moments = {"started": record.started_at, "finished": record.finished_at} if record is not None else {}
    body |= {name: rest_time(parse_utc(at).timestamp()) for name, at in moments.items() if at is not None}
    return json_response(body)


async def campaign_report(request: web.Request, store: Store) -> web.Response:
    """``GET /smartcampaigns/{id}/report``: aggregates of the responses released so far."""
    campaign = _campaign(request, store)
    batch = store.started_batch(campaign)
    run = batch.run if batch is not None else None
    total = run.recipients if run is not None else 0
    report: dict[str, int] = dict(run.report) if run is not None else {}
    return json_response(
        {
            "campaignId": campaign.id,
            "campaignName": campaign.name,
            "recipients": {
                "net": total,
                "total": total,
                "skipped": 0,
                "inQueue": max(0, total - report.get("sent", 0)),
            },
            "bounces": {"hard": report.get("hard", 0), "soft": report.get("soft", 0)},
            "unsubscribes": report.get("unsubscribes", 0),
            "opens": {"total": report.get("opens", 0), "unique": report.get("opens_unique", 0)},
            "clicks": {"total": report.get("clicks", 0), "unique": report.get("clicks_unique", 0)},
        }
    )


# Bounces and unsubscribes


def _created_key(item: dict[str, Any]) -> tuple[datetime, str]:
    return datetime.fromisoformat(item["created"]), str(item["recipientId"])


def _released(store: Store, stream: str, mailing_id: int | None) -> list[dict[str, Any]]:
    """A stream's released elements of one mailing (in release order) or of all, by ``created``."""
    out: list[dict[str, Any]] = []
    for campaign in store.data.campaigns.values():
        if mailing_id is not None and campaign.mailing_id != mailing_id:
            continue
        batch = store.started_batch(campaign)
        record = store.send_of(batch) if batch is not None else None
        if record is None:
            continue
        event_log = store.account.event_log(record.send_id)
        out.extend(event_log.page(stream, 0, event_log.total(stream)))
    if mailing_id is None:
        out.sort(key=_created_key)
    return out


async def get_responses(request: web.Request, store: Store) -> web.Response:
    """``GET /responses?category=&mailingId=&recipientIds=&limit=``: the first ``limit`` (100 by
    default, at most 10000) in ascending ``created``. There is no ``offset``: a parameter the
    document does not name is 400. ``recipientIds`` is comma-separated (also given repeated)."""
    query = request.query
    unknown = sorted(set(query) - RESPONSE_PARAMETERS)
    if unknown:
        raise bad_request(
            f"{', '.join(unknown)}: not a parameter of GET /responses "
            f"(it takes {', '.join(sorted(RESPONSE_PARAMETERS))})"
        )
    category = query.get("category")
    if category not in RESPONSE_CATEGORIES:
        raise bad_request(f"category must be one of {', '.join(RESPONSE_CATEGORIES)}")
    limit = _int(query.get("limit"), "limit", DEFAULT_LIMIT)
    if not 1 <= limit <= MAX_RESPONSES_LIMIT:
        raise bad_request(f"limit must be from 1 to {MAX_RESPONSES_LIMIT}")
    wanted = {r for value in query.getall("recipientIds", []) for r in value.split(",") if r}
    mailing_text = query.get("mailingId")
    if not mailing_text and not wanted:
        raise bad_request("category and mailingId or recipientIds are required")
    mailing_id: int | None = None
    campaigns = list(store.data.campaigns.values())
    if mailing_text:
        mailing_id = _int(mailing_text, "mailingId", 0)
        campaign = store.campaign_of_mailing(mailing_id)
        if campaign is None:
            raise not_found(f"no mailing {mailing_id}")
        campaigns = [campaign]
    if wanted:
        known: set[str] = set()
        for campaign in campaigns:
            batch = store.started_batch(campaign)
            known.update(r["id"] for r in (await store.members(batch) if batch is not None else ()))
        wanted &= known
        if not wanted:
            raise not_found("none of the recipientIds was found")
    elements = _released(store, category, mailing_id) if category in CATEGORY.values() else []
    if wanted:
        elements = [e for e in elements if e["recipientId"] in wanted]
    page = elements[:limit]
    return json_response({"elements": page, "count": len(page), "offset": 0, "limit": limit})


async def get_recipients(request: web.Request, store: Store) -> web.Response:
    """``GET /recipients/{listId}?offset=&limit=&sort=id&direction=``: a batch's list, its
    recipients by ``id`` (``RestRecipient``); an unknown list is 404."""
    list_id = _path_int(request, "listId", "recipient list")
    batch = store.batch_of_list(list_id)
    if batch is None and not store.list_exists(str(list_id)):
        raise not_found(f"no recipient list {list_id}")
    query = request.query
    unsimulated = sorted(UNSIMULATED_RECIPIENT_PARAMETERS & set(query))
    if unsimulated:
        raise bad_request(f"the sandbox does not simulate {', '.join(unsimulated)}")
    if query.get("sort", "id") not in RECIPIENT_SORTS:
        raise bad_request("sort must be id")
    direction = query.get("direction", "ASC")
    if direction not in ("ASC", "DESC"):
        raise bad_request("direction must be ASC or DESC")
    if batch is not None:
        members = await store.members(batch)
    else:  # a list of the client's: its subscribed and unsubscribed recipients (pending: not yet)
        members = [
            _recipient_body(r)
            for r in store.account.contacts.records(str(list_id))
            if r.state in (ContactState.SUBSCRIBED, ContactState.UNSUBSCRIBED)
        ]
    return _page(request, members[::-1] if direction == "DESC" else members)


async def get_unsubscribes(request: web.Request, store: Store) -> web.Response:
    """``GET /unsubscribes?sort=created&direction=ASC|DESC`` (default ASC): every mailing's and the
    contacts' (made through the API or a link), paged; ``recipientIds`` and ``recipientListId``
    narrow them."""
    query = request.query
    if query.get("sort", "created") != "created":
        raise bad_request("sort must be created")
    direction = query.get("direction", "ASC").upper()
    if direction not in ("ASC", "DESC"):
        raise bad_request("direction must be ASC or DESC")
    if query.get("mediaType", "EMAIL") != "EMAIL":
        raise bad_request("the sandbox simulates the EMAIL unsubscribe list only")
    elements = [*_released(store, UNSUBSCRIBE_STREAM, None), *_book_unsubscribes(store)]
    elements.sort(key=_created_key)
    wanted = set(_ids(query.getall("recipientIds", [])))
    if wanted:
        elements = [e for e in elements if str(e["recipientId"]).lower() in wanted]
    if query.get("recipientListId"):
        elements = [e for e in elements if str(e.get("recipientListId")) == query["recipientListId"]]
    if direction == "DESC":
        elements.reverse()
    return _page(request, elements)


# Recipients of the client's recipient lists (the account's contact book)


def _recipient_list(request: web.Request, store: Store) -> str:
    """The path's recipient list: 404 when the client has no such list."""
    list_id = request.match_info["listId"]
    if not store.list_exists(list_id):
        raise not_found(f"no recipient list {list_id}")
    return list_id


def _process(value: Any, store: Store, status: int) -> str | None:
    """The type of the opt-in process ``value`` names (None without one); ``status`` for an unknown one."""
    if value is None or value == "":
        return None
    kind = store.settings.opt_optin_processes.get(str(value))
    if kind is None:
        raise EspError(status, "bad_optin_process", f"no opt-in process {value} of this client")
    return kind


def _text(value: Any) -> str:
    """An attribute value as the list stores it: text (other JSON values as JSON)."""
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _recipient_body(record: ContactRecord, opt_in_mail: str | None = None) -> dict[str, Any]:
    """``RestRecipient`` of a contact on a list (its id is its address)."""
    at = rest_time(record.changed_at)
    body = {"id": record.email, "created": at, "modified": at}
    return body | ({"optInMailId": opt_in_mail} if opt_in_mail else {})


def _added_state(kind: str | None) -> ContactState:
    """A new recipient through a double opt-in process waits for its confirmation."""
    return ContactState.PENDING if kind == "double" else ContactState.SUBSCRIBED


async def add_recipients(request: web.Request, store: Store) -> web.Response:
    """``PUT /recipients/{listId}``: add many (``optinProcessId`` optional; an unknown one is
    409); ``failedIds``: no address, blocklisted, bounced, unsubscribed, or on the list already."""
    list_id = _recipient_list(request, store)
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("recipients"), list):
        raise bad_request("the body must be a JSON object with recipients")
    kind = _process(body.get("optinProcessId"), store, 409)
    changes: list[ContactChange] = []
    failed: list[str] = []
    async with store.lock:
        taken: set[str] = set()
        for item in body["recipients"]:
            rid = item.get("id") if isinstance(item, dict) else None
            if not isinstance(rid, str) or not rid:
                continue  # nothing to name it by
            address = item.get("address") or rid
            email = address.strip().lower() if isinstance(address, str) else ""
            data = item.get("data")
            fields = (
                {str(k): _text(v) for k, v in data.items() if v is not None} if isinstance(data, dict) else {}
            )
            if not valid_email(email) or email in taken or store.refusal(list_id, email) is not None:
                failed.append(rid)
                continue
            taken.add(email)
            changes.append(ContactChange(list_id, email, _added_state(kind), "api", Via.API, fields))
        await asyncio.to_thread(store.account.contacts.set_many, changes)
    return json_response({"count": len(changes), "failedIds": failed})


async def add_recipient(request: web.Request, store: Store) -> web.Response:
    """``POST /recipients/{listId}`` (form ``recipientId``, ``address``, ``data.<attribute>``,
    ``optinProcessId``, ``returnOptInMailId``): 201, or 202 pending through a double opt-in
    process; 409 blocklisted, bounced, unsubscribed or on the list already."""
    list_id = _recipient_list(request, store)
    form = await request.post()
    rid = _form_value(form, "recipientId")
    if rid is None:
        raise bad_request('"recipientId" is required')
    email = (_form_value(form, "address") or rid).lower()
    if not valid_email(email):
        raise bad_request(f"{email!r} is not a valid address")
    kind = _process(_form_value(form, "optinProcessId"), store, 400)
    fields = {k.removeprefix("data."): str(v) for k, v in form.items() if k.startswith("data.")}
    async with store.lock:
        refusal = store.refusal(list_id, email)
        if refusal is not None:
            raise conflict(f"{email} cannot be added to recipient list {list_id}: {refusal}")
        event = await asyncio.to_thread(
            store.account.contacts.set, list_id, email, _added_state(kind), reason="api", fields=fields
        )
    mail = None
    if _form_value(form, "returnOptInMailId") == "true" and kind in ("double", "confirmed"):
        mail = f"optin-{store.account.contacts.event_id(event)}"
    return json_response(_recipient_body(event.record, mail), 202 if kind == "double" else 201)


async def modify_recipients(request: web.Request, store: Store) -> web.Response:
    """``PUT /recipients/{listId}/modify`` (``updateMode`` set, prepend or append): ``failedIds``
    are the ids not on the list."""
    list_id = _recipient_list(request, store)
    body = await _json_body(request)
    if not isinstance(body, dict) or not isinstance(body.get("recipients"), list):
        raise bad_request("the body must be a JSON object with recipients")
    mode = body.get("updateMode", "set")
    if mode not in ("set", "prepend", "append"):
        raise bad_request("updateMode must be set, prepend or append")
    book = store.account.contacts
    changes: list[ContactChange] = []
    failed: list[str] = []
    async with store.lock:
        for item in body["recipients"]:
            rid = item.get("id") if isinstance(item, dict) else None
            if not isinstance(rid, str) or not rid:
                continue
            record = book.get(list_id, rid)
            data = item.get("data") if isinstance(item.get("data"), dict) else {}
            if record is None or record.state is ContactState.REMOVED:
                failed.append(rid)
                continue
            fields = {}
            for name, value in data.items():
                text, old = _text(value), record.fields.get(str(name), "")
                fields[str(name)] = text if mode == "set" else text + old if mode == "prepend" else old + text
            changes.append(ContactChange(list_id, record.email, record.state, record.reason, Via.API, fields))
        await asyncio.to_thread(book.set_many, changes)
    return json_response({"count": len(changes), "failedIds": failed})


async def delete_recipients(request: web.Request, store: Store) -> web.Response:
    """``DELETE /recipients/{listId}?recipientIds=…|removalType=…``: 204; as documented, neither
    deletes every recipient of the list; both is 400."""
    list_id = _recipient_list(request, store)
    query = request.query
    ids = [i.strip().lower() for v in query.getall("recipientIds", []) for i in v.split(",") if i.strip()]
    removal = query.get("removalType")
    if ids and removal is not None:
        raise bad_request('"recipientIds" and "removalType" cannot be combined')
    if "mediaType" in query and removal is None:
        raise bad_request('"mediaType" goes with "removalType" only')
    if removal is not None and removal not in REMOVAL_TYPES:
        raise bad_request(f"removalType must be one of {', '.join(REMOVAL_TYPES)}")
    book = store.account.contacts
    async with store.lock:
        on_list = [r for r in book.records(list_id) if r.state is not ContactState.REMOVED]
        if ids:
            wanted = set(ids)
            on_list = [r for r in on_list if r.email in wanted]
        elif removal is not None:
            on_list = [r for r in on_list if store.standing(list_id, r.email) == REMOVAL_TYPES[removal]]
        changes = [ContactChange(list_id, r.email, ContactState.REMOVED, "api", Via.API) for r in on_list]
        await asyncio.to_thread(book.set_many, changes)
    return web.Response(status=204)


async def recipient_validity(request: web.Request, store: Store) -> web.Response:
    """``GET /recipients?recipientId=&recipientListIds=``: per list of the client, whether the
    recipient can be mailed there and why not (unknown lists are left out)."""
    recipient = request.query.get("recipientId")
    if not recipient:
        raise bad_request("The required parameter 'recipientId' is not provided.")
    media = request.query.get("mediaType", "EMAIL")
    lists = [i.strip() for v in request.query.getall("recipientListIds", []) for i in v.split(",")]
    answer = []
    for list_id in dict.fromkeys(i for i in lists if i):
        if not store.list_exists(list_id):
            continue
        reason = store.standing(list_id, recipient.lower()) if media == "EMAIL" else "not_found"
        entry: dict[str, Any] = {"recipientListId": int(list_id), "valid": reason is None}
        answer.append(entry | ({"validationFailedReason": reason} if reason else {}))
    return json_response(answer)


def _unsubscribe_scope(store: Store, values: Mapping[str, Any]) -> str:
    """The recipient list an unsubscribe call names, checked against the client's setting: a
    recipient-list based unsubscribe list needs one, the client's own refuses one."""
    named = values.get("recipientListId")
    if store.settings.opt_list_unsubscribes:
        if not named:
            raise bad_request("recipientListId is required: unsubscribes are recipient-list based")
        if not store.list_exists(str(named)):
            raise not_found(f"no recipient list {named}")
        return str(named)
    if named:
        raise bad_request("recipientListId is only for recipient-list based unsubscribes (not set up)")
    return EVERY_LIST


def _ids(values: Any) -> list[str]:
    return [i.strip().lower() for v in values for i in str(v).split(",") if i.strip()]


def _unsubscribed_everywhere(store: Store, email: str, reason: str) -> list[ContactChange]:
    """A contact on the client's unsubscribe list is unsubscribed on each list it is on."""
    return [
        ContactChange(r.list, email, ContactState.UNSUBSCRIBED, reason, Via.API)
        for r in store.account.contacts.records(email=email)
        if r.list != EVERY_LIST and r.state in (ContactState.SUBSCRIBED, ContactState.PENDING)
    ]


async def create_unsubscribes(request: web.Request, store: Store) -> web.Response:
    """``POST /unsubscribes`` (form ``recipientIds``, ``mediaType``, ``recipientListId``): 200 with
    the ids added and those not (already unsubscribed, not an address) once one was added; 400
    when none was, or over 5000 ids."""
    form = await request.post()
    if form.get("mailIds"):
        raise bad_request("the sandbox does not simulate unsubscribes by mailIds")
    if form.get("mediaType", "EMAIL") != "EMAIL":
        raise bad_request("the sandbox simulates the EMAIL unsubscribe list only")
    ids = list(dict.fromkeys(_ids(form.getall("recipientIds", []))))
    if not ids or len(ids) > MAX_UNSUBSCRIBE_IDS:
        raise bad_request(f"recipientIds must name 1 to {MAX_UNSUBSCRIBE_IDS} recipients")
    scope = _unsubscribe_scope(store, form)
    book = store.account.contacts
    async with store.lock:
        added = [i for i in ids if valid_email(i) and store.unsubscribed(scope, i) is None]
        changes = [ContactChange(scope, i, ContactState.UNSUBSCRIBED, "api", Via.API) for i in added]
        if scope == EVERY_LIST:
            changes += [c for i in added for c in _unsubscribed_everywhere(store, i, "api")]
        await asyncio.to_thread(book.set_many, changes)
    if not added:
        raise bad_request("The recipients could not be unsubscribed.")
    return json_response({"successfulIds": added, "unsuccessfulIds": [i for i in ids if i not in added]})


async def remove_unsubscribes(request: web.Request, store: Store) -> web.Response:
    """``DELETE /unsubscribes?recipientIds=…``: lifts their unsubscribes (a recipient on a list
    is mailed there again); 204, or 404 when none of them was unsubscribed."""
    ids = _ids(request.query.getall("recipientIds", []))
    if not ids:
        raise bad_request('"recipientIds" is required')
    scope = _unsubscribe_scope(store, request.query)
    book = store.account.contacts
    async with store.lock:
        lifted = [
            r
            for i in ids
            for r in book.records(email=i)
            if r.state is ContactState.UNSUBSCRIBED
            and r.via is not Via.BOUNCE  # a hard bounce is no unsubscribe to lift
            and scope in (EVERY_LIST, r.list)
        ]
        # a list's unsubscribe goes back to subscribed; the client's own entry is taken off
        changes = [
            ContactChange(
                r.list,
                r.email,
                ContactState.REMOVED if r.list == EVERY_LIST else ContactState.SUBSCRIBED,
                "api",
                Via.API,
            )
            for r in lifted
        ]
        await asyncio.to_thread(book.set_many, changes)
    if not lifted:
        raise not_found("Unsubscribe could not be found for the indicated recipient IDs")
    return web.Response(status=204)


def _book_unsubscribes(store: Store) -> list[dict[str, Any]]:
    """``RestUnsubscribe``s of the contact book: every unsubscribed contact, with its list when the
    unsubscribe list is recipient-list based."""
    out = []
    for record in store.account.contacts.records():
        if record.state is not ContactState.UNSUBSCRIBED or record.via is Via.BOUNCE:
            continue
        if record.list != EVERY_LIST and not record.list.isdigit():
            continue  # a list the control route named that Optimizely could not have
        if (record.list == EVERY_LIST) == store.settings.opt_list_unsubscribes:
            continue  # a list's record mirrors the client's entry, or the client keeps none
        entry: dict[str, Any] = {"recipientId": record.email}
        if record.list != EVERY_LIST:
            entry["recipientListId"] = int(record.list)
        entry |= {"reason": record.reason, "created": rest_time(record.changed_at), "mediaType": "EMAIL"}
        out.append(entry)
    return out


async def create_blocklist_entry(request: web.Request, store: Store) -> web.Response:
    """``POST /blacklistentries`` (form ``entry``, ``reason``): 201 ``RestBlacklistEntry``."""
    form = await request.post()
    pattern = _form_value(form, "entry")
    if pattern is None:
        raise bad_request("A required value for the entry is not provided: entry")
    async with store.lock:
        entry = BlockEntry(pattern=pattern, reason=_form_value(form, "reason") or "", created=time.time())
        store.data.blocklist[pattern.lower()] = entry
        await store.save()
    return json_response(entry.public(), 201)


# Webhooks (registration)


async def create_webhook(request: web.Request, store: Store) -> web.Response:
    """``POST /webhooks`` (form: ``type``, ``format=json``, ``targetUrl``, ``authentication``) → 201."""
    form = await request.post()
    hook_type = _form_value(form, "type")
    target = _form_value(form, "targetUrl")
    fmt = _form_value(form, "format") or "json"
    auth_text = _form_value(form, "authentication")
    if hook_type not in REGISTRABLE_HOOK_TYPES:
        raise bad_request(f"type must be one of {', '.join(REGISTRABLE_HOOK_TYPES)}")
    if fmt != "json":
        raise bad_request("format must be json")
    if target is None or not target.startswith(("http://", "https://")):
        raise bad_request("targetUrl must be an http(s) URL")
    try:
        auth = _parse_auth(auth_text) if auth_text is not None else None
    except ValueError as exc:
        raise bad_request(str(exc)) from None
    async with store.lock:
        hook = Webhook(
            id=store.data.next_webhook,
            type=hook_type,
            target_url=target,
            authentication=auth,
            created=time.time(),
        )
        store.data.next_webhook += 1
        store.data.webhooks[hook.id] = hook
        await store.save()
    return json_response(hook.public(), 201)


async def list_webhooks(request: web.Request, store: Store) -> web.Response:
    """``GET /webhooks``: ascending ``id``, paged by ``offset``/``limit`` but a plain array, as the
    OpenAPI document answers it (no collection envelope)."""
    window = _window(request, [store.data.webhooks[i].public() for i in sorted(store.data.webhooks)])
    return json_response(window.elements)


async def activate_webhook(request: web.Request, store: Store) -> web.Response:
    """``POST /webhooks/{id}/activate`` → 200 with the webhook ``activated``."""
    hook_id = _path_int(request, "webhookId", "webhook")
    async with store.lock:
        hook = store.data.webhooks.get(hook_id)
        if hook is None or hook.status == "deleted":
            raise not_found(f"no webhook {hook_id}")
        hook.status = "activated"
        await store.save()
    return json_response(hook.public())


async def stats(request: web.Request, store: Store) -> web.Response:
    """``GET _sandbox/stats`` (tests): batches created (201), started (202) and whose campaign was
    cancelled, per decoded tag, and the 429s answered."""
    batches = store.data.batches.values()
    campaigns = store.data.campaigns
    cancelled = (
        b.job_id for b in batches if b.state == "sent" and campaigns[b.campaign_id].canceled is not None
    )
    return json_response(
        {
            "sends_created": dict(Counter(b.job_id for b in batches if b.state == "sent")),
            "sends_cancelled": dict(Counter(cancelled)),
            "batches_created": dict(Counter(b.job_id for b in batches)),
            "rate_limited": store.account.counters["rate_limited"],
        }
    )


async def unknown(request: web.Request, store: Store) -> web.Response:
    raise not_found(f"no resource {request.method} {request.path}")


BASE = "/rest/{clientId}"

ROUTES = (
    web.post(f"{BASE}/sending/batches", endpoint(create_batch)),
    web.get(f"{BASE}/sending/batches", endpoint(list_batches)),
    web.get(f"{BASE}/sending/batches/{{batchId}}", endpoint(get_batch)),
    web.put(f"{BASE}/sending/batches/{{batchId}}", endpoint(put_chunk)),
    web.post(f"{BASE}/sending/batches/{{batchId}}", endpoint(start_batch)),
    web.get(f"{BASE}/smartcampaigns/{{campaignId}}", endpoint(get_campaign)),
    web.get(f"{BASE}/smartcampaigns/{{campaignId}}/report", endpoint(campaign_report)),
    web.post(f"{BASE}/smartcampaigns/{{campaignId}}/stop", endpoint(stop_campaign)),
    web.get(f"{BASE}/responses", endpoint(get_responses)),
    web.get(f"{BASE}/recipients", endpoint(recipient_validity)),
    web.get(f"{BASE}/recipients/{{listId}}", endpoint(get_recipients)),
    web.put(f"{BASE}/recipients/{{listId}}", endpoint(add_recipients)),
    web.post(f"{BASE}/recipients/{{listId}}", endpoint(add_recipient)),
    web.delete(f"{BASE}/recipients/{{listId}}", endpoint(delete_recipients)),
    web.put(f"{BASE}/recipients/{{listId}}/modify", endpoint(modify_recipients)),
    web.get(f"{BASE}/unsubscribes", endpoint(get_unsubscribes)),
    web.post(f"{BASE}/unsubscribes", endpoint(create_unsubscribes)),
    web.delete(f"{BASE}/unsubscribes", endpoint(remove_unsubscribes)),
    web.post(f"{BASE}/blacklistentries", endpoint(create_blocklist_entry)),
    web.get(f"{BASE}/webhooks", endpoint(list_webhooks)),
    web.post(f"{BASE}/webhooks", endpoint(create_webhook)),
    web.post(f"{BASE}/webhooks/{{webhookId}}/activate", endpoint(activate_webhook)),
    web.get(f"{BASE}/_sandbox/stats", endpoint(stats, limited=False)),
    web.route("*", f"{BASE}/{{tail:.*}}", endpoint(unknown, limited=False)),
)


# Responses: files, API elements and webhook calls, released by the engine's send

BATCH = "batch"
"""The send attribute naming the batch it releases."""


@dataclass(frozen=True)
class OptBroadcast(Broadcast):
    """A started batch as its files see it: its recipients' attributes and send times."""

    recipient_data: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    delivery: Mapping[str, int] = field(default_factory=dict)
    """Recipient id → when the message was sent to them (``DeliveryDate``)."""


class OptimizelyResponses(ResponseFormat):
    """``responses/Response_<batchId>_<yyyyMMddHHmmss>_<seq>.csv``: ``;``, Europe/Berlin dates;
    the API elements and webhook calls of each step come with them (:class:`OptimizelyRelease`)."""

    phases = usual_phases("sends", "bounces", "opens", "clicks", "optouts")
    # Events are identified by their facts: never two of a recipient with one type, URL and second.
    distinct_seconds = True
    # /responses is in ascending `created`: a phase's steps follow each other in time.
    time_ordered_phases = True

    def file_name(self, file: PendingFile) -> str:
        """The batch id, the local time of writing and the send's file number."""
        stamp = file.now.astimezone(BERLIN).strftime("%Y%m%d%H%M%S")
        return f"{RESPONSES}/Response_{file.broadcast.attrs[BATCH]}_{stamp}_{file.seq:03d}.csv"

    @staticmethod
    def row(broadcast: OptBroadcast, event: Event) -> list[str]:
        """One event's row in the columns of :data:`HEADER`."""
        data = broadcast.recipient_data.get(event.key, {})
        click = event.event_type is EventType.CLICK
        return [
            event.email,
            event.key,
            data.get("CommunicationKey", ""),
            MESSAGE_TYPES[event.event_type],
            file_time(broadcast.delivery.get(event.key, event.at)),
            event.url if click else "",
            file_time(event.at) if click else "",
            file_time(event.at),
            CATEGORY.get(event.event_type, ""),
            data.get("BroadcastId", ""),
        ]

    def write(self, out: IO[str], broadcast: Broadcast, phase: ResponsePhase, events: list[Event]) -> None:
        """The header and one row per event."""
        assert isinstance(broadcast, OptBroadcast)
        out.write(csv_line(HEADER, DELIMITER))
        for event in events:
            out.write(csv_line(self.row(broadcast, event), DELIMITER))

    def writer(self, account: Account, record: SendRecord, broadcast: Broadcast) -> PhaseWriter:
        """An :class:`OptimizelyRelease`."""
        return OptimizelyRelease(self, account, record, broadcast)


def bad_row(good: list[str], kind: int) -> list[str]:
    """A malformed copy of a good row (kinds: :data:`MALFORMED_KINDS`)."""
    row = list(good)
    if kind == 0:
        row[3] = "Forward"
    elif kind == 1:
        row[7] = "31.02.2026 25:61:00"
    elif kind == 2:
        row = row[:-1]
    else:
        row[3], row[5], row[6], row[8] = "Bounce", "", "", ""
    return row


class OptimizelyRelease(ResponseWriter):
    """Releases a started batch's steps through its sources: each step's file-owned events in one
    response file, its API elements in one event-log step, then its webhook calls.

    Each event's sources (its owner, and duplicates) are drawn once, before the first step. The
    manifest counts what at least one source delivered (a webhook event once acknowledged).
    """

    format: OptimizelyResponses

    def __init__(
        self, fmt: OptimizelyResponses, account: Account, record: SendRecord, broadcast: Broadcast
    ) -> None:
        self.store = store_of(account)
        self.batch = self.store.data.batches[int(broadcast.attrs[BATCH])]
        assert self.batch.run is not None
        self.run = self.batch.run
        self.campaign = self.store.data.campaigns[self.batch.campaign_id]
        super().__init__(fmt, account, record, broadcast)
        self.opt_broadcast = OptBroadcast(**{f.name: getattr(broadcast, f.name) for f in fields(broadcast)})
        self.log = account.event_log(record.send_id)
        self.plan = bytearray()
        """Event number → the sources that deliver it (bits)."""
        self.by_source = {s: {t.value: 0 for t in COUNTED_TYPES} for s in SOURCES}
        self.undelivered = 0
        self.malformed = 0
        self.report: Counter[str] = Counter()
        self._openers: set[str] = set()
        self._clickers: set[str] = set()
        self._file_seq = 0
        self._call_seq = 0

    def _same_send(self, manifest: dict[str, Any]) -> bool:
        return bool(manifest.get("batch_id") == self.batch.id)

    # The events

    def events(self) -> Iterator[Event]:
        """The engine's events without ``delivered`` ones (only the draw gates opens), complaints
        only with their webhook, and the link with a comma with a ``;`` instead, so files prove
        their quoting. (Leaving out whole types and renaming one link keeps the engine's distinct
        seconds as they are.)"""
        complaints = "spamcomplaint" in self.run.webhook_types
        return (
            replace(event, url=event.url.replace(",", ";")) if "," in event.url else event
            for event in super().events()
            if event.event_type is not EventType.DELIVERED
            and (complaints or event.event_type is not EventType.COMPLAINT)
        )

    def _draw(self, rng: random.Random, event: Event) -> int:
        """The sources that deliver an event (bits): its owner, then maybe duplicates."""
        r = self.run
        sources = [
            s
            for s in CAPABLE[event.event_type]
            if s != "webhook" or WEBHOOK_TYPE[event.event_type] in r.webhook_types
        ]
        if not sources:
            return 0
        weights = [r.weights.get(s, 0.0) for s in sources]
        total = sum(weights)
        x = rng.random()
        if total <= 0:
            owner = sources[min(int(x * len(sources)), len(sources) - 1)]
        else:
            owner, acc = sources[-1], 0.0
            for source, weight in zip(sources, weights, strict=True):
                acc += weight
                if x * total < acc:
                    owner = source
                    break
        mask = SOURCE_BIT[owner]
        repeated = in_repeated_hour(event.at)
        for source in sources:
            if source != owner and rng.random() < r.duplicate_rate and not repeated:
                mask |= SOURCE_BIT[source]
        return mask

    def _plan_sources(self) -> None:
        """Draw every event's sources and read the recipients' attributes (worker thread)."""
        data: dict[str, Mapping[str, str]] = {}
        with (self.store.batch_dir(self.batch.id) / "recipients.jsonl").open("rb") as people:
            for line in people:
                person = orjson.loads(line)
                data[person["id"]] = person["data"]
        delivery: dict[str, int] = {}
        rng = random.Random(f"{self.broadcast.seed}:{self.batch.job_id}:src")
        for event in self._unless_stopped(self.events()):
            if event.event_type is EventType.SENT:
                delivery[event.key] = event.at
            if event.number >= len(self.plan):
                self.plan.extend(bytes(event.number + 1 - len(self.plan)))
            self.plan[event.number] = self._draw(rng, event)
        self.opt_broadcast = replace(self.opt_broadcast, recipient_data=data, delivery=delivery)

    async def start(self) -> None:
        """Draw the sources, then write the first manifest if there is none."""
        await asyncio.to_thread(self._plan_sources)
        await super().start()

    # One step

    async def _release(self, phase: ResponsePhase, seq: int, events: list[Event]) -> bool:
        fresh = False
        file_events = [e for e in events if self.plan[e.number] & FILE]
        if file_events:
            fresh |= await self._file(phase, file_events)
        api_events = sorted((e for e in events if self.plan[e.number] & API), key=lambda e: (e.at, e.key))
        fresh |= await self.log.release(seq, [self._api_record(e) for e in api_events], self._stop)
        acked: set[int] = set()
        hook_events = [e for e in events if self.plan[e.number] & WEBHOOK]
        for hook_type in WEBHOOK_TYPES:
            of_type = [e for e in hook_events if WEBHOOK_TYPE[e.event_type] == hook_type]
            for start in range(0, len(of_type), self.run.webhook_batch):
                call = of_type[start : start + self.run.webhook_batch]
                self._call_seq += 1
                ok = self.run.calls.get(self._call_seq)
                if ok is None:
                    ok = await self._deliver(self._call_seq, hook_type, call)
                    self.run.calls[self._call_seq] = ok
                    await self.store.save()
                    fresh = True
                if ok:
                    acked.update(e.number for e in call)
                    if self._bad_call(self._call_seq):
                        self.malformed += 1
        self._count_sources(events, acked)
        if fresh:
            self.run.report = self.report_now()
            await self.store.save()
            await asyncio.to_thread(self._write_manifest, False)
            log.info(
                "responses released",
                extra={"batch_id": self.batch.id, "step": seq, "events": len(events), "counts": self.counts},
            )
        return fresh

    def _count_sources(self, events: list[Event], acked: set[int]) -> None:
        for e in events:
            mask, t = self.plan[e.number], e.event_type.value
            delivered = [s for s in SOURCES if mask & SOURCE_BIT[s] and (s != "webhook" or e.number in acked)]
            for source in delivered:
                self.by_source[source][t] += 1
            if delivered:
                self.counts[t] += 1
            else:
                self.undelivered += 1
            kind = REPORT_KINDS.get(e.event_type)
            if kind is not None:
                self.report[kind] += 1
            if e.event_type is EventType.OPEN:
                self._openers.add(e.key)
            if e.event_type is EventType.CLICK:
                self._clickers.add(e.key)

    def report_now(self) -> dict[str, int]:
        """The campaign report's counters so far."""
        return {**self.report, "opens_unique": len(self._openers), "clicks_unique": len(self._clickers)}

    # Files

    def _bad_file(self, file_seq: int) -> int | None:
        every = self.run.malformed_every
        if every <= 0 or file_seq % every:
            return None
        return (file_seq // every - 1) % len(MALFORMED_KINDS)

    def _bad_call(self, call_seq: int) -> bool:
        every = self.run.malformed_every
        return every > 0 and call_seq % every == 0

    def _write_with_bad_row(self, path: str, events: list[Event], bad: int | None) -> None:
        if self._stop.is_set():
            raise SendInterruptedError
        target = self.broadcast.account_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(target) as out:
            self.format.write(out, self.opt_broadcast, self.format.phases[0], events)
            if bad is not None:
                row = self.format.row(self.opt_broadcast, events[-1])
                out.write(csv_line(bad_row(row, bad), DELIMITER))

    async def _file(self, phase: ResponsePhase, events: list[Event]) -> bool:
        self._file_seq += 1
        path = await self.account.name_file(self.record, self.broadcast, phase, self._file_seq)
        bad = self._bad_file(self._file_seq)
        fresh = not self._already_written(path)
        if fresh:
            await asyncio.to_thread(self._write_with_bad_row, path, events, bad)
            log.info("response file written", extra={"batch_id": self.batch.id, "file": path})
        self.files.append(path)
        if bad is not None:
            self.malformed += 1
        return fresh

    # API elements

    def _api_record(self, e: Event) -> tuple[str, dict[str, Any]]:
        mailing, list_id = self.campaign.mailing_id, self.batch.recipient_list_id
        if e.event_type is EventType.UNSUBSCRIBE:
            return UNSUBSCRIBE_STREAM, {
                "recipientListId": list_id,
                "recipientId": e.key,
                "mailingId": mailing,
                "reason": UNSUBSCRIBE_REASON,
                "created": rest_time(e.at),
                "mediaType": "EMAIL",
            }
        category = CATEGORY[e.event_type]
        return category, {
            "mailId": f"{mailing}-{e.key}",
            "mailingId": mailing,
            "recipientListId": list_id,
            "recipientId": e.key,
            "category": category,
            "subject": "Undelivered Mail",
            "ruleName": RULE_NAME[e.event_type],
            "mediaType": "EMAIL",
            "created": rest_time(e.at),
        }

    # Webhooks

    def _hook_item(self, hook: Webhook, hook_type: str, e: Event) -> dict[str, Any]:
        mailing = self.campaign.mailing_id
        item: dict[str, Any] = {
            "webhookId": hook.id,
            "type": hook_type,
            "clientId": self.store.client_id,
            "mailingId": mailing,
            "recipientListId": self.batch.recipient_list_id,
            "recipientId": e.key,
            "mailId": f"{mailing}-{e.key}",
            "created": rest_time(e.at),
        }
        if e.event_type is EventType.CLICK:
            item["url"] = e.url
        if e.event_type in CATEGORY:
            item["category"] = CATEGORY[e.event_type]
        if e.event_type is EventType.UNSUBSCRIBE:
            item["reason"] = UNSUBSCRIBE_REASON
        item["data"] = dict(self.opt_broadcast.recipient_data.get(e.key, {}))
        return item

    async def _deliver(self, call_seq: int, hook_type: str, events: list[Event]) -> bool:
        """POST one call of events to the type's webhook (:func:`post_webhook`)."""
        hook = self.store.webhook_for(hook_type)
        if hook is None:
            log.warning("no activated webhook; events undelivered", extra={"type": hook_type})
            return False
        items = [self._hook_item(hook, hook_type, e) for e in events]
        if self._bad_call(call_seq):
            items.append({k: v for k, v in items[0].items() if k != "recipientId"})
        return await post_webhook(self.store, hook, items, {"batch_id": self.batch.id, "call": call_seq})

    # The manifest

    def manifest(self, complete: bool) -> dict[str, Any]:
        """The manifest body (docs/connectors/optimizely.md, "Sandbox flavor")."""
        return {
            "broadcast_id": self.batch.job_id,
            "batch_id": self.batch.id,
            "campaign_id": self.campaign.id,
            "mailing_id": self.campaign.mailing_id,
            "recipients": self.run.recipients,
            "counts": dict(self.counts),
            "by_source": {s: dict(c) for s, c in self.by_source.items()},
            "duplicates": sum(sum(c.values()) for c in self.by_source.values()) - sum(self.counts.values()),
            "undelivered": self.undelivered,
            "malformed_rows": self.malformed,
            "files": list(self.files),
            "complete": complete,
        }

    async def finish(self) -> None:
        """Save the final report, then mark the manifest complete."""
        self.run.report = self.report_now()
        await self.store.save()
        await super().finish()


async def post_webhook(
    store: Store, hook: Webhook, items: list[dict[str, Any]], where: dict[str, Any]
) -> bool:
    """POST one call to a webhook, retried after a timeout, a connection error or a 5xx 1, 2, 4, 8
    and 16 s later; True once answered 2xx (``where`` names the call in the log)."""
    body = orjson.dumps(items)
    headers = {"Content-Type": "application/json", **_auth_headers(hook.authentication)}
    for attempt, pause in enumerate((0, *WEBHOOK_RETRIES_S)):
        if pause:
            await asyncio.sleep(pause)
        try:
            async with store.http().post(hook.target_url, data=body, headers=headers) as resp:
                await resp.read()
                if 200 <= resp.status < 300:
                    return True
                problem = f"HTTP {resp.status}"
                if resp.status < 500:
                    log.warning("webhook call refused; not retried", extra={**where, "status": resp.status})
                    return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            problem = f"{type(exc).__name__}: {exc}"
        log.warning("webhook call failed", extra={**where, "attempt": attempt + 1, "error": problem})
    return False


def _auth_headers(auth: Mapping[str, str] | None) -> dict[str, str]:
    """The headers a webhook's ``authentication`` puts on each call."""
    if auth is None:
        return {}
    if auth["type"] == "basicAuth":
        pair = f"{auth['userName']}:{auth['password']}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode("ascii")}
    return {auth["key"]: auth["passphrase"]}


# Contact changes made on the ESP side, reported through webhooks

CONTACT_HOOKS = {
    (Via.LINK, ContactState.UNSUBSCRIBED): "unsubscribe",
    (Via.COMPLAINT, ContactState.UNSUBSCRIBED): "spamcomplaint",
    (Via.BOUNCE, ContactState.UNSUBSCRIBED): "bounce",
    (Via.CONFIRM, ContactState.SUBSCRIBED): "doubleoptin",
    (Via.LINK, ContactState.SUBSCRIBED): "singleoptin",
}
"""The webhook type that reports a change made on the ESP side (a removal in the ESP's own
interface has none: Optimizely does not report one)."""
UNSUBSCRIBING = frozenset({Via.LINK, Via.COMPLAINT})
"""Changes that put the contact on the unsubscribe list (a hard bounce counts against the bounce
limit instead)."""


async def on_contact_event(account: Account, event: ContactEvent) -> None:
    """A change made on the ESP side: an unsubscribe of a client without recipient-list based
    unsubscribes holds for every list (the book says so at once); the webhook call follows in the
    background, in the book's order (:func:`report_contacts`)."""
    store = store_of(account)
    record = event.record
    if (
        record.via in UNSUBSCRIBING
        and record.state is ContactState.UNSUBSCRIBED
        and not store.settings.opt_list_unsubscribes
    ):
        reason = record.reason
        everywhere = [ContactChange(EVERY_LIST, record.email, ContactState.UNSUBSCRIBED, reason, Via.API)]
        everywhere += [
            c for c in _unsubscribed_everywhere(store, record.email, reason) if c.list_id != record.list
        ]
        await asyncio.to_thread(account.contacts.set_many, everywhere)
    store.contact_changes.set()


def _batch_recipient(store: Store, batch: Batch, email: str) -> dict[str, Any] | None:
    """The batch's recipient with that address (its id and attributes), or None (worker thread)."""
    path = store.batch_dir(batch.id) / "recipients.jsonl"
    if not path.is_file():
        return None
    with path.open("rb") as people:
        for line in people:
            person: dict[str, Any] = orjson.loads(line)
            if str(person["data"].get("email", "")).strip().lower() == email:
                return person
    return None


async def contact_item(store: Store, hook: Webhook, hook_type: str, event: ContactEvent) -> dict[str, Any]:
    """The webhook item of a change. On a batch's pool list its recipient there: the recipient's id
    and attributes (``BroadcastId`` too) and the batch's mailing. On a list of the client's the
    address is the id and the data are the contact's fields, with the mailing of the ``job`` whose
    message carried the link, if one was named."""
    record = event.record
    listed = int(record.list) if record.list.isdigit() else None
    pool = store.batch_of_list(listed) if listed is not None else None
    send = store.account.send_of_job(event.job) if event.job is not None else None
    named = send.attrs.get(BATCH) if send is not None else None
    batch = pool or (store.data.batches.get(int(named)) if named else None)
    person = await asyncio.to_thread(_batch_recipient, store, pool, record.email) if pool else None
    item: dict[str, Any] = {"webhookId": hook.id, "type": hook_type, "clientId": store.client_id}
    if batch is not None:
        item["mailingId"] = store.data.campaigns[batch.campaign_id].mailing_id
    if listed is not None:
        item["recipientListId"] = listed
    item["recipientId"] = person["id"] if person is not None else record.email
    if batch is not None:
        item["mailId"] = f"{item['mailingId']}-{item['recipientId']}"
    item["created"] = rest_time(record.changed_at)
    if hook_type == "bounce":
        item["category"] = "hardbounce"
    if hook_type == "unsubscribe":
        item["reason"] = UNSUBSCRIBE_REASON
    item["data"] = dict(person["data"]) if person is not None else {**record.fields, "email": record.email}
    return item


async def report_contacts(store: Store) -> None:
    """Report the contact book's changes made on the ESP side, in order, each through its type's
    webhook (none activated: not reported); how far is saved, so a restart goes on from there."""
    book = store.account.contacts
    while True:
        await store.contact_changes.wait()
        store.contact_changes.clear()
        feed = store.data.reported
        if feed.book != book.book_id:
            feed.book, feed.seq = book.book_id, 0
        for event in book.events_since(feed.seq):
            hook_type = CONTACT_HOOKS.get((event.record.via, event.record.state))
            hook = store.webhook_for(hook_type) if hook_type is not None else None
            if hook_type is not None and hook is not None:
                item = await contact_item(store, hook, hook_type, event)
                where = {"account": store.account.name, "contact_event": event.seq, "type": hook_type}
                await post_webhook(store, hook, [item], where)
            elif hook_type is not None:
                log.info("no activated webhook: a contact change is not reported", extra={"type": hook_type})
            feed.seq = event.seq
            if hook_type is not None:
                await store.save()
        await store.save()


async def watch(account: Account) -> None:
    """Hand the engine the started batches a stop left without a send; report the contact changes
    not reported yet, and those to come; close the webhook client at the end."""
    store = store_of(account)
    reporting = asyncio.create_task(report_contacts(store))
    store.contact_changes.set()
    try:
        for batch in list(store.data.batches.values()):
            if batch.run is not None and batch.run.duplicate_of is None and batch.run.send_id is None:
                await start_send(store, batch)
        await asyncio.Event().wait()
    finally:
        reporting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reporting
        await store.close()


FLAVOR = Flavor(
    name="optimizely",
    responses=OptimizelyResponses(),
    routes=ROUTES,
    watch=watch,
    check_settings=opt_settings,
    on_contact_event=on_contact_event,
)
