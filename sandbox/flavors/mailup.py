"""The ``mailup`` flavor: MailUp as docs/connectors/mailup.md (and its "Sandbox flavor" section) describes it.

The account base ``/api/v1/accounts/<account>`` is the services root (``api_url``). Under it: the
OAuth2 token endpoint (password and refresh grants; access tokens live ``TOKEN_TTL_S``), the
console service (personal data fields, groups, recipient imports from JSON bodies, one
recipient's subscription, sendings with their queues and history) and the mail statistics
service (paged per message), and ``_sandbox/stats`` (the sandbox bearer ``TOKEN``). Errors have MailUp's
``{"ErrorCode", "ErrorDescription", "ErrorName", "ErrorStack"}`` body; console and statistics calls
are limited per account to ``RATE_LIMIT_PER_S`` in a sliding second (a real 429, ``Retry-After: 1``).

The flavor keeps the account's recipients (personal data fields, groups), groups, imports and
sendings in ``<account>/.sandbox-mailup.json``, saved before an answer; each recipient's status on
each list (``MAILUP_LISTS``) is in the account's contact book (``sandbox.contacts``). An import
subscribes the recipients new to its list. A sending snapshots the subscribed members it
addresses into an engine import; once confirmed (or given a ``datetime``) it becomes an engine send, scheduled
``PHASE_DELAY_S`` after the confirmation (or the ``datetime``), with ``external_id`` = the job
named by its recipients' ``EspbridgeJob``, whose event log holds the released events. The
statistics API aggregates the logs of a message's sendings; each released step is also written
as an export file to ``statistics/`` (``MAILUP_EXPORT``) and its unsubscribes and complaints
POSTed to ``MAILUP_WEBHOOK_URL`` (if set), with the parameters ``MAILUP_WEBHOOK_PARAMS`` names
and their placeholders (``[Email]``, ``[Field39]``…) filled as MailUp fills them. A change made
at MailUp (the ``_sandbox/contacts`` control route, a confirmation) calls the same URL as its
Subscribe, Unsubscribe or Delete webhook; a change an API caller made calls none, as at MailUp.
Contacts files put in ``import/<list>/`` (the (S)FTP import data sync) set each contact's status.

Choices where the page leaves room (see also the README):

- Ids: recipients from 1, groups from 11, imports from 9001, sendings from 501, per account.
- A refused token request (wrong or missing ``client_id``, ``client_secret``, ``username``,
  ``password`` or refresh token) is ``400 invalid_grant``; another ``grant_type`` is
  ``400 unsupported_grant_type``. A bearer token of another account is an invalid token.
- An unknown personal data field ``Id``, a value over 200 characters or a body that is not an
  array of recipients is ``400``; an empty array is an import of no rows.
- ``imports_created`` and the sending's job: the job part of the first ``EspbridgeJob`` value in
  the request (else the group's name, else ``list``); a sending's job is the most common job among
  its members whose ``EspbridgeJob`` names the sending's message (else ``sending-<id>``).
- Several sendings attributed to one job share that job's (first) engine send and events.
- Import ``Rows`` are counted when the import completes (before: only ``Total``). A group may
  share its name with another; names are at most 138 characters.
- Queues: *Undefined* until confirmed (``Immediate``, or ``Deferred`` with a ``Date``); *Deferred*
  until its time; then *Immediate* until the first phase is released; then SendHistory.
  Confirming a deferred or delivered sending changes nothing. ``StartDate`` of an Undefined item
  is null. The Send's ``datetime`` must be quoted as MailUp writes it (``"2026-11-22 10:00:00Z"``).
- SendHistory answers whole (``IsPaginated`` false), in MailUp's item shape, which names no
  sending: ``SenderEmail``/``SenderName`` are fixed, ``Kb_transferred`` is 42 per recipient.
- Webhook placeholders: ``[IdConsole]`` is 1, ``[Channel]`` 0 (mail), ``[Prefix]``/``[Number]``
  empty, ``[Groups]`` the recipient's group ids; ``[EventDate]`` in Italian time with
  milliseconds and an hours-only offset, as MailUp's example.
- No ``Reason`` 3 items: hard bounces only unsubscribe the recipient from the list.
- Export files: name time in Italian time, ``<n>`` numbers the account's export files from 1;
  ``sentDate`` is the sending's start; bad rows come after the good ones, each a good row of the
  file spoiled; unsubscribes and complaints have no export rows (their phase writes no file).
  ``export_unattributable`` also counts rows whose recipient's ``EspbridgeJob`` is empty.
- Unknown query parameters are ignored, except ``filterby`` outside ``Groups`` and
  ``Recipients/<status>`` (``Email=='…'`` only) (400).
- Recipient calls: ``POST …/Recipient`` subscribes a recipient new to the list (or removed from
  it), pending with ``ConfirmEmail=true``, which also asks an unsubscribed one again; otherwise a
  status stays. A recipient unsubscribed by a hard bounce is refused (400) a subscribe or a
  confirmation. An address is checked as ``sandbox.contacts.valid_email`` does (400). Unsubscribe
  is idempotent; removing a recipient not on the list is 404. Field updates reach the contact
  book's fields (by description) on every list of the recipient.
- Webhooks of changes made at MailUp: ``Subscribe``/``Recipient`` (a sign-up, a confirmation),
  ``Unsubscribe``/``Recipient`` with ``Reason`` 1 (link), 2 (complaint) or 3 (hard bounce), and
  ``Delete``/``Console``; ``IdNL`` is the message of the control route's ``job`` (else 0).
- Contacts files: ``;``-separated UTF-8 with a header ``Email``, optional ``Status``
  (``subscribed``, ``unsubscribed``, ``pending``, ``removed``, any case; empty: new ones
  subscribed, the others kept), and personal data fields by description. Bad rows are left out
  with their line; an unknown column fails the whole file. The file moves to ``done/`` (or
  ``failed/``) with ``<name>.result.json``; no webhook is called, as for MailUp's bulk imports.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import csv
import functools
import io
import logging
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Protocol, TypeVar
from zoneinfo import ZoneInfo

import aiohttp
import orjson
from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)

from sandbox.api import CONTEXT, account_of, bearer_token, own_auth, problems
from sandbox.contacts import ContactBook, ContactChange, ContactEvent, ContactRecord, ContactState, Via
from sandbox.contacts import valid_email as well_formed
from sandbox.engine import Account
from sandbox.errors import OAUTH, ErrorStyle, EspError, bad_request, found, json_response, not_found
from sandbox.eventlog import EVENTS_FOLDER, read_step
from sandbox.files import atomic_write_bytes, atomic_writer, csv_field
from sandbox.flavors.base import Flavor
from sandbox.limits import SlidingWindow, retry_after_s
from sandbox.listfile import recipient_store
from sandbox.protocol import (
    API_PREFIX,
    ARCHIVE,
    DROP,
    EXTERNAL_ID_RE,
    MANIFEST,
    UPLOADS_FOLDER,
    EventType,
    SendState,
)
from sandbox.responses import Broadcast, EventLogFormat, PhaseWriter, usual_phases
from sandbox.settings import SandboxSettings
from sandbox.simulate import URLS, Event
from sandbox.state import SendRecord
from sandbox.validators import CommaList, HttpUrl

log = logging.getLogger(__name__)

BASE = API_PREFIX + "/{account}"
OAUTH_PATH = "/Authorization/OAuth/Token"
CONSOLE = "/API/v1.1/Rest/ConsoleService.svc"
STATS = "/API/v1.1/Rest/MailStatisticsService.svc"

LIST_ID = 1
"""The list of a group, import or sending saved before the flavor had several lists."""
DEFAULT_LISTS = ("1", "2", "3")
STATISTICS = "statistics"
IMPORT = "import"
"""The (S)FTP import data sync's folder: ``import/<list id>/`` takes contacts files."""
STORE_FILE = ".sandbox-mailup.json"
ROME = ZoneInfo("Europe/Rome")
KEY_FIELD = "CommunicationKey"
JOB_FIELD = "EspbridgeJob"
MAX_FIELDS = 39
DEFAULT_FIELDS = (
    "FirstName",
    "LastName",
    "Company",
    "City",
    *(f"Field{n:02d}" for n in range(5, MAX_FIELDS - 1)),
    KEY_FIELD,
    JOB_FIELD,
)
"""All 39 fields of a MailUp account: four named ones, the key and the job in the last two."""
DEFAULT_WEBHOOK_PARAMS = (
    "EventType=[EventType]&EventSource=[EventSource]&EventDate=[EventDate]&IdList=[IdList]"
    "&IdNL=[IdNL]&Email=[Email]&Reason=[Reason]&Job=[Field39]&Key=[Field38]"
)
WEBHOOK_PLACEHOLDERS = frozenset(
    {
        "EventDate",
        "IdConsole",
        "IdList",
        "IdNL",
        "EventType",
        "EventSource",
        "Reason",
        "Email",
        "Prefix",
        "Number",
        "Groups",
        "Channel",
        *(f"Field{n:02d}" for n in range(1, MAX_FIELDS + 1)),
    }
)
"""The placeholders MailUp fills in a webhook's parameters."""
_PLACEHOLDER_RE = re.compile(r"\[([^\[\]]*)\]")
ID_CONSOLE = 1
"""The account id ``[IdConsole]`` stands for."""
MAIL_CHANNEL = 0
"""``[Channel]`` of an email event (-1 unknown, 0 mail, 1 sms, 2 fax, 5 social)."""
SENDER_EMAIL = "newsletter@example.com"
SENDER_NAME = "Sandbox"
KB_PER_RECIPIENT = 42
MAX_VALUE = 200
MAX_GROUP_NAME = 138
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 1000
API_TIME = "%Y-%m-%d %H:%M:%SZ"
EXPORT_TIME = "%Y%m%dT%H%M%S"
WEBHOOK_RETRIES = 3

FIRST_IDS = {"recipient": 1, "group": 11, "import": 9001, "sending": 501}

# Statistics endpoints (under /Message/{m}/List/) and the event types they carry.
RECIPIENTS, BOUNCES, VIEWS, CLICKS, UNSUBSCRIPTIONS = (
    "Recipients",
    "Bounces",
    "Views",
    "UrlClickDetails",
    "Unsubscriptions",
)
# MailUp's published click lists: per recipient {Count, Email, IdRecipient}, per link {Count, IdMessage, Url}.
CLICKS_PER_RECIPIENT, CLICKS_PER_URL = "Clicks", "UrlClicks"
STREAMS = {
    EventType.SENT: RECIPIENTS,
    EventType.BOUNCE_HARD: BOUNCES,
    EventType.BOUNCE_SOFT: BOUNCES,
    EventType.OPEN: VIEWS,
    EventType.CLICK: CLICKS,
    EventType.UNSUBSCRIBE: UNSUBSCRIPTIONS,
    EventType.COMPLAINT: UNSUBSCRIPTIONS,
}
REASONS = {EventType.UNSUBSCRIBE: 1, EventType.COMPLAINT: 2}
BOUNCE_CODES = {EventType.BOUNCE_HARD: ("5.1.1", "550"), EventType.BOUNCE_SOFT: ("4.2.2", "452")}
# The simulation's links as MailUp shows them: one with ";" (the export's separator), one with ",".
LINKS = dict(
    zip(
        URLS,
        (
            "https://example.com/offer?id=1001",
            "https://example.com/offer?id=1002;ref=newsletter",
            "https://example.com/offer?id=1003&utm_source=newsletter&utm_medium=email",
            "https://example.com/catalog?tags=shoes,bags",
        ),
        strict=True,
    )
)

EXPORT_HEADER = (
    "idList",
    "idInvio",
    "idNl",
    "e-mail address",
    "subject",
    "statusType",
    "details",
    "statusChange",
    "sentDate",
    KEY_FIELD,
    JOB_FIELD,
)
STATUS_TYPES = {
    EventType.SENT: "SNT",
    EventType.BOUNCE_HARD: "NCO",
    EventType.BOUNCE_SOFT: "NCO",
    EventType.OPEN: "OPN",
    EventType.CLICK: "CLK",
}
BAD_ROW_KINDS = ("statusType XXX", "statusChange 2026-13-45", "a missing column", "NCO with code 999")
LEAVING = {
    EventType.BOUNCE_HARD: (Via.BOUNCE, "bounce_hard"),
    EventType.UNSUBSCRIBE: (Via.LINK, "unsubscribe"),
    EventType.COMPLAINT: (Via.COMPLAINT, "complaint"),
}
"""The released events after which the recipient is unsubscribed from the sending's list: how, why."""


# Settings


def _field_names(value: tuple[str, ...]) -> tuple[str, ...]:
    if not 1 <= len(value) <= MAX_FIELDS:
        raise ValueError(f"between 1 and {MAX_FIELDS} fields are needed")
    if len(set(value)) != len(value):
        raise ValueError("field names must be unique")
    return value


def webhook_params(text: str) -> tuple[tuple[str, str], ...]:
    """``name=value&…`` as a webhook's parameters are configured at MailUp: (name, value) pairs
    whose values may hold placeholders (``[Email]``, ``[Field07]``); an unknown one is refused."""
    pairs: list[tuple[str, str]] = []
    for part in text.split("&"):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"{part!r} is not name=value")
        unknown = [p for p in _PLACEHOLDER_RE.findall(value) if p not in WEBHOOK_PLACEHOLDERS]
        if unknown:
            raise ValueError(
                f"unknown placeholder [{unknown[0]}] (MailUp's: [Email], [Field01]…[Field39], …)"
            )
        pairs.append((name.strip(), value))
    return tuple(pairs)


def _list_ids(value: tuple[str, ...]) -> tuple[str, ...]:
    if not value:
        raise ValueError("at least one list is needed")
    bad = [v for v in value if not v.isascii() or not v.isdigit() or int(v) < 1]
    if bad:
        raise ValueError(f"{bad[0]!r} is not a MailUp list id (a positive number)")
    return tuple(dict.fromkeys(str(int(v)) for v in value))


def _valid_webhook_params(text: str) -> str:
    webhook_params(text)
    return text


def fill_placeholders(value: str, values: dict[str, str]) -> str:
    """A parameter's value with its placeholders filled (an empty field stays empty)."""
    return _PLACEHOLDER_RE.sub(lambda m: values.get(m.group(1), ""), value)


class MailUpSettings(SandboxSettings):
    """The flavor's own settings (prefix ``ESPBRIDGE_SANDBOX_``)."""

    mailup_fields: Annotated[CommaList, AfterValidator(_field_names)] = Field(
        default=DEFAULT_FIELDS,
        description="comma list of the personal data fields' descriptions, numbered 1…n",
    )
    mailup_lists: Annotated[CommaList, AfterValidator(_list_ids)] = Field(
        default=DEFAULT_LISTS, description="comma list of the account's list ids; others answer 404"
    )
    mailup_export: bool = Field(default=True, description="write the statistics export files")
    mailup_webhook_url: HttpUrl = Field(
        default=None,
        description="where the Subscribe, Unsubscribe and Delete webhooks POST ({account} replaced)",
    )
    mailup_webhook_params: Annotated[str, AfterValidator(_valid_webhook_params)] = Field(
        default=DEFAULT_WEBHOOK_PARAMS,
        description="the webhook's parameters as configured at MailUp (name=[Placeholder]&…), after Secret",
    )
    rate_limit_per_s: int = Field(
        default=5, ge=0, description="console+statistics calls per second (0 = off)"
    )
    mailup_stop_interval_s: float = Field(
        default=30.0, ge=0, description="Stop calls: at most one per so many seconds (MailUp: 30; 0 = off)"
    )
    bad_rows: int = Field(default=0, ge=0, description="malformed rows added to every export file")

    def field_id(self, name: str) -> int | None:
        """The id of a personal data field (1-based), or None if there is none of that name."""
        return self.mailup_fields.index(name) + 1 if name in self.mailup_fields else None

    def field_name(self, field_id: int | str) -> str:
        """The description of a personal data field by its id."""
        return self.mailup_fields[int(field_id) - 1]


mailup_settings = functools.cache(MailUpSettings)
"""The flavor's settings, read from the environment once."""


# Times


def _now() -> datetime:
    return datetime.now(UTC)


def api_time(moment: datetime | str | None) -> str | None:
    """A time as API bodies show it: ``yyyy-MM-dd HH:mm:ssZ`` in UTC."""
    if moment is None:
        return None
    if isinstance(moment, str):
        moment = datetime.fromisoformat(moment)
    return moment.astimezone(UTC).strftime(API_TIME)


def rome_time(at: float) -> str:
    """A time as the export shows it: ``yyyymmddThhmmss`` in Italian time."""
    return datetime.fromtimestamp(at, ROME).strftime(EXPORT_TIME)


# Errors


ERROR_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    500: "InternalServerError",
}


ERRORS = ErrorStyle(
    lambda e: {
        "ErrorCode": str(e.status),
        "ErrorDescription": e.message,
        "ErrorName": ERROR_NAMES.get(e.status),
        "ErrorStack": None,
    },
    charset="utf-8",
)
"""MailUp's error body: ``{"ErrorCode", "ErrorDescription", "ErrorName", "ErrorStack"}``."""

TOKEN_ERRORS = replace(OAUTH, charset="utf-8")
"""The token endpoint's: RFC 6749's, in MailUp's charset."""


def _json(body: Any) -> web.Response:
    return json_response(body, charset="utf-8")


# The flavor's state: MailUp's list, groups, imports and sendings of one account


class Recipient(BaseModel):
    """A member of the list: its personal data field values by field id, subscription, groups."""

    id: int
    email: str
    fields: dict[str, str] = Field(default_factory=dict)
    groups: list[int] = Field(default_factory=list)

    def body(self) -> dict[str, Any]:
        """As the recipient calls show it: its personal data fields with their descriptions."""
        settings = mailup_settings()
        return {
            "Email": self.email,
            "Fields": [
                {"Description": settings.field_name(n), "Id": int(n), "Value": value}
                for n, value in sorted(self.fields.items(), key=lambda item: int(item[0]))
            ],
            "MobileNumber": "",
            "MobilePrefix": "",
            "Name": "",
            "idRecipient": self.id,
        }


class Group(BaseModel):
    """A group of the list."""

    id: int
    name: str
    notes: str = ""
    deletable: bool = True
    list: int = LIST_ID

    def body(self) -> dict[str, Any]:
        """As the API shows it."""
        return {
            "Deletable": self.deletable,
            "Name": self.name,
            "Notes": self.notes,
            "idGroup": self.id,
            "idList": self.list,
        }


class MailUpImport(BaseModel):
    """One import request (its recipients are in ``.sandbox-uploads/mailup-import-<id>.json``)."""

    id: int
    group: int | None
    job: str
    total: int
    created: str
    list: int = LIST_ID
    status: int = 1
    start: str | None = None
    end: str | None = None
    rows: dict[str, Any] | None = None


class Sending(BaseModel):
    """One sending of a message to a group (or the list), and the engine send it became."""

    id: int
    message: int
    group: int | None
    job: str
    list: int = LIST_ID
    recipients: int
    import_id: str
    created: str
    deferred: str | None = None
    confirmed: str | None = None
    send_id: str | None = None
    bad_rows: int = 0
    stopped: str | None = None
    """When a Stop took it out of its queue: it leaves every queue and sends nothing."""


class Export(BaseModel):
    """What one engine send's released steps led to: export files, bad rows, webhooks queued."""

    synced: int = 0
    files: list[str] = Field(default_factory=list)
    bad_rows: int = 0
    unattributable: int = 0
    pending: str | None = None


class StoreData(BaseModel):
    """The saved state of the flavor in one account."""

    model_config = ConfigDict(extra="ignore")

    next_ids: dict[str, int] = Field(default_factory=lambda: dict(FIRST_IDS))
    recipients: list[Recipient] = Field(default_factory=list)
    groups: list[Group] = Field(default_factory=list)
    imports: list[MailUpImport] = Field(default_factory=list)
    sendings: list[Sending] = Field(default_factory=list)
    exports: dict[str, Export] = Field(default_factory=dict)
    export_seq: int = 0


class Store:
    """``StoreData`` with indexes, one lock (mutations happen in the event loop and in the worker
    threads that release responses) and an atomic save."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.data = StoreData()
        self.by_email: dict[str, Recipient] = {}
        self.by_id: dict[int, Recipient] = {}

    def load(self) -> None:
        """Read the saved state, if any."""
        if self.path.is_file():
            self.data = StoreData.model_validate_json(self.path.read_bytes())
        self.by_email = {r.email.lower(): r for r in self.data.recipients}
        self.by_id = {r.id: r for r in self.data.recipients}

    def save(self) -> None:
        """Write the state atomically (blocking: from the event loop, call it in a thread)."""
        with self.lock:
            atomic_write_bytes(self.path, orjson.dumps(self.data.model_dump(mode="json")))

    def new_id(self, kind: str) -> int:
        """The next id of a kind (``recipient``, ``group``, ``import``, ``sending``)."""
        with self.lock:
            value = self.data.next_ids.get(kind, FIRST_IDS[kind])
            self.data.next_ids[kind] = value + 1
            return value

    def group(self, group_id: int) -> Group:
        """A group; 404 if there is none."""
        found = next((g for g in self.data.groups if g.id == group_id), None)
        if found is None:
            raise not_found(f"Group {group_id} not found")
        return found

    def add_recipient(self, email: str) -> Recipient:
        """A new recipient of the account (call with the lock held); its lists are in the contact book."""
        recipient = Recipient(id=self.new_id("recipient"), email=email)
        self.data.recipients.append(recipient)
        self.by_email[email.lower()] = recipient
        self.by_id[recipient.id] = recipient
        return recipient

    def groups_in(self, recipient: Recipient | None, list_id: str) -> str:
        """``[Groups]``: the recipient's groups in the list, comma-separated (call with the lock held)."""
        if recipient is None:
            return ""
        in_list = {g.id for g in self.data.groups if str(g.list) == list_id}
        return ",".join(str(g) for g in recipient.groups if g in in_list)

    def recipient(self, email: str) -> Recipient:
        """The account's recipient of that email, added if it has none (call with the lock held)."""
        return self.by_email.get(email.strip().lower()) or self.add_recipient(email.strip().lower())


# The import's request body


class FieldIn(BaseModel):
    """One personal data field value of a recipient in an import body."""

    model_config = ConfigDict(extra="ignore")

    Id: StrictInt
    Value: StrictStr | None = None


class RecipientIn(BaseModel):
    """One recipient in an import body."""

    model_config = ConfigDict(extra="ignore")

    Email: StrictStr | None = None
    Name: StrictStr | None = None
    Fields: list[FieldIn] = Field(default_factory=list)


IMPORT_BODY = TypeAdapter(list[RecipientIn])


def _rows_body(
    total: int,
    new: int = 0,
    update: int = 0,
    repeated: int = 0,
    invalid: int = 0,
    without: int = 0,
) -> dict[str, Any]:
    return {
        "Total": total,
        "Valid": {
            "Total": new + update + repeated,
            "EmailNew": new,
            "EmailUpdate": update,
            "RepeatedEmail": repeated,
            "NumberNew": 0,
            "NumberUpdate": 0,
            "RepeatedNumber": 0,
        },
        "Invalid": {
            "Total": invalid + without,
            "InvalidEmail": invalid,
            "WithoutEmail": without,
            "InvalidNumber": 0,
            "WithoutNumber": 0,
            "WithoutPrefix": 0,
        },
    }


def valid_email(email: str) -> bool:
    """A single ``@`` with text on both sides."""
    local, _, domain = email.partition("@")
    return email.count("@") == 1 and bool(local) and bool(domain)


def _job_of(value: str, message: int | None = None) -> str | None:
    """The job part of an ``EspbridgeJob`` value ``<message>:<job>`` (of that message, if given)."""
    part, sep, job = value.partition(":")
    if not sep or not job or not EXTERNAL_ID_RE.fullmatch(job):
        return None
    if message is not None and part != str(message):
        return None
    return job


# The per-account runtime


class MailUp:
    """The flavor's side of one account: its saved state, rate limit, webhook queue and caches."""

    def __init__(self, folder: Path, contacts: ContactBook) -> None:
        self.folder = folder
        self.contacts = contacts
        """The account's contact book: each recipient's status on each list."""
        self.store = Store(folder / STORE_FILE)
        self.store.load()
        # Export files half-written by a killed sandbox (it writes them only through this object).
        for stale in (folder / STATISTICS).glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        settings = mailup_settings()
        self.window = SlidingWindow(settings.rate_limit_per_s) if settings.rate_limit_per_s else None
        self.stops = (
            SlidingWindow(1, settings.mailup_stop_interval_s) if settings.mailup_stop_interval_s else None
        )
        self.webhooks: collections.deque[dict[str, str]] = collections.deque()
        self._wakeup: asyncio.Event | None = None
        self._hooked: asyncio.Event | None = None
        self._stats: dict[tuple[int, str], tuple[tuple[tuple[str, int], ...], list[dict[str, Any]]]] = {}

    @property
    def wakeup(self) -> asyncio.Event:
        """Set when an import arrives (created in the event loop)."""
        if self._wakeup is None:
            self._wakeup = asyncio.Event()
        return self._wakeup

    @property
    def hooked(self) -> asyncio.Event:
        """Set when a webhook call is queued from the event loop (created there)."""
        if self._hooked is None:
            self._hooked = asyncio.Event()
        return self._hooked

    def members(self, list_id: int, group_id: int | None) -> list[Recipient]:
        """The recipients subscribed to the list, of a group of it (None: all), by ``IdRecipient``."""
        with self.store.lock:
            candidates = [r for r in self.store.data.recipients if group_id is None or group_id in r.groups]
        return [r for r in candidates if self.status(list_id, r.email) is ContactState.SUBSCRIBED]

    def status(self, list_id: int, email: str) -> ContactState | None:
        """The recipient's status on the list (None: never on it)."""
        record = self.contacts.get(str(list_id), email)
        return record.state if record is not None else None

    def check_limit(self, account: Account) -> None:
        """The 429 over ``RATE_LIMIT_PER_S`` calls in a sliding second; refused calls do not count."""
        if self.window is None or self.window.acquire() == 0:
            return
        account.counters["rate_limited"] += 1
        limit = self.window.limit
        raise EspError(
            429,
            "too_many_requests",
            "Authorization error (too_many_requests): Too many requests. "
            f"Max:{limit} calls per second , actual:{limit + 1}.",
            {"Retry-After": "1"},
        )

    def check_stop_limit(self, account: Account) -> None:
        """The 429 over one Stop per ``MAILUP_STOP_INTERVAL_S``, with the seconds left as ``Retry-After``."""
        if self.stops is None or (wait_s := self.stops.acquire()) == 0:
            return
        account.counters["rate_limited"] += 1
        raise EspError(
            429,
            "too_many_requests",
            "Authorization error (too_many_requests): Too many requests. "
            f"Max:1 call every {self.stops.window_s:g} seconds for Stop/Delete sendings.",
            {"Retry-After": str(retry_after_s(wait_s))},
        )

    def stats(self, account: Account, tokens_issued: int) -> dict[str, Any]:
        """``_sandbox/stats``: sendings (created and stopped) and imports per job id, tokens issued,
        429s answered."""
        with self.store.lock:
            sends = collections.Counter(s.job for s in self.store.data.sendings)
            stopped = collections.Counter(s.job for s in self.store.data.sendings if s.stopped is not None)
            imports = collections.Counter(i.job for i in self.store.data.imports)
        return {
            "sends_created": dict(sends),
            "sends_cancelled": dict(stopped),
            "imports_created": dict(imports),
            "rate_limited": account.counters["rate_limited"],
            "tokens_issued": tokens_issued,
        }

    # Imports

    async def create_import(self, list_id: int, group: int | None, rows: list[RecipientIn]) -> int:
        """Save an import request into the list (and group) (its rows first) and queue it; its id."""
        store = self.store
        job_id = mailup_settings().field_id(JOB_FIELD)
        job = next(
            (
                j
                for row in rows
                for f in row.Fields
                if f.Id == job_id and (j := _job_of(f.Value or "")) is not None
            ),
            None,
        )
        if job is None:
            job = store.group(group).name if group is not None else "list"
        import_id = store.new_id("import")
        data = [
            {"Email": r.Email or "", "Fields": {str(f.Id): f.Value or "" for f in r.Fields}} for r in rows
        ]
        path = self.folder / UPLOADS_FOLDER / f"mailup-import-{import_id}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(atomic_write_bytes, path, orjson.dumps(data))
        record = MailUpImport(
            id=import_id, group=group, job=job, total=len(rows), created=_now().isoformat(), list=list_id
        )
        with store.lock:
            store.data.imports.append(record)
        await asyncio.to_thread(store.save)
        self.wakeup.set()
        log.info(
            "import received",
            extra={"account": self.folder.name, "import": import_id, "rows": len(rows), "job": job},
        )
        return import_id

    def _apply(self, record: MailUpImport) -> None:
        """Import the rows into the list (and group) and complete the import (in a worker thread)."""
        store = self.store
        path = self.folder / UPLOADS_FOLDER / f"mailup-import-{record.id}.json"
        rows: list[dict[str, Any]] = orjson.loads(path.read_bytes())
        new = update = repeated = invalid = without = 0
        seen: list[str] = []
        seen_keys: set[str] = set()
        with store.lock:
            for row in rows:
                email = str(row["Email"]).strip()
                if not email:
                    without += 1
                    continue
                if not valid_email(email):
                    invalid += 1
                    continue
                key = email.lower()
                if key in seen_keys:
                    repeated += 1
                    continue
                seen_keys.add(key)
                seen.append(key)
                recipient = store.by_email.get(key)
                if recipient is None:
                    recipient = store.add_recipient(email)
                    new += 1
                else:
                    update += 1
                recipient.fields.update(row["Fields"])
                if record.group is not None and record.group not in recipient.groups:
                    recipient.groups.append(record.group)
            record.rows = _rows_body(len(rows), new, update, repeated, invalid, without)
            # MailUp's import: new recipients are subscribed to the list, the others keep their status
            self.contacts.add_subscribed(str(record.list), seen)
            record.status = 3
            record.end = _now().isoformat()
            store.save()
        path.unlink(missing_ok=True)

    async def run_imports(self, delay_s: float) -> None:
        """Carry out the imports one at a time, in arrival order: 1 for ``delay_s``, 2 as long, 3."""
        store = self.store
        while True:
            self.wakeup.clear()
            with store.lock:
                record = next((i for i in store.data.imports if i.status in (1, 2)), None)
            if record is None:
                await self.wakeup.wait()
                continue
            if record.status == 1:
                await asyncio.sleep(delay_s)
                with store.lock:
                    record.status = 2
                    record.start = _now().isoformat()
                await asyncio.to_thread(store.save)
            await asyncio.sleep(delay_s)
            await asyncio.to_thread(self._apply, record)
            log.info("import done", extra={"account": self.folder.name, "import": record.id})

    # Sendings

    def queue(self, account: Account, sending: Sending) -> str | None:
        """The sending's queue (``Undefined``, ``Deferred``, ``Immediate``), or None once delivery
        started (or if it failed)."""
        record = account.state.sends.get(sending.send_id) if sending.send_id else None
        if sending.stopped is not None or (
            record is not None and record.state in (SendState.SENT, SendState.FAILED)
        ):
            return None
        if sending.deferred is not None:
            return "Deferred" if _now() < datetime.fromisoformat(sending.deferred) else "Immediate"
        return "Immediate" if sending.confirmed is not None else "Undefined"

    async def create_sending(
        self, account: Account, message: int, list_id: int, group: int | None, deferred: datetime | None
    ) -> Sending:
        """A new sending of ``message`` to the list's subscribed members (of ``group``, if given)."""
        store = self.store
        members = self.members(list_id, group)
        if not members:
            raise bad_request("No subscribed recipients to send to")
        job_field = mailup_settings().field_id(JOB_FIELD)
        jobs = collections.Counter(
            job
            for r in members
            if job_field is not None
            and (job := _job_of(r.fields.get(str(job_field), ""), message)) is not None
        )
        sending_id = store.new_id("sending")
        job = jobs.most_common(1)[0][0] if jobs else f"sending-{sending_id}"
        # The recipients addressed, as an engine import: (email, IdRecipient) in IdRecipient order.
        import_id = f"mailup-sending-{sending_id}"
        rows = [(r.email, str(r.id)) for r in members]
        await asyncio.to_thread(_write_members, account.list_store(import_id), rows)
        await account.imported_list(import_id, len(rows), list_id=f"list-{list_id}")
        sending = Sending(
            id=sending_id,
            message=message,
            group=group,
            list=list_id,
            job=job,
            recipients=len(rows),
            import_id=import_id,
            created=_now().isoformat(),
            deferred=deferred.isoformat() if deferred is not None else None,
            bad_rows=mailup_settings().bad_rows,
        )
        with store.lock:
            store.data.sendings.append(sending)
        await asyncio.to_thread(store.save)
        log.info(
            "sending created",
            extra={
                "account": account.name,
                "sending": sending_id,
                "message_id": message,
                "job": job,
                "recipients": len(rows),
                "deferred": sending.deferred,
            },
        )
        if deferred is not None:
            await self.start_sending(account, sending)
        return sending

    async def defer(self, account: Account, sending: Sending, when: datetime) -> None:
        """Schedule an Undefined sending for ``when`` (a confirmed, deferred or stopped one: nothing
        happens)."""
        if sending.confirmed is not None or sending.deferred is not None or sending.stopped is not None:
            return
        with self.store.lock:
            sending.deferred = when.isoformat()
        await asyncio.to_thread(self.store.save)
        await self.start_sending(account, sending)

    async def confirm(self, account: Account, sending: Sending) -> None:
        """Confirm an Undefined sending (again, or a deferred or stopped one: nothing happens)."""
        if sending.confirmed is not None or sending.deferred is not None or sending.stopped is not None:
            return
        with self.store.lock:
            sending.confirmed = _now().isoformat()
        await asyncio.to_thread(self.store.save)
        await self.start_sending(account, sending)

    async def start_sending(self, account: Account, sending: Sending) -> None:
        """Schedule the engine send of a confirmed (or deferred) sending: it starts ``PHASE_DELAY_S``
        after the confirmation (or the ``datetime``); a sending of a job already sent shares its send."""
        since = sending.deferred or sending.confirmed
        assert since is not None
        start = datetime.fromisoformat(since) + timedelta(seconds=account.settings.phase_delay_s)
        attrs = {
            "message": str(sending.message),
            "sending": str(sending.id),
            "bad_rows": str(sending.bad_rows),
            "list": str(sending.list),
        }
        record, _ = await account.create_send(
            sending.import_id, str(sending.message), sending.job, start, attrs
        )
        with self.store.lock:
            sending.send_id = record.send_id
        await asyncio.to_thread(self.store.save)

    async def stop(self, account: Account, sending: Sending) -> bool:
        """Take a sending out of its queue before its delivery starts (again: nothing happens);
        False once delivery started (or the sending failed)."""
        if sending.stopped is not None:
            return True
        if sending.send_id is not None:
            record = await account.cancel_send(sending.send_id)
            if record.state is not SendState.CANCELLED:
                return False
        with self.store.lock:
            sending.stopped = _now().isoformat()
        await asyncio.to_thread(self.store.save)
        log.info(
            "sending stopped", extra={"account": account.name, "sending": sending.id, "job": sending.job}
        )
        return True

    def sending_item(self, account: Account, sending: Sending, state: str | None = None) -> dict[str, Any]:
        """An ``EmailSendingItem``."""
        state = state or self.queue(account, sending) or "Immediate"
        start = None if state == "Undefined" else api_time(sending.deferred or sending.confirmed)
        return {
            "Id": sending.id,
            "IdList": sending.list,
            "IdMessage": sending.message,
            "Notes": "",
            "StartDate": start,
            "State": state,
            "Subject": f"Message {sending.message}",
            "Type": "Newsletter",
        }

    def history_item(self, account: Account, sending: Sending) -> dict[str, Any] | None:
        """The sending's SendHistory item, once delivery started: MailUp's shape, which names no
        sending and no list (``EndDate`` null while in delivery)."""
        record = account.state.sends.get(sending.send_id) if sending.send_id else None
        if record is None or record.state is not SendState.SENT:
            return None
        end = None
        if record.responses_complete:
            manifest = account.folder / MANIFEST / f"{record.external_id}.json"
            try:
                end = api_time(datetime.fromtimestamp(manifest.stat().st_mtime, UTC))
            except FileNotFoundError:
                end = api_time(record.finished_at)
        return {
            "EndDate": end,
            "Kb_transferred": sending.recipients * KB_PER_RECIPIENT,
            "Recipients": sending.recipients,
            "SenderEmail": SENDER_EMAIL,
            "SenderName": SENDER_NAME,
            "StartDate": api_time(record.started_at),
            "idMessage": sending.message,
        }

    # Recipients' subscriptions (the account's contact book)

    def _recipient_by_id(self, recipient_id: int) -> Recipient:
        with self.store.lock:
            found = self.store.by_id.get(recipient_id)
        if found is None:
            raise not_found(f"Recipient {recipient_id} not found")
        return found

    def _set(
        self, list_id: int, recipient: Recipient, state: ContactState, reason: str, **fields: str
    ) -> None:
        self.contacts.set(
            str(list_id), recipient.email, state, reason=reason, via=Via.API, fields=fields or None
        )

    async def add(self, list_id: int, email: str, fields: dict[int, str], confirm: bool) -> int:
        """``POST …/List/{list}/Recipient``: the recipient (created or its fields updated) is
        subscribed, or pending with ``confirm``, when new to the list or removed from it; a pending
        or subscribed one stays so; an unsubscribed one stays so, unless ``confirm`` asks it again
        (not after hard bounces). Its id."""
        with self.store.lock:
            recipient = self.store.recipient(email)
            recipient.fields.update({str(n): value for n, value in fields.items()})
        await asyncio.to_thread(self.store.save)
        record = self.contacts.get(str(list_id), email)
        state = record.state if record is not None else ContactState.REMOVED
        if state is ContactState.UNSUBSCRIBED and confirm:
            self._check_resubscribe(record, recipient)
        wanted = ContactState.PENDING if confirm else ContactState.SUBSCRIBED
        if state is ContactState.REMOVED or (state is ContactState.UNSUBSCRIBED and confirm):
            state = wanted
        if record is None or state is not record.state or fields:
            self._set(list_id, recipient, state, "subscribe", **_described(fields))
        return recipient.id

    def _check_resubscribe(self, record: ContactRecord | None, recipient: Recipient) -> None:
        """MailUp subscribes no recipient again by API after it unsubscribed through hard bounces."""
        if record is not None and record.state is ContactState.UNSUBSCRIBED and record.via is Via.BOUNCE:
            raise bad_request(
                f"Recipient {recipient.id} was unsubscribed after hard bounces and cannot be subscribed again"
            )

    def subscribe(self, list_id: int, recipient_id: int) -> None:
        """``POST …/List/{list}/Subscribe/{recipient}``: subscribed now (a forced opt-in)."""
        recipient = self._recipient_by_id(recipient_id)
        record = self.contacts.get(str(list_id), recipient.email)
        self._check_resubscribe(record, recipient)
        if record is None or record.state is not ContactState.SUBSCRIBED:
            self._set(list_id, recipient, ContactState.SUBSCRIBED, "subscribe")

    def unsubscribe(self, list_id: int, recipient_id: int) -> None:
        """``DELETE …/List/{list}/Unsubscribe/{recipient}``: unsubscribed (again: nothing changes)."""
        recipient = self._recipient_by_id(recipient_id)
        if self.status(list_id, recipient.email) is not ContactState.UNSUBSCRIBED:
            self._set(list_id, recipient, ContactState.UNSUBSCRIBED, "unsubscribe")

    def remove(self, list_id: int, recipient_id: int) -> None:
        """``DELETE …/List/{list}/Recipient/{recipient}``: off the list; 404 if it is not on it."""
        recipient = self._recipient_by_id(recipient_id)
        if self.status(list_id, recipient.email) in (None, ContactState.REMOVED):
            raise not_found(f"Recipient {recipient_id} is not in list {list_id}")
        self._set(list_id, recipient, ContactState.REMOVED, "remove")

    async def update(self, recipient_id: int | None, email: str, fields: dict[int, str]) -> Recipient:
        """``PUT /Console/Recipient/Detail``: the recipient's fields (by its id, else its email),
        shared by all its lists."""
        with self.store.lock:
            found = (
                self.store.by_id.get(recipient_id) if recipient_id else self.store.by_email.get(email.lower())
            )
            if found is None:
                raise not_found(f"Recipient {recipient_id or email} not found")
            found.fields.update({str(n): value for n, value in fields.items()})
        await asyncio.to_thread(self.store.save)
        described = _described(fields)
        if described:
            changes = [
                ContactChange(r.list, r.email, r.state, r.reason, r.via, described)
                for r in self.contacts.records(email=found.email)
            ]
            self.contacts.set_many(changes)
        return found

    def listed(self, list_id: int, state: ContactState, email: str | None) -> list[dict[str, Any]]:
        """``GET …/List/{list}/Recipients/{status}``: the list's recipients in that status (of one
        email, if given), by ``idRecipient``."""
        records = self.contacts.records(str(list_id), email)
        with self.store.lock:
            found = [
                r
                for rec in records
                if rec.state is state and (r := self.store.by_email.get(rec.email)) is not None
            ]
        return [r.body() for r in sorted(found, key=lambda r: r.id)]

    # The (S)FTP import data sync: contacts files with each contact's status on the list

    async def import_contact_files(self) -> None:
        """Import the contacts files waiting in ``import/<list>/``, in name order; each is moved to
        ``done/`` (or ``failed/``, when it cannot be read at all) with its ``.result.json``."""
        for list_id in mailup_settings().mailup_lists:
            folder = self.folder / IMPORT / list_id
            for path in sorted(folder.glob("*.csv")):
                if path.name.startswith("."):
                    continue  # still being uploaded
                try:
                    result = await asyncio.to_thread(self.import_contacts, path, list_id)
                    outcome = "done"
                except ContactsFileError as exc:
                    result, outcome = {"file": path.name, "list": list_id, "error": str(exc)}, "failed"
                await asyncio.to_thread(_file_away, path, outcome, result)
                log.info(
                    "contacts file imported",
                    extra={"account": self.folder.name, "outcome": outcome, **result},
                )

    def import_contacts(self, path: Path, list_id: str) -> dict[str, Any]:
        """One contacts file (in a worker thread): ``Email``, an optional ``Status`` and personal
        data fields by description; its result, with the lines it left out and why."""
        settings = mailup_settings()
        try:
            rows = list(
                csv.reader(io.StringIO(path.read_bytes().decode("utf-8-sig"), newline=""), delimiter=";")
            )
        except (UnicodeDecodeError, csv.Error) as exc:
            raise ContactsFileError(f"not a UTF-8 CSV file: {exc}") from None
        header = [cell.strip() for cell in rows[0]] if rows else []
        if "Email" not in header:
            raise ContactsFileError("the header has no Email column")
        unknown = [c for c in header if c not in ("Email", "Status") and settings.field_id(c) is None]
        if unknown or len(set(header)) != len(header):
            raise ContactsFileError(f"columns that are no personal data field, or twice: {unknown or header}")
        changes: list[ContactChange] = []
        errors: list[dict[str, Any]] = []
        seen: set[str] = set()
        with self.store.lock:
            for line, row in enumerate(rows[1:], start=2):
                if not any(cell.strip() for cell in row):
                    continue
                problem, change = self._contact_row(list_id, header, row, seen)
                if problem is not None:
                    errors.append({"line": line, "error": problem})
                elif change is not None:
                    changes.append(change)
            self.store.save()
        self.contacts.set_many(changes)
        states = collections.Counter(ContactState(c.state).value for c in changes)
        return {
            "file": path.name,
            "list": list_id,
            "imported": len(changes),
            "states": dict(states),
            "errors": errors,
        }

    def _contact_row(
        self, list_id: str, header: list[str], row: list[str], seen: set[str]
    ) -> tuple[str | None, ContactChange | None]:
        """(why the row is left out, or None; its change) — with the store's lock held."""
        if len(row) != len(header):
            return f"{len(row)} fields, want {len(header)}", None
        values = dict(zip(header, row, strict=True))
        email = values.pop("Email").strip().lower()
        status = values.pop("Status", "").strip().lower()
        if not well_formed(email):
            return f"invalid email address {email!r}", None
        if email in seen:
            return f"{email} is in the file twice", None
        seen.add(email)
        if status and status not in FILE_STATES:
            return f"unknown Status {status!r} (known: {', '.join(FILE_STATES)})", None
        if any(len(v) > MAX_VALUE for v in values.values()):
            return f"a value over {MAX_VALUE} characters", None
        record = self.contacts.get(list_id, email)
        current = record.state if record is not None else ContactState.REMOVED
        # no Status: MailUp's usual import (new recipients subscribed, the others keep theirs)
        state = (
            FILE_STATES[status]
            if status
            else (ContactState.SUBSCRIBED if current is ContactState.REMOVED else current)
        )
        bounced = (
            record is not None and record.state is ContactState.UNSUBSCRIBED and record.via is Via.BOUNCE
        )
        if bounced and state in (ContactState.SUBSCRIBED, ContactState.PENDING):
            return f"{email} was unsubscribed after hard bounces and is not subscribed again", None
        recipient = self.store.recipient(email)
        settings = mailup_settings()
        recipient.fields.update({str(settings.field_id(name)): value for name, value in values.items()})
        return None, ContactChange(list_id, email, state, "import", Via.FILE, values or None)

    # Changes made on MailUp's side: its webhooks

    def queue_hooks(self, forms: Iterable[dict[str, str]]) -> None:
        """Queue webhook calls (the watcher posts them when ``MAILUP_WEBHOOK_URL`` is set)."""
        if mailup_settings().mailup_webhook_url:
            self.webhooks.extend(forms)

    async def report(self, account: Account, event: ContactEvent) -> None:
        """A change made at MailUp (``Flavor.on_contact_event``) as its Subscribe, Unsubscribe or
        Delete webhook calls it; a pending one (only an API caller makes one) calls none."""
        record = event.record
        if record.list not in mailup_settings().mailup_lists:
            raise not_found(f"List {record.list} not found")
        if record.state is ContactState.PENDING:
            return
        event_type, source = WEBHOOK_EVENTS[record.state]
        reason = (
            str(UNSUBSCRIBE_REASONS.get(record.via, 1)) if record.state is ContactState.UNSUBSCRIBED else ""
        )
        with self.store.lock:
            recipient = self.store.recipient(record.email)
            groups = self.store.groups_in(recipient, record.list)
        send = account.send_of_job(event.job) if event.job else None
        message = int(send.attrs.get("message", "0")) if send is not None else 0
        await asyncio.to_thread(self.store.save)
        hook = Hook(event_type, source, record.changed_at, record.list, record.email, message, reason)
        self.queue_hooks(
            [webhook_form(webhook_params(mailup_settings().mailup_webhook_params), hook, recipient, groups)]
        )
        self.hooked.set()
        log.info(
            "contact change reported",
            extra={
                "account": account.name,
                "list": record.list,
                "state": record.state.value,
                "hook": event_type,
            },
        )

    # Statistics

    def statistics(self, account: Account, message: int, kind: str) -> list[dict[str, Any]]:
        """A statistics endpoint's items for a message: its sendings' released events, aggregated."""
        with self.store.lock:
            send_ids = list(
                dict.fromkeys(
                    s.send_id for s in self.store.data.sendings if s.message == message and s.send_id
                )
            )
        logs = [(send_id, account.event_log(send_id)) for send_id in send_ids]
        signature = tuple((send_id, log.total(kind)) for send_id, log in logs)
        cached = self._stats.get((message, kind))
        if cached is not None and cached[0] == signature:
            return cached[1]
        items: dict[tuple[int, str], dict[str, Any]] = {}
        for _send_id, event_log in logs:
            for event in event_log.page(kind, 0, event_log.total(kind)):
                url = event.get("Url", "")
                key = (event["IdRecipient"], url)
                item = items.get(key)
                if item is None:
                    item = {
                        "Email": event["Email"],
                        "IdMessage": message,
                        "IdRecipient": event["IdRecipient"],
                    }
                    items[key] = item
                if kind in (VIEWS, CLICKS):
                    item["Count"] = item.get("Count", 0) + 1
                if kind == CLICKS:
                    item["Url"] = url
                elif kind == BOUNCES:
                    item["Code"] = event["Code"]
                elif kind == UNSUBSCRIPTIONS:
                    item["Reason"] = event["Reason"]
        result = [dict(sorted(items[key].items())) for key in sorted(items)]
        self._stats[message, kind] = (signature, result)
        return result

    def clicks(self, account: Account, message: int) -> list[dict[str, Any]]:
        """``List/Clicks``: each recipient's clicks on any link of the message."""
        per: dict[int, dict[str, Any]] = {}
        for item in self.statistics(account, message, CLICKS):
            found = per.setdefault(
                item["IdRecipient"], {"Count": 0, "Email": item["Email"], "IdRecipient": item["IdRecipient"]}
            )
            found["Count"] += item["Count"]
        return [per[key] for key in sorted(per)]

    def url_clicks(self, account: Account, message: int) -> list[dict[str, Any]]:
        """``List/UrlClicks``: the clicks on each link of the message."""
        counts: collections.Counter[str] = collections.Counter()
        for item in self.statistics(account, message, CLICKS):
            counts[item["Url"]] += item["Count"]
        return [{"Count": counts[url], "IdMessage": message, "Url": url} for url in sorted(counts)]

    # Released steps: recipients' states, export files, webhooks (in the writer's worker thread)

    def sync(self, broadcast: Broadcast) -> Export:
        """Handle the send's event-log steps on disk not handled yet; the send's export record."""
        store = self.store
        with store.lock:
            export = store.data.exports.setdefault(broadcast.send_id, Export())
        folder = broadcast.account_dir / EVENTS_FOLDER / broadcast.send_id
        while (records := read_step(folder, export.synced + 1)) is not None:
            self._sync_step(broadcast, export, [item for _stream, item in records])
        return export

    def _sync_step(self, broadcast: Broadcast, export: Export, items: list[dict[str, Any]]) -> None:
        store, settings = self.store, mailup_settings()
        message = int(broadcast.attrs["message"])
        sending = broadcast.attrs["sending"]
        list_id = broadcast.attrs.get("list", str(LIST_ID))
        key_field, job_field = settings.field_id(KEY_FIELD), settings.field_id(JOB_FIELD)
        params = webhook_params(settings.mailup_webhook_params)
        rows: list[list[str]] = []
        hooks: list[dict[str, str]] = []
        left: list[ContactChange] = []
        unattributable = 0
        with store.lock:
            for item in items:
                recipient = store.by_id.get(item["IdRecipient"])
                fields = recipient.fields if recipient is not None else {}
                key = fields.get(str(key_field), "")
                job = fields.get(str(job_field), "")
                event_type = EventType(item["Type"])
                if event_type in STATUS_TYPES:
                    details = item.get("Url") or item.get("Code") or ""
                    rows.append(
                        [
                            list_id,
                            sending,
                            str(message),
                            item["Email"],
                            f"Message {message}",
                            STATUS_TYPES[event_type],
                            details,
                            rome_time(item["At"]),
                            rome_time(broadcast.t0),
                            key,
                            job,
                        ]
                    )
                    if job.partition(":")[0] != str(message) or not job.partition(":")[2]:
                        unattributable += 1
                if event_type in REASONS:
                    hook = Hook(
                        "Unsubscribe",
                        "Recipient",
                        item["At"],
                        list_id,
                        item["Email"],
                        message,
                        str(item["Reason"]),
                    )
                    hooks.append(webhook_form(params, hook, recipient, store.groups_in(recipient, list_id)))
                if event_type in LEAVING:
                    via, reason = LEAVING[event_type]
                    left.append(ContactChange(list_id, item["Email"], ContactState.UNSUBSCRIBED, reason, via))
        self.contacts.set_many(left)  # they leave the list: reported by the webhook and the API already
        written = bool(rows) and settings.mailup_export
        bad: list[list[str]] = []
        if written:
            count = int(broadcast.attrs.get("bad_rows", "0"))
            bad = [_bad_row(rows[i % len(rows)], export.bad_rows + i + 1) for i in range(count)]
            if export.pending is None:
                with store.lock:
                    store.data.export_seq += 1
                    stamp = _now().astimezone(ROME).strftime(EXPORT_TIME)
                    export.pending = f"{STATISTICS}/statistics_{stamp}_{store.data.export_seq}.csv"
                    store.save()
            name = export.pending
            assert name is not None
            target = broadcast.account_dir / name
            if not target.exists() and not (broadcast.account_dir / ARCHIVE / target.name).exists():
                with atomic_writer(target) as out:
                    for row in (list(EXPORT_HEADER), *rows, *bad):
                        out.write(";".join(csv_field(v, ";") for v in row) + "\r\n")
                log.info(
                    "export file written",
                    extra={
                        "send_id": broadcast.send_id,
                        "file": name,
                        "rows": len(rows),
                        "bad_rows": len(bad),
                    },
                )
        with store.lock:
            if written and export.pending is not None:
                export.files.append(export.pending)
                export.bad_rows += len(bad)
                export.unattributable += unattributable
            export.pending = None
            export.synced += 1
            store.save()
        self.queue_hooks(hooks)


WEBHOOK_EVENTS = {
    ContactState.SUBSCRIBED: ("Subscribe", "Recipient"),
    ContactState.UNSUBSCRIBED: ("Unsubscribe", "Recipient"),
    ContactState.REMOVED: ("Delete", "Console"),
}
"""The webhook a change made at MailUp calls (``[EventType]``, ``[EventSource]``), by its new state."""
UNSUBSCRIBE_REASONS = {Via.COMPLAINT: 2, Via.BOUNCE: 3}
"""``[Reason]`` of an unsubscribe by how it came (else 1, the recipient's own)."""


FILE_STATES = {state.value: state for state in ContactState}
"""A contacts file's ``Status`` values (any case); empty: the import's usual rule."""


class ContactsFileError(Exception):
    """A contacts file that cannot be imported at all (its encoding, its header)."""


def _file_away(path: Path, outcome: str, result: dict[str, Any]) -> None:
    """Move an imported contacts file to ``done/`` or ``failed/`` beside it, with its result."""
    target = path.parent / outcome / path.name
    target.parent.mkdir(exist_ok=True)
    atomic_write_bytes(
        target.with_name(path.name + ".result.json"), orjson.dumps(result, option=orjson.OPT_INDENT_2)
    )
    path.replace(target)


def _described(fields: dict[int, str]) -> dict[str, str]:
    """Field values by id as the contact book keeps them: by the field's description."""
    settings = mailup_settings()
    return {settings.field_name(n): value for n, value in fields.items()}


def webhook_date(at: float) -> str:
    """``[EventDate]`` as MailUp's example writes it: ``2012-09-12T11:18:37.664+02`` (Italian time)."""
    moment = datetime.fromtimestamp(at, ROME)
    offset = moment.utcoffset()
    assert offset is not None
    hours = int(offset.total_seconds()) // 3600
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}{hours:+03d}"


@dataclass(frozen=True)
class Hook:
    """What one webhook call reports: MailUp's event, its source, when, which list and recipient,
    the message that caused it (0: none) and an unsubscribe's reason code."""

    event_type: str
    source: str
    at: float
    list_id: str
    email: str
    message: int = 0
    reason: str = ""


def webhook_form(
    params: tuple[tuple[str, str], ...], hook: Hook, recipient: Recipient | None, groups: str
) -> dict[str, str]:
    """A webhook call's parameters: ``params`` with MailUp's placeholders filled from the event,
    the recipient's numbered fields and its ``groups`` in the list."""
    fields = recipient.fields if recipient is not None else {}
    values = {
        "EventDate": webhook_date(hook.at),
        "IdConsole": str(ID_CONSOLE),
        "IdList": hook.list_id,
        "IdNL": str(hook.message),
        "EventType": hook.event_type,
        "EventSource": hook.source,
        "Reason": hook.reason,
        "Email": hook.email,
        "Prefix": "",
        "Number": "",
        "Groups": groups,
        "Channel": str(MAIL_CHANNEL),
        **{f"Field{n:02d}": fields.get(str(n), "") for n in range(1, MAX_FIELDS + 1)},
    }
    return {name: fill_placeholders(value, values) for name, value in params}


def _write_members(path: Path, rows: list[tuple[str, str]]) -> None:
    with recipient_store(path) as add:
        for email, key in rows:
            add(email, key)


def _bad_row(template: list[str], k: int) -> list[str]:
    """The send's ``k``-th bad export row: a good row spoiled by kind (:data:`BAD_ROW_KINDS`)."""
    row = list(template)
    kind = (k - 1) % len(BAD_ROW_KINDS)
    if kind == 0:
        row[5] = "XXX"
    elif kind == 1:
        row[7] = "2026-13-45"
    elif kind == 2:
        row.pop()
    else:
        row[5], row[6] = "NCO", "999"
    return row


_RUNTIMES: dict[Path, MailUp] = {}
_RUNTIMES_LOCK = threading.Lock()


def mailup(account: Account) -> MailUp:
    """The account's runtime (created, with its saved state, on first use)."""
    with _RUNTIMES_LOCK:
        found = _RUNTIMES.get(account.folder)
        if found is None:
            found = _RUNTIMES[account.folder] = MailUp(account.folder, account.contacts)
        return found


# Authentication

_ISSUED: dict[str, str] = {}
"""Access tokens ever issued in this process, with their account: tells an expired one from an
unknown one."""


@TOKEN_ERRORS.guard
async def token(request: web.Request) -> web.Response:
    """``POST {token_path}``: the password and refresh_token grants (form fields)."""
    context = request.app[CONTEXT]
    account = context.accounts.get(request.match_info["account"])
    form = await request.post()
    fields = {k: v for k, v in form.items() if isinstance(v, str)}
    grant = fields.get("grant_type", "")
    if grant not in ("password", "refresh_token"):
        raise EspError(400, "unsupported_grant_type", f"grant_type {grant!r} is not supported")
    client_ok = bool(fields.get("client_id")) and context.token_matches(fields.get("client_secret", ""))
    if account is None or not client_ok:
        raise EspError(400, "invalid_grant", "The client credentials are invalid")
    if grant == "password":
        if fields.get("username") != account.name or not context.token_matches(fields.get("password", "")):
            raise EspError(400, "invalid_grant", "The user credentials are incorrect")
        issued = context.tokens.issue(account.name)
    else:
        refreshed = context.tokens.refresh(fields.get("refresh_token", ""))
        if refreshed is None or refreshed.account != account.name:
            raise EspError(400, "invalid_grant", "The refresh token is invalid or expired")
        issued = refreshed
    _ISSUED[issued.access_token] = account.name
    return _json(
        {
            "access_token": issued.access_token,
            "expires_in": issued.expires_in,
            "refresh_token": issued.refresh_token,
            "token_type": "bearer",
        }
    )


def _authorise(request: web.Request, account: str) -> None:
    access = bearer_token(request)
    owner = request.app[CONTEXT].tokens.account_of(access) if access else None
    if owner == account:
        return
    if owner is None and _ISSUED.get(access) == account:
        raise EspError(401, "unauthorized", "Authorization error: Access token is expired")
    raise EspError(401, "unauthorized", "Authorization error: Invalid access token")


# Requests


@dataclass(frozen=True)
class Call:
    """One authorised API call: the account, its runtime and the query (names in lower case)."""

    request: web.Request
    account: Account
    mailup: MailUp
    query: dict[str, str]

    def path_int(self, name: str) -> int:
        """An id in the path; 400 unless it is an integer."""
        text = self.request.match_info[name]
        if not text.isascii() or not text.isdigit():
            raise bad_request(f"{name} must be an integer, not {text!r}")
        return int(text)

    def list_id(self) -> int:
        """The list in the path; 404 unless it is one of the account's (``MAILUP_LISTS``)."""
        value = self.path_int("list")
        if str(value) not in mailup_settings().mailup_lists:
            raise not_found(f"List {value} not found")
        return value

    def message_id(self) -> int:
        """The message in the path; every positive id exists in every list."""
        value = self.path_int("message")
        if value < 1:
            raise not_found(f"Message {value} not found")
        return value

    def int_query(self, name: str, default: int, low: int) -> int:
        """An integer query parameter (case-insensitive name)."""
        text = self.query.get(name.lower())
        if text is None or text == "":
            return default
        if not text.isascii() or not text.isdigit() or int(text) < low:
            raise bad_request(f"{name} must be an integer of at least {low}")
        return int(text)

    def filter_value(self, pattern: re.Pattern[str]) -> str | None:
        """The value a ``filterby`` of the one form ``pattern`` matches (also wrapped in ``"…"``),
        None without one; 400 for any other expression."""
        if "filterby" not in self.query:
            return None
        expression = self.query["filterby"].strip()
        if len(expression) >= 2 and expression[0] == expression[-1] == '"':
            expression = expression[1:-1]
        match = pattern.fullmatch(expression)
        if match is None:
            raise bad_request(f"Unsupported filter {self.query['filterby']!r}")
        return match.group(1)

    def no_filter(self) -> None:
        """Refuse ``filterby`` where the sandbox does not filter."""
        if "filterby" in self.query:
            raise bad_request("filterby is not supported here")

    async def json_body(self) -> Any:
        """The request body as JSON; 400 if it is not."""
        try:
            return orjson.loads(await self.request.read())
        except orjson.JSONDecodeError:
            raise bad_request("The request body is not valid JSON") from None


def page(call: Call, items: list[dict[str, Any]]) -> dict[str, Any]:
    """The paging envelope for ``pageSize`` (capped at 1000) and ``pageNumber`` (0-based)."""
    size = min(call.int_query("pageSize", DEFAULT_PAGE_SIZE, 1), MAX_PAGE_SIZE)
    number = call.int_query("pageNumber", 0, 0)
    skipped = number * size
    return {
        "IsPaginated": True,
        "Items": items[skipped : skipped + size],
        "PageNumber": number,
        "PageSize": size,
        "Skipped": skipped,
        "TotalElementsCount": len(items),
    }


def unpaged(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A list MailUp answers whole, as its SendHistory example: ``IsPaginated`` false."""
    return {
        "IsPaginated": False,
        "Items": items,
        "PageNumber": 0,
        "PageSize": DEFAULT_PAGE_SIZE,
        "Skipped": 0,
        "TotalElementsCount": len(items),
    }


def _query(request: web.Request) -> dict[str, str]:
    query: dict[str, str] = {}
    for name, value in request.query.items():
        lower = name.lower()
        if lower in query:
            raise bad_request(f"query parameter {name} is given more than once")
        query[lower] = value
    return query


Endpoint = Callable[[Call], Awaitable[Any]]


def api(endpoint: Endpoint) -> Handler:
    """A console or statistics route: the access token (401), the rate limit (429), then the call."""

    async def handle(request: web.Request) -> web.StreamResponse:
        name = request.match_info["account"]
        account = found(request.app[CONTEXT].accounts.get(name), f"Account {name} not found")
        _authorise(request, account.name)
        runtime = mailup(account)
        runtime.check_limit(account)
        return _json(await endpoint(Call(request, account, runtime, _query(request))))

    return own_auth(ERRORS.guard(handle))


# Console endpoints


async def dynamic_fields(call: Call) -> dict[str, Any]:
    """``GET /Console/Recipient/DynamicFields``."""
    call.no_filter()
    names = mailup_settings().mailup_fields
    return page(call, [{"Description": name, "Id": n} for n, name in enumerate(names, 1)])


_FILTER_RE = re.compile(r"^Name=='(.*)'$", re.DOTALL)


async def groups(call: Call) -> dict[str, Any]:
    """``GET /Console/List/{list}/Groups`` (``filterby=Name=='…'`` only)."""
    list_id = call.list_id()
    wanted = call.filter_value(_FILTER_RE)
    with call.mailup.store.lock:
        found = [
            g.body()
            for g in call.mailup.store.data.groups
            if g.list == list_id and (wanted is None or g.name == wanted)
        ]
    return page(call, found)


class GroupIn(BaseModel):
    """The body of ``POST /Console/List/{list}/Group``."""

    model_config = ConfigDict(extra="ignore")

    Name: StrictStr
    Notes: StrictStr | None = None
    Deletable: bool = True


async def create_group(call: Call) -> dict[str, Any]:
    """``POST /Console/List/{list}/Group``."""
    list_id = call.list_id()
    try:
        body = GroupIn.model_validate(await call.json_body())
    except ValidationError as exc:
        raise bad_request(problems(exc)) from None
    if not body.Name.strip() or len(body.Name) > MAX_GROUP_NAME:
        raise bad_request(f"Name must have 1 to {MAX_GROUP_NAME} characters")
    store = call.mailup.store
    group = Group(
        id=store.new_id("group"),
        name=body.Name,
        notes=body.Notes or "",
        deletable=body.Deletable,
        list=list_id,
    )
    with store.lock:
        store.data.groups.append(group)
    await asyncio.to_thread(store.save)
    return group.body()


async def _import(call: Call, list_id: int, group: int | None) -> int:
    try:
        rows = IMPORT_BODY.validate_python(await call.json_body())
    except ValidationError as exc:
        raise bad_request(problems(exc)) from None
    for line, row in enumerate(rows):
        _check_fields(row.Fields, f"[{line}]: ")
    return await call.mailup.create_import(list_id, group, rows)


def _check_fields(fields: list[FieldIn], where: str) -> None:
    """400 for a field the account does not have or a value over 200 characters."""
    known = len(mailup_settings().mailup_fields)
    for value in fields:
        if not 1 <= value.Id <= known:
            raise bad_request(f"{where}unknown field Id {value.Id}")
        if len(value.Value or "") > MAX_VALUE:
            raise bad_request(f"{where}the value of field {value.Id} is over {MAX_VALUE} characters")


async def import_to_group(call: Call) -> int:
    """``POST /Console/Group/{group}/Recipients``: the bare import id."""
    call.no_filter()
    group = call.mailup.store.group(call.path_int("group"))
    return await _import(call, group.list, group.id)


async def import_to_list(call: Call) -> int:
    """``POST /Console/List/{list}/Recipients``: the bare import id."""
    call.no_filter()
    return await _import(call, call.list_id(), None)


class _Identified(Protocol):
    id: int


Record = TypeVar("Record", bound=_Identified)


def _by_path_id(call: Call, name: str, records: Iterable[Record], what: str) -> Record:
    """The record whose id the path's ``{name}`` gives; 404 if there is none."""
    wanted = call.path_int(name)
    found = next((r for r in records if r.id == wanted), None)
    if found is None:
        raise not_found(f"{what} {wanted} not found")
    return found


def _import_record(call: Call) -> MailUpImport:
    """The import named in the path (call with the store's lock held)."""
    return _by_path_id(call, "import", call.mailup.store.data.imports, "Import")


async def import_status(call: Call) -> dict[str, Any]:
    """``GET /Console/Imports/{import}``."""
    with call.mailup.store.lock:
        record = _import_record(call)
        return {
            "IdImport": record.id,
            "IdList": record.list,
            "IdGroups": [record.group] if record.group is not None else [],
            "StartDate": api_time(record.start),
            "EndDate": api_time(record.end),
            "Filename": "",
            "FieldSeparator": "",
            "IgnoreDoubleQuotes": False,
            "IgnoreFirstRow": False,
            "ImportAsUnsubscribed": False,
            "IncludePendingRecipients": False,
            "OverwriteEmptyFields": True,
            "ReplaceExistingGroup": False,
            "SendConfirmationEmail": False,
            "StatusCode": record.status,
            "Rows": record.rows if record.rows is not None else _rows_body(record.total),
        }


async def import_state(call: Call) -> dict[str, Any]:
    """``GET /Console/Import/{import}``: the import's status (``Completed`` and its counts)."""
    with call.mailup.store.lock:
        record = _import_record(call)
        rows = record.rows if record.rows is not None else _rows_body(record.total)
    valid, invalid = rows["Valid"], rows["Invalid"]
    return {
        "Completed": record.status in (3, 4),
        "CreatedRecipients": valid["EmailNew"],
        "ImportedRecipients": valid["EmailNew"] + valid["EmailUpdate"],
        "NotValidRecipients": invalid["Total"],
        "StatusCode": record.status,
        "UpdatedRecipients": valid["EmailUpdate"],
        "ValidRecipients": valid["Total"],
        "idImport": record.id,
    }


def _api_datetime(text: str, what: str) -> datetime:
    try:
        return datetime.strptime(text.strip(), API_TIME).replace(tzinfo=UTC)
    except ValueError:
        raise bad_request(f"{what} must look like 2026-11-22 10:00:00Z, not {text!r}") from None


def _datetime(call: Call) -> datetime | None:
    """The Send's ``datetime``, quoted as MailUp documents it: ``?datetime="2015-10-20 05:00:00Z"``."""
    text = call.query.get("datetime")
    if text is None:
        return None
    text = text.strip()
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise bad_request(f'datetime must be quoted, as datetime="2026-11-22 10:00:00Z", not {text!r}')
    return _api_datetime(text[1:-1], "datetime")


async def _send(call: Call, list_id: int, group: int | None) -> dict[str, Any]:
    message = call.message_id()
    deferred = _datetime(call)
    sending = await call.mailup.create_sending(call.account, message, list_id, group, deferred)
    return {
        "Id": sending.id,
        "Sent": sending.recipients,
        "InvalidRecipients": [],
        "UnprocessedRecipients": [],
        "idMessage": message,
    }


async def send_to_group(call: Call) -> dict[str, Any]:
    """``POST /Console/Group/{group}/Email/{message}/Send[?datetime=…]``."""
    call.no_filter()
    group = call.mailup.store.group(call.path_int("group"))
    return await _send(call, group.list, group.id)


async def send_to_list(call: Call) -> dict[str, Any]:
    """``POST /Console/List/{list}/Email/{message}/Send[?datetime=…]``."""
    call.no_filter()
    return await _send(call, call.list_id(), None)


def _sending(call: Call) -> Sending:
    return _by_path_id(call, "sending", call.mailup.store.data.sendings, "Sending")


async def confirm(call: Call) -> dict[str, Any]:
    """``POST /Console/Email/Sendings/{sending}/Immediate``."""
    call.no_filter()
    sending = _sending(call)
    await call.mailup.confirm(call.account, sending)
    return call.mailup.sending_item(call.account, sending)


class DeferredIn(BaseModel):
    """The body of ``POST /Console/Email/Sendings/{sending}/Deferred``."""

    model_config = ConfigDict(extra="ignore")

    Date: StrictStr


async def defer(call: Call) -> dict[str, Any]:
    """``POST /Console/Email/Sendings/{sending}/Deferred`` with ``{"Date": …}`` (UTC)."""
    call.no_filter()
    sending = _sending(call)
    try:
        body = DeferredIn.model_validate(await call.json_body())
    except ValidationError as exc:
        raise bad_request(problems(exc)) from None
    await call.mailup.defer(call.account, sending, _api_datetime(body.Date, "Date"))
    return call.mailup.sending_item(call.account, sending)


async def stop(call: Call) -> None:
    """``POST /Console/Email/Sendings/{sending}/Stop``: out of its queue, nothing sent (200, no
    body); 400 once its delivery started. One call per ``MAILUP_STOP_INTERVAL_S`` (429)."""
    call.no_filter()
    sending = _sending(call)
    call.mailup.check_stop_limit(call.account)
    if not await call.mailup.stop(call.account, sending):
        raise bad_request(f"Sending {sending.id} is completed and cannot be stopped")


def queue(name: str) -> Endpoint:
    """``GET /Console/Email/Sendings/{name}``: the sendings in that queue, by id."""

    async def listing(call: Call) -> dict[str, Any]:
        call.no_filter()
        runtime = call.mailup
        with runtime.store.lock:
            sendings = list(runtime.store.data.sendings)
        items = [
            runtime.sending_item(call.account, s, name)
            for s in sendings
            if runtime.queue(call.account, s) == name
        ]
        return page(call, items)

    return listing


async def send_history(call: Call) -> dict[str, Any]:
    """``GET /Console/List/{list}/Email/{message}/SendHistory``."""
    call.no_filter()
    list_id = call.list_id()
    message = call.message_id()
    runtime = call.mailup
    with runtime.store.lock:
        sendings = [s for s in runtime.store.data.sendings if s.message == message and s.list == list_id]
    items = [item for s in sendings if (item := runtime.history_item(call.account, s)) is not None]
    return unpaged(items)


async def statistics(call: Call) -> dict[str, Any]:
    """``GET /Message/{message}/List/{kind}`` of the statistics service."""
    call.no_filter()
    message = call.message_id()
    kind = call.request.match_info["kind"]
    if kind == CLICKS_PER_RECIPIENT:
        return page(call, call.mailup.clicks(call.account, message))
    if kind == CLICKS_PER_URL:
        return page(call, call.mailup.url_clicks(call.account, message))
    if kind not in (RECIPIENTS, BOUNCES, VIEWS, CLICKS, UNSUBSCRIPTIONS):
        raise not_found(f"Unknown statistics {kind}")
    return page(call, call.mailup.statistics(call.account, message, kind))


async def count_recipients(call: Call) -> int:
    """``GET /Message/{message}/Count/Recipients``: how many recipients the message was sent to."""
    call.no_filter()
    return len(call.mailup.statistics(call.account, call.message_id(), RECIPIENTS))


# Recipients of a list: their subscription, one at a time


STATUSES = {
    "Subscribed": ContactState.SUBSCRIBED,
    "Unsubscribed": ContactState.UNSUBSCRIBED,
    "Pending": ContactState.PENDING,
}
"""``GET /Console/List/{list}/Recipients/<status>``: the three statuses a recipient may have on a list."""
_EMAIL_FILTER_RE = re.compile(r"^Email=='((?:[^']|'')*)'$", re.DOTALL)


class OneRecipientIn(BaseModel):
    """The body of ``POST …/List/{list}/Recipient`` and ``PUT /Console/Recipient/Detail``."""

    model_config = ConfigDict(extra="ignore")

    recipient_id: StrictInt | None = Field(default=None, alias="idRecipient")
    Email: StrictStr = ""
    Name: StrictStr | None = None
    Fields: list[FieldIn] = Field(default_factory=list)


async def _one_recipient(call: Call) -> tuple[OneRecipientIn, dict[int, str]]:
    """The body and its field values by id (400 for an unknown field or a value too long)."""
    try:
        body = OneRecipientIn.model_validate(await call.json_body())
    except ValidationError as exc:
        raise bad_request(problems(exc)) from None
    _check_fields(body.Fields, "")
    return body, {f.Id: f.Value or "" for f in body.Fields}


async def recipients_by_status(call: Call) -> dict[str, Any]:
    """``GET /Console/List/{list}/Recipients/{Subscribed|Unsubscribed|Pending}`` (``filterby``
    ``Email=='…'`` only, ``''`` for a quote)."""
    list_id = call.list_id()
    state = STATUSES.get(call.request.match_info["status"])
    if state is None:
        raise not_found(f"Unknown recipient status {call.request.match_info['status']}")
    email = call.filter_value(_EMAIL_FILTER_RE)
    if email is not None:
        email = email.replace("''", "'")
    return page(call, call.mailup.listed(list_id, state, email))


async def add_recipient(call: Call) -> int:
    """``POST /Console/List/{list}/Recipient[?ConfirmEmail=true]``: the recipient's id."""
    list_id = call.list_id()
    body, fields = await _one_recipient(call)
    email = body.Email.strip()
    if not well_formed(email):
        raise bad_request(f"Invalid email address {email!r}")
    confirm = call.query.get("confirmemail", "").strip().lower() == "true"
    return await call.mailup.add(list_id, email, fields, confirm)


async def subscribe(call: Call) -> bool:
    """``POST /Console/List/{list}/Subscribe/{recipient}``."""
    call.mailup.subscribe(call.list_id(), call.path_int("recipient"))
    return True


async def unsubscribe(call: Call) -> bool:
    """``DELETE /Console/List/{list}/Unsubscribe/{recipient}``."""
    call.mailup.unsubscribe(call.list_id(), call.path_int("recipient"))
    return True


async def remove(call: Call) -> bool:
    """``DELETE /Console/List/{list}/Recipient/{recipient}``."""
    call.mailup.remove(call.list_id(), call.path_int("recipient"))
    return True


async def update_recipient(call: Call) -> dict[str, Any]:
    """``PUT /Console/Recipient/Detail``: the recipient as it is now."""
    call.no_filter()
    body, fields = await _one_recipient(call)
    if body.recipient_id is None and not body.Email.strip():
        raise bad_request("idRecipient or Email is required")
    return (await call.mailup.update(body.recipient_id, body.Email.strip(), fields)).body()


async def sandbox_stats(request: web.Request) -> web.Response:
    """``GET <base>/_sandbox/stats`` (the sandbox bearer token; not rate-limited)."""
    account = account_of(request)
    tokens = request.app[CONTEXT].tokens.issued[account.name]
    return _json(mailup(account).stats(account, tokens))


# The stats route comes first: it replaces the shared one at the same path.
ROUTES = (
    web.get(f"{BASE}/_sandbox/stats", sandbox_stats),
    web.post(f"{BASE}{OAUTH_PATH}", own_auth(token)),
    web.get(f"{BASE}{CONSOLE}/Console/Recipient/DynamicFields", api(dynamic_fields)),
    web.get(f"{BASE}{CONSOLE}/Console/List/{{list}}/Groups", api(groups)),
    web.post(f"{BASE}{CONSOLE}/Console/List/{{list}}/Group", api(create_group)),
    web.post(f"{BASE}{CONSOLE}/Console/Group/{{group}}/Recipients", api(import_to_group)),
    web.post(f"{BASE}{CONSOLE}/Console/List/{{list}}/Recipients", api(import_to_list)),
    web.get(f"{BASE}{CONSOLE}/Console/Imports/{{import}}", api(import_status)),
    web.get(f"{BASE}{CONSOLE}/Console/Import/{{import}}", api(import_state)),
    web.post(f"{BASE}{CONSOLE}/Console/Group/{{group}}/Email/{{message}}/Send", api(send_to_group)),
    web.post(f"{BASE}{CONSOLE}/Console/List/{{list}}/Email/{{message}}/Send", api(send_to_list)),
    web.post(f"{BASE}{CONSOLE}/Console/Email/Sendings/{{sending}}/Immediate", api(confirm)),
    web.post(f"{BASE}{CONSOLE}/Console/Email/Sendings/{{sending}}/Deferred", api(defer)),
    web.post(f"{BASE}{CONSOLE}/Console/Email/Sendings/{{sending}}/Stop", api(stop)),
    *(
        web.get(f"{BASE}{CONSOLE}/Console/Email/Sendings/{name}", api(queue(name)))
        for name in ("Deferred", "Undefined", "Immediate")
    ),
    web.get(f"{BASE}{CONSOLE}/Console/List/{{list}}/Email/{{message}}/SendHistory", api(send_history)),
    web.get(f"{BASE}{CONSOLE}/Console/List/{{list}}/Recipients/{{status}}", api(recipients_by_status)),
    web.post(f"{BASE}{CONSOLE}/Console/List/{{list}}/Recipient", api(add_recipient)),
    web.post(f"{BASE}{CONSOLE}/Console/List/{{list}}/Subscribe/{{recipient}}", api(subscribe)),
    web.delete(f"{BASE}{CONSOLE}/Console/List/{{list}}/Unsubscribe/{{recipient}}", api(unsubscribe)),
    web.delete(f"{BASE}{CONSOLE}/Console/List/{{list}}/Recipient/{{recipient}}", api(remove)),
    web.put(f"{BASE}{CONSOLE}/Console/Recipient/Detail", api(update_recipient)),
    web.get(f"{BASE}{STATS}/Message/{{message}}/List/{{kind}}", api(statistics)),
    web.get(f"{BASE}{STATS}/Message/{{message}}/Count/Recipients", api(count_recipients)),
)


# Responses: the event log behind the statistics API, export files and webhooks


class MailUpResponses(EventLogFormat):
    """One stream per statistics endpoint; an item per released event (the API aggregates them)."""

    phases = usual_phases("sent", "bounces", "opens", "clicks", "unsubscribes")
    # Export rows have no event id: never two of one recipient with the same type, link and second.
    distinct_seconds = True

    def writer(self, account: Account, record: SendRecord, broadcast: Broadcast) -> PhaseWriter:
        """The usual writer, once the account's runtime exists (its steps are handled there)."""
        mailup(account)
        return super().writer(account, record, broadcast)

    def adjust(self, events: Iterator[Event]) -> Iterator[Event]:
        """MailUp's links; a complaining recipient's unsubscribe is left out (a complaint wins)."""
        batch: list[Event] = []
        for event in events:
            if batch and event.key != batch[0].key:
                yield from _recipient_events(batch)
                batch = []
            batch.append(event)
        yield from _recipient_events(batch)

    def stream(self, event: Event) -> str:
        """The statistics endpoint of the event."""
        return STREAMS[event.event_type]

    def item(self, broadcast: Broadcast, event: Event) -> dict[str, Any]:
        """The event: type, ``IdRecipient`` (the list store's key column), email, time, details."""
        item: dict[str, Any] = {
            "Type": event.event_type.value,
            "IdRecipient": int(event.key),
            "Email": event.email,
            "At": event.at,
        }
        if event.event_type in BOUNCE_CODES:
            item["Code"] = BOUNCE_CODES[event.event_type][event.number % 2]
        elif event.event_type is EventType.CLICK:
            item["Url"] = event.url
        elif event.event_type in REASONS:
            item["Reason"] = REASONS[event.event_type]
        return item

    def manifest_fields(self, broadcast: Broadcast) -> dict[str, Any]:
        """Called after every released step: handles it (export file, webhooks, unsubscriptions)
        first, then gives ``send_id`` as ``<message>:<idSending>``, the export files and counts."""
        if "message" not in broadcast.attrs:
            return {}
        export = _RUNTIMES[broadcast.account_dir].sync(broadcast)  # made by writer()
        return {
            "send_id": f"{broadcast.attrs['message']}:{broadcast.attrs['sending']}",
            "files": list(export.files),
            "export_unattributable": export.unattributable,
            "bad_rows": export.bad_rows,
        }


def _recipient_events(batch: list[Event]) -> Iterator[Event]:
    complained = any(e.event_type is EventType.COMPLAINT for e in batch)
    for event in batch:
        if complained and event.event_type is EventType.UNSUBSCRIBE:
            continue
        yield replace(event, url=LINKS.get(event.url, event.url)) if event.url else event


# Background work per account: imports one at a time, delayed sendings, webhooks


async def _post_webhook(http: aiohttp.ClientSession, url: str, form: dict[str, str]) -> None:
    for attempt in range(WEBHOOK_RETRIES + 1):
        status: int | str
        try:
            async with http.post(url, data=form) as resp:
                status = resp.status
                if 200 <= resp.status < 300:
                    return
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        log.warning("webhook call failed", extra={"status": status, "attempt": attempt + 1})
        if attempt < WEBHOOK_RETRIES:
            await asyncio.sleep(1.0)
    log.warning("webhook call dropped", extra={"email": form.get("Email")})


async def watch(account: Account) -> None:
    """Run the imports, start the sendings an earlier run left waiting, and call the webhook."""
    runtime = mailup(account)
    with runtime.store.lock:
        waiting = [
            s
            for s in runtime.store.data.sendings
            if s.send_id is None and (s.deferred is not None or s.confirmed is not None)
        ]
    for sending in waiting:  # confirmed (or deferred) when a stop came, not yet handed to the engine
        await runtime.start_sending(account, sending)
    account.spawn(runtime.run_imports(account.settings.import_delay_s), "mailup imports")
    for list_id in mailup_settings().mailup_lists:
        (account.folder / IMPORT / list_id).mkdir(parents=True, exist_ok=True)
    url = mailup_settings().mailup_webhook_url
    secret = account.settings.bearer_token.get_secret_value()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        while True:
            runtime.hooked.clear()
            while url and runtime.webhooks:
                form = {"Secret": secret, **runtime.webhooks.popleft()}
                target = url.replace("{account}", account.name)
                account.spawn(_post_webhook(http, target, form), "mailup webhook")
            await runtime.import_contact_files()
            with contextlib.suppress(TimeoutError):  # a change made at MailUp wakes it at once
                await asyncio.wait_for(runtime.hooked.wait(), account.settings.watch_interval_s)


async def on_contact_event(account: Account, event: ContactEvent) -> None:
    """``Flavor.on_contact_event``: MailUp calls its webhook (see :meth:`MailUp.report`)."""
    await mailup(account).report(account, event)


FLAVOR = Flavor(
    name="mailup",
    responses=MailUpResponses(),
    folders=(DROP, STATISTICS, ARCHIVE, MANIFEST, IMPORT),
    routes=ROUTES,
    watch=watch,
    check_settings=mailup_settings,
    on_contact_event=on_contact_event,
)
