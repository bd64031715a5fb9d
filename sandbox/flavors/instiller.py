"""The ``instiller`` flavor: Instiller as docs/connectors/instiller.md describes it.

REST under ``/rest`` with ``api_id`` (the account name) and ``api_key`` (the sandbox ``TOKEN``) as
request parameters: query string for ``GET``, ``multipart/form-data`` fields for ``POST`` (as the
public client sends them); never headers. A list file uploaded to ``upload/`` is imported by
``POST lists/import_file`` into the list ``list_api_identifier``; ``POST emails/send`` sends an
email to a list whose latest import is ``complete``. There are no response files: each send's
rows are released phase by phase into its event log, one stream per export type, and
``GET emails/export_responses`` pages through them.

Choices where the page leaves room:

- A list exists once an import names it; its members are those of its latest import (a new import
  replaces them), and a send takes the latest import's recipients.
- The export of a list serves the rows of the first send to that list (one list per job).
- A repeated ``import_file`` or ``send`` (same ``external_id``) answers the whole status object plus
  ``"created": false``, before checking any other parameter.
- A ``POST`` whose body is not ``multipart/form-data`` (url-encoded, JSON, none) is
  ``415 unsupported_media_type``, before its credentials are looked at: no other form is known to
  work, so a client that drifts from it fails here rather than at the real ESP.
- A parameter given twice is ``400 invalid_parameter``; an empty optional parameter counts as absent;
  ``list_name`` may be empty (the list is then named after its identifier).
- ``file`` with ``..``, an absolute path or a backslash is ``400 invalid_parameter``; a hidden file
  (a path part starting with ``.``) or a missing one is ``404 file_not_found``.
- Every endpoint but ``_sandbox/stats`` is rate-limited; refused calls take no token.

Subscriptions (the page's Subscriptions section): users with their fields (kept in
``<account>/.sandbox-instiller-users.json``) and their state per list in the account's contact
book. ``users/list_subscribe`` takes a list in ``INSTILLER_LISTS`` or one an import made, and a
user ``users/add_or_update`` (or an import) made; ``subscribed=Y`` subscribes, ``N`` unsubscribes.
``automation/trigger_workflow`` of a workflow in ``INSTILLER_WORKFLOWS`` is the opt-in workflow:
its user is pending on the list its ``workflow_session_variables`` name, until a confirmation (the
``_sandbox/contacts`` control route). A change made on Instiller's side (the control route) is
reported to ``INSTILLER_WEBHOOK_URL`` as the account's workflow webhook would; an address that is
not well formed is ``400 invalid_parameter``. The recipients of a list a send goes to become
subscribed on the first of ``INSTILLER_LISTS``.
"""

from __future__ import annotations

import asyncio
import functools
import re
import threading
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from pathlib import PurePosixPath
from typing import Any
from zoneinfo import ZoneInfo

import orjson
from aiohttp import web
from pydantic import Field

from sandbox.api import CONTEXT
from sandbox.contacts import ContactEvent, ContactState, valid_email
from sandbox.engine import Account
from sandbox.errors import EspError, found, json_response
from sandbox.files import atomic_write_bytes
from sandbox.flavors.base import Flavor
from sandbox.limits import MalformedRows
from sandbox.listfile import import_list
from sandbox.protocol import EXTERNAL_ID_RE, MANIFEST, EventType, ImportState, parse_utc
from sandbox.responses import Broadcast, EventLogFormat, ResponsePhase
from sandbox.settings import SandboxSettings
from sandbox.simulate import Event
from sandbox.state import ImportRecord, SendRecord
from sandbox.validators import CommaList, HttpUrl, TimeZone
from sandbox.webhooks import report_change

BASE = "/rest"
UPLOAD = "upload"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"
MAX_LIMIT = 5000
DEFAULT_LIMIT = 1000

# Attribute keys saved with imports and sends.
LIST = "list"
EMAIL_PROFILE = "email_profile"
USERS_FILE = ".sandbox-instiller-users.json"
CREDENTIALS = ("api_id", "api_key")


class InstillerSettings(SandboxSettings):
    """The flavor's own settings (``ESPBRIDGE_SANDBOX_FIELD_MAPS``, ``ESPBRIDGE_SANDBOX_TIMEZONE``)."""

    field_maps: CommaList = Field(
        default=("espbridge",), description="comma list of the field maps that exist"
    )
    timezone: TimeZone = Field(default=ZoneInfo("Europe/London"), description="the account's local time zone")
    instiller_lists: CommaList = Field(
        default=("newsletter",),
        description="comma list of the lists that exist besides those imports make; the first gets "
        "the recipients of every send",
    )
    instiller_workflows: CommaList = Field(
        default=("double_opt_in",), description="comma list of the opt-in workflows that exist"
    )
    instiller_webhook_url: HttpUrl = Field(
        default=None, description="where the workflows report changes made at Instiller ({account} replaced)"
    )


instiller_settings = functools.cache(InstillerSettings)
"""The flavor's settings, read from the environment once."""


def local_text(moment: datetime | float) -> str:
    """A time as the API shows it: ``date_format`` in ``TIMEZONE``, no offset."""
    if not isinstance(moment, datetime):
        moment = datetime.fromtimestamp(moment, UTC)
    return moment.astimezone(instiller_settings().timezone).strftime(DATE_FORMAT)


def parse_local(text: str) -> datetime:
    """A ``date_format`` time in ``TIMEZONE`` (the first occurrence of a repeated hour), in UTC."""
    naive = datetime.strptime(text, DATE_FORMAT)
    return naive.replace(tzinfo=instiller_settings().timezone, fold=0).astimezone(UTC)


# Requests


class Params:
    """A request's parameters: each a single string (a repeated one is refused once authorised)."""

    def __init__(self, items: Iterable[tuple[str, object]]) -> None:
        self.values: dict[str, str] = {}
        self.problems: list[str] = []
        for name, value in items:
            if not isinstance(value, str):
                self.problems.append(f"{name} must be a plain value, not a file")
            elif name in self.values:
                self.problems.append(f"{name} is given more than once")
            else:
                self.values[name] = value

    def required(self, name: str) -> str:
        """The value of a required parameter; 400 if it is missing or empty."""
        value = self.values.get(name, "")
        if not value:
            raise EspError(400, "invalid_parameter", f"{name} is required")
        return value

    def optional(self, name: str) -> str | None:
        """The value of an optional parameter; None if it is missing or empty."""
        return self.values.get(name) or None


async def _params(request: web.Request) -> Params:
    if request.method == "GET":
        return Params(request.query.items())
    # Multipart form fields only; a POST's query parameters carry nothing.
    if request.content_type != "multipart/form-data":
        raise EspError(
            415, "unsupported_media_type", "POST parameters are read from multipart/form-data only"
        )
    return Params((await request.post()).items())


Endpoint = Callable[[Account, Params], Awaitable[Any]]


def _authorised(request: web.Request, params: Params) -> Account:
    context = request.app[CONTEXT]
    account = context.accounts.get(params.values.get("api_id", ""))
    key = params.values.get("api_key", "")
    if account is None or not key or not context.token_matches(key):
        raise EspError(401, "invalid_credentials", "API ID or key not recognised")
    return account


def endpoint(handler: Endpoint, limited: bool = True) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A route handler: credentials (401), then the rate limit (429), then the parameters."""

    async def handle(request: web.Request) -> web.Response:
        params = await _params(request)
        account = _authorised(request, params)
        if limited:
            account.check_rate_limit()
        if params.problems:
            raise EspError(400, "invalid_parameter", "; ".join(params.problems))
        return json_response(await handler(account, params))

    return handle


_LIST_RE = re.compile(r"^[^\x00-\x1f]{1,200}$")


def _external_id(params: Params) -> str:
    value = params.required("external_id")
    if not EXTERNAL_ID_RE.fullmatch(value):
        raise EspError(400, "invalid_parameter", "external_id is malformed")
    return value


def _list_id(params: Params) -> str:
    value = params.required("list_api_identifier")
    if not _LIST_RE.fullmatch(value):
        raise EspError(400, "invalid_parameter", "list_api_identifier is malformed")
    return value


def _account_file(file: str) -> str:
    """The ``file`` parameter as a path inside the account folder; 400 if it leaves it, 404 if hidden."""
    path = PurePosixPath(file)
    if path.is_absolute() or "\\" in file or ".." in path.parts or not path.parts:
        raise EspError(
            400, "invalid_parameter", "file must be a path inside the account, e.g. upload/job-1.csv"
        )
    if any(part.startswith(".") for part in path.parts):
        raise EspError(404, "file_not_found", f"{file} does not exist")
    return str(path)


def _int(params: Params, name: str, default: int, low: int, high: int | None) -> int:
    text = params.optional(name)
    if text is None:
        return default
    if not text.isdigit() or not text.isascii():
        raise EspError(400, "invalid_parameter", f"{name} must be an integer")
    value = int(text)
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise EspError(400, "invalid_parameter", f"{name} must be {bounds}")
    return value


# Lists, imports and sends as Instiller shows them

IMPORT_STATES = {
    ImportState.QUEUED: "queued",
    ImportState.RUNNING: "processing",
    ImportState.DONE: "complete",
    ImportState.FAILED: "failed",
}


def _imports_of(account: Account, list_id: str) -> list[ImportRecord]:
    return [i for i in account.state.imports.values() if i.attrs.get(LIST) == list_id]


def _sends_of(account: Account, list_id: str) -> list[SendRecord]:
    return [s for s in account.state.sends.values() if s.attrs.get(LIST) == list_id]


def _import_body(record: ImportRecord) -> dict[str, Any]:
    return {
        "import_id": record.import_id,
        "external_id": record.external_id,
        "list_api_identifier": record.attrs.get(LIST, ""),
        "file": record.file,
        "state": IMPORT_STATES[record.state],
        "rows_total": record.rows_total,
        "rows_imported": record.rows_valid,
        "rows_rejected": record.rows_invalid,
        "errors": record.errors,
    }


def _time(utc: str | None) -> str | None:
    return local_text(parse_utc(utc)) if utc is not None else None


def _send_body(record: SendRecord) -> dict[str, Any]:
    return {
        "send_id": record.send_id,
        "external_id": record.external_id,
        "email_api_identifier": record.message,
        "list_api_identifier": record.attrs.get(LIST, ""),
        "state": record.state.value,
        "recipients": record.recipients,
        "send_at": _time(record.send_at),
        "started_at": _time(record.started_at),
        "finished_at": _time(record.finished_at),
        "error": (record.error or "the send failed") if record.state.value == "failed" else None,
    }


# Endpoints


async def import_file(account: Account, params: Params) -> dict[str, Any]:
    """``POST lists/import_file``: start importing a file of the account's SFTP site into a list."""
    external_id = _external_id(params)
    existing = account.state.import_by_external_id(external_id)
    if existing is not None:
        return {**_import_body(existing), "created": False}
    list_id = _list_id(params)
    if "list_name" not in params.values:
        raise EspError(400, "invalid_parameter", "list_name is required")
    list_name = params.values["list_name"] or list_id
    field_map = params.required("field_map_api_identifier")
    file = _account_file(params.required("file"))
    if field_map not in instiller_settings().field_maps:
        raise EspError(404, "field_map_not_found", f"no field map {field_map}")
    if not (account.folder / file).is_file():
        raise EspError(404, "file_not_found", f"{file} does not exist")
    record, created = await account.create_import(file, list_name, external_id, {LIST: list_id})
    return {**_import_body(record), "created": created}


async def import_status(account: Account, params: Params) -> dict[str, Any]:
    """``GET lists/import_status``."""
    import_id = params.required("import_id")
    imports = account.state.imports
    return _import_body(found(imports.get(import_id), f"no import {import_id}", "import_not_found"))


async def send(account: Account, params: Params) -> dict[str, Any]:
    """``POST emails/send``: an email to a list whose latest import is complete, once per external_id."""
    external_id = _external_id(params)
    existing = account.state.sends_by_external_id(external_id)
    if existing:
        return {**_send_body(existing[0]), "created": False}
    message = params.required("email_api_identifier")
    list_id = _list_id(params)
    send_at_text = params.optional("send_at")
    try:
        send_at = parse_local(send_at_text) if send_at_text is not None else None
    except ValueError:
        raise EspError(400, "invalid_parameter", "send_at must look like 2026-07-01 10:00:00") from None
    imports = _imports_of(account, list_id)
    if not imports:
        raise EspError(404, "list_not_found", f"no list {list_id}")
    latest = imports[-1]
    if latest.state is not ImportState.DONE:
        raise EspError(
            409, "list_not_ready", f"the latest import of {list_id} is {IMPORT_STATES[latest.state]}"
        )
    attrs = {LIST: list_id}
    profile = params.optional("email_profile_api_identifier")
    if profile is not None:
        attrs[EMAIL_PROFILE] = profile
    await account.subscribe_imported(latest.import_id, instiller_settings().instiller_lists[0])
    record, created = await account.create_send(latest.import_id, message, external_id, send_at, attrs)
    return {**_send_body(record), "created": created}


async def send_status(account: Account, params: Params) -> dict[str, Any]:
    """``GET emails/send_status``."""
    send_id = params.required("send_id")
    return _send_body(found(account.state.sends.get(send_id), f"no send {send_id}", "send_not_found"))


async def list_sends(account: Account, params: Params) -> dict[str, Any]:
    """``GET emails/list_sends``: the sends made with an ``external_id``."""
    external_id = params.required("external_id")
    return {"sends": [_send_body(s) for s in account.state.sends_by_external_id(external_id)]}


async def export_responses(account: Account, params: Params) -> dict[str, Any]:
    """``GET emails/export_responses``: one export type's released rows of a list, paged."""
    list_id = _list_id(params)
    export_type = params.required("export_type")
    offset = _int(params, "offset", 0, 0, None)
    limit = _int(params, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    if export_type not in EXPORT_TYPES:
        raise EspError(400, "invalid_export_type", f"unknown export_type {export_type}")
    if not _imports_of(account, list_id):
        raise EspError(404, "list_not_found", f"no list {list_id}")
    sends = _sends_of(account, list_id)
    total, rows = 0, []
    if sends:
        log = account.event_log(sends[0].send_id)
        total, rows = log.total(export_type), log.page(export_type, offset, limit)
    return {
        "export_type": export_type,
        "list_api_identifier": list_id,
        "offset": offset,
        "limit": limit,
        "total": total,
        "rows": rows,
    }


# Users and their lists


class Users:
    """The users of one account and their fields, saved whole on every change (a few, from API calls)."""

    def __init__(self, account: Account) -> None:
        self.path = account.folder / USERS_FILE
        self.lock = threading.Lock()
        try:
            self.fields: dict[str, dict[str, str]] = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            self.fields = {}

    def save(self, email: str, fields: dict[str, str]) -> dict[str, str]:
        """Create the user or update its fields; the user's fields."""
        with self.lock:
            merged = {**self.fields.get(email, {}), **fields}
            self.fields[email] = merged
            atomic_write_bytes(self.path, orjson.dumps(self.fields))
            return merged


_USERS: dict[int, Users] = {}


def users_of(account: Account) -> Users:
    """The account's users, read from disk at the first use."""
    found = _USERS.get(id(account))
    if found is None:
        found = _USERS[id(account)] = Users(account)
    return found


def _email(params: Params) -> str:
    value = params.required("email_address").strip().lower()
    if not valid_email(value):
        raise EspError(400, "invalid_parameter", "email_address is not a valid email address")
    return value


def _user_fields(params: Params, *known: str) -> dict[str, str]:
    """The parameters that are the user's fields: all but the credentials and the call's own."""
    return {k: v for k, v in params.values.items() if k not in (*CREDENTIALS, *known)}


def _list_exists(account: Account, list_id: str) -> bool:
    return list_id in instiller_settings().instiller_lists or bool(_imports_of(account, list_id))


async def add_or_update(account: Account, params: Params) -> dict[str, Any]:
    """``POST users/add_or_update``: create the user or update its fields (the further parameters)."""
    email = _email(params)
    fields = await asyncio.to_thread(users_of(account).save, email, _user_fields(params, "email_address"))
    return {"email_address": email, **fields}


async def user_details(account: Account, params: Params) -> dict[str, Any]:
    """``GET users/details``: the user's fields and its state on each list it is on."""
    email = _email(params)
    fields = users_of(account).fields.get(email)
    records = account.contacts.records(email=email)
    if fields is None and not records:
        raise EspError(404, "user_not_found", f"no user {email}")
    lists = {r.list: r.state.value for r in records}
    return {"valid": True, "email_address": email, **(fields or {}), "lists": lists}


async def list_subscribe(account: Account, params: Params) -> dict[str, Any]:
    """``GET users/list_subscribe``: ``subscribed=Y`` subscribes the user to the list, ``N`` unsubscribes."""
    email = _email(params)
    list_id = _list_id(params)
    subscribed = params.required("subscribed")
    if subscribed not in ("Y", "N"):
        raise EspError(400, "invalid_parameter", "subscribed must be Y or N")
    if not _list_exists(account, list_id):
        raise EspError(404, "list_not_found", f"no list {list_id}")
    if email not in users_of(account).fields and not account.contacts.records(email=email):
        raise EspError(404, "user_not_found", f"no user {email}: add it with users/add_or_update first")
    state = ContactState.SUBSCRIBED if subscribed == "Y" else ContactState.UNSUBSCRIBED
    reason = "subscribe" if subscribed == "Y" else "unsubscribe"
    await asyncio.to_thread(account.contacts.set, list_id, email, state, reason=reason)
    return {"email_address": email, "list_api_identifier": list_id, "subscribed": subscribed}


async def trigger_workflow(account: Account, params: Params) -> dict[str, Any]:
    """``POST automation/trigger_workflow``: the opt-in workflow makes the user pending on the list
    its session variables name (and saves the user's fields)."""
    workflow = params.required("workflow_api_identifier")
    email = _email(params)
    if workflow not in instiller_settings().instiller_workflows:
        raise EspError(404, "workflow_not_found", f"no workflow {workflow}")
    try:
        variables = orjson.loads(params.optional("workflow_session_variables") or "{}")
    except orjson.JSONDecodeError:
        variables = None
    if not isinstance(variables, dict):
        raise EspError(400, "invalid_parameter", "workflow_session_variables must be a JSON object")
    list_id = variables.get("list_api_identifier")
    if not isinstance(list_id, str) or not _list_exists(account, list_id):
        raise EspError(404, "list_not_found", f"no list {list_id}")
    own = ("email_address", "workflow_api_identifier", "workflow_session_variables")
    await asyncio.to_thread(users_of(account).save, email, _user_fields(params, *own))
    await asyncio.to_thread(
        account.contacts.set, list_id, email, ContactState.PENDING, reason="double opt-in"
    )
    return {"workflow_api_identifier": workflow, "email_address": email, "triggered": True}


async def on_contact_event(account: Account, event: ContactEvent) -> None:
    """A change made at Instiller, reported as the account's workflow webhook calls espbridge."""
    report_change(
        account,
        event,
        instiller_settings().instiller_webhook_url,
        email_key="email_address",
        list_key="list_api_identifier",
        time_key="event_date",
        time=local_text(event.record.changed_at),
    )


async def stats(account: Account, _params: Params) -> dict[str, Any]:
    """``GET _sandbox/stats`` (tests): imports and sends created per job, and 429s answered."""
    return {**account.state.stats(), "rate_limited": account.counters["rate_limited"]}


ROUTES = (
    web.post(f"{BASE}/lists/import_file", endpoint(import_file)),
    web.get(f"{BASE}/lists/import_status", endpoint(import_status)),
    web.post(f"{BASE}/emails/send", endpoint(send)),
    web.get(f"{BASE}/emails/send_status", endpoint(send_status)),
    web.get(f"{BASE}/emails/list_sends", endpoint(list_sends)),
    web.get(f"{BASE}/emails/export_responses", endpoint(export_responses)),
    web.post(f"{BASE}/users/add_or_update", endpoint(add_or_update)),
    web.get(f"{BASE}/users/details", endpoint(user_details)),
    web.get(f"{BASE}/users/list_subscribe", endpoint(list_subscribe)),
    web.post(f"{BASE}/automation/trigger_workflow", endpoint(trigger_workflow)),
    web.get(f"{BASE}/_sandbox/stats", endpoint(stats, limited=False)),
)

# Responses: the export API's rows

EXPORTS: dict[EventType, tuple[str, str]] = {
    EventType.SENT: ("output", "SentDate"),
    EventType.DELIVERED: ("delivered", "DeliveryDate"),
    EventType.BOUNCE_HARD: ("hard", "BounceDate"),
    EventType.BOUNCE_SOFT: ("soft", "BounceDate"),
    EventType.RETURNED: ("returned", "ReturnedDate"),
    EventType.OPEN: ("open", "OpenDate"),
    EventType.CLICK: ("clicks_info", "ClickDate"),
    EventType.COMPLAINT: ("complaints", "ComplaintDate"),
    EventType.UNSUBSCRIBE: ("unsubscribes", "UnsubscribeDate"),
}
"""Per event type: its export type and that type's date column."""

EXPORT_TYPES = {export_type: date for export_type, date in EXPORTS.values()}
"""The export types the sandbox knows, with their date columns."""

# The quotes and comma make readers prove they take the values as JSON strings.
REASONS = {
    EventType.BOUNCE_HARD: '550 5.1.1 "user unknown"',
    EventType.BOUNCE_SOFT: "452 4.2.2 mailbox full, try later",
    EventType.RETURNED: "auto-reply: out of office",
}

MALFORMED_KINDS = ("no recipient", "bad date", "no date")
"""The kinds of malformed rows, in rotation: empty ``CommunicationKey`` and ``Email``; date
``not-a-date``; the date key absent."""


class InstillerResponses(EventLogFormat):
    """Rows per export type, released in the page's phases; an ``Id`` per row."""

    phases = (
        ResponsePhase("output", frozenset({EventType.SENT})),
        ResponsePhase(
            "delivery", frozenset({EventType.DELIVERED, EventType.BOUNCE_HARD, EventType.BOUNCE_SOFT})
        ),
        ResponsePhase("open", frozenset({EventType.OPEN})),
        ResponsePhase("clicks_info", frozenset({EventType.CLICK})),
        ResponsePhase("optouts", frozenset({EventType.UNSUBSCRIBE, EventType.COMPLAINT, EventType.RETURNED})),
    )
    # The connector may derive event ids from the facts (id_column ""): never two rows alike.
    distinct_seconds = True
    # Rows of an export type are in ascending time, across steps too.
    time_ordered_phases = True
    malformed_kinds = len(MALFORMED_KINDS)

    def stream(self, event: Event) -> str:
        """The event's export type."""
        return EXPORTS[event.event_type][0]

    def item(self, broadcast: Broadcast, event: Event) -> dict[str, str]:
        """The export row: ``Id``, ``SendId``, ``EmailApiIdentifier``, the recipient, the date, extras."""
        row = {
            "Id": f"{broadcast.send_id}-{event.number}",
            "SendId": broadcast.send_id,
            "EmailApiIdentifier": broadcast.message,
            "CommunicationKey": event.key,
            "Email": event.email,
            EXPORTS[event.event_type][1]: local_text(event.at),
        }
        if event.event_type in REASONS:
            row["Reason"] = REASONS[event.event_type]
        if event.event_type is EventType.CLICK:
            row["ClickUrl"] = event.url
        return row

    def malformed_item(self, broadcast: Broadcast, stream: str, k: int, after: Any) -> dict[str, str]:
        """The row ``after`` with ``Id`` ``<send_id>-bad-<k>``, spoiled by kind (:data:`MALFORMED_KINDS`)."""
        row = {**after, "Id": f"{broadcast.send_id}-bad-{k}"}
        date = EXPORT_TYPES[stream]
        kind = MalformedRows.kind(k, len(MALFORMED_KINDS))
        if kind == 0:
            row["CommunicationKey"] = row["Email"] = ""
        elif kind == 1:
            row[date] = "not-a-date"
        else:
            del row[date]
        return row

    def manifest_fields(self, broadcast: Broadcast) -> dict[str, Any]:
        """``list_api_identifier``: the list the send went to."""
        return {"list_api_identifier": broadcast.attrs.get(LIST, "")}


FLAVOR = Flavor(
    name="instiller",
    read_list=import_list,
    responses=InstillerResponses(),
    folders=(UPLOAD, MANIFEST),
    routes=ROUTES,
    check_settings=instiller_settings,
    on_contact_event=on_contact_event,
)
