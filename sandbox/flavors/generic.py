"""The ``generic`` flavor: the generic ESP protocol of docs/generic-esp.md (the default).

REST API for imports and sends (the client triggers both, and may cancel a send before its messages
go out), comma-delimited list files
``drop/<job_id>.csv``, and response files ``<send_id>_<seq>_<phase>.csv`` with an ``EventId``.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from pathlib import PurePosixPath
from typing import IO

from aiohttp import web
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from sandbox.api import account_of, read_body
from sandbox.errors import EspError, json_response, not_found
from sandbox.files import csv_line
from sandbox.flavors.base import Flavor
from sandbox.listfile import import_list
from sandbox.protocol import API_PREFIX, DROP, EXTERNAL_ID_RE, RESPONSES, EventType, SendState, utc_text
from sandbox.responses import Broadcast, PendingFile, ResponseFormat, ResponsePhase
from sandbox.simulate import Event
from sandbox.state import ImportRecord, SendRecord

# REST API


class ImportRequest(BaseModel):
    """The body of ``POST /imports``."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    file: str = Field(min_length=1)
    list_name: str | None = None
    external_id: str = Field(pattern=EXTERNAL_ID_RE.pattern)


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
    record, created = await account.create_import(file, body.list_name, body.external_id)
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


_BASE = API_PREFIX + "/{account}"

ROUTES = (
    web.post(f"{_BASE}/imports", create_import),
    web.get(f"{_BASE}/imports/{{import_id}}", get_import),
    web.post(f"{_BASE}/sends", create_send),
    web.get(f"{_BASE}/sends", list_sends),
    web.get(f"{_BASE}/sends/{{send_id}}", get_send),
    web.post(f"{_BASE}/sends/{{send_id}}/cancel", cancel_send),
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


FLAVOR = Flavor(name="generic", read_list=import_list, responses=GenericResponses(), routes=ROUTES)
