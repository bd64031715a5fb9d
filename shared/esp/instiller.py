"""The Instiller connector (``connector: instiller``), written from docs/connectors/instiller.md.

* Lists: a CSV file (``Email``, ``CommunicationKey`` and the job's field-map targets) uploaded to
  ``<sftp_root>/upload/<job_id>.csv``, then imported into the job's own list
  (``espbridge_<job_id>``) with ``POST lists/import_file`` and followed with ``GET lists/import_status``.
* Sends: ``POST emails/send`` of the job's pre-created email to that list, found again with
  ``GET emails/list_sends`` and followed with ``GET emails/send_status``; imports and sends are
  idempotent by the job id (``external_id``).
* Responses: pulled from ``GET emails/export_responses``, one export type and one page per
  :meth:`InstillerConnector.pull_responses` call, with the connector's own JSON cursor
  (``{"v":1,"next":<type>,"offsets":{<type>: rows read}}``). No response files.
* Subscriptions: a contact's fields through ``POST users/add_or_update``, its state on a list
  through ``GET users/list_subscribe`` (``subscribed`` Y or N), a double opt-in through the
  account's workflow (``POST automation/trigger_workflow``). Changes made at Instiller (an
  unsubscribe, a complaint, a confirmed opt-in) come from the account's workflows as webhook calls
  (:meth:`InstillerConnector.parse_webhook`), authenticated with the account's ``token``.

Credentials: every request carries ``api_id`` and ``api_key`` as request parameters (query string
for GET, ``multipart/form-data`` fields for POST; never a header). ``api_id`` is the account's
``client_id`` and ``api_key`` its ``client_secret`` (prefer ``client_secret_file``). Because the key
travels in URLs, no request URL's query string is ever put into a log line or an error message.

Calls keep to ``requests_per_second`` per account, together across every process with a database
(:mod:`shared.esp.limits`). A 429 raises :class:`EspUnavailableError` with its ``Retry-After``, and
the account's further calls wait until that time has passed (or fail at once if it is further away
than the request timeout). Every endpoint path, parameter name, state name, export type, row key and
time format is an account option; see the documentation page for each of them.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self, TypeVar

import orjson
from pydantic import Field, model_validator

from shared.esp import base, contacts, rows
from shared.esp.accounts import AccountConfig
from shared.esp.cursor import Count, StoredCursor
from shared.esp.generic import ListRejectedError
from shared.esp.limits import rate_limiter
from shared.esp.options import ConnectorOptions, DateFormat, TimeZone
from shared.esp.rest import EspClient, EspRequestError, EspUnavailableError, is_count, short_json
from shared.infra.db.jobs import SentBroadcast
from shared.model.errors import ConfigurationError
from shared.model.messages import (
    BroadcastJob,
    EventType,
    ResponseEvent,
    SubscriptionChange,
    SubscriptionState,
)

log = logging.getLogger(__name__)

S = TypeVar("S", base.ImportState, base.SendState)

DEFAULT_PATHS = {
    "import_file": "/lists/import_file",
    "import_status": "/lists/import_status",
    "send": "/emails/send",
    "send_status": "/emails/send_status",
    "list_sends": "/emails/list_sends",
    "export": "/emails/export_responses",
    "add_or_update": "/users/add_or_update",
    "list_subscribe": "/users/list_subscribe",
    "trigger_workflow": "/automation/trigger_workflow",
}
DEFAULT_PARAMS = {
    "list": "list_api_identifier",
    "list_name": "list_name",
    "field_map": "field_map_api_identifier",
    "file": "file",
    "external_id": "external_id",
    "import_id": "import_id",
    "message": "email_api_identifier",
    "send_at": "send_at",
    "email_profile": "email_profile_api_identifier",
    "send_id": "send_id",
    "export_type": "export_type",
    "offset": "offset",
    "limit": "limit",
    "email": "email_address",
    "subscribed": "subscribed",
    "workflow": "workflow_api_identifier",
    "workflow_variables": "workflow_session_variables",
}
DEFAULT_IMPORT_STATES = {"queued": "queued", "processing": "running", "complete": "done", "failed": "failed"}
DEFAULT_SEND_STATES = {s: s for s in ("scheduled", "sending", "sent", "failed")}
DEFAULT_EXPORT_TYPES = (
    "output",
    "delivered",
    "hard",
    "soft",
    "open",
    "clicks_info",
    "complaints",
    "unsubscribes",
)
DEFAULT_EXPORT_TYPE_MAP = {
    "output": "sent",
    "delivered": "delivered",
    "hard": "bounce_hard",
    "soft": "bounce_soft",
    "open": "open",
    "clicks_info": "click",
    "complaints": "complaint",
    "unsubscribes": "unsubscribe",
}
DEFAULT_COLUMNS = {
    "id": "Id",
    "communication_key": "CommunicationKey",
    "email": "Email",
    "message": "EmailApiIdentifier",
    "send_id": "SendId",
    "url": "ClickUrl",
    "reason": "Reason",
}
DEFAULT_DATE_COLUMNS = {
    "output": "SentDate",
    "delivered": "DeliveryDate",
    "hard": "BounceDate",
    "soft": "BounceDate",
    "returned": "ReturnedDate",
    "open": "OpenDate",
    "clicks_info": "ClickDate",
    "complaints": "ComplaintDate",
    "unsubscribes": "UnsubscribeDate",
}
AUTH_PARAMS = ("api_id", "api_key")


class Options(ConnectorOptions):
    """The account ``options`` this connector reads (see docs/connectors/instiller.md#configuration).

    ``paths``, ``params``, ``columns``, ``date_columns``, ``export_type_map``, ``import_states`` and
    ``send_states`` are merged over their defaults, so an account names only what differs.
    """

    MERGED: ClassVar[Mapping[str, Mapping[str, Any]]] = {
        "paths": DEFAULT_PATHS,
        "params": DEFAULT_PARAMS,
        "import_states": DEFAULT_IMPORT_STATES,
        "send_states": DEFAULT_SEND_STATES,
        "export_type_map": DEFAULT_EXPORT_TYPE_MAP,
        "columns": DEFAULT_COLUMNS,
        "date_columns": DEFAULT_DATE_COLUMNS,
        "webhook_events": contacts.DEFAULT_WEBHOOK_EVENTS,
    }
    ROLE_KEYED: ClassVar = ("paths", "params", "columns")

    paths: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PATHS))
    params: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_PARAMS))
    import_states: dict[str, base.ImportState] = Field(
        default_factory=lambda: {k: base.ImportState(v) for k, v in DEFAULT_IMPORT_STATES.items()}
    )
    send_states: dict[str, base.SendState] = Field(
        default_factory=lambda: {k: base.SendState(v) for k, v in DEFAULT_SEND_STATES.items()}
    )
    list_identifier_template: str = "espbridge_{job_id}"
    field_map_api_identifier: str = Field(default="espbridge", min_length=1)
    email_profile_api_identifier: str | None = None
    upload_folder: str = Field(default="upload", min_length=1)
    list_suffix: str = ".csv"
    list_delimiter: str = Field(default=",", min_length=1, max_length=1)
    list_encoding: str = "utf-8"
    list_line_terminator: str = "\n"
    email_column: str = Field(default="Email", min_length=1)
    key_column: str = Field(default="CommunicationKey", min_length=1)
    export_types: tuple[str, ...] = Field(default=DEFAULT_EXPORT_TYPES, min_length=1)
    export_type_map: dict[str, EventType] = Field(
        default_factory=lambda: {k: EventType(v) for k, v in DEFAULT_EXPORT_TYPE_MAP.items()}
    )
    optional_export_types: tuple[str, ...] = ("output", "unsubscribes")
    columns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    date_columns: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_DATE_COLUMNS))
    id_column: str = Field(default="Id", description='the row key of the ESP\'s event id; "" = none')
    page_size: int = Field(default=1000, ge=1, le=5000)
    date_format: DateFormat = "%Y-%m-%d %H:%M:%S"
    timezone: TimeZone = "Europe/London"
    requests_per_second: float = Field(default=5.0, gt=0)
    double_opt_in_workflow: str | None = Field(
        default=None,
        min_length=1,
        description="the API identifier of the workflow that mails the opt-in confirmation and subscribes",
    )
    webhook_events: dict[str, SubscriptionState] = Field(
        default_factory=lambda: dict(contacts.DEFAULT_WEBHOOK_EVENTS)
    )

    @classmethod
    def laid_over_defaults(cls, given: dict[str, Any]) -> dict[str, Any]:
        """The defaults merged; ``columns.id`` and ``id_column`` name the same key: either may be
        given, but not two different ones."""
        merged = super().laid_over_defaults(given)
        given_columns = given.get("columns")
        given_id = given_columns.get("id") if isinstance(given_columns, dict) else None
        if given_id is not None:
            if "id_column" not in given:
                merged["id_column"] = given_id
            elif given["id_column"] and given["id_column"] != given_id:
                raise ValueError(f"id_column {given['id_column']!r} and columns.id {given_id!r} disagree")
        return merged

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        bad_paths = [p for p in self.paths.values() if not p.startswith("/")]
        if bad_paths:
            raise ValueError(f"paths must start with '/': {bad_paths}")
        names = list(self.params.values())
        if len(set(names)) != len(names) or set(names) & set(AUTH_PARAMS) or "" in names:
            raise ValueError(f"params must be distinct non-empty names other than {AUTH_PARAMS}: {names}")
        if "{job_id}" not in self.list_identifier_template:
            raise ValueError("list_identifier_template must contain {job_id}")
        try:
            self.list_identifier_template.format(job_id="job-1")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(f"list_identifier_template is not a template of job_id only: {exc}") from None
        if len(set(self.export_types)) != len(self.export_types):
            raise ValueError("export_types lists a type twice")
        unmapped = [t for t in self.export_types if t not in self.export_type_map]
        if unmapped:
            raise ValueError(f"export_types {unmapped} are not mapped in export_type_map")
        undated = [t for t in self.export_types if not self.date_columns.get(t)]
        if undated:
            raise ValueError(f"export_types {undated} have no date column in date_columns")
        return self


class Cursor(StoredCursor):
    """The pull position: the export type read next and the rows read of each type."""

    next: str
    offsets: dict[str, Count]


class InstillerRefusedError(EspRequestError):
    """The ESP answered 400, 404, 409 or another 4xx with its ``{"error", "message"}`` body."""

    def __init__(self, where: str, status: int, error: str, message: str) -> None:
        super().__init__(f"{where} answered {status} {error}: {message}")
        self.status = status
        self.error = error

    @classmethod
    def of(cls, where: str, status: int, body: Any, text: str) -> InstillerRefusedError:
        """The refusal of an answer (the :class:`EspClient` refusal of this ESP)."""
        if isinstance(body, dict):
            return cls(where, status, str(body.get("error") or ""), str(body.get("message") or ""))
        return cls(where, status, "", text)


class ExportTypesRefusedError(EspRequestError):
    """Required export types the ESP answered ``invalid_export_type`` in a round of pulls; the
    round's other types were read."""

    def __init__(self, account: str, refused: Mapping[str, str]) -> None:
        answers = "; ".join(refused.values())
        super().__init__(
            f"Instiller does not know the export types {', '.join(refused)} of account {account} "
            f"({answers}): their rows are not pulled, the other types are. Name the types this "
            "account knows in options.export_types (with export_type_map and date_columns), or "
            "list them in optional_export_types"
        )
        self.export_types = tuple(refused)


class InstillerConnector(base.Connector):
    """Connector for Instiller (REST with ``api_id``/``api_key`` parameters, SFTP list files)."""

    can_send = True
    pulls_api = True
    response_sources: tuple[base.ResponseSource, ...] = ()

    def __init__(self, account: AccountConfig, context: base.ConnectorContext) -> None:
        super().__init__(account, context)
        self.options = opts = Options.of(account)
        if not account.api_url:
            raise ConfigurationError(
                f"account {account.name} needs an api_url (e.g. https://control.instiller.co.uk/rest)"
            )
        if not account.client_id or not account.client_secret or not account.client_secret.get_secret_value():
            raise ConfigurationError(
                f"account {account.name} needs client_id (the Instiller API ID) "
                "and client_secret[_file] (the API key)"
            )
        self._name = account.name
        # the key travels as a request parameter: never redirected, never in a message (EspClient)
        self._api = EspClient(
            context.http,
            account.api_url,
            account=account.name,
            timeout_s=account.request_timeout_s,
            auth_params={"api_id": account.client_id, "api_key": account.client_secret.get_secret_value()},
            limiter=rate_limiter(context, account, 1, 1.0 / opts.requests_per_second),
            holds=True,
            answered=(200,),
            refusal=InstillerRefusedError.of,
            follow_redirects=False,
        )
        self._times = rows.LocalTimes(opts.date_format, opts.timezone)
        self._events = rows.Events(account)
        self._id_key = opts.id_column
        self._columns = dict(opts.columns)
        self._missing_types: set[str] = set()  # optional export types the ESP does not know
        # Required export types the ESP refused in a broadcast's round (type → the ESP's answer),
        # and the error that reports them at the call after the round's last page.
        self._refused: dict[str, dict[str, str]] = {}
        self._reports: dict[str, ExportTypesRefusedError] = {}
        self.list_format = opts.list_format(drop_folder=opts.upload_folder)
        policy = account.subscriptions
        if policy.enabled and policy.double_opt_in and not opts.double_opt_in_workflow:
            raise ConfigurationError(
                f"account {account.name} subscribes with double opt-in (subscriptions.double_opt_in) "
                "and needs options.double_opt_in_workflow: the API identifier of the Instiller "
                "workflow that mails the confirmation and subscribes the user once confirmed"
            )
        self._webhook_secret = account.token.get_secret_value() if account.token else ""
        self._webhook_items = contacts.WebhookItems(
            email_key=opts.params["email"],
            list_key=opts.params["list"],
            time_key="event_date",
            events=opts.webhook_events,
            times=self._times,
        )
        # the user's fields travel as further parameters beside these
        self._reserved = {*AUTH_PARAMS, *opts.params.values()}

    async def _call(self, method: str, role: str, params: dict[str, str]) -> Any:
        """One call of an endpoint role (a GET's parameters in the query, a POST's as
        ``multipart/form-data``, as Instiller's public client sends them): the parsed body of a
        200, else the mapped error."""
        path = self.options.paths[role]
        if method == "GET":
            _, body = await self._api.call(method, path, params=params)
        else:
            _, body = await self._api.call(method, path, form=params, multipart=True)
        return body

    # --- imports and sends ----------------------------------------------------------------------------

    def _list_id(self, job_id: str) -> str:
        return self.options.list_identifier_template.format(job_id=job_id)

    async def start_import(self, remote_path: str, job: BroadcastJob) -> base.ImportStatus:
        """POST lists/import_file (idempotent by the job id as external_id)."""
        p, rel = self.options.params, self.in_account_folder(remote_path)
        form = {
            p["list"]: self._list_id(job.job_id),
            p["list_name"]: job.list_name,
            p["field_map"]: self.options.field_map_api_identifier,
            p["file"]: rel,
            p["external_id"]: job.job_id,
        }
        try:
            body = await self._call("POST", "import_file", form)
        except InstillerRefusedError as exc:
            if exc.status == 404:
                raise ListRejectedError(f"Instiller cannot import {rel}: {exc}") from None
            raise
        return self._import_status(body)

    async def import_status(self, import_id: str) -> base.ImportStatus:
        """GET lists/import_status."""
        try:
            body = await self._call("GET", "import_status", {self.options.params["import_id"]: import_id})
        except InstillerRefusedError as exc:
            if exc.status == 404:
                raise ListRejectedError(f"Instiller does not know import {import_id}: {exc}") from None
            raise
        return self._import_status(body)

    async def find_send(self, job: BroadcastJob) -> base.SendStatus | None:
        """GET emails/list_sends?external_id=<job_id>: the first send, else None."""
        body = await self._call("GET", "list_sends", {self.options.params["external_id"]: job.job_id})
        sends = body.get("sends") if isinstance(body, dict) else None
        if not isinstance(sends, list):
            raise EspUnavailableError(f"list_sends answered without a sends list: {short_json(body)}")
        return self._send_status(sends[0]) if sends else None

    async def send(self, import_id: str, job: BroadcastJob) -> base.SendStatus:
        """POST emails/send of the job's message to the job's list (idempotent by external_id)."""
        p, opts = self.options.params, self.options
        form = {
            p["message"]: job.message,
            p["list"]: self._list_id(job.job_id),
            p["external_id"]: job.job_id,
        }
        send_at = base.schedule_of(job)
        if send_at is not None:
            form[p["send_at"]] = send_at.astimezone(self._times.zone).strftime(opts.date_format)
        if opts.email_profile_api_identifier:
            form[p["email_profile"]] = opts.email_profile_api_identifier
        try:
            body = await self._call("POST", "send", form)
        except InstillerRefusedError as exc:
            if exc.status in (404, 409):
                raise ListRejectedError(f"Instiller refused the send of {job.job_id}: {exc}") from None
            raise
        return self._send_status(body)

    async def send_status(self, send_id: str) -> base.SendStatus:
        """GET emails/send_status."""
        body = await self._call("GET", "send_status", {self.options.params["send_id"]: send_id})
        return self._send_status(body)

    def _state(self, body: Any, what: str, states: Mapping[str, S]) -> S:
        """The state of an import or send answer (``what``), mapped by the account's options."""
        if not isinstance(body, dict) or not body.get(f"{what}_id") or not isinstance(body.get("state"), str):
            raise EspUnavailableError(f"a {what} answer without {what}_id and state: {short_json(body)}")
        state = states.get(body["state"])
        if state is None:
            raise ConfigurationError(
                f"Instiller answered {what} state {body['state']!r}, which options.{what}_states of "
                f"{self._name} does not map"
            )
        return state

    def _import_status(self, body: Any) -> base.ImportStatus:
        state = self._state(body, "import", self.options.import_states)
        errors = body.get("errors") or []
        if not isinstance(errors, list):
            raise EspUnavailableError(f"an import answer whose errors are not a list: {short_json(body)}")
        return base.ImportStatus(
            import_id=str(body["import_id"]),
            state=state,
            rows_valid=_count(body, "rows_imported"),
            rows_invalid=_count(body, "rows_rejected"),
            errors=tuple(
                f"line {e.get('line')}: {e.get('error')}" if isinstance(e, dict) else str(e) for e in errors
            ),
        )

    def _send_status(self, body: Any) -> base.SendStatus:
        state = self._state(body, "send", self.options.send_states)
        return base.SendStatus(
            send_id=str(body["send_id"]),
            state=state,
            recipients=_count(body, "recipients"),
            detail=str(body.get("error") or ""),
        )

    # --- subscriptions: users and their lists -------------------------------------------------------

    async def apply_contacts(self, changes: Sequence[base.ContactChange]) -> list[base.ContactResult]:
        """Each change with the users calls: fields through ``POST users/add_or_update`` (which also
        creates the user), then ``GET users/list_subscribe`` with ``subscribed`` Y or N; a double
        opt-in triggers the account's opt-in workflow instead (pending). A refusal is the contact's."""
        return [await self._apply(change) for change in changes]

    async def _apply(self, change: base.ContactChange) -> base.ContactResult:
        fields = contacts.contact_fields(change, self._reserved)
        if isinstance(fields, str):
            return contacts.refused(change, fields)
        try:
            return await self._apply_fields(change, fields)
        except InstillerRefusedError as exc:
            return contacts.refused(change, str(exc))

    async def _apply_fields(self, change: base.ContactChange, fields: dict[str, str]) -> base.ContactResult:
        p, opts, state = self.options.params, self.options, change.state
        user = {p["email"]: change.email, **fields}
        opt_in = state is SubscriptionState.PENDING or (
            state is SubscriptionState.SUBSCRIBED and change.double_opt_in
        )
        if opt_in:
            if not opts.double_opt_in_workflow:
                return contacts.refused(
                    change, f"account {self._name} has no double opt-in (options.double_opt_in_workflow)"
                )
            variables = orjson.dumps({p["list"]: change.list}).decode()
            form = {p["workflow"]: opts.double_opt_in_workflow, p["workflow_variables"]: variables, **user}
            await self._call("POST", "trigger_workflow", form)
            return contacts.applied(change, SubscriptionState.PENDING)
        if fields or state is SubscriptionState.SUBSCRIBED or state is None:
            await self._call("POST", "add_or_update", user)  # the user exists before its lists change
        if state is None:
            return contacts.applied(change, None)
        subscribed = "Y" if state is SubscriptionState.SUBSCRIBED else "N"
        query = {p["email"]: change.email, p["list"]: change.list, p["subscribed"]: subscribed}
        await self._call("GET", "list_subscribe", query)
        # Instiller has no removal from a list: a removed contact is unsubscribed there
        return contacts.applied(change, None if state is SubscriptionState.REMOVED else state)

    # --- webhooks: ESP-side changes from the account's workflows ------------------------------------

    def parse_webhook(
        self, headers: Mapping[str, str], body: bytes
    ) -> list[ResponseEvent | SubscriptionChange | base.BadRow]:
        """A workflow's webhook reporting subscription changes (an unsubscribe, a complaint, a
        confirmed opt-in…): ``Authorization: Bearer <token>``, a JSON object or an array of them,
        each a :class:`SubscriptionChange`. Without a ``token`` the account takes no webhooks."""
        if not self._webhook_secret:
            raise base.NotSupportedError(
                f"{self._name} takes no webhooks: no webhook secret (token[_file]) is configured"
            )
        contacts.check_bearer(headers, self._webhook_secret, "webhook")
        return [*self._webhook_items.parse(self.account, body)]

    # --- responses --------------------------------------------------------------------------------------

    def _read_cursor(self, cursor: str | None) -> Cursor:
        """The stored position; none (or an unreadable one) starts at the first type."""
        types = self.options.export_types
        stored = Cursor.read(cursor, self._name)
        if stored is None or stored.next not in types:
            return Cursor(next=types[0], offsets=stored.offsets if stored else {})
        return stored

    async def pull_responses(self, broadcast: SentBroadcast, cursor: str | None) -> base.PullPage:
        """One GET emails/export_responses page: export type ``next`` from its stored offset.

        When a type is exhausted the cursor moves to the next type (``more``), and after the last
        type it wraps to the first with ``more = False``: one round visits every type. A type the
        ESP refuses (``invalid_export_type``) is read as empty: an optional one from then on, a
        required one for this round, whose end then fails with :class:`ExportTypesRefusedError`.
        """
        job_id = broadcast.job_id
        refused_last_round = self._reports.pop(job_id, None)
        if refused_last_round is not None:
            raise refused_last_round
        opts, p = self.options, self.options.params
        types = opts.export_types
        stored = self._read_cursor(cursor)
        current, offsets = stored.next, stored.offsets
        index = types.index(current)

        def done(items: tuple[ResponseEvent | base.BadRow, ...], read: dict[str, int]) -> base.PullPage:
            """The page after which ``current`` is exhausted: on to the following type, or the wrap."""
            if index + 1 < len(types):
                return base.PullPage(items, Cursor(next=types[index + 1], offsets=read).dump(), more=True)
            refused = self._refused.pop(job_id, None)
            if refused:  # one more call reports them, after this page's cursor is stored
                self._reports[job_id] = ExportTypesRefusedError(self._name, refused)
            return base.PullPage(items, Cursor(next=types[0], offsets=read).dump(), more=bool(refused))

        while current in self._missing_types:  # optional types the ESP does not know: treated as empty
            if index + 1 >= len(types):
                return done((), offsets)
            index += 1
            current = types[index]
        offset = offsets.get(current, 0)
        list_id = self._list_id(job_id)
        query = {
            p["list"]: list_id,
            p["export_type"]: current,
            p["offset"]: str(offset),
            p["limit"]: str(opts.page_size),
        }
        try:
            body = await self._call("GET", "export", query)
        except InstillerRefusedError as exc:
            if exc.status != 400 or exc.error != "invalid_export_type":
                raise
            if current not in opts.optional_export_types:
                self._refused.setdefault(job_id, {})[current] = str(exc)
            elif current not in self._missing_types:
                self._missing_types.add(current)
                log.warning(
                    "Instiller does not know an optional export type: treated as empty",
                    extra={"account": self._name, "export_type": current},
                )
            return done((), offsets)
        found, total = self._envelope(body, current, list_id, offset)
        events = rows.item_events(
            found,
            lambda _, row: self._event(broadcast, current, offset, row),
            what=f"{current} row",
            first_line=offset + 1,
        )
        items = tuple(events)
        offsets = {**offsets, current: offset + len(found)}
        if found and offset + len(found) < total:
            return base.PullPage(items, Cursor(next=current, offsets=offsets).dump(), more=True)
        return done(items, offsets)

    def _envelope(self, body: Any, export_type: str, list_id: str, offset: int) -> tuple[list[Any], int]:
        """The rows and total of an export answer; anything else fails the call (cursor kept)."""
        problem = None
        if not isinstance(body, dict):
            problem = "not an object"
        elif not isinstance(body.get("rows"), list):
            problem = "no rows list"
        elif not is_count(body.get("total")):
            problem = "no total count"
        elif not is_count(body.get("limit")):
            problem = "no limit count"
        elif body.get("offset") != offset or not is_count(body.get("offset")):
            problem = f"offset {body.get('offset')!r}, not the {offset} asked for"
        elif body.get("export_type") != export_type:
            problem = f"export_type {body.get('export_type')!r}, not {export_type!r}"
        elif body.get("list_api_identifier") != list_id:
            problem = f"list_api_identifier {body.get('list_api_identifier')!r}, not {list_id!r}"
        if problem is not None:
            raise EspUnavailableError(
                f"GET {self.options.paths['export']} ({export_type}) answered a body that is not the "
                f"export envelope ({problem}): {short_json(body)}"
            )
        return body["rows"], body["total"]

    def _event(self, broadcast: SentBroadcast, export_type: str, offset: int, row: Any) -> ResponseEvent:
        opts, cols = self.options, self._columns
        if not isinstance(row, dict):
            raise ValueError(f"not an object but {type(row).__name__}")
        not_text = [str(k) for k, v in row.items() if not isinstance(v, str)]
        if not_text:
            raise ValueError(f"non-string values in {', '.join(not_text)}")

        def get(role: str) -> str:
            return str(row.get(cols[role], ""))

        esp_id = str(row.get(self._id_key, "")) if self._id_key else ""
        if self._id_key and not esp_id:
            raise ValueError(f"empty {self._id_key}")
        key, email = get("communication_key"), get("email")
        if not key and not email:
            raise ValueError(f"neither {cols['communication_key']} nor {cols['email']}")
        date_column = opts.date_columns[export_type]
        if date_column not in row:
            raise ValueError(f"no {date_column}")
        occurred = self._times.utc(date_column, row[date_column])
        event_type = opts.export_type_map[export_type]
        url = get("url") if event_type is EventType.CLICK else ""
        if event_type is EventType.CLICK and not url:
            raise ValueError(f"a click without {cols['url']}")
        extra = {"export_type": export_type}
        for role, name in (("send_id", "SendId"), ("reason", "Reason")):
            if get(role):
                extra[name] = get(role)
        return self._events.make(
            broadcast_id=broadcast.job_id,
            type=event_type,
            occurred_at=occurred,
            source=rows.api_source(
                f"{opts.paths['export']}?export_type={export_type}", offset // opts.page_size
            ),
            recipient=key or email,
            esp_event_id=f"{self.account.account}:{export_type}:{esp_id}" if esp_id else None,
            url=url or None,
            communication_key=key or None,
            email=email or None,
            esp_message_id=get("message") or broadcast.message,
            extra=extra,
        )


def _count(body: dict[str, Any], name: str) -> int:
    value = body.get(name)
    if value is None:
        return 0
    if not is_count(value):
        raise EspUnavailableError(f"{name} is not a count: {short_json(body)}")
    return value
