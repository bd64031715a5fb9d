"""The ``deployteq`` flavor: Deployteq as docs/connectors/deployteq.md describes it.

- **CSV trigger.** Every ``IMPORT_DELAY_S`` the sandbox lists ``csv upload/*/Upload/``. A visible
  ``<trigger>+<job_id>.csv`` whose trigger is in ``CAMPAIGNS`` (``*`` = any) moves to ``Active`` at
  once, is read after ``IMPORT_DELAY_S`` (``;``, UTF-8, ``emailAddress``/``externalId``) and moves
  to ``Done`` (the campaign starts: ``sends_created[job_id]`` = 1) or to ``Failed``. Like
  Deployteq, which gives the reason only in its notification e-mail, the sandbox writes no reason
  file: the reasons are in its log and in the job's manifest. Other files stay in ``Upload``.
- **Events API** under ``/deployteq/<account>/analytics-events`` with OAuth2 client-credentials
  tokens from ``/deployteq/<account>/oauth2/token`` (Basic ``<account>:<TOKEN>``): the account's
  released events per metric in ``metric_id`` (release) order, paged with ``limit``/``offset`` and
  ``_links.next``; errors are ``application/problem+json``.
- **Activities export**: every ``EXPORT_INTERVAL_S``, ``event-export/activities_<stamp>.csv`` and
  ``broadcasts_<stamp>.csv`` with the rows released since the last run.

A ``Done`` file's campaign is an engine send (its kept rows an engine import), released phase by
phase by the engine. Its writer, :class:`DeployteqRelease`, puts each step in the account-wide
step log, because the API and the export are account-wide: one file
``.sandbox-deployteq/steps/<seq>.json`` per step (its API items with their ``metric_id``, its
export rows with the injected ones, the account counters after it), written under a hidden name
and renamed. The steps on disk are the truth: a restarted sandbox loads them, the engine resumes
the unfinished send and only the missing steps are added; an export run's name and range are
saved before its files are written, so a run cut short is finished under the same name and no
row is exported twice.

Choices where the page leaves room:

- A file is taken once per job id: a later file with a job id already taken (same or other trigger
  or brand) is not started again; it moves to ``Failed``, and a log line names the first file.
- A file is decoded as strict UTF-8, so a byte order mark fails the header; LF line ends are
  accepted (the failure list does not name them). Every wrong header name, and every row with the
  wrong field count (at most 100), is a reason line; the other checks stop at the header.
- A file whose rows are all skipped is ``Done`` with 0 recipients (no events; complete at once).
- Without ``filter[metric]`` a call answers every metric's events together, in ``metric_id``
  order, as Deployteq documents; the date filters are optional (absent = unbounded), ``limit``
  defaults to 100 and ``offset`` to 0; a repeated parameter is a 400. ``_links.current`` and
  ``_links.next`` repeat the given filters with their brackets percent-encoded
  (``filter%5Bmetric%5D``), as Deployteq's do; ``next`` is absent on the last page.
- The token endpoint checks the client (401 ``invalid_client``) before ``grant_type`` (400
  ``invalid_request`` when missing, ``unsupported_grant_type`` otherwise) and ``scope`` (optional;
  400 ``invalid_scope`` unless it is ``analytics.events:read``); the client id and secret are
  compared as given and form-decoded. An unknown account in the path is a 404.
- ``_sandbox/stats`` takes the sandbox ``TOKEN`` or an access token of the account as bearer.
- Injections count per account, after every n-th well-formed row (API event) of the account:
  malformed rows name the file of the row they follow; a foreign API event copies the event it
  follows with another customer and broadcast and ``broadcast_manual_options`` alternately ``null``
  and ``{}``. The manifest's ``malformed`` counts the job's malformed rows in written files.
- ``delivered`` is simulated but in no phase, so it takes no room in a step.

Subscriptions (the page's Subscriptions section): the public REST API's customer calls under
``/deployteq/<account>/app/api/rest/public/v2/customer`` (``?token=`` the sandbox ``TOKEN``) and the
webhook receiver ``/deployteq/<account>/datahook/data-receiver/<endpoint>`` (Bearer ``TOKEN``)
whose campaign is the double opt-in: the customer it receives is pending on the list it names until
a confirmation (the ``_sandbox/contacts`` control route). A customer's id and other fields are kept
in ``.sandbox-deployteq/customers.json``; its Y/N list fields (``DEPLOYTEQ_LIST_FIELDS``) are its
states in the account's contact book: Y is subscribed, anything else N. A customer created without
the first list field is opted in on it (Deployteq's ``optin`` defaults to Y), and so are the kept
rows of a trigger file. A customer with an address that is not well formed is refused
(``400``, ``X-Deployteq-API-Error``). A change made on Deployteq's side is reported to
``DEPLOYTEQ_WEBHOOK_URL`` as a campaign's HTTP request object would (JSON, Bearer ``TOKEN``).
"""

from __future__ import annotations

import asyncio
import csv
import functools
import logging
import os
import re
import threading
import uuid
import zlib
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import IO, Annotated, Any, Literal, overload
from urllib.parse import quote, unquote_plus
from zoneinfo import ZoneInfo

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field

from sandbox.api import CONTEXT, account_of, basic_credentials, bearer_token
from sandbox.contacts import ContactChange, ContactEvent, ContactState, valid_email
from sandbox.engine import Account
from sandbox.errors import OAUTH, ErrorStyle, EspError, json_response
from sandbox.files import atomic_write_bytes, atomic_writer, csv_field
from sandbox.flavors.base import Flavor
from sandbox.listfile import recipient_store
from sandbox.protocol import (
    COUNTED_TYPES,
    EXTERNAL_ID_RE,
    MANIFEST,
    EventType,
    parse_utc,
    utc_text,
)
from sandbox.responses import Broadcast, EventLogFormat, PhaseWriter, ResponsePhase, usual_phases
from sandbox.settings import SandboxSettings
from sandbox.simulate import URLS, Event
from sandbox.state import SendRecord
from sandbox.validators import CommaList, HttpUrl, TimeZone, name_matching, names_matching
from sandbox.webhooks import report_change

log = logging.getLogger(__name__)

# Folders (relative to the account) and names

TRIGGER_ROOT = "csv upload"
UPLOAD, ACTIVE, DONE, FAILED = "Upload", "Active", "Done", "Failed"
STAGING = "espbridge/staging"
EXPORT = "event-export"
EXPORT_ARCHIVE = "event-export/archive"
DATA = ".sandbox-deployteq"
STEPS = f"{DATA}/steps"
STATE = f"{DATA}/state.json"
CUSTOMERS = f"{DATA}/customers.json"
REST = "/app/api/rest/public/v2"
FIRST_CUSTOMER_ID = 1001

BASE = "/deployteq/{account}"
SCOPE = "analytics.events:read"
FIRST_BROADCAST_ID = 5_000_001
FOREIGN_BROADCAST_ID = 4_000_001
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_REASONS = 100

TRIGGER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
COLUMN_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
BRAND_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
COUNT_RE = re.compile(r"^\d{1,9}$")
EMAIL_COLUMN, KEY_COLUMN = "emailAddress", "externalId"
FILE_OPTION = "espbridge_file"
DELIMITER = ";"
CRLF = "\r\n"
EXPORT_TIME = "%Y-%m-%d %H:%M:%S"

METRICS: dict[EventType, str] = {
    EventType.SENT: "sends",
    EventType.BOUNCE_HARD: "bounces",
    EventType.BOUNCE_SOFT: "bounces",
    EventType.OPEN: "opens",
    EventType.CLICK: "clicks",
    EventType.UNSUBSCRIBE: "unsubscribes",
}
"""The Events API metric of each published event type (``delivered`` and complaints have none)."""

METRIC_NAMES = ("sends", "bounces", "opens", "clicks", "unsubscribes")

EXPORT_CODES: dict[EventType, str] = {
    EventType.SENT: "SEND",
    EventType.BOUNCE_HARD: "BOUNCE",
    EventType.BOUNCE_SOFT: "BOUNCE",
    EventType.OPEN: "OPEN",
    EventType.CLICK: "CLICK",
    EventType.COMPLAINT: "COMPLAINT",
}
"""The activities ``Event type`` of each exported event type (unsubscribes are never exported)."""

API_TYPES = ("sent", "bounce_hard", "bounce_soft", "open", "click", "unsubscribe")
EXPORT_TYPES = ("complaint",)
SOURCES = {"api": list(API_TYPES), "export": list(EXPORT_TYPES)}

ACTIVITY_COLUMNS = (
    "Broadcast ID",
    "Customer ID",
    "External customer number",
    "Email address",
    "Event type",
    "Event date",
    "URL",
    "Bounce type",
    "Bounce code",
    FILE_OPTION,
)
URL_AT = ACTIVITY_COLUMNS.index("URL")
BROADCAST_COLUMNS = (
    "Broadcast ID",
    "Broadcast date",
    "Campaign ID",
    "Campaign name",
    "Campaign object ID",
    "Email ID",
    "Email name",
    "Subject",
)

# Click URLs: the simulation's, with a ";" and a '"' so readers prove their CSV quoting.
CLICK_URLS = {
    URLS[0]: URLS[0],
    URLS[1]: "https://example.com/offer?id=1002;ref=mail",
    URLS[2]: URLS[2],
    URLS[3]: 'https://example.com/catalog?tags=shoes,bags&q="winter"',
}
LINK_IDS = {url: n for n, url in enumerate(CLICK_URLS.values(), start=1)}

# (bounce_type, bounce_code, bounce_category); the code has a ";" and quotes for the export.
BOUNCES = {
    EventType.BOUNCE_HARD: ("hard", '550 5.1.1 "user unknown"; no such mailbox', "invalid_recipient"),
    EventType.BOUNCE_SOFT: ("soft", "452 4.2.2 mailbox full", "mailbox_full"),
}

MALFORMED_KINDS = ("missing field", "unknown event type", "complaint not-a-date")
"""The malformed activities rows, in rotation: a field short; ``Event type`` ``UNKNOWN``; a
``COMPLAINT`` dated ``not-a-date``."""


# Settings


class DeployteqSettings(SandboxSettings):
    """The flavor's own settings (prefix ``ESPBRIDGE_SANDBOX_``)."""

    brand: Annotated[str, name_matching(BRAND_RE, "brand")] = Field(
        default="espbridge", description="the brand folder created: csv upload/<brand>/"
    )
    campaigns: Annotated[CommaList, names_matching(TRIGGER_RE, "trigger", wildcard={"*"})] = Field(
        default=("*",), description="comma list of the triggers that select a campaign; * = any"
    )
    timezone: TimeZone = Field(
        default=ZoneInfo("Europe/Amsterdam"), description="the local zone of times and dates"
    )
    export_interval_s: float = Field(default=2.0, ge=1.0, description="time between two export runs")
    foreign_every: int = Field(
        default=0, ge=0, description="a foreign complaint row / API event after every n-th (0 = off)"
    )
    deployteq_list_fields: Annotated[CommaList, names_matching(COLUMN_RE, "list field")] = Field(
        default=("optin",),
        description="comma list of the customers' Y/N fields that are lists; new customers and "
        "trigger-file rows are opted in on the first",
    )
    deployteq_webhook_url: HttpUrl = Field(
        default=None, description="where the campaigns report changes made at Deployteq ({account} replaced)"
    )

    def campaign_known(self, trigger: str) -> bool:
        """Whether a trigger selects a campaign."""
        return "*" in self.campaigns or trigger in self.campaigns


deployteq_settings = functools.cache(DeployteqSettings)
"""The flavor's settings, read from the environment once."""


def trigger_folder(brand: str, state: str) -> str:
    """``csv upload/<brand>/<state>``."""
    return f"{TRIGGER_ROOT}/{brand}/{state}"


class _Folders(Sequence[str]):
    """The account's folders; the brand's tree depends on ``BRAND``, read when the accounts open."""

    def _all(self) -> tuple[str, ...]:
        brand = deployteq_settings().brand
        trees = tuple(trigger_folder(brand, s) for s in (UPLOAD, ACTIVE, DONE, FAILED))
        return (*trees, STAGING, EXPORT, EXPORT_ARCHIVE, MANIFEST, STEPS)

    def __len__(self) -> int:
        return len(self._all())

    @overload
    def __getitem__(self, index: int) -> str: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[str]: ...

    def __getitem__(self, index: int | slice) -> str | Sequence[str]:
        return self._all()[index]


# Times and ids


def local_iso(at: int) -> str:
    """``metric_timestamp``: whole seconds in ``TIMEZONE`` with their offset."""
    return datetime.fromtimestamp(at, deployteq_settings().timezone).isoformat()


def local_date(at: int) -> str:
    """The local date of a time, as the date filters compare it."""
    return datetime.fromtimestamp(at, deployteq_settings().timezone).date().isoformat()


def local_text(at: int) -> str:
    """An export time: ``%Y-%m-%d %H:%M:%S`` in ``TIMEZONE``, no offset."""
    return datetime.fromtimestamp(at, deployteq_settings().timezone).strftime(EXPORT_TIME)


def customer_id(key: str) -> int:
    """A stable Deployteq customer id per ``externalId``."""
    return 1_000_000 + zlib.crc32(key.encode()) % 9_000_000


def campaign_id(trigger: str) -> int:
    """A stable campaign id per trigger."""
    return 100 + zlib.crc32(trigger.encode()) % 900


def event_uuid(seed: int, job_id: str, number: int) -> str:
    """uuid5 over (seed, job id, event index): the same across restarts."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"deployteq:{seed}:{job_id}:{number}"))


def parse_name(name: str) -> tuple[str, str] | None:
    """``(trigger, job_id)`` of ``<trigger>+<job_id>.csv``, or None for any other name."""
    if not name.endswith(".csv") or "+" not in name:
        return None
    trigger, _, rest = name.partition("+")
    job_id = rest.removesuffix(".csv")
    if not TRIGGER_RE.fullmatch(trigger) or not job_id or "+" in job_id or "@" in job_id:
        return None
    if not EXTERNAL_ID_RE.fullmatch(job_id):
        return None
    return trigger, job_id


# Reading a trigger file


class _RejectedError(Exception):
    """The file fails; the recipients written so far are discarded."""


@dataclass
class Reading:
    """What reading a trigger file found."""

    reasons: list[str] = field(default_factory=list)
    rows: int = 0
    kept: int = 0
    skipped: int = 0

    def fail(self, line: int, reason: str) -> None:
        """One more ``line N: reason`` (only the first ones are kept)."""
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(f"line {line}: {reason}")


def _decoded(handle: IO[bytes], line: list[int]) -> Iterator[str]:
    """The file's lines as strict UTF-8 (line ends kept), counting them in ``line[0]``."""
    for raw in handle:
        line[0] += 1
        yield raw.decode("utf-8")


def _header_problems(header: list[str]) -> list[str]:
    problems = []
    if header and header[0].startswith("\ufeff"):
        problems.append("a byte order mark precedes the header (UTF-8 without BOM expected)")
    problems += [f"invalid column name {c!r}" for c in header if not COLUMN_RE.fullmatch(c)]
    problems += [f"duplicate column {c}" for c in sorted({c for c in header if header.count(c) > 1})]
    problems += [f"missing column {c}" for c in (EMAIL_COLUMN, KEY_COLUMN) if c not in header]
    return problems


def read_trigger_file(source: Path, store: Path) -> Reading:
    """Validate a trigger file; unless it fails, write its kept (email, key) rows to ``store``."""
    reading = Reading()
    line = [0]
    try:
        with source.open("rb") as handle, recipient_store(store) as add:
            reader = csv.reader(_decoded(handle, line), delimiter=DELIMITER, strict=True)
            try:
                _read_rows(reader, add, reading, line)
            except UnicodeDecodeError:
                reading.fail(line[0], "not valid UTF-8")
            except csv.Error as exc:
                reading.fail(line[0], f"malformed CSV: {exc}")
            if reading.reasons:
                raise _RejectedError
    except _RejectedError:
        pass
    return reading


def _read_rows(
    reader: Iterator[list[str]], add: Callable[[str, str], object], reading: Reading, line: list[int]
) -> None:
    header = next(reader, None)
    if header is None:
        reading.fail(1, "empty file: no header row")
        return
    for problem in _header_problems(header):
        reading.fail(1, problem)
    if reading.reasons:
        return
    width, email_at, key_at = len(header), header.index(EMAIL_COLUMN), header.index(KEY_COLUMN)
    seen: set[str] = set()
    start = line[0] + 1
    for row in reader:
        row_line, start = start, line[0] + 1
        if not row:
            continue  # a blank line is no row
        reading.rows += 1
        if len(row) != width:
            reading.fail(row_line, f"expected {width} fields, found {len(row)}")
            continue
        email, key = row[email_at], row[key_at]
        if not email.strip() or "@" not in email or not key.strip() or key in seen:
            reading.skipped += 1
            continue
        seen.add(key)
        reading.kept += 1
        add(email, key)
    if reading.rows == 0:
        reading.fail(line[0] + 1, "no rows")


# Responses: the API items


class DeployteqResponses(EventLogFormat):
    """The phases of a send and the Events API item of each published event."""

    phases = usual_phases("sends", "bounces", "opens", "clicks", "optouts")
    # "Deployteq writes no two rows alike in customer, broadcast, type, URL and second."
    distinct_seconds = True
    time_ordered_phases = True

    def stream(self, event: Event) -> str:
        """The event's metric."""
        return METRICS[event.event_type]

    def item(self, broadcast: Broadcast, event: Event) -> dict[str, Any]:
        """The Events API item (``metric_id`` is set when the step is released)."""
        attrs = broadcast.attrs
        url = CLICK_URLS.get(event.url, event.url) if event.event_type is EventType.CLICK else None
        bounce_type, bounce_code, bounce_category = BOUNCES.get(event.event_type, (None, None, None))
        return {
            "uuid": event_uuid(broadcast.seed, broadcast.external_id, event.number),
            "metric": self.stream(event),
            "metric_id": 0,
            "metric_timestamp": local_iso(event.at),
            "customer_id": customer_id(event.key),
            "external_id": event.key,
            "email_address": event.email,
            "customer_email_address": event.email,
            "broadcast_id": int(attrs["broadcast_id"]),
            "broadcast_manual_options": {FILE_OPTION: attrs["file"]},
            "campaign_id": campaign_id(broadcast.message),
            "link_id": LINK_IDS[url] if url is not None else None,
            "url": url,
            "url_unrendered": url,
            "bounce_type": bounce_type,
            "bounce_code": bounce_code,
            "bounce_category": bounce_category,
            "machine_generated": False,
            "test_mailing": 0,
            "subject": f"{broadcast.message}: news",
        }

    def writer(self, account: Account, record: SendRecord, broadcast: Broadcast) -> PhaseWriter:
        """A :class:`DeployteqRelease`."""
        return DeployteqRelease(self, account, record, broadcast)


RESPONSES = DeployteqResponses()


# Saved state


class Job(BaseModel):
    """One taken trigger file and the send it started."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    job_id: str
    name: str
    brand: str
    trigger: str
    state: Literal["active", "done", "failed"] = "active"
    taken_at: str
    broadcast_id: int | None = None
    """Deployteq's broadcast id (from 5000001 on), once the file is ``Done``."""
    recipients: int = 0
    rows_skipped: int = 0
    reasons: list[str] = Field(default_factory=list)
    released_all: bool = False
    """Every step of its send is released (the engine finished it)."""
    complaints_exported: int = 0
    malformed: int = 0
    files: list[str] = Field(default_factory=list)

    def path(self, state: str) -> str:
        """The file's path in one of its brand's folders."""
        return f"{trigger_folder(self.brand, state)}/{self.name}"


class ExportRun(BaseModel):
    """An export run whose files are (being) written: its stamp and the steps it covers."""

    model_config = ConfigDict(extra="ignore")

    stamp: str
    start: int
    through: int


class SavedState(BaseModel):
    """``.sandbox-deployteq/state.json``."""

    model_config = ConfigDict(extra="ignore")

    jobs: list[Job] = Field(default_factory=list)
    exported: int = 0
    """The steps ``1..exported`` are exported."""
    stamps: list[str] = Field(default_factory=list)
    pending: ExportRun | None = None


@dataclass
class Counters:
    """Account-wide counters, saved after every step."""

    metric_id: int = 0
    api_events: int = 0
    foreign_api: int = 0
    rows: int = 0
    malformed: int = 0
    foreign: int = 0


@dataclass
class ExportRow:
    """One activities row: the job it names ("" for a foreign row), its kind, and its fields."""

    job: str
    kind: Literal["good", "malformed", "foreign"]
    event: str
    broadcast: int
    fields: list[str]


@dataclass
class Step:
    """One release step of a job, account-wide number ``seq``."""

    seq: int
    job: str
    n: int
    api: list[tuple[str, str, dict[str, Any]]]
    """(metric, local date, item)."""
    export: list[ExportRow]
    counts: dict[str, int]
    """The job's well-formed API events per espbridge type."""
    counters: Counters

    @classmethod
    def parse(cls, data: bytes) -> Step:
        raw = orjson.loads(data)
        return cls(
            seq=raw["seq"],
            job=raw["job"],
            n=raw["n"],
            api=[(m, d, item) for m, d, item in raw["api"]],
            export=[ExportRow(**row) for row in raw["export"]],
            counts=dict(raw["counts"]),
            counters=Counters(**raw["counters"]),
        )


@dataclass
class Progress:
    """What of a job is released (rebuilt from the steps at the start)."""

    steps: int = 0
    last_seq: int = 0
    counts: Counter[str] = field(default_factory=Counter)


# Errors: the Events API's problem+json, the token endpoint's RFC 6749 bodies

PROBLEMS = ErrorStyle(
    lambda e: {
        "type": "about:blank",
        "title": HTTPStatus(e.status).phrase,
        "status": e.status,
        "detail": e.message,
    },
    content_type="application/problem+json",
)
TOKEN_ERRORS = replace(OAUTH, headers={"Cache-Control": "no-store"})
"""The token endpoint's RFC 6749 bodies, never cached."""


# One account


class Deployteq:
    """The flavor's side of one account: its jobs, the released events, the export runs."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.folder = account.folder
        self.settings = deployteq_settings()
        self.jobs: dict[str, Job] = {}
        self.exported = 0
        self.stamps: list[str] = []
        self.pending: ExportRun | None = None
        self.seq = 0
        self.counters = Counters()
        self.progress: dict[str, Progress] = {}
        self.metrics: dict[str, list[tuple[str, dict[str, Any]]]] = {m: [] for m in METRIC_NAMES}
        self.released: list[tuple[str, dict[str, Any]]] = []  # every metric's, in metric_id order
        self.unexported: dict[int, list[ExportRow]] = {}
        self.step_jobs: dict[int, str] = {}
        self.lock = asyncio.Lock()
        self._save_lock = asyncio.Lock()
        self._manifest_lock = asyncio.Lock()
        self._ignored: set[str] = set()
        self._started = False
        self._customers: Customers | None = None

    @property
    def customers(self) -> Customers:
        """The account's customers (the REST API's), read from disk at the first use."""
        if self._customers is None:
            self._customers = Customers(self.account)
        return self._customers

    # Loading and saving

    def load(self) -> None:
        """Read the saved state and the released steps; remove half-written files."""
        for sub in (DATA, STEPS, EXPORT, *self._trigger_folders()):
            for stale in (self.folder / sub).glob(".*.tmp"):
                stale.unlink(missing_ok=True)
        try:
            saved = SavedState.model_validate_json((self.folder / STATE).read_bytes())
        except FileNotFoundError:
            saved = SavedState()
        self.jobs = {j.job_id: j for j in saved.jobs}
        self.exported, self.stamps, self.pending = saved.exported, saved.stamps, saved.pending
        while (path := self._step_path(self.seq + 1)).is_file():
            self._publish(Step.parse(path.read_bytes()))
        log.info(
            "deployteq state loaded",
            extra={"account": self.account.name, "jobs": len(self.jobs), "steps": self.seq},
        )

    def _trigger_folders(self) -> list[str]:
        root = self.folder / TRIGGER_ROOT
        if not root.is_dir():
            return []
        return [
            trigger_folder(brand.name, s)
            for brand in root.iterdir()
            if brand.is_dir()
            for s in (UPLOAD, ACTIVE, DONE, FAILED)
        ]

    def _step_path(self, seq: int) -> Path:
        return self.folder / STEPS / f"{seq:06d}.json"

    async def save(self) -> None:
        """Write the state atomically (the newest snapshot wins when saves overlap)."""
        async with self._save_lock:
            snapshot = SavedState(
                jobs=list(self.jobs.values()),
                exported=self.exported,
                stamps=list(self.stamps),
                pending=self.pending,
            )
            data = orjson.dumps(snapshot.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
            await asyncio.to_thread(atomic_write_bytes, self.folder / STATE, data)

    # Manifest

    def complete(self, job: Job) -> bool:
        """Every step released and exported (a failed file is complete at once)."""
        if job.state == "failed":
            return True
        progress = self.progress.get(job.job_id, Progress())
        return job.state == "done" and job.released_all and progress.last_seq <= self.exported

    def manifest(self, job: Job) -> dict[str, Any]:
        """The manifest body of a job."""
        counts = {t.value: 0 for t in COUNTED_TYPES}
        if job.state == "done":
            counts.update(self.progress.get(job.job_id, Progress()).counts)
            counts["complaint"] = job.complaints_exported
        folder = FAILED if job.state == "failed" else DONE
        body: dict[str, Any] = {
            "broadcast_id": job.job_id,
            "deployteq_broadcast_id": job.broadcast_id,
            "file": job.path(folder),
            "recipients": job.recipients,
            "rows_skipped": job.rows_skipped,
            "counts": counts,
            "sources": SOURCES,
            "malformed": job.malformed,
            "files": list(job.files),
        }
        if job.state == "failed":
            body["failed"] = list(job.reasons)
        body["complete"] = self.complete(job)
        return body

    async def write_manifest(self, job: Job) -> None:
        """Rewrite ``manifest/<job_id>.json``."""
        data = orjson.dumps(self.manifest(job), option=orjson.OPT_INDENT_2)
        async with self._manifest_lock:
            await asyncio.to_thread(atomic_write_bytes, self.folder / MANIFEST / f"{job.job_id}.json", data)

    # The trigger

    def start(self) -> None:
        """Resume what an earlier run left unfinished; start the export runs."""
        if self._started:
            return
        self._started = True
        for job in self.jobs.values():
            if job.state == "active":
                self.spawn(self.process(job), f"read {job.name}")
            else:
                self.spawn(self.settle(job), f"resume {job.job_id}")
        self.account.spawn(self.export_loop(), "deployteq export")

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run ``work`` in the background; an error is logged (the work resumes at the next start)."""

        async def logged() -> None:
            try:
                await work
            except Exception:
                log.exception("background work failed", extra={"account": self.account.name, "work": name})

        self.account.spawn(logged(), name)

    async def settle(self, job: Job) -> None:
        """Finish a file's move to its final folder (a stop may have come between), then its send."""
        await self.write_manifest(job)
        await asyncio.to_thread(self._finish_move, job)
        if job.state == "done":
            await self.start_send(job)

    def _finish_move(self, job: Job) -> None:
        """Move a read file on to ``Done`` or ``Failed`` (no reason file: Deployteq writes none)."""
        if job.state == "failed":
            self._move(job, FAILED, (UPLOAD, ACTIVE))
        elif job.state == "done":
            self._move(job, DONE, (UPLOAD, ACTIVE))

    def _find(self, job: Job, states: Sequence[str]) -> Path | None:
        for state in states:
            path = self.folder / job.path(state)
            if path.is_file():
                return path
        return None

    def _move(self, job: Job, state: str, sources: Sequence[str]) -> None:
        """Move the job's file forward to ``state`` if it is in one of ``sources`` (a stop may have
        come between saving the state and the move)."""
        target = self.folder / job.path(state)
        found = self._find(job, sources)
        if found is not None:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(found, target)

    def _upload_files(self) -> list[tuple[str, str]]:
        """(brand, name) of the visible files in every ``csv upload/<brand>/Upload/``."""
        found = []
        root = self.folder / TRIGGER_ROOT
        for brand in sorted(root.iterdir()) if root.is_dir() else ():
            upload = brand / UPLOAD
            if not brand.is_dir() or brand.name.startswith(".") or not upload.is_dir():
                continue
            for path in sorted(upload.iterdir()):
                if not path.name.startswith(".") and path.is_file():
                    found.append((brand.name, path.name))
        return found

    async def poll(self) -> None:
        """Take each new trigger file whose trigger selects a campaign."""
        for brand, name in await asyncio.to_thread(self._upload_files):
            where = trigger_folder(brand, UPLOAD) + "/" + name
            parsed = parse_name(name)
            if parsed is None or not self.settings.campaign_known(parsed[0]):
                if where not in self._ignored:
                    self._ignored.add(where)
                    log.warning("no campaign for this file; it stays", extra={"file": where})
                continue
            trigger, job_id = parsed
            existing = self.jobs.get(job_id)
            if existing is None:
                await self.take(brand, name, trigger, job_id)
            elif not (existing.state == "active" and (existing.brand, existing.name) == (brand, name)):
                await self.refuse_repeat(brand, name, existing)

    async def take(self, brand: str, name: str, trigger: str, job_id: str) -> None:
        """Move a new trigger file to ``Active`` (saved first) and read it after ``IMPORT_DELAY_S``."""
        job = Job(
            job_id=job_id, name=name, brand=brand, trigger=trigger, taken_at=utc_text(datetime.now(UTC))
        )
        self.jobs[job_id] = job
        await self.save()
        try:
            await asyncio.to_thread(
                os.replace, self.folder / job.path(UPLOAD), self.folder / job.path(ACTIVE)
            )
        except FileNotFoundError:
            del self.jobs[job_id]
            await self.save()
            return
        log.info("trigger file taken", extra={"account": self.account.name, "file": job.path(ACTIVE)})
        self.spawn(self.process(job), f"read {name}")

    async def refuse_repeat(self, brand: str, name: str, first: Job) -> None:
        """A file of a job taken before: not started again; to ``Failed`` (the reason only logged)."""
        folder = self.folder / trigger_folder(brand, FAILED)

        def move() -> None:
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(self.folder / trigger_folder(brand, UPLOAD) / name, folder / name)

        try:
            await asyncio.to_thread(move)
        except FileNotFoundError:
            return
        log.warning(
            "trigger file of a job taken before; not sent again",
            extra={"file": name, "job_id": first.job_id, "first_file": first.path(UPLOAD)},
        )

    async def process(self, job: Job) -> None:
        """Read an ``Active`` file; fail it or start its campaign."""
        await asyncio.sleep(self.account.settings.import_delay_s)
        await asyncio.to_thread(self._move, job, ACTIVE, (UPLOAD,))
        source = self._find(job, (ACTIVE,))
        store = self.account.list_store(job.job_id)
        reading = Reading()
        if source is None:
            reading.fail(1, "the file vanished before it was read")
        else:
            try:
                reading = await asyncio.to_thread(read_trigger_file, source, store)
            except OSError as exc:
                reading.fail(1, f"cannot read the file: {exc.strerror or exc}")
        job.rows_skipped = reading.skipped
        if reading.reasons:
            job.reasons = reading.reasons
            job.state = "failed"
        else:
            job.recipients = reading.kept
            job.broadcast_id = FIRST_BROADCAST_ID + sum(
                1 for j in self.jobs.values() if j.broadcast_id is not None
            )
            job.state = "done"
        # Saved and in the manifest before the file moves on; a restart finishes the move.
        await self.save()
        await self.write_manifest(job)
        await asyncio.to_thread(self._finish_move, job)
        if job.state == "failed":
            log.info("trigger file failed", extra={"file": job.path(FAILED), "reasons": job.reasons[:3]})
            return
        log.info(
            "campaign started",
            extra={"file": job.path(DONE), "recipients": job.recipients, "broadcast_id": job.broadcast_id},
        )
        await self.start_send(job)

    # Releasing a send's events

    async def start_send(self, job: Job) -> None:
        """Hand a ``Done`` job's campaign to the engine, which releases it through
        :class:`DeployteqRelease` (again: nothing new). Its recipients are the file's kept rows."""
        await self.account.imported_list(job.job_id, job.recipients)
        await self.account.subscribe_imported(job.job_id, self.settings.deployteq_list_fields[0])
        attrs = {"broadcast_id": str(job.broadcast_id), "file": job.name}
        await self.account.create_send(job.job_id, job.trigger, job.job_id, None, attrs)

    def started_at(self, job: Job) -> int | None:
        """When the job's campaign started (epoch seconds), once it did."""
        sends = self.account.state.sends_by_external_id(job.job_id)
        started = sends[0].started_at if sends else None
        return int(parse_utc(started).timestamp()) if started is not None else None

    def _step(self, job: Job, broadcast: Broadcast, n: int, events: list[Event]) -> Step:
        """The next step's records, with the account counters moved on (not yet applied)."""
        c = Counters(**asdict(self.counters))
        foreign_every = self.settings.foreign_every
        malformed_every = broadcast.malformed_every
        api: list[tuple[str, str, dict[str, Any]]] = []
        export: list[ExportRow] = []
        counts: Counter[str] = Counter()
        for e in events:
            if e.event_type in METRICS:
                c.metric_id += 1
                item = {**RESPONSES.item(broadcast, e), "metric_id": c.metric_id}
                metric, day = METRICS[e.event_type], local_date(e.at)
                api.append((metric, day, item))
                counts[e.event_type.value] += 1
                c.api_events += 1
                if foreign_every and c.api_events % foreign_every == 0:
                    c.metric_id += 1
                    c.foreign_api += 1
                    api.append((metric, day, self._foreign_item(item, c.foreign_api, c.metric_id)))
            if e.event_type in EXPORT_CODES:
                row = self._activity(job, e)
                export.append(ExportRow(job.job_id, "good", e.event_type.value, int(row[0]), row))
                c.rows += 1
                if malformed_every and c.rows % malformed_every == 0:
                    c.malformed += 1
                    export.append(self._malformed(job, row, c.malformed))
                if foreign_every and c.rows % foreign_every == 0:
                    c.foreign += 1
                    export.append(self._foreign_row(row, c.foreign))
        return Step(self.seq + 1, job.job_id, n, api, export, dict(counts), c)

    @staticmethod
    def _foreign_item(item: dict[str, Any], k: int, metric_id: int) -> dict[str, Any]:
        """Another mailing's event (no ``espbridge_file``): ``broadcast_manual_options`` null or ``{}``."""
        return {
            **item,
            "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"deployteq:foreign:{item['uuid']}:{k}")),
            "metric_id": metric_id,
            "customer_id": 900_000 + k,
            "external_id": f"F-{k:06d}",
            "email_address": f"foreign-{k}@example.org",
            "customer_email_address": f"foreign-{k}@example.org",
            "broadcast_id": FOREIGN_BROADCAST_ID,
            "broadcast_manual_options": None if k % 2 else {},
            "campaign_id": 99,
        }

    def _activity(self, job: Job, e: Event) -> list[str]:
        assert job.broadcast_id is not None
        bounce_type, bounce_code, _ = BOUNCES.get(e.event_type, ("", "", ""))
        url = CLICK_URLS.get(e.url, e.url) if e.event_type is EventType.CLICK else ""
        return [
            str(job.broadcast_id),
            str(customer_id(e.key)),
            e.key,
            e.email,
            EXPORT_CODES[e.event_type],
            local_text(e.at),
            url,
            bounce_type or "",
            bounce_code or "",
            job.name,
        ]

    @staticmethod
    def _malformed(job: Job, row: list[str], k: int) -> ExportRow:
        """The ``k``-th malformed row, after ``row`` (kinds :data:`MALFORMED_KINDS` in rotation)."""
        kind = (k - 1) % len(MALFORMED_KINDS)
        if kind == 0:
            fields = row[:URL_AT] + row[URL_AT + 1 :]
        elif kind == 1:
            fields = [*row[:4], "UNKNOWN", *row[5:]]
        else:
            fields = [*row[:4], "COMPLAINT", "not-a-date", "", "", "", row[-1]]
        return ExportRow(job.job_id, "malformed", "", int(row[0]), fields)

    @staticmethod
    def _foreign_row(row: list[str], k: int) -> ExportRow:
        """A well-formed complaint of another mailing: empty ``espbridge_file``."""
        email = f"foreign-{k}@example.org"
        fields = [
            str(FOREIGN_BROADCAST_ID),
            str(900_000 + k),
            f"F-{k:06d}",
            email,
            "COMPLAINT",
            row[5],
            "",
            "",
            "",
            "",
        ]
        return ExportRow("", "foreign", "", FOREIGN_BROADCAST_ID, fields)

    async def append_step(self, job: Job, broadcast: Broadcast, n: int, events: list[Event]) -> None:
        """Release one step: write it (hidden, renamed), make it visible, rewrite the manifest."""
        async with self.lock:
            step = await asyncio.to_thread(self._step, job, broadcast, n, events)
            data = orjson.dumps(step)
            await asyncio.to_thread(atomic_write_bytes, self._step_path(step.seq), data)
            self._publish(step)
            await self.write_manifest(job)
        log.info(
            "events released", extra={"job_id": job.job_id, "step": n, "seq": step.seq, "api": len(step.api)}
        )

    def _publish(self, step: Step) -> None:
        if step.seq != self.seq + 1:
            raise ValueError(f"step {step.seq} after step {self.seq}")
        for metric, day, item in step.api:
            self.metrics[metric].append((day, item))
            self.released.append((day, item))
        progress = self.progress.setdefault(step.job, Progress())
        progress.steps, progress.last_seq = step.n, step.seq
        progress.counts.update(step.counts)
        if step.seq > self.exported:
            self.unexported[step.seq] = step.export
        self.step_jobs[step.seq] = step.job
        self.counters = step.counters
        self.seq = step.seq

    # The export

    async def export_loop(self) -> None:
        """An export run now if one was cut short, then every ``EXPORT_INTERVAL_S``."""
        while True:
            if self.pending is None:
                await asyncio.sleep(self.settings.export_interval_s)
            try:
                await self.export_run()
            except Exception:
                log.exception("export run failed; trying again", extra={"account": self.account.name})
                await asyncio.sleep(self.settings.export_interval_s)

    def _taken(self, stamp: str) -> bool:
        names = (f"activities_{stamp}.csv", f"broadcasts_{stamp}.csv")
        return stamp in self.stamps or any(
            (self.folder / folder / name).exists() for folder in (EXPORT, EXPORT_ARCHIVE) for name in names
        )

    def _new_stamp(self) -> str:
        moment = datetime.now(self.settings.timezone)
        while self._taken(stamp := moment.strftime("%Y%m%d_%H%M%S")):
            moment += timedelta(seconds=1)
        return stamp

    async def export_run(self) -> None:
        """Export the rows released since the last run (a run without rows writes nothing)."""
        async with self.lock:
            run = self.pending
            if run is None:
                if self.seq == self.exported:
                    return
                run = ExportRun(stamp="", start=self.exported, through=self.seq)
                if not any(self.unexported.get(s) for s in range(run.start + 1, run.through + 1)):
                    await self._exported(run)
                    return
                run.stamp = await asyncio.to_thread(self._new_stamp)
                self.pending = run
                await self.save()
            rows = [r for s in range(run.start + 1, run.through + 1) for r in self.unexported.get(s, [])]
            await asyncio.to_thread(self._write_run, run, rows)
            await self._exported(run, rows)
        log.info(
            "export written", extra={"account": self.account.name, "stamp": run.stamp, "rows": len(rows)}
        )

    def _write_run(self, run: ExportRun, rows: list[ExportRow]) -> None:
        """Write the run's activities and broadcasts files unless written (or archived) before."""
        for kind, lines in (
            ("activities", self._activity_lines(rows)),
            ("broadcasts", self._broadcast_lines(rows)),
        ):
            name = f"{kind}_{run.stamp}.csv"
            if any((self.folder / folder / name).exists() for folder in (EXPORT, EXPORT_ARCHIVE)):
                continue
            with atomic_writer(self.folder / EXPORT / name) as out:
                for fields in lines:
                    out.write(DELIMITER.join(csv_field(f, DELIMITER) for f in fields) + CRLF)

    @staticmethod
    def _activity_lines(rows: list[ExportRow]) -> Iterator[Sequence[str]]:
        yield ACTIVITY_COLUMNS
        for row in rows:
            yield row.fields

    def _broadcast_lines(self, rows: list[ExportRow]) -> Iterator[Sequence[str]]:
        yield BROADCAST_COLUMNS
        jobs = {j.broadcast_id: j for j in self.jobs.values() if j.broadcast_id is not None}
        for broadcast in dict.fromkeys(r.broadcast for r in rows):
            job = jobs.get(broadcast)
            trigger = job.trigger if job is not None else "other-mailing"
            at = self.started_at(job) if job is not None else None
            started = local_text(at) if at is not None else ""
            cid = campaign_id(trigger) if job is not None else 99
            yield (
                str(broadcast),
                started,
                str(cid),
                trigger,
                str(cid * 10 + 1),
                str(20_000 + cid),
                f"{trigger} email",
                f'{trigger}: "news"; this week',
            )

    async def _exported(self, run: ExportRun, rows: Sequence[ExportRow] = ()) -> None:
        """Count a run's rows for their jobs, move the export on, save, rewrite the manifests."""
        file = f"{EXPORT}/activities_{run.stamp}.csv"
        touched: dict[str, Job] = {}
        for row in rows:
            job = self.jobs.get(row.job)
            if job is None:
                continue
            touched[job.job_id] = job
            if file not in job.files:
                job.files.append(file)
            if row.kind == "malformed":
                job.malformed += 1
            elif row.event == EventType.COMPLAINT.value:
                job.complaints_exported += 1
        for s in range(run.start + 1, run.through + 1):
            self.unexported.pop(s, None)
            job_id = self.step_jobs.get(s)
            if job_id in self.jobs:
                touched[job_id] = self.jobs[job_id]
        self.exported = run.through
        if run.stamp:
            self.stamps.append(run.stamp)
        self.pending = None
        await self.save()
        for job in touched.values():
            await self.write_manifest(job)

    # The API

    def events_page(
        self, metric: str | None, lo: str | None, hi: str | None, offset: int, limit: int
    ) -> tuple[int, list[Any]]:
        """``total_count`` and one page of a metric's events (None: every metric's) with a local
        date in ``[lo, hi]``."""
        items = self.released if metric is None else self.metrics[metric]
        if lo is None and hi is None:
            return len(items), [item for _, item in items[offset : offset + limit]]
        chosen = [item for day, item in items if (lo is None or day >= lo) and (hi is None or day <= hi)]
        return len(chosen), chosen[offset : offset + limit]

    def stats(self, tokens_issued: int) -> dict[str, Any]:
        """``_sandbox/stats``: campaigns started per job id, tokens issued, 429s answered."""
        return {
            "sends_created": {j.job_id: 1 for j in self.jobs.values() if j.state == "done"},
            "tokens_issued": tokens_issued,
            "rate_limited": self.account.counters["rate_limited"],
        }


class DeployteqRelease(PhaseWriter):
    """Releases a job's send into the account-wide step log (:meth:`Deployteq.append_step`): the
    Events API and the export read the steps of every job, and the manifest is the job's."""

    def __init__(
        self, fmt: DeployteqResponses, account: Account, record: SendRecord, broadcast: Broadcast
    ) -> None:
        super().__init__(fmt, account, record, broadcast)
        self.deployteq = deployteq_of(account)
        self.job = self.deployteq.jobs[record.external_id]

    async def start(self) -> None:
        """Nothing: the job's manifest was written when its file moved on."""

    async def _release(self, phase: ResponsePhase, seq: int, events: list[Event]) -> bool:
        released = self.deployteq.progress.get(self.job.job_id, Progress()).steps
        if seq <= released:
            return False
        await self.deployteq.append_step(self.job, self.broadcast, seq, events)
        return True

    async def finish(self) -> None:
        """Mark the job released: its manifest is complete once the export has its last step."""
        self.job.released_all = True
        await self.deployteq.save()
        await self.deployteq.write_manifest(self.job)


_ACCOUNTS: dict[Path, Deployteq] = {}


def deployteq_of(account: Account) -> Deployteq:
    """The flavor's side of an account, loaded from disk at the first use."""
    found = _ACCOUNTS.get(account.folder)
    if found is None or found.account is not account:
        found = Deployteq(account)
        found.load()
        _ACCOUNTS[account.folder] = found
    return found


async def watch(account: Account) -> None:
    """Resume unfinished work, run the export, and take new trigger files until the sandbox stops."""
    dt = deployteq_of(account)
    dt.start()
    while True:
        try:
            await dt.poll()
        except Exception:
            log.exception("watching the Upload folders failed; trying again", extra={"account": account.name})
        await asyncio.sleep(max(account.settings.import_delay_s, 0.01))


# Routes


@TOKEN_ERRORS.guard
async def token(request: web.Request) -> web.Response:
    """``POST oauth2/token``: client credentials (Basic) for a bearer token that lives ``TOKEN_TTL_S``."""
    account = account_of(request, code="invalid_request")
    context = request.app[CONTEXT]
    form = await request.post()
    creds = basic_credentials(request)
    good = creds is not None and any(
        client_id == account.name and context.token_matches(secret)
        for client_id, secret in {creds, (unquote_plus(creds[0]), unquote_plus(creds[1]))}
    )
    if not good:
        raise EspError(
            401,
            "invalid_client",
            "client authentication failed",
            {"WWW-Authenticate": 'Basic realm="deployteq"'},
        )
    grant = form.get("grant_type")
    if not isinstance(grant, str) or not grant:
        raise EspError(400, "invalid_request", "grant_type is required")
    if grant != "client_credentials":
        raise EspError(400, "unsupported_grant_type", f"grant_type {grant} is not supported")
    scope = form.get("scope", SCOPE)
    if not isinstance(scope, str) or any(s != SCOPE for s in scope.split()):
        raise EspError(400, "invalid_scope", f"only {SCOPE} can be granted")
    issued = context.tokens.issue(account.name)
    body = {
        "access_token": issued.access_token,
        "token_type": "Bearer",
        "expires_in": issued.expires_in,
        "scope": SCOPE,
    }
    return json_response(body, headers={"Cache-Control": "no-store"})


_INVALID_TOKEN = {"WWW-Authenticate": 'Bearer error="invalid_token"'}


def _api_account(request: web.Request, accept_sandbox_token: bool = False) -> Account:
    account = account_of(request, code="not_found")
    context = request.app[CONTEXT]
    given = bearer_token(request)
    if not given or not (
        context.tokens.account_of(given) == account.name
        or (accept_sandbox_token and context.token_matches(given))
    ):
        raise EspError(
            401, "invalid_token", "the access token is missing, unknown or expired", _INVALID_TOKEN
        )
    return account


def _single(request: web.Request, name: str) -> str | None:
    values = request.query.getall(name, [])
    if len(values) > 1:
        raise EspError(400, "invalid_parameter", f"{name} is given more than once")
    return values[0] if values else None


def _date(request: web.Request, name: str) -> str | None:
    value = _single(request, name)
    if value is None:
        return None
    try:
        if not DATE_RE.fullmatch(value):
            raise ValueError
        return date.fromisoformat(value).isoformat()
    except ValueError:
        raise EspError(400, "invalid_parameter", f"invalid {name}: expected YYYY-MM-DD") from None


def _count(request: web.Request, name: str, default: int, low: int, high: int | None) -> int:
    value = _single(request, name)
    if value is None:
        return default
    number = int(value) if COUNT_RE.fullmatch(value) else -1
    if number < low or (high is not None and number > high):
        bounds = f"{low}-{high}" if high is not None else f">= {low}"
        raise EspError(400, "invalid_parameter", f"invalid {name}: must be an integer {bounds}")
    return number


def _link(base: str, query: list[tuple[str, str]]) -> str:
    """A link as Deployteq writes one: names and values percent-encoded (``filter%5Bmetric%5D``)."""
    return base + "?" + "&".join(f"{quote(k, safe='')}={quote(v, safe='-_.:')}" for k, v in query)


@PROBLEMS.guard
async def events(request: web.Request) -> web.Response:
    """``GET analytics-events/events``: one metric's events of the account (all without a
    ``filter[metric]``), paged."""
    account = _api_account(request)
    account.check_rate_limit()
    metric = _single(request, "filter[metric]")
    lo, hi = _date(request, "filter[date_from]"), _date(request, "filter[date_to]")
    limit = _count(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    offset = _count(request, "offset", 0, 0, None)
    if metric is not None and metric not in METRIC_NAMES:
        raise EspError(400, "invalid_parameter", f"invalid metric {metric}")
    total, data = deployteq_of(account).events_page(metric, lo, hi, offset, limit)
    query = [(k, v) for k, v in (("filter[date_from]", lo), ("filter[date_to]", hi)) if v is not None]
    if metric is not None:
        query.append(("filter[metric]", metric))
    base = str(request.url.with_query(None))
    links: dict[str, str] = {"current": _link(base, [*query, ("limit", str(limit)), ("offset", str(offset))])}
    if offset + len(data) < total:
        links["next"] = _link(base, [*query, ("limit", str(limit)), ("offset", str(offset + len(data)))])
    return json_response({"total_count": total, "_links": links, "data": data})


@PROBLEMS.guard
async def stats(request: web.Request) -> web.Response:
    """``GET analytics-events/_sandbox/stats`` (tests; not rate-limited)."""
    account = _api_account(request, accept_sandbox_token=True)
    return json_response(deployteq_of(account).stats(request.app[CONTEXT].tokens.issued[account.name]))


# Subscriptions: customers, the webhook receiver of the opt-in campaign, the HTTP request objects


class Customers:
    """The customers of one account: ids and fields other than the list fields (saved whole on
    every change), their list fields being their states in the contact book."""

    def __init__(self, account: Account) -> None:
        self.account = account
        self.path = account.folder / CUSTOMERS
        self.lists = deployteq_settings().deployteq_list_fields
        self.lock = threading.Lock()
        try:
            saved = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            saved = {"next_id": FIRST_CUSTOMER_ID, "customers": {}}
        self.next_id: int = saved["next_id"]
        self.fields: dict[int, dict[str, str]] = {int(k): v for k, v in saved["customers"].items()}

    def _save(self) -> None:
        data = {"next_id": self.next_id, "customers": {str(k): v for k, v in self.fields.items()}}
        atomic_write_bytes(self.path, orjson.dumps(data))

    def view(self, number: int) -> dict[str, Any]:
        """The customer as the API shows it: id, fields, and Y or N per list field."""
        fields = self.fields[number]
        email = fields["emailaddress"]
        flags = {}
        for lst in self.lists:
            record = self.account.contacts.get(lst, email)
            flags[lst] = "Y" if record is not None and record.state is ContactState.SUBSCRIBED else "N"
        return {"id": number, **fields, **flags}

    def find(self, email: str) -> list[int]:
        """The ids of the customers with the address; one made for an address an import brought."""
        with self.lock:
            found = [n for n, f in self.fields.items() if f["emailaddress"] == email]
            imported = any(
                r.list in self.lists and r.state is not ContactState.REMOVED
                for r in self.account.contacts.records(email=email)
            )
            if not found and imported:
                found = [self._add({"emailaddress": email})]
                self._save()
            return found

    def _add(self, fields: dict[str, str]) -> int:
        number = self.next_id
        self.next_id += 1
        self.fields[number] = fields
        return number

    def create(self, body: dict[str, str]) -> int:
        """A new customer; opted in on the first list field unless the body says otherwise."""
        with self.lock:
            number = self._add({k: v for k, v in body.items() if k not in self.lists})
            self._save()
        self._set_lists(body["emailaddress"], {self.lists[0]: "Y", **body})
        return number

    def update(self, number: int, body: dict[str, str]) -> None:
        """Change the given fields (the address too); the list fields change the contact's states."""
        with self.lock:
            self.fields[number].update({k: v for k, v in body.items() if k not in self.lists})
            self._save()
        self._set_lists(self.fields[number]["emailaddress"], body)

    def delete(self, number: int) -> None:
        """The customer is gone, and so is its address from every list it was on."""
        with self.lock:
            email = self.fields.pop(number)["emailaddress"]
            self._save()
        gone = [
            ContactChange(r.list, email, ContactState.REMOVED, "customer deleted")
            for r in self.account.contacts.records(email=email)
            if r.list in self.lists
        ]
        self.account.contacts.set_many(gone)

    def _set_lists(self, email: str, body: dict[str, str]) -> None:
        changes = [
            ContactChange(
                lst,
                email,
                ContactState.SUBSCRIBED if body[lst] == "Y" else ContactState.UNSUBSCRIBED,
                "subscribe" if body[lst] == "Y" else "unsubscribe",
            )
            for lst in self.lists
            if lst in body
        ]
        self.account.contacts.set_many(changes)


REST_ERRORS = ErrorStyle(lambda e: {"code": e.status, "message": e.message})
"""The customer API's errors: ``{"code", "message"}``, the message also in ``X-Deployteq-API-Error``."""


def _rest_error(status: int, message: str) -> EspError:
    return EspError(status, "error", message, {"X-Deployteq-API-Error": message})


def _rest_account(request: web.Request) -> Account:
    """The account of a customer call whose ``token`` is the sandbox's; its call counted and limited."""
    account = account_of(request, code="not_found")
    if not request.app[CONTEXT].token_matches(_single(request, "token") or ""):
        raise _rest_error(401, "invalid token")
    account.check_rate_limit()
    return account


async def _customer_body(request: web.Request) -> dict[str, str]:
    """A customer's fields from a JSON object of strings (a null or a number taken as text)."""
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise _rest_error(400, "the body is not JSON") from None
    if not isinstance(body, dict) or any(
        not isinstance(k, str) or isinstance(v, (dict, list)) for k, v in body.items()
    ):
        raise _rest_error(400, "the body must be a JSON object of customer fields")
    fields = {k: "" if v is None else str(v) for k, v in body.items() if k != "id"}
    lists = deployteq_settings().deployteq_list_fields
    bad = sorted(lst for lst in lists if lst in fields and fields[lst] not in ("Y", "N"))
    if bad:
        raise _rest_error(400, f"{', '.join(bad)} must be Y or N")
    if "emailaddress" in fields:
        fields["emailaddress"] = fields["emailaddress"].strip().lower()
        if not valid_email(fields["emailaddress"]):
            raise _rest_error(400, "emailaddress is not a valid e-mail address")
    return fields


@REST_ERRORS.guard
async def customers_route(request: web.Request) -> web.Response:
    """``GET customer?emailaddress=`` (the customers with the address) and ``POST customer``."""
    account = _rest_account(request)
    customers = deployteq_of(account).customers
    if request.method == "GET":
        email = (_single(request, "emailaddress") or "").strip().lower()
        found = await asyncio.to_thread(customers.find, email)
        return json_response([customers.view(n) for n in found])
    body = await _customer_body(request)
    if not body.get("emailaddress"):
        raise _rest_error(400, "emailaddress is required")
    number = await asyncio.to_thread(customers.create, body)
    return json_response(customers.view(number), status=201)


@REST_ERRORS.guard
async def customer_route(request: web.Request) -> web.Response:
    """``GET``, ``PUT`` (the given fields) and ``DELETE customer/<id>``."""
    account = _rest_account(request)
    customers = deployteq_of(account).customers
    text = request.match_info["id"]
    number = int(text) if text.isdigit() else -1
    if number not in customers.fields:
        raise _rest_error(404, f"customer {text} not found")
    if request.method == "DELETE":
        await asyncio.to_thread(customers.delete, number)
        return web.Response(status=204)
    if request.method == "PUT":
        await asyncio.to_thread(customers.update, number, await _customer_body(request))
    return json_response(customers.view(number))


@REST_ERRORS.guard
async def data_receiver(request: web.Request) -> web.Response:
    """``POST datahook/data-receiver/<endpoint>``: the opt-in campaign's webhook receiver makes the
    customer it gets pending on the list it names."""
    account = account_of(request, code="not_found")
    if not request.app[CONTEXT].token_matches(bearer_token(request)):
        raise _rest_error(401, "invalid token")
    body = await _customer_body(request)
    email, lst = body.get("emailaddress", ""), body.get("list", "")
    if not email or lst not in deployteq_settings().deployteq_list_fields:
        raise _rest_error(400, "emailaddress and a list (one of the list fields) are required")
    await asyncio.to_thread(account.contacts.set, lst, email, ContactState.PENDING, reason="double opt-in")
    return json_response({"status": "received"})


async def on_contact_event(account: Account, event: ContactEvent) -> None:
    """A change made at Deployteq, reported as a campaign's HTTP request object calls espbridge."""
    settings = deployteq_settings()
    at = datetime.fromtimestamp(event.record.changed_at, settings.timezone).isoformat(timespec="milliseconds")
    report_change(
        account,
        event,
        settings.deployteq_webhook_url,
        email_key="emailaddress",
        list_key="list",
        time_key="timestamp",
        time=at,
    )


ROUTES = (
    web.post(f"{BASE}/oauth2/token", token),
    web.get(f"{BASE}/analytics-events/events", events),
    web.get(f"{BASE}/analytics-events/_sandbox/stats", stats),
    web.get(f"{BASE}{REST}/customer", customers_route),
    web.post(f"{BASE}{REST}/customer", customers_route),
    web.get(f"{BASE}{REST}/customer/{{id}}", customer_route),
    web.put(f"{BASE}{REST}/customer/{{id}}", customer_route),
    web.delete(f"{BASE}{REST}/customer/{{id}}", customer_route),
    web.post(f"{BASE}/datahook/data-receiver/{{endpoint}}", data_receiver),
)


FLAVOR = Flavor(
    name="deployteq",
    responses=RESPONSES,
    folders=_Folders(),
    routes=ROUTES,
    watch=watch,
    check_settings=deployteq_settings,
    on_contact_event=on_contact_event,
)
