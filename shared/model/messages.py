"""Message models for every topic: frozen pydantic models with JSON-only types and a schema_version.

The JSON Schema of each model (``Model.model_json_schema()``) is the published contract for
producers outside espbridge, e.g. a CRM that writes broadcast jobs.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

from shared.model.errors import InvalidMessageError

IDENTIFIER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,62}$"
"""A SQL identifier espbridge accepts: letters, digits and underscores, not starting with a digit."""

Identifier = Annotated[str, StringConstraints(pattern=IDENTIFIER_PATTERN)]
"""A column name (validated, never interpolated into SQL)."""

QualifiedName = Annotated[
    str,
    StringConstraints(pattern=r"^([A-Za-z_][A-Za-z0-9_]{0,62}\.)?[A-Za-z_][A-Za-z0-9_]{0,62}$"),
]
"""A table or view name, optionally schema-qualified: ``customers`` or ``crm.customers``."""

Name = Annotated[str, StringConstraints(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]
"""A connector or account name: lower-case letters, digits, ``_`` and ``-``."""

JobId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")]
"""A broadcast job id: safe in a file name and a Kafka key."""

OneLine = Annotated[str, StringConstraints(pattern=r"^[^\x00-\x1f\x7f\x85\u2028\u2029]*$")]
"""Free text on one line: no line breaks or other control characters (it is printed and logged)."""

Scalar = str | int | float | bool | None
"""A JSON scalar, the only value type allowed in filters and inline rows."""

EVENT_NAMESPACE = uuid.UUID("6f1c1d2e-8a0b-5c3e-9f47-2b1d0e6a9c55")
"""The uuid5 namespace of espbridge's deterministic event ids; never change it."""

MAX_INLINE_ROWS = 10_000
MAX_COLUMNS = 1600
"""The most columns a selection or field map may name: PostgreSQL's own limit for one table."""
MAX_FIELD_NAME = 200
"""The longest ESP field name a field map may map a column to."""
MAX_BROADCAST_ID = 200
"""The longest broadcast id a response event carries."""


def _utc(value: datetime) -> datetime:
    return value.astimezone(UTC)


UtcDatetime = Annotated[AwareDatetime, AfterValidator(_utc)]
"""A timezone-aware datetime, normalized to UTC; naive datetimes are refused."""


def utcnow() -> datetime:
    """The current time in UTC."""
    return datetime.now(UTC)


class Message(BaseModel):
    """Base of every message: frozen, strict about unknown fields, versioned."""

    model_config = ConfigDict(
        frozen=True,
        extra="forbid",
        ser_json_bytes="base64",
        val_json_bytes="base64",
        use_enum_values=False,
    )
    SCHEMA_VERSION: ClassVar[int] = 1

    schema_version: int = 1

    @model_validator(mode="after")
    def _known_version(self) -> Self:
        if self.schema_version != self.SCHEMA_VERSION:
            raise ValueError(
                f"{type(self).__name__} schema_version {self.schema_version} is not supported "
                f"(this build reads version {self.SCHEMA_VERSION})"
            )
        return self

    def to_json(self) -> bytes:
        """The message as compact JSON bytes, the form it has on Kafka."""
        return self.__pydantic_serializer__.to_json(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> Self:
        """Parse and validate a message from its JSON form."""
        return cls.model_validate_json(data)


M = TypeVar("M", bound=Message)


def decode(model: type[M], body: bytes) -> M:
    """Validate a raw message body against a model; bad bytes raise :class:`InvalidMessageError`."""
    try:
        return model.from_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(message)'}: {err['msg']}"
            for err in exc.errors()[:20]
        )
        raise InvalidMessageError(f"not a valid {model.__name__}: {problems}") from None


# --- broadcast jobs -----------------------------------------------------------------------------


class TableSelection(BaseModel):
    """Recipients read from a table or view of the CRM database."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["table"] = "table"
    table: QualifiedName
    columns: tuple[Identifier, ...] = Field(min_length=1, max_length=MAX_COLUMNS)
    filters: dict[Identifier, Scalar] = Field(default_factory=dict, max_length=MAX_COLUMNS)


class CsvSelection(BaseModel):
    """Recipients read from a CSV file (UTF-8, header row) that the uploader can open."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["csv"] = "csv"
    path: str = Field(min_length=1)
    delimiter: str = Field(default=",", min_length=1, max_length=1)


class InlineSelection(BaseModel):
    """A short list of recipients carried in the job itself."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["inline"] = "inline"
    rows: tuple[dict[Identifier, Scalar], ...] = Field(min_length=1, max_length=MAX_INLINE_ROWS)


Selection = Annotated[TableSelection | CsvSelection | InlineSelection, Field(discriminator="kind")]


FieldName = Annotated[OneLine, StringConstraints(min_length=1, max_length=MAX_FIELD_NAME)]
"""An ESP field a column is mapped to: the list file's header cell, on one line."""


class SendMode(StrEnum):
    """Whether the monitor triggers the send after the import."""

    UPLOAD_AND_SEND = "upload_and_send"
    """Upload the list, wait for the import, then send (now or at ``send_at``)."""
    UPLOAD_ONLY = "upload_only"
    """Upload the list and wait for the import; the send is started on the ESP side."""


class BroadcastJob(Message):
    """One broadcast: which recipients, to which ESP account, with which pre-created message."""

    job_id: JobId
    esp: Name
    account: Name
    list_name: OneLine = Field(min_length=1, max_length=200)
    message: OneLine = Field(min_length=1, max_length=200)
    selection: Selection
    field_map: dict[Identifier, FieldName] = Field(min_length=1, max_length=MAX_COLUMNS)
    communication_key: Identifier
    mode: SendMode = SendMode.UPLOAD_AND_SEND
    send_at: UtcDatetime | None = None
    requested_by: OneLine = Field(min_length=1, max_length=200)
    created_at: UtcDatetime

    @model_validator(mode="after")
    def _coherent(self) -> Self:
        if self.mode is SendMode.UPLOAD_ONLY and self.send_at is not None:
            raise ValueError("send_at makes no sense for an upload_only job")
        if isinstance(self.selection, TableSelection):
            cols = set(self.selection.columns)
            missing = [c for c in (*self.field_map, self.communication_key) if c not in cols]
            if missing:
                raise ValueError(f"columns used but not selected: {', '.join(sorted(set(missing)))}")
        targets = list(self.field_map.values())
        if len(set(targets)) != len(targets):
            raise ValueError("field_map maps two columns to the same ESP field")
        return self


class ListUploaded(Message):
    """A recipient list is complete on the ESP's SFTP site."""

    job_id: JobId
    esp: Name
    account: Name
    remote_path: str
    rows: int = Field(ge=0)
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    excluded: int = Field(ge=0, description="rows left out as opted out or suppressed")
    uploaded_at: UtcDatetime


class Stage(StrEnum):
    """The stages of a broadcast's life."""

    UPLOAD = "upload"
    """Selecting recipients and putting the list file on the ESP's SFTP site."""
    IMPORT = "import"
    """The ESP importing the list."""
    SEND = "send"
    """The ESP sending the message to the list."""
    GATHER = "gather"
    """Fetching response data from the ESP."""
    LOAD = "load"
    """Loading response events into the response database."""


class State(StrEnum):
    """The state of one stage."""

    QUEUED = "queued"
    """Accepted, not started."""
    RUNNING = "running"
    """In progress."""
    DONE = "done"
    """Finished successfully."""
    FAILED = "failed"
    """Stopped with an error (see ``detail``)."""
    CANCELLED = "cancelled"
    """Stopped on request."""


class BroadcastStatus(Message):
    """What one service did with one broadcast, for dashboards and the CLI."""

    job_id: JobId
    stage: Stage
    state: State
    counts: dict[str, int] = Field(default_factory=dict)
    detail: str = ""
    service: str = ""
    at: UtcDatetime = Field(default_factory=utcnow)


class CancelRequest(Message):
    """A request to cancel a broadcast: nothing is sent if it comes before the send, else the ESP's
    cancel is called where the ESP has one (the outcome is reported on broadcast.status.v1)."""

    job_id: JobId
    reason: OneLine = Field(default="", max_length=500)
    requested_at: UtcDatetime
    requested_by: OneLine = Field(default="", max_length=200)


# --- responses ----------------------------------------------------------------------------------


class ResponseFile(Message):
    """One remote response file that a gatherer worker should fetch and parse."""

    esp: Name
    account: Name
    path: str = Field(min_length=1, max_length=1024)
    size: int = Field(ge=0)
    mtime: UtcDatetime
    found_at: UtcDatetime = Field(default_factory=utcnow)


class EventType(StrEnum):
    """Normalized response event types."""

    SENT = "sent"
    """The ESP sent the message to the recipient."""
    DELIVERED = "delivered"
    """The receiving server accepted the message."""
    BOUNCE_HARD = "bounce_hard"
    """Permanent delivery failure."""
    BOUNCE_SOFT = "bounce_soft"
    """Temporary delivery failure."""
    OPEN = "open"
    """The recipient opened the message."""
    CLICK = "click"
    """The recipient clicked a link (``url``)."""
    UNSUBSCRIBE = "unsubscribe"
    """The recipient unsubscribed."""
    COMPLAINT = "complaint"
    """The recipient reported the message as spam."""
    SUBSCRIBE = "subscribe"
    """The recipient subscribed or re-subscribed."""


class EventSource(BaseModel):
    """Where an event or a rejected payload came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["file", "api", "webhook", "topic"]
    name: str = Field(description="file path, API endpoint, webhook route or topic name")
    line: int | None = Field(default=None, ge=1, description="line in the file")
    page: int | None = Field(default=None, ge=0, description="page of the API pull")
    partition: int | None = Field(default=None, ge=0)
    offset: int | None = Field(default=None, ge=0)


def event_id_for(
    esp: str,
    *,
    esp_event_id: str | None = None,
    broadcast_id: str = "",
    recipient: str = "",
    event_type: str = "",
    occurred_at: datetime | None = None,
    url: str | None = None,
) -> uuid.UUID:
    """The deterministic event id: uuid5 over the ESP's own event id, else over the event's facts.

    The same event read twice (from a re-processed file or an overlapping API window) gets the
    same id, so the loader's ``ON CONFLICT (event_id) DO NOTHING`` absorbs the duplicate.
    """
    if esp_event_id:
        return uuid.uuid5(EVENT_NAMESPACE, f"{esp}\x1f{esp_event_id}")
    when = occurred_at.astimezone(UTC).isoformat() if occurred_at else ""
    facts = "\x1f".join((esp, broadcast_id, recipient, event_type, when, url or ""))
    return uuid.uuid5(EVENT_NAMESPACE, facts)


class ResponseEvent(Message):
    """One normalized response of one recipient to one broadcast."""

    event_id: uuid.UUID
    esp: Name
    account: Name
    broadcast_id: str = Field(min_length=1, max_length=MAX_BROADCAST_ID)
    esp_message_id: str | None = None
    communication_key: str | None = None
    email: str | None = None
    type: EventType
    url: str | None = None
    occurred_at: UtcDatetime
    source: EventSource
    extra: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_recipient(self) -> Self:
        if not self.communication_key and not self.email:
            raise ValueError("a response event needs a communication_key or an email")
        return self


EMAIL_PATTERN = r"^[^@\s\x00-\x1f\x7f]{1,64}@[^@\s\x00-\x1f\x7f]{1,255}\.[^@\s\x00-\x1f\x7f.]{1,63}$"
"""An address espbridge takes for a contact: one ``@``, a dotted domain, no spaces or control
characters (what every ESP refuses without it)."""


_EMAIL = re.compile(EMAIL_PATTERN)


def _email(value: str) -> str:
    address = value.strip().lower()
    if not 6 <= len(address) <= 320 or not _EMAIL.match(address):
        raise ValueError(
            f"{value[:100]!r} is not an email address "
            "(one @, a dotted domain, no spaces or control characters)"
        )
    return address


Email = Annotated[
    str,
    AfterValidator(_email),
    WithJsonSchema({"type": "string", "minLength": 6, "maxLength": 320, "pattern": EMAIL_PATTERN}),
]
"""A contact's email address, lower-cased: the key of a contact in the CRM's subscription state."""

ListId = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{0,100}$")]
"""An ESP list as the ESP names it (an id or a name); ``""`` in a message: the account's
broadcast list (its ``subscriptions.broadcast_list``)."""


class SubscriptionState(StrEnum):
    """Where a contact stands on one list of one ESP account."""

    PENDING = "pending"
    """Subscribed, waiting for the contact to confirm (double opt-in); not mailed."""
    SUBSCRIBED = "subscribed"
    """Subscribed (and confirmed, where the list asks for it)."""
    UNSUBSCRIBED = "unsubscribed"
    """Opted out (an unsubscribe, a complaint, a hard bounce as the account's policy says)."""
    REMOVED = "removed"
    """Deleted from the list at the ESP."""


class SubscriptionChange(Message):
    """A contact's subscription state as an ESP reported it (a webhook, an API, a response file),
    or a follow-on of one: written to the CRM by the syncer (``subscriptions.changes.v1``)."""

    change_id: uuid.UUID = Field(
        description="the same change read twice (a webhook and a response file) has the same id; applied once"
    )
    email: Email
    esp: Name
    account: Name
    list: ListId = ""
    state: SubscriptionState
    reason: OneLine = Field(default="", max_length=200, description="unsubscribe, complaint, bounce_hard, …")
    occurred_at: UtcDatetime = Field(description="when the contact's state changed at the ESP")


class RequestOrigin(StrEnum):
    """Where a subscription request comes from."""

    PRODUCER = "producer"
    """Any producer (a CRM, the CLI) on the requests topic: the syncer writes it to the CRM first."""
    CAPTURE = "capture"
    """A change the CRM made to its subscriptions table, captured by Debezium: already in the CRM."""
    FOLLOW_ON = "follow_on"
    """A post-operation of another change (``unsubscribe_scope``): already in the CRM."""


class SubscriptionRequest(Message):
    """A change to push to one ESP account: a subscription state, contact data, or both
    (``subscriptions.requests.v1``, keyed by email: one contact's requests stay in order)."""

    request_id: uuid.UUID = Field(description="the same request published twice is pushed once")
    email: Email
    esp: Name
    account: Name
    list: ListId = ""
    state: SubscriptionState | None = Field(
        default=None, description="the state wanted at the ESP; none: only update the contact's fields"
    )
    fields: dict[FieldName, OneLine] = Field(default_factory=dict, max_length=MAX_COLUMNS)
    reason: OneLine = Field(default="", max_length=200)
    origin: RequestOrigin = RequestOrigin.PRODUCER
    source: OneLine = Field(
        default="crm",
        min_length=1,
        max_length=200,
        description="who made the change first: 'crm', or the 'esp/account' of a follow-on's origin",
    )
    requested_at: UtcDatetime = Field(description="when the change was made; a later one wins")

    @model_validator(mode="after")
    def _does_something(self) -> Self:
        if self.state is None and not self.fields:
            raise ValueError("a subscription request needs a state, fields, or both")
        return self


class CapturedChange(Message):
    """A row change of the CRM's ``crm.subscriptions`` as Debezium's PostgreSQL connector publishes
    it from the Kafka Connect worker (its JSON envelope with schemas off); espbridge only reads it."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    before: dict[str, Any] | None = None
    after: dict[str, Any] | None = None
    op: Literal["c", "u", "d", "r", "t", "m"] = Field(
        description="create, update, delete, snapshot read, truncate, message"
    )
    source: dict[str, Any] = Field(default_factory=dict, description="lsn, txId, ts_ms, table, …")


class DeadLetter(Message):
    """Input espbridge could not accept: the original bytes, where they came from, and why."""

    source: EventSource
    payload: bytes
    error_class: str
    message: str
    service: str = ""
    at: UtcDatetime = Field(default_factory=utcnow)
    context: dict[str, str] = Field(
        default_factory=dict,
        description="what a replay needs to read the payload again: esp and account, and for a "
        "response file's rows its header line (see shared/model/deadletters.py); empty when "
        "nothing is needed",
    )


def dumps(obj: Any) -> bytes:
    """Compact JSON for non-model payloads (orjson: datetimes and UUIDs included)."""
    return orjson.dumps(obj)
