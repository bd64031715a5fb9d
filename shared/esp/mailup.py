"""The MailUp connector (``connector: mailup``), written from docs/connectors/mailup.md.

* Lists: the uploader writes ``<sftp_root>/drop/<job_id>.csv`` (``Email``, ``CommunicationKey`` and
  the job's field-map targets). MailUp never reads it: :meth:`MailUpConnector.start_import` reads it
  back over SFTP and posts it in chunks to ``POST /Console/Group/{g}/Recipients`` (the job's own
  group ``espbridge-<job_id>``, found by name or created), each chunk an asynchronous MailUp import.
  The import id is ``<idGroup>/<local invalid rows>/<idImport>,<idImport>,…`` and is followed with
  ``GET /Console/Imports/{id}``.
* Sends: ``POST /Console/Group/{g}/Email/{m}/Send`` of the job's own message, confirmed with
  ``POST /Console/Email/Sendings/{id}/Immediate`` (or deferred with ``?datetime="…"``). The send id
  is ``<idMessage>:<idSending>`` (``<idMessage>`` when only SendHistory showed it), followed through
  the Undefined, Deferred and Immediate queues, then the message's SendHistory (whose rows carry no
  sending id: the message is the job's own), then the message's recipient count.
* Responses: paged pulls of the mail statistics service (one page of one endpoint per
  :meth:`MailUpConnector.pull_responses` call, cursor ``{"v":1,"ep":…,"page":…}``), or, with
  ``statistics_source: export``, the SFTP statistics export files (``statistics/*.csv``) plus the
  Unsubscriptions endpoint; unsubscribes also arrive by the Unsubscribe webhook.
* Subscriptions: :meth:`MailUpConnector.apply_contacts` looks a contact up in the list's
  ``Recipients/Subscribed|Pending|Unsubscribed``, then subscribes it (``POST …/List/{id}/Recipient``,
  ``?ConfirmEmail=true`` for a double opt-in, or ``POST …/Subscribe/{idRecipient}``), unsubscribes
  it (``DELETE …/Unsubscribe/{idRecipient}``), removes it or sets its fields
  (``PUT /Console/Recipient/Detail``), one contact at a time. The Subscribe, Unsubscribe and Delete
  webhooks report changes made at MailUp as subscription changes.

Credentials (OAuth2 password grant at ``token_path``): ``username`` and ``password``/``password_file``
are the MailUp console user, ``client_id`` and ``client_secret``/``client_secret_file`` the
application's API keys. ``token``/``token_file`` is *not* an API credential: it is the webhook's
shared secret, sent by MailUp as the literal parameter ``Secret``; the job and the communication
key reach the webhook as numbered fields (``job_field``, ``key_field``: ``[Field39]``, ``[Field38]``).
The token is refreshed ``token_margin_s`` before it expires and once after a 401; every console
and statistics call of the account waits for the connector's ``RateLimiter`` (``rate_limit_per_s``,
5, per 1.1 s after each call's answer), and a 429 is waited out (``Retry-After``, else 1 s) and
repeated. Every option is described on the documentation page.
"""

from __future__ import annotations

import csv
import functools
import hmac
import logging
import re
import time
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Iterator, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar, Literal, Self
from urllib.parse import parse_qsl, quote, urlencode

from pydantic import Field, field_validator, model_validator

from shared.esp import base, contacts, rows
from shared.esp.accounts import AccountConfig
from shared.esp.cursor import Count, StoredCursor
from shared.esp.delimited import NotUtf8Error, stream_records
from shared.esp.generic import ListRejectedError
from shared.esp.limits import rate_limiter
from shared.esp.options import ConnectorOptions, DateFormat, Encoding, TimeZone
from shared.esp.rest import EspClient, EspUnavailableError, OAuth2Token, Retries, is_count
from shared.infra.db.jobs import SentBroadcast
from shared.infra.sftp import download_stream
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.messages import (
    BroadcastJob,
    EventSource,
    EventType,
    ResponseEvent,
    SubscriptionChange,
    SubscriptionState,
)

log = logging.getLogger(__name__)

FIELD_MAX_CHARS = 200
"""MailUp's personal data fields hold at most 200 characters."""
MAX_ERRORS = 100
"""Local row reasons kept per import (the rest are counted)."""
RATE_WINDOW_S = 1.1
"""The limiter's window: ``rate_limit_per_s`` calls per 1.1 s after each call's answer. The limiter
already keeps calls delayed on the way apart; the extra 0.1 s is a margin for how MailUp's own
clock cuts its seconds, which its documentation does not say."""
MAX_ATTEMPTS = 10
"""Calls of one request when MailUp answers 429 (or, where repeating is safe, 5xx)."""

DEFAULT_EXPORT_COLUMNS = {
    "list_id": "idList",
    "send_id": "idInvio",
    "message_id": "idNl",
    "email": "e-mail address",
    "status": "statusType",
    "details": "details",
    "time": "statusChange",
    "key": "CommunicationKey",
    "job": "EspbridgeJob",
}
REQUIRED_EXPORT_ROLES = ("list_id", "message_id", "email", "status", "details", "time", "job")
DEFAULT_WEBHOOK_PARAMS = {
    "secret": "Secret",
    "event_type": "EventType",
    "event_source": "EventSource",
    "event_date": "EventDate",
    "list_id": "IdList",
    "message_id": "IdNL",
    "email": "Email",
    "reason": "Reason",
    "job": "Job",
    "key": "Key",
}
"""The webhook's parameter names by role; MailUp lets the account name them freely."""
WEBHOOK_PLACEHOLDERS = {
    "event_type": "[EventType]",
    "event_source": "[EventSource]",
    "event_date": "[EventDate]",
    "list_id": "[IdList]",
    "message_id": "[IdNL]",
    "email": "[Email]",
    "reason": "[Reason]",
}
"""MailUp's placeholder for each role (the job and key are ``[FieldNN]`` of their fields)."""
MAX_FIELD = 39
"""MailUp's personal data fields are numbered 1 to 39."""
DEFAULT_IMPORT_STATUS_CODES = {"1": "queued", "2": "running", "3": "done", "4": "failed"}
ReasonType = Literal["unsubscribe", "complaint"]
"""What an unsubscription becomes (or None in ``unsubscribe_reasons``: no event)."""
DEFAULT_UNSUBSCRIBE_REASONS: dict[str, ReasonType | None] = {
    "0": "unsubscribe",
    "1": "unsubscribe",
    "2": "complaint",
    "3": None,
}
DEFAULT_WEBHOOK_EVENTS: dict[str, SubscriptionState | None] = {
    "subscribe": SubscriptionState.SUBSCRIBED,
    "unsubscribe": SubscriptionState.UNSUBSCRIBED,
    "delete": SubscriptionState.REMOVED,
    "changeprofile": None,
}
"""MailUp's webhook events (``[EventType]``, any case) and the subscription state each reports;
None: no change (a profile change carries no subscription state)."""
RECIPIENT_STATUSES = (
    ("Subscribed", SubscriptionState.SUBSCRIBED),
    ("Pending", SubscriptionState.PENDING),
    ("Unsubscribed", SubscriptionState.UNSUBSCRIBED),
)
"""A list's recipients by status (``GET /Console/List/{id}/Recipients/<status>``), in the order a
contact is looked for: the three exclude each other on one list."""
CONTACT_ANSWERS = (200, 201, 202, 204, 400, 404, 409)
"""The answers of a recipient call read by the connector: a 4xx is MailUp refusing the contact."""
API_ENDPOINTS = ("Recipients", "Bounces", "Views", "UrlClickDetails", "Unsubscriptions")
"""The statistics endpoints read with ``statistics_source: api``, in this order."""
EXPORT_API_ENDPOINTS = ("Unsubscriptions",)
"""The only endpoint read with ``statistics_source: export`` (the export has no unsubscribes)."""
Place = Literal["Undefined", "Deferred", "Immediate", "History", "Recipients"]
"""Where a sending is seen: one of the three queues, SendHistory, or only in its recipient count."""
QUEUES: tuple[Place, ...] = ("Undefined", "Deferred", "Immediate")
"""Sending queues in the order a sending moves through them (then SendHistory, then the message's
recipients): a sending that moves on while they are read is met again further on, never missed."""
EXPORT_TYPES = {"SNT": EventType.SENT, "OPN": EventType.OPEN, "CLK": EventType.CLICK}

_IMPORT_ID = re.compile(r"([0-9]+)/([0-9]+)/([0-9]+(?:,[0-9]+)*)?")
_SEND_ID = re.compile(r"([0-9]+)(?::([0-9]+))?")
_DIGITS = re.compile(r"[0-9]+")
_INVALID_KINDS = (
    ("Invalid", "InvalidEmail", "invalid email"),
    ("Invalid", "WithoutEmail", "without email"),
    ("Valid", "RepeatedEmail", "repeated email"),
    ("Invalid", "InvalidNumber", "invalid number"),
    ("Invalid", "WithoutNumber", "without number"),
    ("Invalid", "WithoutPrefix", "without prefix"),
)


class Options(ConnectorOptions):
    """The account ``options`` this connector reads (docs/connectors/mailup.md#configuration).

    ``export_columns``, ``webhook_params`` and ``webhook_events`` are laid over their defaults;
    ``import_status_codes`` and ``unsubscribe_reasons`` replace theirs as a whole.
    """

    MERGED: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "export_columns": DEFAULT_EXPORT_COLUMNS,
        "webhook_params": DEFAULT_WEBHOOK_PARAMS,
        "webhook_events": DEFAULT_WEBHOOK_EVENTS,
    }
    ROLE_KEYED: ClassVar = ("export_columns", "webhook_params")

    list_id: int = Field(gt=0, description="the MailUp list (required)")
    send_to: Literal["group", "list"] = "group"
    group_prefix: str = "espbridge-"
    key_field: int = Field(default=38, ge=1, le=MAX_FIELD, description="the field number of the key")
    job_field: int = Field(default=39, ge=1, le=MAX_FIELD, description="the field number of the job")
    webhook_params: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_WEBHOOK_PARAMS))
    import_chunk_rows: int = Field(default=5000, ge=1)
    confirm_sending: bool = True
    statistics_source: Literal["api", "export"] = "api"
    page_size: int = Field(default=500, ge=1)
    rate_limit_per_s: int = Field(default=5, ge=1)
    stop_interval_s: float = Field(default=30.0, ge=0, description="MailUp: one Stop every 30 s")
    token_margin_s: float = Field(default=60.0, ge=0)
    token_path: str = Field(default="/Authorization/OAuth/Token", min_length=1)
    console_path: str = "/API/v1.1/Rest/ConsoleService.svc"
    stats_path: str = "/API/v1.1/Rest/MailStatisticsService.svc"
    import_status_path: str = "/Console/Imports/{id}"
    send_history_path: str = "/Console/List/{list}/Email/{message}/SendHistory"
    click_details_path: str = "/Message/{message}/List/UrlClickDetails"
    import_status_codes: dict[str, base.ImportState] = Field(
        default_factory=lambda: {k: base.ImportState(v) for k, v in DEFAULT_IMPORT_STATUS_CODES.items()}
    )
    unsubscribe_reasons: dict[str, ReasonType | None] = Field(
        default_factory=lambda: dict(DEFAULT_UNSUBSCRIBE_REASONS)
    )
    hard_bounce_pattern: str = "^5"
    soft_bounce_pattern: str = "^4"
    export_folder: str = Field(default="statistics", min_length=1)
    export_pattern: str = Field(default="*.csv", min_length=1)
    export_delimiter: str = Field(default=";", min_length=1, max_length=1)
    export_quote: str = Field(default='"', min_length=1, max_length=1)
    export_encoding: Encoding = "utf-8"
    export_timezone: TimeZone = "Europe/Rome"
    export_date_format: DateFormat = "%Y%m%dT%H%M%S"
    export_columns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_EXPORT_COLUMNS))
    contact_fields: dict[str, int] = Field(
        default_factory=dict,
        description="subscription requests' field names → MailUp personal data field numbers "
        "(other names are matched to a field's Description)",
    )
    webhook_events: dict[str, SubscriptionState | None] = Field(
        default_factory=lambda: dict(DEFAULT_WEBHOOK_EVENTS),
        description="webhook [EventType] values → the subscription state they report (None: none)",
    )
    remove_recipient_path: str = "/Console/List/{list}/Recipient/{recipient}"

    @field_validator("webhook_events", mode="after")
    @classmethod
    def _event_names(cls, value: dict[str, SubscriptionState | None]) -> dict[str, SubscriptionState | None]:
        return {name.strip().lower(): state for name, state in value.items()}

    @field_validator("key_field", "job_field", mode="before")
    @classmethod
    def _field_number(cls, value: Any) -> Any:
        if isinstance(value, str) and not _DIGITS.fullmatch(value.strip()):
            raise ValueError(
                f"is a MailUp personal data field number (1 to {MAX_FIELD}, as in [Field07]), "
                f"not a name ({value!r})"
            )
        return value

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.key_field == self.job_field:
            raise ValueError(f"key_field and job_field are both field {self.key_field}")
        names = [name.strip() for name in self.webhook_params.values()]
        if not all(names) or len(set(names)) != len(names):
            raise ValueError(f"webhook_params names must be non-empty and distinct: {self.webhook_params}")
        for name in ("token_path", "console_path", "stats_path"):
            if not getattr(self, name).startswith("/"):
                raise ValueError(f"{name} must start with '/'")
        for name, number in self.contact_fields.items():
            if not 1 <= number <= MAX_FIELD:
                raise ValueError(
                    f"contact_fields {name!r}: {number} is not a field number (1 to {MAX_FIELD})"
                )
            if number in (self.key_field, self.job_field):
                raise ValueError(
                    f"contact_fields {name!r}: field {number} holds espbridge's "
                    + ("key (key_field)" if number == self.key_field else "job (job_field)")
                )
        if self.webhook_events.get("unsubscribe") not in (SubscriptionState.UNSUBSCRIBED, None):
            raise ValueError("webhook_events: an Unsubscribe reports the state unsubscribed (or none)")
        templates = {
            "remove_recipient_path": (self.remove_recipient_path, {"list": 1, "recipient": 2}),
            "import_status_path": (self.import_status_path, {"id": 1}),
            "send_history_path": (self.send_history_path, {"list": 1, "message": 2}),
            "click_details_path": (self.click_details_path, {"message": 2}),
        }
        for name, (template, values) in templates.items():
            if not template.startswith("/"):
                raise ValueError(f"{name} must start with '/'")
            try:
                template.format(**values)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"{name} {template!r} may use only {{{'}, {'.join(values)}}}: {exc}"
                ) from None
        for name in ("hard_bounce_pattern", "soft_bounce_pattern"):
            try:
                re.compile(getattr(self, name))
            except re.error as exc:
                raise ValueError(f"{name} is not a regular expression: {exc}") from None
        if "'" in self.group_prefix:
            raise ValueError("group_prefix cannot contain ' (it is quoted in the group filter)")
        return self

    def webhook_parameters(self) -> list[tuple[str, str]]:
        """The webhook's parameters as they are configured at MailUp, (name, value) in order; the
        secret's value is the account's ``token``, shown as ``<secret>``."""
        names = self.webhook_params
        return [
            (names["secret"], "<secret>"),
            *((names[role], placeholder) for role, placeholder in WEBHOOK_PLACEHOLDERS.items()),
            (names["job"], f"[Field{self.job_field:02d}]"),
            (names["key"], f"[Field{self.key_field:02d}]"),
        ]


class Cursor(StoredCursor):
    """The pull position: the statistics endpoint and its page read next."""

    ep: str
    page: Count


class MessageTakenError(PermanentError):
    """The job's MailUp message already has a sending (each job needs a message of its own)."""


class _ContactRefusedError(Exception):
    """MailUp refused one contact change (its reason is the text); the other changes go on."""


@dataclass(frozen=True, slots=True)
class _Recipient:
    """A recipient of a list: MailUp's id and its subscription status on that list."""

    id: int
    state: SubscriptionState


@dataclass(frozen=True, slots=True)
class _Chunk:
    """One MailUp import (one posted chunk) as ``GET /Console/Imports/{id}`` reports it."""

    import_id: int
    state: base.ImportState
    valid: int
    invalid: int
    error: str | None


@dataclass(frozen=True, slots=True)
class _Fields:
    """The MailUp field ids the list file's columns go to."""

    email: int
    """Index of the ``Email`` column."""
    columns: tuple[tuple[int, int], ...]
    """(column index, field id) for every other column, the key column first."""
    job_field: int


async def read_list_rows(
    chunks: AsyncIterable[bytes],
) -> AsyncGenerator[tuple[int, list[str] | None], None]:
    """Records of a UTF-8 CSV byte stream with the line each starts on (header included), as
    :func:`~shared.esp.delimited.stream_records` splits them; ``None`` stands for a record csv
    cannot read. The file is never held in memory.
    """
    try:
        async for start, lines in stream_records(chunks):
            yield start, _list_row(lines)
    except NotUtf8Error as exc:
        raise PermanentError(
            f"the list file is not UTF-8 (after line {exc.lines_read}): {exc.reason}"
        ) from None


def _list_row(lines: list[str]) -> list[str] | None:
    """The fields of one record's lines ([] for an empty line), None when csv cannot read them."""
    try:
        parsed = list(csv.reader(lines))
    except csv.Error:
        return None
    return parsed[0] if len(parsed) == 1 else [] if not parsed else None


def _list_number(list_id: str) -> int:
    """A contact change's list as MailUp's list id (a positive number)."""
    if not _DIGITS.fullmatch(list_id) or int(list_id) <= 0:
        raise _ContactRefusedError(f"list {list_id!r} is not a MailUp list id (a positive number)")
    return int(list_id)


def _int(value: Any) -> int:
    """A JSON integer (or integer text) from a MailUp body; anything else is 0."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, str) and _DIGITS.fullmatch(value.strip()):
        return int(value.strip())
    return 0


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _with_query(path: str, query: Mapping[str, str | int] | None) -> str:
    """The path with its query, every value percent-encoded (``%20``, never ``+``)."""
    return f"{path}?{urlencode(query, quote_via=quote, safe='')}" if query else path


def _split_job_value(value: str) -> tuple[str, str] | None:
    """``<message>:<job_id>`` from the job field, or None when it is not of that shape."""
    message, sep, job_id = value.partition(":")
    if not sep or not _DIGITS.fullmatch(message) or not job_id:
        return None
    return message, job_id


def _api_time(moment: datetime) -> str:
    """A time as MailUp's API writes it: ``yyyy-MM-dd HH:mm:ssZ`` in UTC."""
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _backoff_s(attempt: int, error: EspUnavailableError) -> float:
    """Without a Retry-After: 1 s after a 429, else one second more each time."""
    return 1.0 if error.status == 429 else float(attempt)


class MailUpConnector(base.Connector):
    """Connector for MailUp (REST API v1.1 behind OAuth2, SFTP list files and statistics export)."""

    can_send = True
    pulls_api = True
    list_format = base.ListFormat()
    contacts_per_call = 1
    """MailUp's recipient calls take one recipient; its bulk import is asynchronous and reports
    only counts, so it could not say which contact it refused."""

    def __init__(self, account: AccountConfig, context: base.ConnectorContext) -> None:
        super().__init__(account, context)
        name = account.name
        self.options = opts = Options.of(account)
        if not account.api_url:
            raise ConfigurationError(f"account {name} needs an api_url (e.g. https://services.mailup.com)")
        missing = [
            what
            for what, value in (
                ("username", account.username),
                ("password[_file]", account.password.get_secret_value() if account.password else ""),
                ("client_id", account.client_id),
                (
                    "client_secret[_file]",
                    account.client_secret.get_secret_value() if account.client_secret else "",
                ),
            )
            if not value
        ]
        if missing:
            raise ConfigurationError(
                f"account {name} needs {', '.join(missing)} (the MailUp console user and the API keys)"
            )
        assert account.password is not None  # checked above
        assert account.client_secret is not None
        api_url = account.api_url.rstrip("/")
        grant = {
            "grant_type": "password",
            "client_id": account.client_id or "",
            "client_secret": account.client_secret.get_secret_value(),
            "username": account.username or "",
            "password": account.password.get_secret_value(),
        }
        token = OAuth2Token(
            context.http,
            api_url + opts.token_path,
            grant,
            margin_s=opts.token_margin_s,
            timeout_s=account.request_timeout_s,
        )
        retries = Retries(attempts=MAX_ATTEMPTS, backoff_s=_backoff_s, max_wait_s=account.request_timeout_s)
        self._api = EspClient(
            context.http,
            api_url,
            account=name,
            timeout_s=account.request_timeout_s,
            token=token,
            secrets=(grant["client_secret"], grant["password"]),
            limiter=rate_limiter(context, account, opts.rate_limit_per_s, RATE_WINDOW_S),
            retries=replace(retries, rate_limits_only=True),
        )
        self._repeatable = retries
        self._name = name
        self._console = opts.console_path.rstrip("/")
        self._stats = opts.stats_path.rstrip("/")
        self._events = rows.Events(account)
        self._hard = re.compile(opts.hard_bounce_pattern)
        self._soft = re.compile(opts.soft_bounce_pattern)
        self._exports = rows.ResponseTable(
            opts.export_columns,
            REQUIRED_EXPORT_ROLES,
            delimiter=opts.export_delimiter,
            encoding=opts.export_encoding,
            quotechar=opts.export_quote,
            times=rows.LocalTimes(opts.export_date_format, opts.export_timezone),
        )
        self._endpoints = API_ENDPOINTS if opts.statistics_source == "api" else EXPORT_API_ENDPOINTS
        self._stopped_at: float | None = None  # when this process last called Stop (monotonic)
        self._final_imports: dict[int, _Chunk] = {}
        self._field_ids: dict[str, int] | None = None
        self._local_errors: dict[str, tuple[str, ...]] = {}
        self.response_sources: tuple[base.ResponseSource, ...] = (
            (base.ResponseSource(opts.export_folder, opts.export_pattern),)
            if opts.statistics_source == "export"
            else ()
        )

    # --- HTTP -----------------------------------------------------------------------------------------

    async def _call(
        self, method: str, path: str, json: Any = None, repeatable: bool = False
    ) -> tuple[int, Any]:
        """One console or statistics call: bearer token, rate limiter, 429s waited out and repeated.

        ``repeatable`` calls (an import chunk, an Immediate confirmation) are also repeated in place
        after a 5xx, a timeout or a dropped connection; other calls raise those as transient.
        """
        return await self._api.call(method, path, json=json, retries=self._repeatable if repeatable else None)

    async def _pages(self, url: str, query: Mapping[str, str] | None = None) -> list[dict[str, Any]] | None:
        """Every item of a paged list (None when MailUp answers 404)."""
        items: list[dict[str, Any]] = []
        page = 0
        while True:
            status, body = await self._page(url, page, query)
            if status == 404:
                return None
            page_items, last = self._envelope(url, body, page)
            items.extend(page_items)
            if last:
                return items
            page += 1

    async def _page(self, url: str, page: int, query: Mapping[str, str] | None = None) -> tuple[int, Any]:
        return await self._call(
            "GET", _with_query(url, {**(query or {}), "pageSize": self.options.page_size, "pageNumber": page})
        )

    def _envelope(self, url: str, body: Any, page: int) -> tuple[list[dict[str, Any]], bool]:
        """The items of a paging envelope and whether it is the last page."""
        if not isinstance(body, dict) or not isinstance(body.get("Items"), list):
            raise EspUnavailableError(f"GET {url} answered without a paging envelope: {str(body)[:200]}")
        items = [i if isinstance(i, dict) else {"_item": i} for i in body["Items"]]
        size = _int(body.get("PageSize")) or self.options.page_size
        number = _int(body.get("PageNumber")) if body.get("PageNumber") is not None else page
        total = _int(body.get("TotalElementsCount"))
        last = body.get("IsPaginated") is False or not items or (number + 1) * size >= total
        return items, last

    # --- messages and sendings ------------------------------------------------------------------------

    def _message_id(self, job: BroadcastJob) -> int:
        if not _DIGITS.fullmatch(job.message) or int(job.message) <= 0:
            raise ListRejectedError(
                f"job {job.job_id}: message {job.message!r} is not a MailUp message id (a positive number)"
            )
        return int(job.message)

    def _history_url(self, message: int) -> str:
        path = self.options.send_history_path.format(list=self.options.list_id, message=message)
        return self._console + path

    async def _find_sending(self, message: int, sending: int | None = None) -> _Sending | None:
        """Where the message's sending is (that sending's, when its id is given), or None if the
        message has none: the queues, then SendHistory, then the message's recipients.

        SendHistory rows carry no sending id, so they are the message's: every job has a message of
        its own. Raises :class:`ListRejectedError` when MailUp does not know the message (404).
        """
        for queue in QUEUES:
            for item in await self._pages(f"{self._console}/Console/Email/Sendings/{queue}") or []:
                if _int(item.get("IdMessage")) == message and sending in (None, _int(item.get("Id"))):
                    return _Sending(message, _int(item.get("Id")), queue)
        history = await self._pages(self._history_url(message))
        if history is None:
            raise ListRejectedError(f"MailUp knows no message {message} in list {self.options.list_id}")
        if history:
            return _Sending(
                message,
                sending,
                "History",
                ended=all(row.get("EndDate") not in (None, "") for row in history),
                recipients=sum(_int(row.get("Recipients")) for row in history),
            )
        counted = await self._recipients_counted(message)
        return _Sending(message, sending, "Recipients", recipients=counted) if counted > 0 else None

    async def _recipients_counted(self, message: int) -> int:
        """How many recipients the message was sent to (the statistics service; 0 when unknown)."""
        status, body = await self._call("GET", f"{self._stats}/Message/{message}/Count/Recipients")
        return 0 if status == 404 else _int(body)

    async def _confirm(self, sending: int) -> None:
        status, body = await self._call(
            "POST", f"{self._console}/Console/Email/Sendings/{sending}/Immediate", repeatable=True
        )
        if status == 404:
            raise ListRejectedError(f"MailUp does not know sending {sending}: {_error_text(body)}")

    async def _defer(self, sending: int, when: datetime) -> None:
        """Schedule a sending left unconfirmed for its job's ``send_at``."""
        status, body = await self._call(
            "POST",
            f"{self._console}/Console/Email/Sendings/{sending}/Deferred",
            json={"Date": _api_time(when)},
            repeatable=True,
        )
        if status == 404:
            raise ListRejectedError(f"MailUp does not know sending {sending}: {_error_text(body)}")

    # --- import ---------------------------------------------------------------------------------------

    async def start_import(self, remote_path: str, job: BroadcastJob) -> base.ImportStatus:
        """Check the message is unused, read the list file back from SFTP and post it in chunks."""
        message = self._message_id(job)
        found = await self._find_sending(message)
        if found is not None:
            raise MessageTakenError(
                f"message {message} already has a sending ({found.status().send_id}): "
                "every job needs a MailUp message of its own"
            )
        if self.context.sftp is None:
            raise ConfigurationError(f"{self._name}: the mailup connector needs the SFTP pool to read lists")
        async with self.context.sftp.session() as sftp:
            data = download_stream(sftp, remote_path)
            try:
                return await self.import_list(data, job)
            finally:
                if isinstance(data, AsyncGenerator):
                    await data.aclose()  # the remote file is closed even when the import stops early

    async def import_list(self, chunks: AsyncIterable[bytes], job: BroadcastJob) -> base.ImportStatus:
        """Post a list file's rows (the bytes of ``drop/<job_id>.csv``) to MailUp, chunk by chunk.

        Rows that cannot be imported are left out and counted with their line. Returns ``queued``
        with the composite import id (see the module docstring).
        """
        async with aclosing(read_list_rows(chunks)) as records:
            return await self._import_rows(records, job)

    async def _import_rows(
        self, records: AsyncIterator[tuple[int, list[str] | None]], job: BroadcastJob
    ) -> base.ImportStatus:
        message = self._message_id(job)
        opts = self.options
        first = await anext(records, None)
        if first is None or not first[1]:
            raise ListRejectedError(f"the list file of job {job.job_id} has no header row")
        header = first[1]
        fields = await self._resolve_fields(header)
        group = 0 if opts.send_to == "list" else await self._group(job)
        url = (
            f"{self._console}/Console/List/{opts.list_id}/Recipients"
            if opts.send_to == "list"
            else f"{self._console}/Console/Group/{group}/Recipients"
        )
        job_value = f"{message}:{job.job_id}"
        key_index = header.index(self.list_format.key_field)
        seen_emails: set[str] = set()
        seen_keys: set[str] = set()
        errors: list[str] = []
        invalid = 0
        batch: list[dict[str, Any]] = []
        imports: list[int] = []
        async for line, row in records:
            if row == []:
                continue  # an empty line is no row
            reason = self._row_problem(row, len(header), fields.email, key_index, seen_emails, seen_keys)
            if reason is not None:
                invalid += 1
                if len(errors) < MAX_ERRORS:
                    errors.append(f"line {line}: {reason}")
                continue
            assert row is not None  # _row_problem refuses unreadable records
            batch.append(
                {
                    "Email": row[fields.email],
                    "Name": "",
                    "Fields": [
                        *({"Id": field, "Value": row[index]} for index, field in fields.columns[:1]),
                        {"Id": fields.job_field, "Value": job_value},
                        *({"Id": field, "Value": row[index]} for index, field in fields.columns[1:]),
                    ],
                }
            )
            if len(batch) >= opts.import_chunk_rows:
                imports.append(await self._post_chunk(url, batch))
                batch = []
        if batch:
            imports.append(await self._post_chunk(url, batch))
        if invalid > len(errors):
            errors.append(f"… and {invalid - len(errors)} more rows left out")
        import_id = f"{group}/{invalid}/{','.join(str(i) for i in imports)}"
        self._local_errors[import_id] = tuple(errors)
        log.info(
            "MailUp import posted",
            extra={"job_id": job.job_id, "import_id": import_id, "chunks": len(imports), "left_out": invalid},
        )
        if not imports:
            return base.ImportStatus(
                import_id=import_id,
                state=base.ImportState.FAILED,
                rows_invalid=invalid,
                errors=(*errors, "no row of the list file can be imported"),
            )
        return base.ImportStatus(
            import_id=import_id, state=base.ImportState.QUEUED, rows_invalid=invalid, errors=tuple(errors)
        )

    def _row_problem(
        self,
        row: list[str] | None,
        width: int,
        email_index: int,
        key_index: int,
        seen_emails: set[str],
        seen_keys: set[str],
    ) -> str | None:
        """Why a list row is left out, or None (then its email and key count as seen)."""
        if row is None:
            return "not a readable CSV record"
        if len(row) != width:
            return f"{len(row)} fields, want {width}"
        key = row[key_index]
        if not key:
            return f"empty {self.list_format.key_field}"
        long = [i for i, value in enumerate(row) if i != email_index and len(value) > FIELD_MAX_CHARS]
        if long:
            return f"a value over {FIELD_MAX_CHARS} characters (field {long[0] + 1})"
        email = row[email_index].lower()
        if email and email in seen_emails:
            return f"email {row[email_index]!r} already in the file"
        if key in seen_keys:
            return f"{self.list_format.key_field} {key!r} already in the file"
        if email:
            seen_emails.add(email)
        seen_keys.add(key)
        return None

    async def _resolve_fields(self, header: Sequence[str]) -> _Fields:
        """Map the list file's columns to MailUp personal data fields: the key to the field
        numbered ``key_field``, the others by their Description; the job goes to ``job_field``."""
        fmt, opts = self.list_format, self.options
        for needed in (fmt.email_field, fmt.key_field):
            if needed not in header:
                raise ListRejectedError(f"the list file has no {needed!r} column")
        duplicated = sorted({c for c in header if header.count(c) > 1})
        if duplicated:
            raise ListRejectedError(f"the list file names columns twice: {', '.join(duplicated)}")
        items = await self._pages(f"{self._console}/Console/Recipient/DynamicFields")
        by_name: dict[str, int] = {}
        numbers: set[int] = set()
        for item in items or []:
            description, field = item.get("Description"), _int(item.get("Id"))
            if field > 0:
                numbers.add(field)
                if isinstance(description, str):
                    by_name.setdefault(description, field)
        for option in ("key_field", "job_field"):
            if getattr(opts, option) not in numbers:
                raise ListRejectedError(
                    f"MailUp has no personal data field {getattr(opts, option)} ({option}); "
                    f"the account's fields are {', '.join(str(n) for n in sorted(numbers)) or 'none'}"
                )

        def field_of(name: str) -> int:
            if name not in by_name:
                raise ListRejectedError(
                    f"MailUp has no personal data field {name!r} (for the column {name!r}); "
                    f"known: {', '.join(sorted(by_name))}"
                )
            return by_name[name]

        key_index = header.index(fmt.key_field)
        columns = [(key_index, opts.key_field)]
        for index, column in enumerate(header):
            if column not in (fmt.email_field, fmt.key_field):
                columns.append((index, field_of(column)))
        ids = [field for _, field in columns] + [opts.job_field]
        if len(set(ids)) != len(ids):
            raise ListRejectedError(
                f"two list columns (or a column and the key or job field {opts.key_field}, "
                f"{opts.job_field}) go to one MailUp field"
            )
        return _Fields(email=header.index(fmt.email_field), columns=tuple(columns), job_field=opts.job_field)

    async def _group(self, job: BroadcastJob) -> int:
        """The job's group, found by name or created."""
        opts = self.options
        name = f"{opts.group_prefix}{job.job_id}"
        url = f"{self._console}/Console/List/{opts.list_id}/Groups"
        items = await self._pages(url, {"filterby": f"Name=='{name}'"})
        if items is None:
            raise ListRejectedError(f"MailUp knows no list {opts.list_id}")
        for item in items:
            if item.get("Name") == name and _int(item.get("idGroup")) > 0:
                return _int(item.get("idGroup"))
        status, body = await self._call(
            "POST",
            f"{self._console}/Console/List/{opts.list_id}/Group",
            json={"Name": name, "Notes": job.list_name, "Deletable": True},
        )
        group = _int(_dict(body).get("idGroup"))
        if status == 404 or group <= 0:
            raise ListRejectedError(f"MailUp did not create group {name!r}: {_error_text(body)}")
        log.info("MailUp group created", extra={"job_id": job.job_id, "group": group})
        return group

    async def _post_chunk(self, url: str, recipients: list[dict[str, Any]]) -> int:
        """One asynchronous import; repeated in place on 429/5xx (MailUp upserts by email)."""
        status, body = await self._call("POST", url, json=recipients, repeatable=True)
        if status == 404:
            raise ListRejectedError(f"MailUp knows no such list or group: {_error_text(body)}")
        import_id = _int(body)
        if import_id <= 0:
            raise EspUnavailableError(f"POST {url} answered without an import id: {str(body)[:200]}")
        return import_id

    async def import_status(self, import_id: str) -> base.ImportStatus:
        """Every chunk's ``GET /Console/Imports/{id}``, folded into one status."""
        match = _IMPORT_ID.fullmatch(import_id)
        if match is None:
            raise ListRejectedError(f"{import_id!r} is not a mailup import id (<group>/<invalid>/<ids>)")
        local = int(match.group(2))
        ids = [int(i) for i in match.group(3).split(",")] if match.group(3) else []
        errors = list(self._local_errors.get(import_id, ()))
        if local and not errors:
            errors.append(f"{local} rows of the list file were left out before the import")
        chunks = [await self._chunk(i) for i in ids]
        errors += [c.error for c in chunks if c.error]
        states = [c.state for c in chunks]
        if not states or base.ImportState.FAILED in states:
            state = base.ImportState.FAILED
            if not states:
                errors.append("no row of the list file can be imported")
        elif all(s is base.ImportState.DONE for s in states):
            state = base.ImportState.DONE
        elif all(s is base.ImportState.QUEUED for s in states):
            state = base.ImportState.QUEUED
        else:
            state = base.ImportState.RUNNING
        return base.ImportStatus(
            import_id=import_id,
            state=state,
            rows_valid=sum(c.valid for c in chunks),
            rows_invalid=local + sum(c.invalid for c in chunks),
            errors=tuple(errors),
        )

    async def _chunk(self, import_id: int) -> _Chunk:
        if import_id in self._final_imports:
            return self._final_imports[import_id]
        path = self.options.import_status_path.format(id=import_id)
        status, body = await self._call("GET", self._console + path)
        if status == 404:
            chunk = _Chunk(
                import_id, base.ImportState.FAILED, 0, 0, f"import {import_id}: MailUp does not know it"
            )
        else:
            chunk = self._parse_chunk(import_id, _dict(body))
        if chunk.state in (base.ImportState.DONE, base.ImportState.FAILED):
            self._final_imports[import_id] = chunk
        return chunk

    def _parse_chunk(self, import_id: int, body: Mapping[str, Any]) -> _Chunk:
        code = body.get("StatusCode")
        state = self.options.import_status_codes.get(str(code), base.ImportState.RUNNING)
        counted = _dict(body.get("Rows"))
        valid, invalid = _dict(counted.get("Valid")), _dict(counted.get("Invalid"))
        repeated = _int(valid.get("RepeatedEmail"))
        counts = [
            f"{n} {label}"
            for part, key, label in _INVALID_KINDS
            if (n := _int(_dict(counted.get(part)).get(key)))
        ]
        problem = f"import {import_id}: {', '.join(counts)}" if counts else None
        if state is base.ImportState.FAILED:
            problem = f"import {import_id} failed (StatusCode {code})" + (
                f": {', '.join(counts)}" if counts else ""
            )
        return _Chunk(
            import_id=import_id,
            state=state,
            valid=max(0, _int(valid.get("Total")) - repeated),
            invalid=_int(invalid.get("Total")) + repeated,
            error=problem,
        )

    # --- send -----------------------------------------------------------------------------------------

    async def find_send(self, job: BroadcastJob) -> base.SendStatus | None:
        """The sending of the job's message, if any (each job has a message of its own).

        A sending still waiting in the Undefined queue is confirmed here (immediately, or deferred
        to ``send_at``): its confirmation may be what failed before the monitor asked.
        """
        message = self._message_id(job)
        try:
            found = await self._find_sending(message)
        except ListRejectedError:
            return None
        if found is None or found.place != "Undefined" or not self.options.confirm_sending:
            return found.status() if found is not None else None
        assert found.sending is not None  # a queue item names its sending
        send_at = base.schedule_of(job)
        if send_at is None:
            await self._confirm(found.sending)
        else:
            await self._defer(found.sending, send_at)
        return base.SendStatus(
            send_id=found.send_id,
            state=base.SendState.SCHEDULED,
            detail=f"sending {found.sending} confirmed",
        )

    async def send(self, import_id: str, job: BroadcastJob) -> base.SendStatus:
        """Send the job's message to its group (or list), confirmed now or deferred to ``send_at``."""
        message = self._message_id(job)
        match = _IMPORT_ID.fullmatch(import_id)
        if match is None:
            raise ListRejectedError(f"{import_id!r} is not a mailup import id (<group>/<invalid>/<ids>)")
        group = int(match.group(1))
        found = await self._find_sending(message)
        if found is not None:
            raise MessageTakenError(
                f"message {message} already sent ({found.status().send_id}); "
                "every job needs a MailUp message of its own"
            )
        opts = self.options
        if opts.send_to == "list":
            url = f"{self._console}/Console/List/{opts.list_id}/Email/{message}/Send"
        elif group > 0:
            url = f"{self._console}/Console/Group/{group}/Email/{message}/Send"
        else:
            raise ListRejectedError(f"import {import_id} has no group to send to (send_to: group)")
        # MailUp's documented deferred form quotes the time: ?datetime="2015-10-20 05:00:00Z".
        send_at = base.schedule_of(job)
        query = {"datetime": f'"{_api_time(send_at)}"'} if send_at else None
        status, body = await self._call("POST", _with_query(url, query))
        sending = _int(_dict(body).get("Id"))
        if status == 404 or sending <= 0:
            raise ListRejectedError(f"MailUp refused the send of message {message}: {_error_text(body)}")
        if send_at is None and opts.confirm_sending:
            await self._confirm(sending)
        log.info("MailUp sending created", extra={"job_id": job.job_id, "sending": sending})
        return base.SendStatus(
            send_id=f"{message}:{sending}",
            state=base.SendState.SCHEDULED,
            recipients=_int(_dict(body).get("Sent")),
            detail=f"sending {sending}" + (" deferred" if send_at else ""),
        )

    async def send_status(self, send_id: str) -> base.SendStatus:
        """Where the sending is: a queue → scheduled/sending; SendHistory → sending, or sent once
        every row has its EndDate; only recipients counted → sending; nowhere → failed."""
        message, sending = _parse_send_id(send_id)
        try:
            found = await self._find_sending(message, sending)
        except ListRejectedError:
            found = None
        if found is None:
            what = f"sending {sending}" if sending is not None else f"a sending of message {message}"
            return base.SendStatus(
                send_id=send_id,
                state=base.SendState.FAILED,
                detail=f"{what} not found (in no queue, no SendHistory, no recipients)",
            )
        return found.status()

    async def cancel_send(self, send_id: str, job: BroadcastJob) -> base.CancelResult:
        """Stop the job's sending where MailUp still has it: in a queue, or in delivery.

        ``POST /Console/Email/Sendings/{id}/Stop``, at most once every ``stop_interval_s`` (MailUp's
        limit; sooner raises a transient error with the wait). A send id without the sending's id
        (only SendHistory showed it) and a finished sending are too late.
        """
        message, sending = _parse_send_id(send_id)
        if sending is None:
            return base.CancelResult(
                base.CancelOutcome.TOO_LATE,
                f"the sending of message {message} was found only in its SendHistory: delivery began, "
                "and MailUp's Stop needs the sending's id",
            )
        found = await self._find_sending(message, sending)
        if found is None:
            return base.CancelResult(
                base.CancelOutcome.CANCELLED, f"sending {sending} is in no queue and has no history: stopped"
            )
        if found.place == "History" and found.ended:
            return base.CancelResult(
                base.CancelOutcome.TOO_LATE, f"sending {sending} finished ({found.recipients} recipients)"
            )
        status, body = await self._stop(sending)
        if status == 200:
            where = "in delivery: recipients reached before it got the message"
            if found.place not in _DELIVERY:
                where = f"in the {found.place} queue: nothing was sent"
            return base.CancelResult(base.CancelOutcome.CANCELLED, f"sending {sending} stopped {where}")
        after = await self._find_sending(message, sending)  # refused: where is it now?
        if after is None:
            return base.CancelResult(base.CancelOutcome.CANCELLED, f"sending {sending} was stopped before")
        if after.place in _DELIVERY:
            return base.CancelResult(
                base.CancelOutcome.TOO_LATE,
                f"sending {sending}: MailUp refused the stop: {_error_text(body)}",
            )
        raise ListRejectedError(f"MailUp refused to stop sending {sending} ({status}): {_error_text(body)}")

    async def _stop(self, sending: int) -> tuple[int, Any]:
        """One Stop call, kept to MailUp's one call per ``stop_interval_s`` in this process."""
        interval = self.options.stop_interval_s
        if self._stopped_at is not None and (wait := self._stopped_at + interval - time.monotonic()) > 0:
            raise EspUnavailableError(
                f"MailUp allows one Stop every {interval:g}s: the next in {wait:.0f}s", retry_after_s=wait
            )
        self._stopped_at = time.monotonic()
        return await self._api.call(
            "POST",
            f"{self._console}/Console/Email/Sendings/{sending}/Stop",
            retries=Retries(),  # a 429 goes to the caller with its Retry-After: the window is long
            answered=(200, 400, 404, 409),
        )

    # --- contacts (subscription sync) -------------------------------------------------------------------

    async def apply_contacts(self, changes: Sequence[base.ContactChange]) -> list[base.ContactResult]:
        """Each change with MailUp's synchronous recipient calls (see :meth:`_apply_contact`)."""
        return [await self._apply_contact(change) for change in changes]

    async def _apply_contact(self, change: base.ContactChange) -> base.ContactResult:
        """Find the recipient's status on the list, then subscribe (``ConfirmEmail=true`` for a
        double opt-in), unsubscribe, remove or update its fields; what MailUp refuses (a 4xx, an
        unknown list or field) is a refused result with MailUp's reason."""
        done = functools.partial(contacts.applied, change)
        try:
            list_id = _list_number(change.list)
            fields = await self._contact_fields(change.fields)
            found = await self._recipient(list_id, change.email)
            wanted = change.state
            if wanted in (SubscriptionState.SUBSCRIBED, SubscriptionState.PENDING):
                confirm = change.double_opt_in or wanted is SubscriptionState.PENDING
                return done(await self._subscribe(list_id, change.email, found, fields, confirm))
            if found is None:
                return done(None, f"not a recipient of MailUp list {list_id}: nothing to change")
            if fields and wanted is not SubscriptionState.REMOVED:
                await self._update_recipient(found, change.email, fields)
            if wanted is SubscriptionState.UNSUBSCRIBED and found.state is not SubscriptionState.UNSUBSCRIBED:
                await self._contact_call("DELETE", f"/Console/List/{list_id}/Unsubscribe/{found.id}")
            elif wanted is SubscriptionState.REMOVED:
                path = self.options.remove_recipient_path.format(list=list_id, recipient=found.id)
                await self._contact_call("DELETE", path)
            return done(wanted or found.state)
        except _ContactRefusedError as exc:
            log.info("MailUp refused a contact", extra={"account": self._name, "reason": str(exc)})
            return contacts.refused(change, str(exc))

    async def _subscribe(
        self,
        list_id: int,
        email: str,
        found: _Recipient | None,
        fields: list[dict[str, Any]],
        confirm: bool,
    ) -> SubscriptionState:
        """Subscribe the contact; the state it is in afterwards (pending until it confirms)."""
        if found is None or (confirm and found.state is SubscriptionState.UNSUBSCRIBED):
            # MailUp's synchronous add: new recipients (and a confirmed resubscribe) go through it
            body = await self._contact_call(
                "POST",
                f"/Console/List/{list_id}/Recipient",
                json={"Email": email, "Fields": fields},
                query={"ConfirmEmail": "true"} if confirm else None,
            )
            if _int(body) <= 0:
                raise EspUnavailableError(f"MailUp added {email} to list {list_id} without a recipient id")
            return SubscriptionState.PENDING if confirm else SubscriptionState.SUBSCRIBED
        if fields:
            await self._update_recipient(found, email, fields)
        if found.state is SubscriptionState.SUBSCRIBED or (
            confirm and found.state is SubscriptionState.PENDING
        ):
            return found.state
        # a forced opt-in, for a contact the CRM says wants to be subscribed again (or confirmed)
        await self._contact_call("POST", f"/Console/List/{list_id}/Subscribe/{found.id}")
        return SubscriptionState.SUBSCRIBED

    async def _recipient(self, list_id: int, email: str) -> _Recipient | None:
        """The recipient of that email on the list with its status there, or None."""
        quoted = email.replace("'", "''")
        query = {
            "filterby": f"\"Email=='{quoted}'\"",
            "pageSize": str(self.options.page_size),
            "pageNumber": "0",
        }
        for status, state in RECIPIENT_STATUSES:
            path = f"/Console/List/{list_id}/Recipients/{status}"
            body = await self._contact_call(
                "GET", path, query=query, unknown=f"MailUp knows no list {list_id}"
            )
            items, _ = self._envelope(path, body, 0)  # one address: one item at most
            for item in items:
                if (
                    str(item.get("Email", "")).strip().lower() == email.lower()
                    and _int(item.get("idRecipient")) > 0
                ):
                    return _Recipient(_int(item.get("idRecipient")), state)
        return None

    async def _update_recipient(self, found: _Recipient, email: str, fields: list[dict[str, Any]]) -> None:
        """Set personal data fields (account-wide in MailUp, shared by every list)."""
        body = {"idRecipient": found.id, "Email": email, "Fields": fields}
        await self._contact_call("PUT", "/Console/Recipient/Detail", json=body)

    async def _contact_call(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        query: Mapping[str, str] | None = None,
        unknown: str = "",
    ) -> Any:
        """One recipient call under the console path (a 429 waited out and repeated, an outage
        raised: the caller applies the contact again); a 4xx is MailUp refusing the contact, a
        404 said as ``unknown`` when given."""
        url = self._console + _with_query(path, query)
        status, body = await self._api.call(method, url, json=json, answered=CONTACT_ANSWERS)
        if status >= 400:
            said = f"{method} {path} answered {status}: {_error_text(body)}"
            raise _ContactRefusedError(f"{unknown} ({said})" if status == 404 and unknown else said)
        return body

    async def _contact_fields(self, fields: Mapping[str, str]) -> list[dict[str, Any]]:
        """``Fields`` for a recipient body: each by ``contact_fields``, else by its Description."""
        opts = self.options
        out: list[dict[str, Any]] = []
        for name, value in fields.items():
            number = opts.contact_fields.get(name)
            if number is None:
                number = (await self._field_numbers()).get(name)
            if number is None:
                usable = (
                    n
                    for n, i in (await self._field_numbers()).items()
                    if i not in (opts.key_field, opts.job_field)
                )
                known = ", ".join(sorted(usable)) or "none"
                raise _ContactRefusedError(f"MailUp has no personal data field {name!r} (known: {known})")
            if number in (opts.key_field, opts.job_field):
                raise _ContactRefusedError(
                    f"field {name!r} is field {number}, which holds espbridge's key or job"
                )
            if len(value) > FIELD_MAX_CHARS:
                raise _ContactRefusedError(f"field {name!r} is over {FIELD_MAX_CHARS} characters")
            out.append({"Id": number, "Value": value})
        return out

    async def _field_numbers(self) -> dict[str, int]:
        """The account's personal data fields by Description (read once per connector)."""
        if self._field_ids is None:
            items = await self._pages(f"{self._console}/Console/Recipient/DynamicFields") or []
            self._field_ids = {
                str(item["Description"]): _int(item.get("Id"))
                for item in items
                if isinstance(item.get("Description"), str) and _int(item.get("Id")) > 0
            }
        return self._field_ids

    # --- statistics API -------------------------------------------------------------------------------

    async def pull_responses(self, broadcast: SentBroadcast, cursor: str | None) -> base.PullPage:
        """One page of one statistics endpoint of the broadcast's message (see the module docstring)."""
        stored = self._read_cursor(cursor)
        endpoint, page = stored.ep, stored.page
        message = broadcast.message
        if not _DIGITS.fullmatch(message):
            return base.PullPage(
                (base.BadRow(1, message.encode(), f"message {message!r} is not a MailUp message id"),),
                None,
                False,
            )
        url = (
            self._stats + self.options.click_details_path.format(message=int(message))
            if endpoint == "UrlClickDetails"
            else f"{self._stats}/Message/{int(message)}/List/{endpoint}"
        )
        pulled_at = datetime.now(UTC)
        status, body = await self._page(url, page)
        if status == 404:
            log.warning(
                "MailUp statistics not found", extra={"job_id": broadcast.job_id, "endpoint": endpoint}
            )
            items: list[dict[str, Any]] = []
            last = True
        else:
            items, last = self._envelope(url, body, page)
        send_id = _SEND_ID.fullmatch(broadcast.send_id or "")
        context = _PullContext(
            broadcast=broadcast,
            message=str(int(message)),
            endpoint=endpoint,
            page=page,
            pulled_at=pulled_at,
            sending=send_id.group(2) if send_id else None,
        )
        out = tuple(
            rows.item_events(items, lambda _, item: self._api_events(context, item), what=f"{endpoint} item")
        )
        if not last:
            return base.PullPage(out, Cursor(ep=endpoint, page=page + 1).dump(), True)
        following = self._endpoints.index(endpoint) + 1
        if following < len(self._endpoints):
            return base.PullPage(out, Cursor(ep=self._endpoints[following], page=0).dump(), True)
        return base.PullPage(out, Cursor(ep=self._endpoints[0], page=0).dump(), False)  # the next round

    def _read_cursor(self, cursor: str | None) -> Cursor:
        """The stored position; none, an unreadable one or another endpoint's starts a new round."""
        stored = Cursor.read(cursor, self._name)
        return (
            stored
            if stored is not None and stored.ep in self._endpoints
            else Cursor(ep=self._endpoints[0], page=0)
        )

    def _api_events(self, ctx: _PullContext, item: Mapping[str, Any]) -> list[ResponseEvent]:
        """The events of one statistics item (ValueError: a BadRow)."""
        recipient = _int(item.get("IdRecipient"))
        if recipient <= 0:
            raise ValueError("no IdRecipient")
        email = item.get("Email")
        if not isinstance(email, str) or not email.strip():
            raise ValueError("no Email")
        m = ctx.message
        extra = {"time_source": "pull", "id_recipient": str(recipient)}
        if ctx.sending:
            extra["send_id"] = ctx.sending
        if ctx.endpoint == "Recipients":
            return [self._api_event(ctx, f"snt:{m}:{recipient}", EventType.SENT, email, None, extra)]
        if ctx.endpoint == "Bounces":
            code = str(item.get("Code") or "").strip()
            kind = self._bounce_type(code)
            return [
                self._api_event(
                    ctx, f"nco:{m}:{recipient}", kind, email, None, {**extra, "bounce_code": code}
                )
            ]
        if ctx.endpoint == "Unsubscriptions":
            kind_or_none = self._reason_type(item.get("Reason"))
            if kind_or_none is None:
                return []
            reason = {"reason": str(item.get("Reason"))} if item.get("Reason") is not None else {}
            event_id = f"uns:{m}:{email.strip().lower()}"
            return [self._api_event(ctx, event_id, kind_or_none, email, None, {**extra, **reason})]
        count = item.get("Count", 1)
        if not is_count(count):
            raise ValueError(f"Count {count!r} is not a count")
        if ctx.endpoint == "Views":
            return [
                self._api_event(ctx, f"opn:{m}:{recipient}:{k}", EventType.OPEN, email, None, extra)
                for k in range(1, count + 1)
            ]
        url = item.get("Url")
        if not isinstance(url, str) or not url:
            raise ValueError("a click without Url")
        return [
            self._api_event(ctx, f"clk:{m}:{recipient}:{k}:{url}", EventType.CLICK, email, url, extra)
            for k in range(1, count + 1)
        ]

    def _api_event(
        self,
        ctx: _PullContext,
        esp_event_id: str,
        kind: EventType,
        email: str,
        url: str | None,
        extra: dict[str, str],
    ) -> ResponseEvent:
        return self._events.make(
            broadcast_id=ctx.broadcast.job_id,
            type=kind,
            occurred_at=ctx.pulled_at,
            source=rows.api_source(f"{self._name}:Message/{ctx.message}/List/{ctx.endpoint}", ctx.page),
            esp_event_id=f"{self.account.account}:{esp_event_id}",
            url=url,
            email=email.strip(),
            esp_message_id=ctx.message,
            extra=extra,
        )

    def _bounce_type(self, code: str) -> EventType:
        if not code:
            raise ValueError("a bounce without a code")
        if self._hard.search(code):
            return EventType.BOUNCE_HARD
        if self._soft.search(code):
            return EventType.BOUNCE_SOFT
        raise ValueError(
            f"bounce code {code!r} matches neither {self._hard.pattern!r} (hard) "
            f"nor {self._soft.pattern!r} (soft)"
        )

    def _reason_type(self, reason: Any) -> EventType | None:
        """unsubscribe/complaint by ``unsubscribe_reasons``; None: no event. No reason: unsubscribe."""
        if reason is None or reason == "":
            return EventType.UNSUBSCRIBE
        key = str(reason).strip()
        if key not in self.options.unsubscribe_reasons:
            raise ValueError(f"unknown unsubscribe Reason {reason!r}")
        mapped = self.options.unsubscribe_reasons[key]
        return EventType(mapped) if mapped else None

    # --- statistics export ----------------------------------------------------------------------------

    def parse_response_file(
        self, local_path: Path, remote_path: str
    ) -> Iterator[ResponseEvent | base.BadRow]:
        """Rows of a statistics export file: one event each; bad rows with their line."""
        return self._exports.events(local_path, lambda row: self._export_event(remote_path, row))

    def _export_event(self, remote_path: str, row: rows.Row) -> ResponseEvent | None:
        """One export row as an event; None for a row espbridge did not send (ValueError: a BadRow)."""
        get = row.get
        if get("list_id") != str(self.options.list_id):
            return None  # another list: not espbridge's
        job_value = get("job")
        if not job_value:
            return None  # not imported by espbridge
        parts = _split_job_value(job_value)
        if parts is None:
            raise ValueError(f"{row.column('job')} {job_value!r} is not <message>:<job_id>")
        message, job_id = parts
        if message != get("message_id"):
            raise ValueError(
                f"{row.column('job')} {job_value!r} names message {message}, the row is of message "
                f"{get('message_id')!r} (the recipient was imported for a later job)"
            )
        status = get("status")
        details = get("details")
        extra: dict[str, str] = {}
        url: str | None = None
        if status in EXPORT_TYPES:
            kind = EXPORT_TYPES[status]
            if kind is EventType.CLICK:
                if not details:
                    raise ValueError("CLK without a URL")
                url = details
        elif status == "NCO":
            kind = self._bounce_type(details)
            extra["bounce_code"] = details
        else:
            raise ValueError(f"unknown {row.column('status')} {status!r}")
        email = get("email")
        if not email:
            raise ValueError("empty email")
        occurred = row.time("time")
        if get("send_id"):
            extra["send_id"] = get("send_id")
        return self._events.make(
            broadcast_id=job_id,
            type=kind,
            occurred_at=occurred,
            source=rows.file_source(remote_path, row.line),
            recipient=email.lower(),
            url=url,
            communication_key=get("key") or None,
            email=email,
            esp_message_id=message,
            extra=extra,
        )

    # --- webhook --------------------------------------------------------------------------------------

    def parse_webhook(
        self, headers: Mapping[str, str], body: bytes
    ) -> list[ResponseEvent | SubscriptionChange | base.BadRow]:
        """MailUp's Subscribe, Unsubscribe and Delete webhooks: form parameters named by
        ``webhook_params``, the shared secret as the literal parameter ``Secret``.

        An unsubscribe caused by a message of a job (``IdNL`` and the job field's ``<message>:<job>``)
        is that broadcast's event; every other subscription event is a :class:`SubscriptionChange`
        of its list, in the state ``webhook_events`` gives its ``[EventType]``.
        """
        names = self.options.webhook_params
        form: dict[str, str] = {}
        for key, value in parse_qsl(
            body.decode("utf-8", "replace"), keep_blank_values=True, encoding="utf-8", errors="replace"
        ):
            form.setdefault(key, value)
        expected = self.account.token.get_secret_value() if self.account.token else ""
        given = form.get(names["secret"])
        if not expected:
            raise base.WebhookAuthError(f"{self._name} has no webhook secret configured (token/token_file)")
        if given is None:
            raise base.WebhookAuthError(f"the webhook call has no {names['secret']}")
        if not hmac.compare_digest(given.encode("utf-8"), expected.encode("utf-8")):
            raise base.WebhookAuthError(f"the webhook call's {names['secret']} is wrong")
        fields = _WebhookForm(form, names)
        event_type = fields.get("event_type", "unsubscribe").lower()
        safe_body = "&".join(
            f"{k}={quote(v, safe='')}" for k, v in form.items() if k != names["secret"]
        ).encode("utf-8")
        from_message = fields.get("message_id") not in ("", "0") and bool(fields.get("job"))
        try:
            if event_type == "unsubscribe" and from_message:
                event = self._webhook_event(fields)
                return [event] if event is not None else []
            state = self.options.webhook_events.get(event_type)
            return [self._webhook_change(fields, event_type, state)] if state is not None else []
        except ValueError as exc:  # pydantic's ValidationError is one too
            return [base.BadRow(1, safe_body, str(exc))]

    def _webhook_change(
        self, fields: _WebhookForm, event_type: str, state: SubscriptionState
    ) -> SubscriptionChange:
        """A subscription event as the change it reports; its id from its facts (MailUp gives none)."""
        list_id = fields.get("list_id")
        if list_id and not _DIGITS.fullmatch(list_id):
            raise ValueError(f"{fields.name('list_id')} {list_id!r} is not a list id")
        email = fields.get("email")
        if not email:
            raise ValueError(f"no {fields.name('email')}")
        occurred = rows.aware_time(fields.name("event_date"), fields.get("event_date"))
        reason = event_type
        if event_type == "unsubscribe":
            kind = self._reason_type(fields.get("reason"))
            reason = kind.value if kind is not None else EventType.BOUNCE_HARD.value  # MailUp's automatic one
        list_text = str(int(list_id)) if list_id else ""
        return contacts.reported_change(
            self.account, email=email, list_id=list_text, state=state, reason=reason, occurred_at=occurred
        )

    def _webhook_event(self, fields: _WebhookForm) -> ResponseEvent | None:
        message, job_value = fields.get("message_id"), fields.get("job")
        if not _DIGITS.fullmatch(message):
            raise ValueError(f"{fields.name('message_id')} {message!r} is not a message id")
        parts = _split_job_value(job_value)
        if parts is None:
            raise ValueError(f"{fields.name('job')} {job_value!r} is not <message>:<job_id>")
        if int(parts[0]) != int(message):
            raise ValueError(
                f"{fields.name('job')} {job_value!r} names message {parts[0]}, the unsubscribe is from "
                f"message {message} (the recipient was imported for a later job)"
            )
        kind = self._reason_type(fields.get("reason"))
        if kind is None:
            return None
        email = fields.get("email")
        if not email:
            raise ValueError(f"no {fields.name('email')}")
        occurred = rows.aware_time(fields.name("event_date"), fields.get("event_date"))
        m = str(int(message))
        extra = {"reason": fields.get("reason"), "event_source": fields.get("event_source")}
        return self._events.make(
            broadcast_id=parts[1],
            type=kind,
            occurred_at=occurred,
            source=EventSource(kind="webhook", name=f"webhook:{self._name}"),
            esp_event_id=f"{self.account.account}:uns:{m}:{email.lower()}",
            communication_key=fields.get("key") or None,
            email=email,
            esp_message_id=m,
            extra={k: v for k, v in extra.items() if v},
        )


@dataclass(frozen=True, slots=True)
class _WebhookForm:
    """A webhook call's parameters read by role, under the names the account gave them."""

    form: Mapping[str, str]
    names: Mapping[str, str]

    def name(self, role: str) -> str:
        """The parameter's name for a role."""
        return self.names[role]

    def get(self, role: str, default: str = "") -> str:
        """The parameter's value (stripped) for a role, ``default`` when the call has none."""
        value = self.form.get(self.names[role])
        return default if value is None else value.strip()


@dataclass(frozen=True, slots=True)
class _Sending:
    """A sending of a message as MailUp shows it: in a queue (its id known), in SendHistory (rows
    without a sending id), or only in the message's recipient count."""

    message: int
    sending: int | None
    """The sending id, when a queue showed it or the caller knew it."""
    place: Place
    ended: bool = False
    """SendHistory: every row of the message has its EndDate."""
    recipients: int = 0

    @property
    def send_id(self) -> str:
        """``<message>:<sending>``, or ``<message>`` when no queue showed the sending's id."""
        return f"{self.message}:{self.sending}" if self.sending is not None else str(self.message)

    def status(self) -> base.SendStatus:
        """The sending as espbridge reports it."""
        which = (
            f"sending {self.sending}"
            if self.sending is not None
            else f"the sending of message {self.message}"
        )
        if self.place == "History":
            state = base.SendState.SENT if self.ended else base.SendState.SENDING
            detail = f"{which} " + ("finished" if self.ended else "in delivery")
        elif self.place == "Recipients":
            state = base.SendState.SENDING
            detail = f"{which} in delivery ({self.recipients} recipients, no SendHistory row yet)"
        else:
            state = base.SendState.SENDING if self.place == "Immediate" else base.SendState.SCHEDULED
            detail = f"{which} in the {self.place} queue"
        return base.SendStatus(send_id=self.send_id, state=state, recipients=self.recipients, detail=detail)


@dataclass(frozen=True, slots=True)
class _PullContext:
    """What every event of one pulled page shares."""

    broadcast: SentBroadcast
    message: str
    endpoint: str
    page: int
    pulled_at: datetime
    sending: str | None


_DELIVERY: tuple[Place, ...] = ("History", "Recipients")
"""Where a sending is once its delivery began."""


def _parse_send_id(send_id: str) -> tuple[int, int | None]:
    """(message, sending) of ``<message>[:<sending>]``."""
    match = _SEND_ID.fullmatch(send_id)
    if match is None:
        raise ListRejectedError(f"{send_id!r} is not a mailup send id (<message>[:<sending>])")
    return int(match.group(1)), int(match.group(2)) if match.group(2) else None


def _error_text(body: Any) -> str:
    if isinstance(body, dict):
        return str(body.get("ErrorDescription") or body.get("error_description") or body)[:300]
    return str(body)[:300]
