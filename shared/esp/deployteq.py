"""The Deployteq (formerly Clang) connector (``connector: deployteq``), from docs/connectors/deployteq.md.

* Lists and sends: the CSV trigger. The uploader writes ``<trigger>+<job_id>.csv`` (``;``, UTF-8,
  CRLF, columns ``emailAddress`` and ``externalId``) into the account's staging folder; the
  connector *releases* it by renaming it into ``<trigger_root>/<brand>/Upload/``, which is the
  send: Deployteq starts the campaign the name before the ``+`` selects. Import and send states
  are read from the folder the file is in (``Upload`` → ``Active`` → ``Done`` | ``Failed``, with
  ``Failed/<name>.reason.txt`` when present). A file still in ``Upload`` after ``pickup_timeout_s``
  matched no campaign and is withdrawn to staging. A job with ``send_at`` stays in staging until
  the monitor's send step at that time releases it. ``upload_only`` jobs are refused: at Deployteq a
  file in ``Upload`` *is* a send. The SFTP folder moves go through :class:`TriggerSite`, whose
  real implementation (:class:`SftpTriggerSite`) uses the process's :class:`~shared.infra.sftp.SftpPool`.
* Responses: ``sent``, ``open``, ``click``, bounces and ``unsubscribe`` from the Analytics Events
  API (``GET <api_url>/events``, one metric and one page per :meth:`DeployteqConnector.pull_responses`
  call, cursor ``{"v":1,"from","to","i","offsets"}``); ``complaint`` from the daily activities
  export files (``event-export/activities_*.csv``). Every event type comes from exactly one
  source. Responses are mapped back to the job through the manual option ``espbridge_file`` (the
  trigger file's name). No SOAP.
* Subscriptions: the customer calls of the public REST API v2 (``options.rest_url``, the account's
  ``token``): each synced list is a Y/N customer field (``list_fields``, by default ``optin``); a
  double opt-in posts the customer to the webhook receiver whose campaign mails the confirmation.
  Changes made at Deployteq (an unsubscribe, a complaint, a confirmed opt-in) come from its
  campaigns' HTTP request objects as webhook calls (:meth:`DeployteqConnector.parse_webhook`),
  authenticated with the account's ``password``; without one every webhook call is refused.

Credentials: the Events API's OAuth2 client-credentials grant. The account's ``client_id`` and
``client_secret`` (prefer ``client_secret_file``) are the OAuth 2.0 app's client id and secret,
sent as HTTP Basic to ``options.token_url`` with ``scope`` (``analytics.events:read``); the bearer
token is renewed when less than min(60 s, 10 % of its lifetime) remains and once after a 401.
``api_url`` is the Events API base (``https://api.canopydeploy.net/analytics-events``). The SFTP
login is the process's (``ESPBRIDGE_SFTP_*``); ``sftp_root`` is the account's folder on it.

One connector instance per account per process holds the token and the hold after a 429's
``Retry-After``; the rate (``api_rate_per_s``) is the account's, shared by every process with a
database (:mod:`shared.esp.limits`).
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, Self, cast
from urllib.parse import parse_qs, urlsplit

import asyncssh
from pydantic import Field, model_validator

from shared.esp import base, contacts, rows
from shared.esp.accounts import AccountConfig
from shared.esp.cursor import Count, StoredCursor
from shared.esp.limits import rate_limiter
from shared.esp.options import ConnectorOptions, DateFormat, Encoding, TimeZone
from shared.esp.rest import (
    EspClient,
    EspRequestError,
    EspUnavailableError,
    OAuth2Token,
    Retries,
    short_json,
)
from shared.infra.db.jobs import SentBroadcast
from shared.infra.sftp import SftpPool
from shared.model.errors import ConfigurationError, PermanentError, TransientError, UnavailableError
from shared.model.messages import (
    BroadcastJob,
    EventType,
    ResponseEvent,
    SendMode,
    SubscriptionChange,
    SubscriptionState,
)

log = logging.getLogger(__name__)

LIST_SUFFIX = ".csv"
STAGED_PREFIX = "staged:"
SEND_AT_FORMAT = "%Y%m%dT%H%M%SZ"
WITHDRAWN_SUFFIX = ".cancelled"
"""A cancelled job's list file stays in staging as ``<name>.cancelled``, never released, for the record."""
WITHDRAW_ATTEMPTS = 3
"""Looks at where a file is when cancelling: a release or Deployteq may move it between look and rename."""
REASON_LINES = 20
REASON_MAX_BYTES = 64 * 1024
RETRY_ATTEMPTS = 3
"""Calls of one Events API page: the first and up to two more after a 429/5xx with Retry-After."""

TRIGGER_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
"""A trigger name (the job's ``message``): the part of the file name before the ``+``."""
JOB_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
LIST_ID_PATTERN = re.compile(r"[A-Za-z0-9_.:-]{1,100}")
"""A list id as espbridge's messages carry one (shared.model.messages.ListId), never empty here."""
"""espbridge's job id pattern (shared.model.messages.JobId): no ``+``, no ``@``."""

BOUNCE = "bounce"
"""The type of a source that carries both bounce kinds; split by ``bounce_types``."""

DEFAULT_API_METRICS = {
    "sends": "sent",
    "opens": "open",
    "clicks": "click",
    "bounces": BOUNCE,
    "unsubscribes": "unsubscribe",
}
DEFAULT_BOUNCE_TYPES = {"hard": EventType.BOUNCE_HARD, "soft": EventType.BOUNCE_SOFT}
DEFAULT_EXPORT_COLUMNS = {
    "broadcast_id": "Broadcast ID",
    "customer_id": "Customer ID",
    "key": "External customer number",
    "email": "Email address",
    "event_type": "Event type",
    "event_date": "Event date",
    "url": "URL",
    "bounce_type": "Bounce type",
    "bounce_code": "Bounce code",
    "file": "espbridge_file",
}
DEFAULT_EXPORT_TYPES: dict[str, str | None] = {
    "SEND": None,
    "OPEN": None,
    "CLICK": None,
    "BOUNCE": None,
    "COMPLAINT": "complaint",
}
REQUIRED_EXPORT_ROLES = ("broadcast_id", "event_type", "event_date", "file")
DEFAULT_LIST_FIELDS = {"optin": "optin"}
"""The lists of a Deployteq account espbridge keeps in sync: each is a Y/N customer field, by
default the customer's one e-mail opt-in, ``optin``."""
CUSTOMER_ID = "id"
EMAIL_FIELD = "emailaddress"
STATUS_FIELD = "status"
BLACKLISTED = "BLACKLIST"
"""The customer status Deployteq mails nobody with: a subscribe to it is refused."""
WEBHOOK_TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
API_EXTRAS = ("customer_id", "campaign_id", "link_id", "bounce_code", "bounce_category", "machine_generated")

_EVENT_TYPES = frozenset(t.value for t in EventType)


def _folder(value: str, what: str, *, single: bool = False) -> str:
    """A folder relative to the account's ``sftp_root`` (one level when ``single``)."""
    parts = value.split("/")
    if (
        not value
        or value.startswith("/")
        or any(p in ("", ".", "..") for p in parts)
        or (single and len(parts) != 1)
    ):
        raise ValueError(
            f"{what} {value!r} must be a {'folder name' if single else 'relative folder path'} "
            "inside the account folder"
        )
    return value


class Options(ConnectorOptions):
    """The account ``options`` this connector reads (docs/connectors/deployteq.md#configuration).

    ``export_columns`` and ``export_types`` are laid over their defaults (``null`` in
    ``export_types`` = a known code whose rows are skipped); ``api_metrics`` and ``bounce_types``
    replace theirs, so a metric is dropped by leaving it out. ``export_columns.file`` defaults to
    ``file_option``.
    """

    MERGED: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "export_columns": DEFAULT_EXPORT_COLUMNS,
        "export_types": DEFAULT_EXPORT_TYPES,
        "webhook_events": contacts.DEFAULT_WEBHOOK_EVENTS,
    }
    ROLE_KEYED: ClassVar = ("export_columns",)

    token_url: str = Field(default="https://auth.clang.cloud/oauth2/token", pattern=r"^https?://")
    scope: str = Field(default="analytics.events:read", min_length=1)
    trigger_root: str = "csv upload"
    brand: str = "espbridge"
    staging_folder: str = "espbridge/staging"
    pickup_timeout_s: float = Field(default=600.0, gt=0)
    reason_suffix: str = Field(default=".reason.txt", min_length=1, pattern=r"^[^/]+$")
    list_delimiter: str = Field(default=";", min_length=1, max_length=1)
    list_encoding: Encoding = "utf-8"
    list_line_terminator: str = Field(default="\r\n", min_length=1)
    email_column: str = Field(default="emailAddress", min_length=1)
    key_column: str = Field(default="externalId", min_length=1)
    file_option: str = Field(default="espbridge_file", min_length=1)
    api_metrics: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_API_METRICS))
    bounce_types: dict[str, EventType] = Field(default_factory=lambda: dict(DEFAULT_BOUNCE_TYPES))
    api_timezone: TimeZone = "Europe/Amsterdam"
    page_limit: int = Field(default=1000, ge=1, le=1000)
    api_rate_per_s: float = Field(default=5.0, gt=0)
    pull_window_days: int = Field(default=31, ge=0)
    export_folder: str = "event-export"
    archive_folder: str = "event-export/archive"
    export_pattern: str = Field(default="activities_*.csv", min_length=1)
    export_delimiter: str = Field(default=";", min_length=1, max_length=1)
    export_encoding: Encoding = "utf-8"
    export_columns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_EXPORT_COLUMNS))
    export_types: dict[str, str | None] = Field(default_factory=lambda: dict(DEFAULT_EXPORT_TYPES))
    export_timestamp_format: DateFormat = "%Y-%m-%d %H:%M:%S"
    export_timezone: TimeZone = "Europe/Amsterdam"
    rest_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="the public REST API v2 base, https://<portal>.myclang.com/app/api/rest/public/v2",
    )
    list_fields: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_LIST_FIELDS))
    double_opt_in_url: str | None = Field(
        default=None, pattern=r"^https?://", description="the webhook receiver starting the opt-in campaign"
    )
    removal: Literal["opt_out", "delete_customer"] = "opt_out"
    webhook_events: dict[str, SubscriptionState] = Field(
        default_factory=lambda: dict(contacts.DEFAULT_WEBHOOK_EVENTS)
    )

    @classmethod
    def merged_defaults(cls, given: Mapping[str, Any]) -> Mapping[str, Mapping[str, Any]]:
        """``export_columns.file`` defaults to ``file_option``."""
        file_column = given.get("file_option", DEFAULT_EXPORT_COLUMNS["file"])
        return {**cls.MERGED, "export_columns": {**DEFAULT_EXPORT_COLUMNS, "file": file_column}}

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        _folder(self.trigger_root, "trigger_root")
        _folder(self.brand, "brand", single=True)
        for name in ("staging_folder", "export_folder", "archive_folder"):
            _folder(getattr(self, name), name)
        if self.email_column == self.key_column:
            raise ValueError("email_column and key_column must differ")
        if any(not c for c in self.export_columns.values()):
            raise ValueError("export_columns names an empty column")
        if any(not m for m in self.api_metrics):
            raise ValueError("api_metrics has an empty metric name")
        lowered = [k.lower() for k in self.bounce_types]
        if len(set(lowered)) != len(lowered) or "" in lowered:
            raise ValueError("bounce_types must name distinct, non-empty bounce types (case-insensitive)")
        allowed = _EVENT_TYPES | {BOUNCE}
        for name, mapping in (("api_metrics", self.api_metrics), ("export_types", self.export_types)):
            bad = sorted({str(v) for v in mapping.values() if v is not None and v not in allowed})
            if bad:
                raise ValueError(f"{name} maps to unknown event types {bad} (known: {sorted(allowed)})")
        bad_fields = sorted(
            f"{k}: {v}"
            for k, v in self.list_fields.items()
            if not LIST_ID_PATTERN.fullmatch(k) or not contacts.FIELD_NAME.fullmatch(v)
        )
        if bad_fields or not self.list_fields:
            raise ValueError(
                "list_fields maps each synced list (its id) to a Y/N customer field "
                f"(a letter, then letters, digits or _): {bad_fields or 'none given'}"
            )
        both = sorted(self.api_types() & self.export_event_types())
        if both:
            raise ValueError(
                f"event types {both} would come from both the Events API (api_metrics) and the "
                "activities export (export_types); take each type from exactly one source"
            )
        return self

    def _expand(self, mapped: str | None) -> set[str]:
        if mapped is None:
            return set()
        return {t.value for t in self.bounce_types.values()} if mapped == BOUNCE else {mapped}

    def api_types(self) -> set[str]:
        """The event types the Events API carries under these options."""
        return {t for m in self.api_metrics.values() for t in self._expand(m)}

    def export_event_types(self) -> set[str]:
        """The event types the activities export carries under these options."""
        return {t for m in self.export_types.values() for t in self._expand(m)}


# --- file names -----------------------------------------------------------------------------------


def list_file_name(job: BroadcastJob) -> str:
    """``<trigger>+<job_id>.csv``; a ``message`` that is not a trigger name is refused."""
    if not TRIGGER_PATTERN.fullmatch(job.message):
        raise PermanentError(
            f"message {job.message!r} is not a Deployteq trigger name "
            "(letters, digits, '_', '.', '-'; up to 100, starting with a letter or digit)"
        )
    return f"{job.message}+{job.job_id}{LIST_SUFFIX}"


def job_id_of(file_name: str) -> str | None:
    """The job id in a trigger file's name (the text after the first ``+``, without ``.csv``)."""
    if not file_name.endswith(LIST_SUFFIX):
        return None
    trigger, plus, job_id = file_name[: -len(LIST_SUFFIX)].partition("+")
    if not plus or not TRIGGER_PATTERN.fullmatch(trigger) or not JOB_ID_PATTERN.fullmatch(job_id):
        return None
    return job_id


def _checked_name(name: str, what: str) -> str:
    if job_id_of(name) is None:
        raise PermanentError(f"{what} {name!r} does not name a trigger file <trigger>+<job_id>.csv")
    return name


def send_id_for(name: str, send_at: datetime | None) -> str:
    """``<name>``, plus ``@<send_at>`` (UTC, ``%Y%m%dT%H%M%SZ``) when the job has a send time."""
    return f"{name}@{send_at.astimezone(UTC).strftime(SEND_AT_FORMAT)}" if send_at else name


def _parse_send_id(send_id: str) -> tuple[str, datetime | None]:
    name, at, stamp = send_id.partition("@")
    _checked_name(name, "send id")
    if not at:
        return name, None
    try:
        return name, datetime.strptime(stamp, SEND_AT_FORMAT).replace(tzinfo=UTC)
    except ValueError:
        raise PermanentError(f"send id {send_id!r} has no send time in {SEND_AT_FORMAT}") from None


# --- the trigger folders ----------------------------------------------------------------------------


class SiteFiles(Protocol):
    """The few file operations the CSV trigger needs, on paths relative to the SFTP login directory.

    Transport failures raise :class:`EspUnavailableError`; what is documented returns a value.
    """

    async def stat(self, path: str) -> float | None:
        """The file's mtime (Unix seconds), or None when there is no such file."""
        ...

    async def rename(self, source: str, target: str, *, overwrite: bool = False) -> bool:
        """Move a file; False when the source is gone or (without ``overwrite``) the target exists."""
        ...

    async def touch(self, path: str, mtime: float) -> bool:
        """Set the file's mtime (SFTP setstat); False when the server refuses."""
        ...

    async def remove(self, path: str) -> bool:
        """Delete a file; False when there was none."""
        ...

    async def head(self, path: str, limit: int) -> bytes | None:
        """Up to ``limit`` first bytes of a file, or None when there is no such file."""
        ...


class TriggerSite(Protocol):
    """Where the trigger folders are: one session of :class:`SiteFiles` per unit of work."""

    def session(self) -> AbstractAsyncContextManager[SiteFiles]:
        """A session for one status question or release."""
        ...


@contextlib.contextmanager
def _sftp_errors(what: str) -> Iterator[None]:
    try:
        yield
    except asyncssh.SFTPPermissionDenied as exc:
        raise ConfigurationError(f"the SFTP server refused to {what}: {exc.reason}") from None
    except (asyncssh.Error, OSError) as exc:
        raise EspUnavailableError(f"SFTP could not {what}: {exc}") from exc


class _SftpFiles:
    """:class:`SiteFiles` on an asyncssh SFTP client."""

    def __init__(self, client: asyncssh.SFTPClient) -> None:
        self._client = client

    async def stat(self, path: str) -> float | None:
        with _sftp_errors(f"stat {path}"):
            try:
                attrs = await self._client.stat(path)
            except asyncssh.SFTPNoSuchFile:
                return None
        return float(attrs.mtime) if attrs.mtime is not None else time.time()

    async def rename(self, source: str, target: str, *, overwrite: bool = False) -> bool:
        with _sftp_errors(f"rename {source} to {target}"):
            try:
                if not overwrite:
                    await self._client.rename(source, target)  # refuses an existing target
                    return True
                try:
                    await self._client.posix_rename(source, target)
                except asyncssh.SFTPOpUnsupported:
                    with contextlib.suppress(asyncssh.SFTPNoSuchFile):
                        await self._client.remove(target)
                    await self._client.rename(source, target)
            except (asyncssh.SFTPNoSuchFile, asyncssh.SFTPFailure):
                return False
        return True

    async def touch(self, path: str, mtime: float) -> bool:
        with _sftp_errors(f"set the mtime of {path}"):
            try:
                await self._client.utime(path, (mtime, mtime))
            except asyncssh.SFTPError as exc:
                log.warning("the SFTP server refused setstat", extra={"path": path, "error": str(exc)})
                return False
        return True

    async def remove(self, path: str) -> bool:
        with _sftp_errors(f"remove {path}"):
            try:
                await self._client.remove(path)
            except asyncssh.SFTPNoSuchFile:
                return False
        return True

    async def head(self, path: str, limit: int) -> bytes | None:
        with _sftp_errors(f"read {path}"):
            try:
                async with self._client.open(path, "rb") as f:
                    data = await f.read(limit)
            except asyncssh.SFTPNoSuchFile:
                return None
        return cast(bytes, data)  # binary mode reads bytes


class SftpTriggerSite:
    """:class:`TriggerSite` on the process's SFTP pool."""

    def __init__(self, pool: SftpPool) -> None:
        self._pool = pool

    @contextlib.asynccontextmanager
    async def session(self) -> AsyncIterator[SiteFiles]:
        """An SFTP session from the pool; an unreachable server is a transient ESP error."""
        try:
            async with self._pool.session() as client:
                yield _SftpFiles(client)
        except UnavailableError as exc:
            raise EspUnavailableError(f"the SFTP site is unavailable: {exc}") from exc


class Where(StrEnum):
    """Where a list file is (or what the connector just did with it)."""

    UPLOAD = "Upload"
    ACTIVE = "Active"
    DONE = "Done"
    FAILED = "Failed"
    STAGING = "staging"
    NOWHERE = "nowhere"
    WITHDRAWN = "withdrawn"
    """Was in Upload past the pickup timeout; the connector moved it back to staging just now."""


TRIGGER_FOLDERS = (Where.UPLOAD, Where.ACTIVE, Where.DONE, Where.FAILED)
"""Deployteq's folders in the order a file moves through them (and the order they are looked in)."""


@dataclass(frozen=True, slots=True)
class Seen:
    """What a status question found."""

    where: Where
    reasons: tuple[str, ...] = ()


_IMPORT_STATES = {
    Where.UPLOAD: base.ImportState.QUEUED,
    Where.ACTIVE: base.ImportState.RUNNING,
    Where.DONE: base.ImportState.DONE,
}
_SEND_STATES = {
    Where.UPLOAD: base.SendState.SCHEDULED,
    Where.ACTIVE: base.SendState.SENDING,
    Where.DONE: base.SendState.SENT,
    Where.STAGING: base.SendState.SCHEDULED,
}

_DETAILS = {
    Where.UPLOAD: "in Upload: waiting for Deployteq to pick it up",
    Where.ACTIVE: "in Active: Deployteq is reading it",
    Where.DONE: "in Done: Deployteq started the campaign",
    Where.STAGING: "held in staging until send_at",
}


_NO_CANCEL = "Deployteq has no API call that cancels a triggered campaign"
_TOO_LATE = {
    Where.ACTIVE: f"Deployteq took {{name}} (Active) and starts its campaign; {_NO_CANCEL}",
    Where.DONE: f"Deployteq started the campaign of {{name}} (Done); {_NO_CANCEL}",
    Where.FAILED: "Deployteq rejected {name} (Failed): its campaign did not start",
    Where.NOWHERE: "{name} is in neither staging nor Deployteq's folders: nothing to withdraw",
}
"""Why a list file can no longer be withdrawn, by where it is."""


class Cursor(StoredCursor):
    """The pull position: the window of local dates pulled, the metric read next, the offsets."""

    start: date = Field(alias="from")
    end: date = Field(alias="to")
    i: Count
    offsets: dict[str, Count]


class UploadOnlyRefusedError(PermanentError):
    """An ``upload_only`` job for Deployteq, where a file in ``Upload`` is already a send."""


class _ClientCredentialsToken(OAuth2Token):
    """:class:`OAuth2Token` renewed when less than min(60 s, 10 % of the lifetime it got) remains."""

    async def _fetch(self) -> None:
        before = time.monotonic()
        await super()._fetch()
        self._margin_s = min(60.0, 0.1 * max(0.0, self._expires_at - before))


class DeployteqConnector(base.Connector):
    """Connector for Deployteq: CSV trigger over SFTP, Analytics Events API, activities export."""

    can_send = True
    pulls_api = True

    def __init__(
        self,
        account: AccountConfig,
        context: base.ConnectorContext,
        *,
        site: TriggerSite | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(account, context)
        name = account.name
        opts = Options.of(account)
        if not account.api_url:
            raise ConfigurationError(
                f"account {name} needs an api_url (the Events API base, "
                "e.g. https://api.canopydeploy.net/analytics-events)"
            )
        if not account.client_id or account.client_secret is None:
            raise ConfigurationError(
                f"account {name} needs client_id and client_secret[_file] (the OAuth 2.0 app's client)"
            )
        self.options = opts
        self._name = name
        self._site: TriggerSite | None = site or (SftpTriggerSite(context.sftp) if context.sftp else None)
        self._clock = clock
        self._api_times = rows.LocalTimes(rows.ISO, opts.api_timezone)
        self._events = rows.Events(account)
        token = _ClientCredentialsToken(
            context.http,
            opts.token_url,
            {"grant_type": "client_credentials", "scope": opts.scope},
            basic=(account.client_id, account.client_secret.get_secret_value()),
            timeout_s=account.request_timeout_s,
        )
        limiter = rate_limiter(context, account, 1, 1.0 / opts.api_rate_per_s)  # evenly spaced: no bursts
        self._api = EspClient(
            context.http,
            account.api_url,
            account=name,
            timeout_s=account.request_timeout_s,
            token=token,
            secrets=(account.client_secret.get_secret_value(),),
            limiter=limiter,
            retries=Retries(attempts=RETRY_ATTEMPTS, max_wait_s=account.request_timeout_s),
            holds=True,
        )
        self._customers = _customer_api(account, opts, context, limiter)
        self._webhook_secret = account.password.get_secret_value() if account.password else ""
        self._webhook_items = contacts.WebhookItems(
            email_key=EMAIL_FIELD,
            list_key="list",
            time_key="timestamp",
            events=opts.webhook_events,
            times=rows.LocalTimes((WEBHOOK_TIME_FORMAT, rows.ISO), opts.api_timezone),
            lists=opts.list_fields,
        )
        self._released_at: dict[str, float] = {}  # this process's releases, in case setstat failed
        root = account.sftp_root.rstrip("/")
        self._staging = posixpath.join(root, opts.staging_folder)
        self._trigger = posixpath.join(root, opts.trigger_root, opts.brand)
        self._exports = rows.ResponseTable(
            opts.export_columns,
            (*REQUIRED_EXPORT_ROLES, ("key", "email")),
            delimiter=opts.export_delimiter,
            encoding=opts.export_encoding,
            times=rows.LocalTimes(opts.export_timestamp_format, opts.export_timezone),
        )
        self._bounces = {k.lower(): v for k, v in opts.bounce_types.items()}
        self.list_format = opts.list_format(drop_folder=opts.staging_folder, suffix=LIST_SUFFIX)
        self.response_sources = (base.ResponseSource(opts.export_folder, opts.export_pattern),)
        self.archive_folder = opts.archive_folder

    # --- lists, imports and sends: the CSV trigger ---------------------------------------------------

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)

    def _name_of(self, job: BroadcastJob) -> str:
        if job.mode is SendMode.UPLOAD_ONLY:
            raise UploadOnlyRefusedError(
                f"{self._name}: Deployteq has no import without a send (a file in Upload is a send); "
                "publish the job as upload_and_send"
            )
        return list_file_name(job)

    def _path(self, where: Where, name: str) -> str:
        if where is Where.STAGING:
            return posixpath.join(self._staging, name)
        return posixpath.join(self._trigger, where.value, name)

    def list_path(self, job: BroadcastJob) -> str:
        """``<sftp_root>/<staging_folder>/<trigger>+<job_id>.csv``; ``upload_only`` is refused."""
        return self._path(Where.STAGING, self._name_of(job))

    def _files(self) -> AbstractAsyncContextManager[SiteFiles]:
        if self._site is None:
            raise ConfigurationError(f"{self._name}: the deployteq connector needs the process's SFTP pool")
        return self._site.session()

    async def _locate(self, files: SiteFiles, name: str) -> tuple[Where, float | None]:
        """Upload, Active, Done, Failed, then staging: a file only moves forward, so this finds it."""
        for where in (*TRIGGER_FOLDERS, Where.STAGING):
            mtime = await files.stat(self._path(where, name))
            if mtime is not None:
                return where, mtime
        return Where.NOWHERE, None

    async def _release(self, files: SiteFiles, name: str) -> tuple[Where, float | None]:
        """Rename the staged file into Upload (the send), then set its mtime to now."""
        upload = self._path(Where.UPLOAD, name)
        if not await files.rename(self._path(Where.STAGING, name), upload):
            where, mtime = await self._locate(files, name)  # released or removed meanwhile?
            if where is Where.STAGING:
                raise EspUnavailableError(f"could not move {name} from staging into Upload")
            return where, mtime
        now = self._clock()
        self._released_at[name] = now
        log.info("list file released into Upload", extra={"account": self._name, "file": name})
        try:
            touched = await files.touch(upload, now)
        except TransientError as exc:
            touched = False
            log.warning("could not set the mtime", extra={"file": name, "error": str(exc)})
        if not touched:
            log.warning(
                "released list file keeps its upload mtime; the pickup timeout counts from the release "
                "in this process only",
                extra={"account": self._name, "file": name},
            )
        return Where.UPLOAD, now

    def _overdue(self, name: str, mtime: float | None) -> bool:
        since = max(mtime or 0.0, self._released_at.get(name, 0.0))
        return self._clock() - since >= self.options.pickup_timeout_s

    async def _reasons(self, files: SiteFiles, name: str) -> tuple[str, ...]:
        data = await files.head(self._path(Where.FAILED, name) + self.options.reason_suffix, REASON_MAX_BYTES)
        lines = [] if data is None else data.decode("utf-8", "replace").splitlines()[:REASON_LINES]
        reasons = tuple(line.strip() for line in lines if line.strip())
        return reasons or ("rejected; see Deployteq's notification email",)

    async def _observe(self, name: str, *, release: bool, tidy: bool = False) -> Seen:
        """Where the file is, after releasing it if asked (and it is staged) and withdrawing it if overdue.

        ``tidy``: a staging copy of a file already in a trigger folder is a re-delivered upload,
        deleted instead of released.
        """
        async with self._files() as files:
            where, mtime = await self._locate(files, name)
            if tidy and where in TRIGGER_FOLDERS and await files.remove(self._path(Where.STAGING, name)):
                log.info(
                    "re-delivered list file deleted from staging (already released)",
                    extra={"account": self._name, "file": name, "folder": where.value},
                )
            if release and where is Where.STAGING:
                where, mtime = await self._release(files, name)
            if where is Where.UPLOAD and self._overdue(name, mtime):
                if await files.rename(
                    self._path(Where.UPLOAD, name), self._path(Where.STAGING, name), overwrite=True
                ):
                    self._released_at.pop(name, None)
                    trigger = name.partition("+")[0]
                    reason = (
                        f"{name} stayed in Upload for {self.options.pickup_timeout_s:.0f}s: no Deployteq "
                        f"campaign took trigger {trigger!r}; withdrawn to staging"
                    )
                    log.warning(reason, extra={"account": self._name, "file": name})
                    return Seen(Where.WITHDRAWN, (reason,))
                where, mtime = await self._locate(files, name)  # Deployteq took it meanwhile
                if where is Where.UPLOAD:
                    raise EspUnavailableError(f"could not withdraw {name} from Upload")
            if where is not Where.UPLOAD:
                self._released_at.pop(name, None)  # Deployteq took it (or it is gone): no timeout left
            if where is Where.FAILED:
                return Seen(where, await self._reasons(files, name))
            return Seen(where)

    @staticmethod
    def _import_status(import_id: str, seen: Seen) -> base.ImportStatus:
        state = _IMPORT_STATES.get(seen.where)
        if state is not None:
            return base.ImportStatus(import_id, state)
        if seen.where is Where.STAGING:
            reasons: tuple[str, ...] = ("withdrawn: the list file is back in staging, not in Upload",)
        elif seen.where is Where.NOWHERE:
            reasons = ("list file vanished: it is in neither staging nor Deployteq's folders",)
        else:
            reasons = seen.reasons
        return base.ImportStatus(import_id, base.ImportState.FAILED, errors=reasons)

    @staticmethod
    def _send_status(send_id: str, seen: Seen) -> base.SendStatus:
        state = _SEND_STATES.get(seen.where)
        if state is not None:
            return base.SendStatus(send_id, state, detail=_DETAILS[seen.where])
        if seen.where is Where.NOWHERE:
            return base.SendStatus(send_id, base.SendState.FAILED, detail="list file vanished")
        return base.SendStatus(send_id, base.SendState.FAILED, detail="; ".join(seen.reasons))

    async def start_import(self, remote_path: str, job: BroadcastJob) -> base.ImportStatus:
        """Release the staged file (idempotent), unless ``send_at`` holds it in staging."""
        name = self._name_of(job)
        staged = self._path(Where.STAGING, name)
        if posixpath.normpath(remote_path) != posixpath.normpath(staged):
            raise PermanentError(f"{remote_path} is not the staged list file {staged} of job {job.job_id}")
        if job.send_at is not None and job.send_at > self._now():
            return base.ImportStatus(f"{STAGED_PREFIX}{name}", base.ImportState.DONE)
        return self._import_status(name, await self._observe(name, release=True, tidy=True))

    async def import_status(self, import_id: str) -> base.ImportStatus:
        """``staged:…`` is done; otherwise the folder the file is in."""
        if import_id.startswith(STAGED_PREFIX):
            _checked_name(import_id.removeprefix(STAGED_PREFIX), "import id")
            return base.ImportStatus(import_id, base.ImportState.DONE)
        name = _checked_name(import_id, "import id")
        return self._import_status(import_id, await self._observe(name, release=False))

    async def find_send(self, job: BroadcastJob) -> base.SendStatus | None:
        """The send if the file is in Upload, Active, Done or Failed; None while staged or gone."""
        name = list_file_name(job)
        seen = await self._observe(name, release=False)
        if seen.where in (Where.STAGING, Where.NOWHERE):
            return None
        return self._send_status(send_id_for(name, job.send_at), seen)

    async def send(self, import_id: str, job: BroadcastJob) -> base.SendStatus:
        """Release the file if still staged (the send), or hold it until ``send_at``."""
        name = self._name_of(job)
        if import_id.removeprefix(STAGED_PREFIX) != name:
            raise PermanentError(f"import {import_id!r} is not the list file {name} of job {job.job_id}")
        send_id = send_id_for(name, job.send_at)
        if job.send_at is not None and job.send_at > self._now():
            return base.SendStatus(send_id, base.SendState.SCHEDULED, detail=_DETAILS[Where.STAGING])
        return self._send_status(send_id, await self._observe(name, release=True, tidy=True))

    async def send_status(self, send_id: str) -> base.SendStatus:
        """The folder the file is in; a staged file is released once ``send_at`` has passed."""
        name, send_at = _parse_send_id(send_id)
        due = send_at is None or self._now() >= send_at
        return self._send_status(send_id, await self._observe(name, release=due))

    async def cancel_send(self, send_id: str, job: BroadcastJob) -> base.CancelResult:
        """Withdraw the list file while Deployteq has not taken it: from staging (held for ``send_at``)
        or from ``Upload`` (not picked up yet), renamed to ``<staging>/<name>.cancelled``, so nothing
        is triggered. Once Deployteq took it (``Active``, ``Done``, ``Failed``) it is too late:
        Deployteq has no API call that cancels a triggered campaign."""
        name, _ = _parse_send_id(send_id)
        withdrawn = self._path(Where.STAGING, name + WITHDRAWN_SUFFIX)
        async with self._files() as files:
            for _ in range(WITHDRAW_ATTEMPTS):
                where, _mtime = await self._locate(files, name)
                if where not in (Where.STAGING, Where.UPLOAD):
                    break
                if await files.rename(self._path(where, name), withdrawn, overwrite=True):
                    self._released_at.pop(name, None)
                    log.info(
                        "list file withdrawn",
                        extra={"account": self._name, "file": name, "from": where.value},
                    )
                    return base.CancelResult(
                        base.CancelOutcome.CANCELLED,
                        f"{name} withdrawn from {where.value} before Deployteq took it: nothing was sent "
                        f"(kept as {posixpath.basename(withdrawn)} in staging)",
                    )
            else:
                raise EspUnavailableError(f"could not withdraw {name}: it kept moving")
            if where is Where.NOWHERE and await files.stat(withdrawn) is not None:
                return base.CancelResult(base.CancelOutcome.CANCELLED, f"{name} was withdrawn before")
        return base.CancelResult(base.CancelOutcome.TOO_LATE, _TOO_LATE[where].format(name=name))

    # --- responses: the Events API ------------------------------------------------------------------

    async def _get_events(self, params: dict[str, str]) -> Any:
        """One page of ``GET /events``, repeated after a 429 or 5xx with Retry-After."""
        where = f"GET /events?filter[metric]={params['filter[metric]']}"
        status, body = await self._api.call("GET", "/events", params=params, answered=(200, 404, 409))
        if status == 404:
            raise ConfigurationError(f"{where} answered 404: is api_url of {self._name} the Events API?")
        if status != 200:
            raise EspRequestError(f"{where} answered {status}: {short_json(body)}")
        return body

    def _first_window(self, broadcast: SentBroadcast) -> tuple[date, date]:
        sent = broadcast.requested_at or self._now()
        start = sent.astimezone(self._api_times.zone).date() - timedelta(days=1)
        return start, start + timedelta(days=self.options.pull_window_days)

    def _read_cursor(self, broadcast: SentBroadcast, cursor: str | None) -> Cursor:
        """The stored window, metric and offsets; none (or an unreadable one): the first window."""
        metrics = list(self.options.api_metrics)
        stored = Cursor.read(cursor, self._name, job_id=broadcast.job_id)
        if stored is None:
            start, end = self._first_window(broadcast)
            return Cursor(start=start, end=end, i=0, offsets=dict.fromkeys(metrics, 0))
        offsets = {m: stored.offsets.get(m, 0) for m in metrics}
        return Cursor(start=stored.start, end=stored.end, i=stored.i % len(metrics), offsets=offsets)

    async def pull_responses(self, broadcast: SentBroadcast, cursor: str | None) -> base.PullPage:
        """One Events API page of metric ``api_metrics[i]`` from its offset (see the cursor rules).

        A page with ``_links.next`` keeps the metric (``more``); the last page of a metric moves to
        the next one, and the round ends (``more`` = False) when it wraps to the first.
        """
        metrics = list(self.options.api_metrics)
        if not metrics:
            return base.PullPage((), cursor, more=False)
        position = self._read_cursor(broadcast, cursor)
        metric = metrics[position.i]
        offset = position.offsets[metric]
        body = await self._get_events(
            {
                "filter[date_from]": position.start.isoformat(),
                "filter[date_to]": position.end.isoformat(),
                "filter[metric]": metric,
                "limit": str(self.options.page_limit),
                "offset": str(offset),
            }
        )
        data, next_offset = self._envelope(body, metric, offset)
        items = rows.item_events(
            data, lambda _, item: self._api_item(broadcast, metric, offset, item), what=f"{metric} event"
        )
        if next_offset is not None:
            position.offsets[metric] = next_offset
            more = True
        else:
            position.offsets[metric] = offset + len(data)
            position.i = (position.i + 1) % len(metrics)
            more = position.i != 0
        return base.PullPage(tuple(items), position.dump(), more=more)

    def _envelope(self, body: Any, metric: str, offset: int) -> tuple[list[Any], int | None]:
        """The page's items and the offset of ``_links.next`` (None on the last page)."""
        if not isinstance(body, dict) or not isinstance(body.get("data"), list):
            raise EspUnavailableError(
                f"GET /events ({metric}) answered a body without a data list: {short_json(body)}"
            )
        data: list[Any] = body["data"]
        links = body.get("_links")
        following = links.get("next") if isinstance(links, dict) else None
        if isinstance(following, dict):  # HAL's {"href": …} form
            following = following.get("href")
        if following is None:
            return data, None
        try:
            values = parse_qs(urlsplit(str(following)).query).get("offset") or []
            next_offset = int(values[0]) if len(values) == 1 else -1
        except ValueError:
            next_offset = -1
        if next_offset <= offset:
            log.warning(
                "_links.next has no offset past this page's; reading on from this page's end",
                extra={"account": self._name, "metric": metric, "next": str(following)[:300]},
            )
            return data, None
        return data, next_offset

    def _api_item(
        self, broadcast: SentBroadcast, metric: str, offset: int, item: Any
    ) -> ResponseEvent | None:
        """The event of an item of this broadcast; None for other mail; ValueError when unusable."""
        if not isinstance(item, dict):
            log.warning("Events API item is not an object", extra={"account": self._name, "metric": metric})
            return None
        manual = item.get("broadcast_manual_options")
        file_name = manual.get(self.options.file_option) if isinstance(manual, dict) else None
        if not isinstance(file_name, str) or job_id_of(file_name) != broadcast.job_id:
            return None  # another job's mail, or not espbridge's at all
        if item.get("test_mailing") == 1:
            return None
        return self._api_event(broadcast, metric, offset, item)

    def _api_event(
        self, broadcast: SentBroadcast, metric: str, offset: int, item: dict[str, Any]
    ) -> ResponseEvent:
        esp_id = item.get("uuid")
        if not isinstance(esp_id, str) or not esp_id:
            raise ValueError("no uuid")
        timestamp = item.get("metric_timestamp")
        occurred = self._api_times.utc("metric_timestamp", timestamp if isinstance(timestamp, str) else "")
        key = _text(item.get("external_id"))
        email = _text(item.get("email_address")) or _text(item.get("customer_email_address"))
        if not key and not email:
            raise ValueError("neither external_id nor an email address")
        event_type = self._typed(self.options.api_metrics[metric], item.get("bounce_type"), "bounce_type")
        url = None
        if event_type is EventType.CLICK:
            url = _text(item.get("url")) or _text(item.get("url_unrendered"))
            if not url:
                raise ValueError("a click without url or url_unrendered")
        broadcast_id = item.get("broadcast_id")
        return self._events.make(
            broadcast_id=broadcast.job_id,
            type=event_type,
            occurred_at=occurred,
            source=rows.api_source(f"GET /events?filter[metric]={metric}", offset // self.options.page_limit),
            esp_event_id=esp_id,
            url=url,
            communication_key=key or None,
            email=email or None,
            esp_message_id=str(broadcast_id) if broadcast_id is not None else None,
            extra={k: _extra_text(item[k]) for k in API_EXTRAS if item.get(k) is not None},
        )

    def _typed(self, mapped: str, bounce_type: Any, what: str) -> EventType:
        """The event type of a source mapped to ``mapped`` (``bounce`` splits by the bounce type)."""
        if mapped != BOUNCE:
            return EventType(mapped)
        kind = self._bounces.get(bounce_type.strip().lower()) if isinstance(bounce_type, str) else None
        if kind is None:
            raise ValueError(f"unknown {what} {bounce_type!r} (known: {sorted(self._bounces)})")
        return kind

    # --- responses: the activities export -------------------------------------------------------------

    def parse_response_file(
        self, local_path: Path, remote_path: str
    ) -> Iterator[ResponseEvent | base.BadRow]:
        """Rows of an activities file: events of the mapped types, BadRows with their line."""
        return self._exports.events(local_path, lambda row: self._export_event(remote_path, row))

    def _export_event(self, remote_path: str, row: rows.Row) -> ResponseEvent | None:
        opts, cols, get = self.options, row.column, row.get
        code = get("event_type")
        if code not in opts.export_types:
            raise ValueError(f"unknown {cols('event_type')} {code!r} (known: {sorted(opts.export_types)})")
        mapped = opts.export_types[code]
        file_name = get("file")
        if mapped is None or not file_name:
            return None  # a type the API carries, or mail that is not espbridge's
        job_id = job_id_of(file_name)
        if job_id is None:
            raise ValueError(
                f"{cols('file')} {file_name!r} is not a trigger file name <trigger>+<job_id>.csv"
            )
        occurred = row.time("event_date")
        key, email = get("key"), get("email")
        if not key and not email:
            raise ValueError(f"neither {cols('key')} nor {cols('email')}")
        event_type = self._typed(mapped, get("bounce_type"), cols("bounce_type"))
        url = get("url") or None
        if event_type is EventType.CLICK and not url:
            raise ValueError(f"a click without {cols('url')}")
        extra = {role: get(role) for role in ("customer_id", "bounce_code") if get(role)}
        return self._events.make(
            broadcast_id=job_id,
            type=event_type,
            occurred_at=occurred,
            source=rows.file_source(remote_path, row.line),
            recipient=key or email,
            url=url,
            communication_key=key or None,
            email=email or None,
            esp_message_id=get("broadcast_id") or None,
            extra=extra,
        )

    # --- subscriptions: the customer REST API --------------------------------------------------------

    async def apply_contacts(self, changes: Sequence[base.ContactChange]) -> list[base.ContactResult]:
        """Each change through the public REST API: the customers with the address are looked up,
        then updated (``PUT customer/<id>``) or one is created (``POST customer``) with the list's
        opt-in field Y or N and the change's fields; a double opt-in leaves the field N and posts
        the customer to the webhook receiver that starts the opt-in campaign (pending). A removal
        opts out, or deletes the customers (``removal``). A refusal of Deployteq's is the contact's."""
        if self._customers is None:
            raise ConfigurationError(_NO_SYNC.format(name=self._name))
        return [await self._customers.apply(change) for change in changes]

    # --- webhooks: ESP-side changes from the campaigns' HTTP request objects ------------------------

    def parse_webhook(
        self, headers: Mapping[str, str], body: bytes
    ) -> list[ResponseEvent | SubscriptionChange | base.BadRow]:
        """A campaign's HTTP request object reporting subscription changes (an unsubscribe, a
        complaint, a confirmed opt-in…): ``Authorization: Bearer <password>``, a JSON object or an
        array of them, each a :class:`SubscriptionChange`. Without a ``password`` configured every
        call is refused: Deployteq sends no event webhooks of its own."""
        if not self._webhook_secret:
            raise base.WebhookAuthError(
                f"{self._name}: no webhook secret (password[_file]) is configured, so no call from "
                "a Deployteq HTTP request object is accepted"
            )
        contacts.check_bearer(headers, self._webhook_secret, "webhook")
        return [*self._webhook_items.parse(self.account, body)]


_NO_SYNC = (
    "{name} does not sync subscriptions: its subscriptions.lists is empty, so no contact is pushed to it"
)


class DeployteqRefusedError(EspRequestError):
    """The customer REST API refused a request (a 4xx with its ``message``)."""

    def __init__(self, where: str, status: int, message: str) -> None:
        super().__init__(f"{where} answered {status}: {message}")
        self.status = status
        self.message = message

    @classmethod
    def of(cls, where: str, status: int, body: Any, text: str) -> DeployteqRefusedError:
        """The refusal of an answer (the :class:`EspClient` refusal of the customer API)."""
        message = body.get("message") if isinstance(body, dict) else None
        return cls(where, status, str(message) if message else text)


def _customer_api(
    account: AccountConfig, opts: Options, context: base.ConnectorContext, limiter: Any
) -> _Customers | None:
    """The customer API of an account that syncs subscriptions (None otherwise), its options
    checked: a misconfigured account fails at the start, not at its first contact."""
    policy = account.subscriptions
    if not policy.enabled:
        return None
    name = account.name
    problems = []
    if not opts.rest_url:
        problems.append(
            "options.rest_url (the REST API base, https://<portal>.myclang.com/app/api/rest/public/v2)"
        )
    token = account.token.get_secret_value() if account.token else ""
    if not token:
        problems.append("token[_file] (the Deployteq API token of the REST API)")
    unmapped = [lst for lst in policy.lists if lst not in opts.list_fields]
    if unmapped:
        problems.append(f"options.list_fields for the lists {unmapped} (each list's Y/N customer field)")
    if policy.double_opt_in and not opts.double_opt_in_url:
        problems.append("options.double_opt_in_url (the webhook receiver that starts the opt-in campaign)")
    if problems:
        raise ConfigurationError(f"account {name} syncs subscriptions and needs " + "; ".join(problems))

    def client(base_url: str, headers: Mapping[str, str] | None = None) -> EspClient:
        return EspClient(
            context.http,
            base_url,
            account=name,
            timeout_s=account.request_timeout_s,
            headers=headers,
            secrets=(token,),
            limiter=limiter,
            # a 429 was not carried out; a 5xx may have been, so the caller retries from the lookup
            retries=Retries(
                attempts=RETRY_ATTEMPTS, rate_limits_only=True, max_wait_s=account.request_timeout_s
            ),
            holds=True,
            answered=(200, 201, 202, 204, 404),
            refusal=DeployteqRefusedError.of,
        )

    assert opts.rest_url is not None  # checked above
    receiver = opts.double_opt_in_url
    opt_in = client(receiver, {"Authorization": f"Bearer {token}"}) if receiver else None
    return _Customers(name, opts, client(opts.rest_url), opt_in, token)


class _Customers:
    """The customer calls of one account (docs/connectors/deployteq.md#subscriptions)."""

    def __init__(
        self, name: str, opts: Options, client: EspClient, opt_in: EspClient | None, token: str
    ) -> None:
        self._name = name
        self._opts = opts
        self._client = client
        self._opt_in = opt_in
        self._token = token
        self._reserved = {CUSTOMER_ID, EMAIL_FIELD, "token", *opts.list_fields.values()}

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
        return await self._client.call(method, path, params={"token": self._token}, json=body)

    async def find(self, email: str) -> list[dict[str, Any]]:
        """``GET customer?emailaddress=``: the customers with the address (none: an empty list)."""
        status, body = await self._client.call(
            "GET", "/customer", params={"token": self._token, EMAIL_FIELD: email}
        )
        if status == 404:
            raise ConfigurationError(
                f"GET /customer answered 404: is options.rest_url of {self._name} the REST API v2 base?"
            )
        if not isinstance(body, list) or not all(
            isinstance(c, dict) and isinstance(c.get(CUSTOMER_ID), int) for c in body
        ):
            raise EspUnavailableError(
                f"GET /customer answered no array of customers with ids: {short_json(body)}"
            )
        return body

    async def apply(self, change: base.ContactChange) -> base.ContactResult:
        """One change: refused (Deployteq's reason) or applied (the state Deployteq now holds)."""
        field = self._opts.list_fields.get(change.list)
        if field is None:
            return contacts.refused(
                change, f"Deployteq account {self._name} has no list {change.list!r} (options.list_fields)"
            )
        fields = contacts.contact_fields(change, self._reserved)
        if isinstance(fields, str):
            return contacts.refused(change, fields)
        try:
            return await self._apply(change, field, fields)
        except DeployteqRefusedError as exc:
            return contacts.refused(change, f"Deployteq refused {change.email}: {exc.message}")

    async def _apply(
        self, change: base.ContactChange, field: str, fields: dict[str, str]
    ) -> base.ContactResult:
        customers = await self.find(change.email)
        state = change.state
        if state is None:
            if not customers:
                return contacts.applied(
                    change, None, "no Deployteq customer has this address: nothing to update"
                )
            await self._save(change.email, customers, fields)
            return contacts.applied(change, None)
        if state is SubscriptionState.REMOVED and self._opts.removal == "delete_customer":
            for customer in customers:
                await self._call("DELETE", f"/customer/{customer[CUSTOMER_ID]}")
            return contacts.applied(change, SubscriptionState.REMOVED)
        if state in (SubscriptionState.UNSUBSCRIBED, SubscriptionState.REMOVED):
            await self._save(change.email, customers, {**fields, field: "N"})
            return contacts.applied(change, state if state is SubscriptionState.UNSUBSCRIBED else None)
        blacklisted = [c[CUSTOMER_ID] for c in customers if c.get(STATUS_FIELD) == BLACKLISTED]
        if blacklisted:
            return contacts.refused(
                change,
                f"Deployteq customer {blacklisted[0]} with this address is blacklisted (status BLACKLIST)",
            )
        confirmed = customers and all(c.get(field) == "Y" for c in customers)
        wants_opt_in = state is SubscriptionState.PENDING or change.double_opt_in
        if not wants_opt_in or confirmed:
            await self._save(change.email, customers, {**fields, field: "Y"})
            return contacts.applied(change, SubscriptionState.SUBSCRIBED)
        if self._opt_in is None:
            return contacts.refused(
                change, f"account {self._name} has no double opt-in (options.double_opt_in_url is not set)"
            )
        ids = await self._save(change.email, customers, {**fields, field: "N"})
        # the receiver's campaign mails the confirmation; its HTTP request object reports the confirm
        body = {EMAIL_FIELD: change.email, "list": change.list, "field": field, "customer_id": ids[0]}
        status, answer = await self._opt_in.call("POST", "", json=body)
        if status == 404:
            raise ConfigurationError(
                f"the webhook receiver of {self._name} (options.double_opt_in_url) answered 404: "
                f"{short_json(answer)}"
            )
        return contacts.applied(change, SubscriptionState.PENDING)

    async def _save(self, email: str, customers: list[dict[str, Any]], values: dict[str, str]) -> list[int]:
        """Update every customer with the address, or create one; their ids."""
        ids = []
        for customer in customers:
            status, _ = await self._call("PUT", f"/customer/{customer[CUSTOMER_ID]}", values)
            if status != 404:  # deleted since the lookup: nothing to update
                ids.append(customer[CUSTOMER_ID])
        if ids:
            return ids
        _, body = await self._call("POST", "/customer", {EMAIL_FIELD: email, **values})
        made = body.get(CUSTOMER_ID) if isinstance(body, dict) else None
        if not isinstance(made, int):
            raise EspUnavailableError(f"POST /customer answered no customer id: {short_json(body)}")
        return [made]


def _text(value: Any) -> str:
    """A string field (an int is accepted as its digits); anything else is absent."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return ""


def _extra_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)
