"""The ``generic`` flavor: the generic ESP protocol of docs/generic-esp.md (the default).

REST API for imports and sends (the client triggers both, and may cancel a send before its messages
go out), comma-delimited list files
``drop/<job_id>.csv``, and response files ``<send_id>_<seq>_<phase>.csv`` with an ``EventId``.
Contacts: batch calls per list to subscribe (with double opt-in), unsubscribe, remove and update
them; a change made on the ESP side is reported in a response file when it belongs to a broadcast
(a link unsubscribe, a complaint, a hard bounce with a ``job``), else by the contacts webhook.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import IO, Literal

from aiohttp import web
from aiohttp.typedefs import Handler
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from sandbox.api import account_of, read_body
from sandbox.contacts import ContactChange, ContactEvent, ContactState, Via, valid_email
from sandbox.engine import Account
from sandbox.errors import EspError, json_response, not_found
from sandbox.files import atomic_writer, csv_line
from sandbox.flavors.base import Flavor
from sandbox.listfile import import_list
from sandbox.protocol import API_PREFIX, DROP, EXTERNAL_ID_RE, RESPONSES, EventType, SendState, utc_text
from sandbox.responses import Broadcast, PendingFile, ResponseFormat, ResponsePhase
from sandbox.settings import SandboxSettings
from sandbox.simulate import Event
from sandbox.state import ImportRecord, SendRecord
from sandbox.validators import HttpUrl
from sandbox.webhooks import call_webhook

log = logging.getLogger(__name__)

LIST_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
"""A contact list's id (created on first use)."""
FIELD_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
MAX_FIELD_VALUE = 1000
MAX_CONTACTS = 1000
"""Contacts in one call at most."""
WEBHOOK_BATCH = 100


class GenericSettings(SandboxSettings):
    """The flavor's own settings (prefix ``ESPBRIDGE_SANDBOX_``)."""

    generic_webhook_url: HttpUrl = Field(
        default=None,
        description="where contact changes made on the ESP side are POSTed ({account} replaced); unset: none",
    )


generic_settings = functools.cache(GenericSettings)
"""The flavor's settings, read from the environment once."""

# REST API


class ImportRequest(BaseModel):
    """The body of ``POST /imports``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    file: str = Field(min_length=1)
    list_name: str | None = None
    external_id: str = Field(pattern=EXTERNAL_ID_RE.pattern)
    list_id: str | None = Field(default=None, pattern=LIST_ID_RE.pattern)
    """The contact list the recipients join (as subscribed, unless they opted out of it)."""


class SendRequest(BaseModel):
    """The body of ``POST /sends``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    import_id: str = Field(min_length=1)
    message: str = Field(min_length=1)
    external_id: str = Field(pattern=EXTERNAL_ID_RE.pattern)
    send_at: AwareDatetime | None = None


def drop_file(file: str) -> str:
    """The ``file`` of an import request, if it names a visible file directly in ``drop/``."""
    path = PurePosixPath(file)
    if (
        path.is_absolute()
        or len(path.parts) != 2
        or path.parts[0] != DROP
        or path.name.startswith(".")
        or "\\" in file
    ):
        raise EspError(400, "invalid_request", "file must name a file in drop/, e.g. drop/job-1.csv")
    return str(path)


def _shown(request: web.Request, records: Mapping[str, ImportRecord | SendRecord], kind: str) -> web.Response:
    """The body of the record the path's ``<kind>_id`` names; 404 ``<kind>_not_found``."""
    record_id = request.match_info[f"{kind}_id"]
    record = records.get(record_id)
    if record is None:
        raise not_found(f"no {kind} {record_id}", f"{kind}_not_found")
    return json_response(record.public())


def _answer(record: ImportRecord | SendRecord, created: bool, new: dict[str, str]) -> web.Response:
    """202 with ``new`` for an object just created; 200 with the whole one an ``external_id`` made before."""
    return json_response(new, 202) if created else json_response(record.public())


async def create_import(request: web.Request) -> web.Response:
    """``POST /imports``: 202 with a new import, 200 with the one this ``external_id`` made."""
    account = account_of(request)
    body = await read_body(request, ImportRequest)
    # An existing import is the answer whatever the file says (idempotency comes first).
    existing = account.state.import_by_external_id(body.external_id)
    file = body.file if existing is not None else drop_file(body.file)
    record, created = await account.create_import(
        file, body.list_name, body.external_id, contact_list=body.list_id
    )
    return _answer(record, created, {"import_id": record.import_id, "state": record.state.value})


async def get_import(request: web.Request) -> web.Response:
    """``GET /imports/<import_id>``."""
    return _shown(request, account_of(request).state.imports, "import")


async def create_send(request: web.Request) -> web.Response:
    """``POST /sends``: 202 with a new send, 200 with the one this ``external_id`` made (never sent again)."""
    account = account_of(request)
    body = await read_body(request, SendRequest)
    record, created = await account.create_send(body.import_id, body.message, body.external_id, body.send_at)
    return _answer(record, created, {"send_id": record.send_id, "state": record.state.value})


async def get_send(request: web.Request) -> web.Response:
    """``GET /sends/<send_id>``."""
    return _shown(request, account_of(request).state.sends, "send")


async def cancel_send(request: web.Request) -> web.Response:
    """``POST /sends/<send_id>/cancel``: 200 with the send, ``cancelled`` (again: the same answer);
    409 ``send_not_cancellable`` once its messages are going out or went out."""
    account = account_of(request)
    record = await account.cancel_send(request.match_info["send_id"])
    if record.state is not SendState.CANCELLED:
        raise EspError(
            409, "send_not_cancellable", f"send {record.send_id} is {record.state.value}: too late to cancel"
        )
    return json_response(record.public())


async def list_sends(request: web.Request) -> web.Response:
    """``GET /sends?external_id=…``: the sends made with that ``external_id`` (all without it)."""
    account = account_of(request)
    external_id = request.query.get("external_id")
    if external_id is None:
        sends = list(account.state.sends.values())
    else:
        sends = account.state.sends_by_external_id(external_id)
    return json_response({"sends": [s.public() for s in sends]})


# Contacts


class ContactIn(BaseModel):
    """One contact of a contacts call; checked one by one (a bad one is refused alone)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    email: str = Field(max_length=320)
    fields: dict[str, str] = Field(default_factory=dict)
    reason: str = Field(default="", max_length=200)


class ContactsRequest(BaseModel):
    """The body of the contacts calls: at most :data:`MAX_CONTACTS` contacts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    contacts: list[ContactIn] = Field(min_length=1, max_length=MAX_CONTACTS)
    double_opt_in: bool = False
    """``subscribe`` only: a contact not subscribed yet is ``pending`` until it confirms."""


Action = Literal["subscribe", "unsubscribe", "remove", "update"]


@dataclass(frozen=True)
class Outcome:
    """What became of one contact of a call."""

    email: str
    list: str
    state: ContactState | None = None
    error: str = ""
    message: str = ""

    def public(self) -> dict[str, object]:
        """One item of the call's ``results``."""
        accepted = not self.error
        return {
            "email": self.email,
            "list": self.list,
            "accepted": accepted,
            "state": self.state.value if self.state is not None else None,
            **({} if accepted else {"error": self.error, "message": self.message}),
        }


def _contact_problem(contact: ContactIn) -> tuple[str, str] | None:
    """Why the ESP refuses a contact, as (error, message), or None."""
    if not valid_email(contact.email):
        return "invalid_email", f"{contact.email!r} is not a valid email address"
    for name, value in contact.fields.items():
        if not FIELD_NAME_RE.fullmatch(name):
            return "invalid_field", f"field name {name!r} must match {FIELD_NAME_RE.pattern}"
        if len(value) > MAX_FIELD_VALUE or any(ord(c) < 32 and c not in "\t" for c in value):
            return (
                "invalid_field",
                f"field {name} must be at most {MAX_FIELD_VALUE} characters, no line breaks",
            )
    return None


def _new_state(action: Action, current: ContactState | None, double_opt_in: bool) -> ContactState | None:
    """The state a contact gets from ``action`` (None: ``update`` keeps it)."""
    if action == "subscribe":
        if double_opt_in and current not in (ContactState.SUBSCRIBED,):
            return ContactState.PENDING  # an already subscribed contact is not asked to confirm again
        return ContactState.SUBSCRIBED
    if action == "unsubscribe":
        return ContactState.UNSUBSCRIBED
    if action == "remove":
        return ContactState.REMOVED
    return current


def apply_contacts(account: Account, list_id: str, action: Action, body: ContactsRequest) -> list[Outcome]:
    """Apply a contacts call to the account's contact book (one write for the accepted ones)."""
    book = account.contacts
    outcomes: list[Outcome] = []
    changes: list[ContactChange] = []
    states: dict[str, ContactState] = {}  # the batch's own changes so far, by email
    for contact in body.contacts:
        email = contact.email.strip().lower()
        problem = _contact_problem(contact)
        if problem is not None:
            outcomes.append(Outcome(contact.email, list_id, None, *problem))
            continue
        record = book.get(list_id, email)
        current = states.get(email) or (record.state if record is not None else None)
        if action == "update" and current is None:
            outcomes.append(
                Outcome(email, list_id, None, "contact_not_found", f"{email} is not on {list_id}")
            )
            continue
        state = _new_state(action, current, body.double_opt_in)
        assert state is not None  # update keeps a state the contact has
        states[email] = state
        changes.append(ContactChange(list_id, email, state, contact.reason, Via.API, dict(contact.fields)))
        outcomes.append(Outcome(email, list_id, state))
    book.set_many(changes)
    return outcomes


def _list_id(request: web.Request) -> str:
    list_id = request.match_info["list_id"]
    if not LIST_ID_RE.fullmatch(list_id):
        raise EspError(400, "invalid_list", f"list id {list_id!r} must match {LIST_ID_RE.pattern}")
    return list_id


def contacts_call(action: Action) -> Handler:
    """The handler of one contacts call: ``POST /lists/<list_id>/<action>`` (``PATCH …/contacts``
    for ``update``): 200 with ``{"results": [...]}``, one per contact in order; a refused contact
    has ``accepted: false`` with its ``error`` and ``message`` and changes nothing."""

    async def handler(request: web.Request) -> web.Response:
        account = account_of(request)
        list_id = _list_id(request)
        body = await read_body(request, ContactsRequest)
        outcomes = apply_contacts(account, list_id, action, body)
        return json_response({"results": [o.public() for o in outcomes]})

    return handler


async def list_contacts(request: web.Request) -> web.Response:
    """``GET /lists/<list_id>/contacts?email=…``: the list's contacts (that one with ``email``)."""
    account = account_of(request)
    list_id = _list_id(request)
    email = request.query.get("email") or None
    records = account.contacts.records(list_id, email)
    return json_response({"contacts": [r.public() for r in records]})


_BASE = API_PREFIX + "/{account}"

ROUTES = (
    web.post(f"{_BASE}/imports", create_import),
    web.get(f"{_BASE}/imports/{{import_id}}", get_import),
    web.post(f"{_BASE}/sends", create_send),
    web.get(f"{_BASE}/sends", list_sends),
    web.get(f"{_BASE}/sends/{{send_id}}", get_send),
    web.post(f"{_BASE}/sends/{{send_id}}/cancel", cancel_send),
    web.post(f"{_BASE}/lists/{{list_id}}/subscribe", contacts_call("subscribe")),
    web.post(f"{_BASE}/lists/{{list_id}}/unsubscribe", contacts_call("unsubscribe")),
    web.post(f"{_BASE}/lists/{{list_id}}/remove", contacts_call("remove")),
    web.patch(f"{_BASE}/lists/{{list_id}}/contacts", contacts_call("update")),
    web.get(f"{_BASE}/lists/{{list_id}}/contacts", list_contacts),
)

# Response files


class Phase(StrEnum):
    """A group of response files written together; phases are written in this order."""

    SENT = "sent"
    """`sent` events."""
    DELIVERY = "delivery"
    """`delivered`, `bounce_hard` and `bounce_soft` events."""
    OPENS = "opens"
    """`open` events."""
    CLICKS = "clicks"
    """`click` events."""
    OPTOUTS = "optouts"
    """`unsubscribe` and `complaint` events."""


PHASE_OF: dict[EventType, Phase] = {
    EventType.SENT: Phase.SENT,
    EventType.DELIVERED: Phase.DELIVERY,
    EventType.BOUNCE_HARD: Phase.DELIVERY,
    EventType.BOUNCE_SOFT: Phase.DELIVERY,
    EventType.OPEN: Phase.OPENS,
    EventType.CLICK: Phase.CLICKS,
    EventType.UNSUBSCRIBE: Phase.OPTOUTS,
    EventType.COMPLAINT: Phase.OPTOUTS,
}

HEADER_LINE = "EventId,BroadcastId,MessageId,CommunicationKey,Email,EventType,Url,OccurredAt"
"""The first line of every response file (docs/generic-esp.md)."""
RESPONSE_HEADER = tuple(HEADER_LINE.split(","))


def response_file_name(send_id: str, seq: int, phase: str) -> str:
    """`<send_id>_<seq 3 digits>_<phase>.csv`."""
    return f"{send_id}_{seq:03d}_{phase}.csv"


class GenericResponses(ResponseFormat):
    """Comma-delimited files, every event type, an ``EventId`` per event, names made from the send."""

    phases = tuple(
        ResponsePhase(phase.value, frozenset(t for t, p in PHASE_OF.items() if p is phase)) for phase in Phase
    )

    def file_name(self, file: PendingFile) -> str:
        """`responses/<send_id>_<seq>_<phase>.csv`: unique by construction."""
        return f"{RESPONSES}/{response_file_name(file.broadcast.send_id, file.seq, file.phase.name)}"

    def write(self, out: IO[str], broadcast: Broadcast, phase: ResponsePhase, events: list[Event]) -> None:
        """The header, then one row per event."""
        b = broadcast
        out.write(csv_line(RESPONSE_HEADER))
        for e in events:
            out.write(
                csv_line(
                    (
                        f"{b.send_id}-{e.number}",
                        b.external_id,
                        b.message,
                        e.key,
                        e.email,
                        e.event_type.value,
                        e.url,
                        utc_text(e.at),
                    )
                )
            )


# Changes made on the ESP side

OPT_OUT_TYPES: dict[Via, EventType] = {
    Via.LINK: EventType.UNSUBSCRIBE,
    Via.COMPLAINT: EventType.COMPLAINT,
    Via.BOUNCE: EventType.BOUNCE_HARD,
}
"""The response event of an opt-out that belongs to a broadcast, by how it was made."""


def opt_out_file(account: Account, event: ContactEvent, send: SendRecord, kind: EventType) -> str:
    """Write the response file of an opt-out a broadcast's message led to (blocking): one row under
    the broadcast's id, in ``responses/<send_id>_c<seq>_optouts.csv``; its path."""
    record = event.record
    key = account.recipient_key(send.import_id, record.email) or ""
    path = f"{RESPONSES}/{send.send_id}_c{event.seq:06d}_{Phase.OPTOUTS.value}.csv"
    row = (
        f"c-{account.contacts.event_id(event)}",
        send.external_id,
        send.message,
        key,
        record.email,
        kind.value,
        "",
        utc_text(record.changed_at),
    )
    with atomic_writer(account.folder / path) as out:
        out.write(csv_line(RESPONSE_HEADER))
        out.write(csv_line(row))
    return path


def webhook_item(account: Account, event: ContactEvent) -> dict[str, str]:
    """One change as the contacts webhook carries it."""
    record = event.record
    return {
        "id": account.contacts.event_id(event),
        "email": record.email,
        "list": record.list,
        "state": record.state.value,
        "reason": record.reason,
        "via": record.via.value,
        "changed_at": utc_text(record.changed_at),
    }


async def on_contact_event(account: Account, event: ContactEvent) -> None:
    """Report a change made on the ESP side: an opt-out with a ``job`` in a response file of that
    broadcast, anything else by the contacts webhook (nothing without ``GENERIC_WEBHOOK_URL``)."""
    kind = OPT_OUT_TYPES.get(event.record.via)
    send = account.send_of_job(event.job) if event.job else None
    if kind is not None and send is not None and event.record.state is ContactState.UNSUBSCRIBED:
        path = await asyncio.to_thread(opt_out_file, account, event, send, kind)
        log.info("opt-out reported", extra={"account": account.name, "file": path})
        return
    call_webhook(
        account, generic_settings().generic_webhook_url, webhook_item(account, event), batch=WEBHOOK_BATCH
    )


FLAVOR = Flavor(
    name="generic",
    read_list=import_list,
    responses=GenericResponses(),
    routes=ROUTES,
    check_settings=generic_settings,
    on_contact_event=on_contact_event,
)
