"""Response events in their wire form, without a pydantic model per event (the hot paths).

The gatherer turns millions of file rows into ResponseEvent JSON and the loader reads them back;
a model per event costs more than the rest of the path together. So both sides work on the JSON
itself, with the same wire format (the ResponseEvent JSON Schema, unchanged):

* :class:`FileEventWriter` writes the JSON of a response file's events from a row's texts, byte for
  byte what ``ResponseEvent(...).to_json()`` writes; :func:`encode` does it for a model (other
  connectors, webhooks, API pulls).
* :func:`read_fast` reads a ResponseEvent JSON that has exactly the shape espbridge writes and
  checks every rule of the model; anything else (another producer's spelling, a bad message)
  returns None and goes through the model (``ResponseEvent.from_json``), so what is accepted and
  rejected is the model's call, never this shortcut's.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import orjson

from shared.model.messages import EVENT_NAMESPACE, MAX_BROADCAST_ID, EventSource, EventType, ResponseEvent

_NAMESPACE_SHA1 = hashlib.sha1(EVENT_NAMESPACE.bytes, usedforsecurity=False)


# The RFC 4122 variant's hex digit for each hex digit of the hash at its place (10xx in binary).
_VARIANT: Final = {f"{n:x}": f"{(n & 0x3) | 0x8:x}" for n in range(16)}


def event_id_text(esp: str, esp_event_id: str) -> str:
    """``str(event_id_for(esp, esp_event_id=…))`` without the uuid module's objects (a uuid5)."""
    return _uuid5(f"{esp}\x1f{esp_event_id}")


def _uuid5(name: str) -> str:
    digest = _NAMESPACE_SHA1.copy()
    digest.update(name.encode())
    h = digest.hexdigest()
    # Version 5 in the 13th digit, the variant in the 17th.
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


def event_key(broadcast_id: str, communication_key: str | None, email: str | None) -> str:
    """The Kafka key of a response event: its broadcast and recipient (one partition per recipient)."""
    return f"{broadcast_id}/{communication_key or email}"


@dataclass(slots=True)  # not frozen: one is made per event, and a frozen one costs 4x to make
class EncodedEvent:
    """A response event ready to publish: its JSON, its Kafka key, and what the gatherer counts."""

    body: bytes
    key: bytes
    broadcast_id: str
    line: int | None
    """The line of the response file it came from (None for API pages and webhooks)."""


_JSON_SPECIAL: Final = re.compile(r'["\\\x00-\x1f]')
"""Characters a JSON string must escape (orjson escapes nothing else)."""


def json_plain(text: str) -> bool:
    """Whether ``text`` (valid Unicode) is written into a JSON string as it is."""
    return _JSON_SPECIAL.search(text) is None


def _quoted(value: str | None) -> str:
    return "null" if value is None else f'"{value}"'


class FileEventWriter:
    """The JSON of the events of one response file: the parts that are the same for every row
    (ESP, account, file name) are written once, and a row's values are put in as they are, or
    escaped as orjson escapes them where :func:`json_plain` refuses one.

    Writes the same bytes as the model's ``to_json`` (a unit test holds them equal).
    """

    __slots__ = ("_esp_id_prefix", "_head", "_tail")

    def __init__(self, esp: str, account: str, name: str) -> None:
        def text(value: str) -> str:
            return orjson.dumps(value).decode()

        self._head = f'","esp":{text(esp)},"account":{text(account)},"broadcast_id":"'
        self._tail = f'","source":{{"kind":"file","name":{text(name)},"line":'
        self._esp_id_prefix = f"{esp}\x1f{account}:"

    def event_id(self, esp_event_id: str) -> str:
        """The event id of the ESP's event id in this file's account (see :func:`event_id_text`)."""
        return _uuid5(f"{self._esp_id_prefix}{esp_event_id}")

    def json(
        self,
        event_id: str,
        broadcast_id: str,
        esp_message_id: str | None,
        communication_key: str | None,
        email: str | None,
        event_type: str,
        url: str | None,
        occurred_at: str,
        line: int,
        plain: bool = True,
    ) -> bytes:
        """The event's JSON; ``occurred_at`` as orjson writes a UTC time (see :func:`utc_text`).
        ``plain`` says that every value is one :func:`json_plain` accepts (the fast path); with
        False the values are escaped first."""
        if not plain:
            event_id, broadcast_id, event_type = (_escaped(v) for v in (event_id, broadcast_id, event_type))
            esp_message_id, communication_key, email, url = (
                None if v is None else _escaped(v) for v in (esp_message_id, communication_key, email, url)
            )
        return (
            f'{{"schema_version":1,"event_id":"{event_id}{self._head}{broadcast_id}",'
            f'"esp_message_id":{_quoted(esp_message_id)},"communication_key":{_quoted(communication_key)},'
            f'"email":{_quoted(email)},"type":"{event_type}","url":{_quoted(url)},'
            f'"occurred_at":"{occurred_at}{self._tail}{line},"page":null,"partition":null,"offset":null}},'
            '"extra":{}}'
        ).encode()


def _escaped(value: str) -> str:
    """``value`` as it stands inside a JSON string that orjson writes."""
    return orjson.dumps(value).decode()[1:-1]


def utc_text(when: datetime) -> str:
    """A UTC time as a ResponseEvent's JSON holds it (``2026-11-22T09:00:00Z``, microseconds if any)."""
    return orjson.dumps(when, option=orjson.OPT_UTC_Z)[1:-1].decode()


def encode(event: ResponseEvent) -> EncodedEvent:
    """A model's wire form (the path of connectors without a fast parser)."""
    return EncodedEvent(
        event.to_json(),
        event_key(event.broadcast_id, event.communication_key, event.email).encode(),
        event.broadcast_id,
        event.source.line,
    )


# --- reading ------------------------------------------------------------------------------------

_FIELD_COUNT: Final = len(ResponseEvent.model_fields)
_SOURCE_COUNT: Final = len(EventSource.model_fields)
_KINDS: Final = frozenset(("file", "api", "webhook", "topic"))
_TYPES: Final = frozenset(t.value for t in EventType)
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_UTC_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?(Z|\+00:00)")


@dataclass(frozen=True, slots=True)
class EventFields:
    """The values of a ResponseEvent as read from its JSON (text, as the database takes them)."""

    event_id: str
    esp: str
    account: str
    broadcast_id: str
    esp_message_id: str | None
    communication_key: str | None
    email: str | None
    type: str
    url: str | None
    occurred_at: str
    """ISO 8601 in UTC."""
    source: str
    """The origin as one string, e.g. ``file:sandbox/demo/responses/x.csv:12``."""
    extra: str | None
    """The ESP's extra fields as JSON, None if there are none."""


def source_text(kind: str, name: str, line: int | None, page: int | None) -> str:
    """An event's origin as one readable string: ``kind:name:line`` or ``kind:name#page=n``."""
    if line is not None:
        return f"{kind}:{name}:{line}"
    if page is not None:
        return f"{kind}:{name}#page={page}"
    return f"{kind}:{name}"


def fields_of(event: ResponseEvent) -> EventFields:
    """A validated model's values in the form :func:`read_fast` gives."""
    src = event.source
    return EventFields(
        str(event.event_id),
        event.esp,
        event.account,
        event.broadcast_id,
        event.esp_message_id,
        event.communication_key,
        event.email,
        event.type.value,
        event.url,
        event.occurred_at.isoformat(),
        source_text(src.kind, src.name, src.line, src.page),
        orjson.dumps(event.extra).decode() if event.extra else None,
    )


def read_fast(body: bytes) -> EventFields | None:
    """The values of a ResponseEvent JSON of espbridge's own shape, or None to ask the model.

    Accepts only what :class:`~shared.model.messages.ResponseEvent` accepts (every field present, JSON
    types as the model writes them, a lower-case uuid, a UTC time); None is no verdict.
    """
    try:
        d = orjson.loads(body)
        # As many keys as the model has fields, and each of them: exactly the model's fields.
        if type(d) is not dict or len(d) != _FIELD_COUNT:
            return None
        version, event_id, esp, account = d["schema_version"], d["event_id"], d["esp"], d["account"]
        broadcast_id = d["broadcast_id"]
        message_id, key, email, url = d["esp_message_id"], d["communication_key"], d["email"], d["url"]
        kind, occurred, extra, source = d["type"], d["occurred_at"], d["extra"], d["source"]
        if type(source) is not dict or len(source) != _SOURCE_COUNT:
            return None
        src_kind, name, line, page = source["kind"], source["name"], source["line"], source["page"]
        partition, offset = source["partition"], source["offset"]
    except (orjson.JSONDecodeError, KeyError):
        return None
    if (
        type(version) is not int
        or version != 1
        or type(event_id) is not str
        or type(broadcast_id) is not str
        or not 1 <= len(broadcast_id) <= MAX_BROADCAST_ID
        or type(esp) is not str
        or not (esp in _names or _name(esp))
        or type(account) is not str
        or not (account in _names or _name(account))
        or (message_id is not None and type(message_id) is not str)
        or (key is not None and type(key) is not str)
        or (email is not None and type(email) is not str)
        or (url is not None and type(url) is not str)
        or not (key or email)
        or type(kind) is not str
        or kind not in _TYPES
        or type(occurred) is not str
        or type(extra) is not dict
        or not _UUID.fullmatch(event_id)
        or not _UTC_TIME.fullmatch(occurred)
        or type(src_kind) is not str
        or src_kind not in _KINDS
        or type(name) is not str
        or (line is not None and (type(line) is not int or line < 1))
        or (page is not None and (type(page) is not int or page < 0))
        or (partition is not None and (type(partition) is not int or partition < 0))
        or (offset is not None and (type(offset) is not int or offset < 0))
        or not _valid_time(occurred)
    ):
        return None
    if extra:
        for value in extra.values():
            if type(value) is not str:
                return None
    return EventFields(
        event_id,
        esp,
        account,
        broadcast_id,
        message_id,
        key,
        email,
        kind,
        url,
        occurred,
        source_text(src_kind, name, line, page),
        orjson.dumps(extra).decode() if extra else None,
    )


_names: set[str] = set()
"""ESP and account names seen valid (a handful per deployment; bounded by :data:`_MAX_NAMES`)."""
_MAX_NAMES: Final = 1000


def _name(value: str) -> bool:
    if not _NAME.fullmatch(value):
        return False
    if len(_names) < _MAX_NAMES:
        _names.add(value)
    return True


def _valid_time(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True
