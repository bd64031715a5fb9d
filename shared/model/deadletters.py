"""Dead letters: built by one constructor per source kind, and as an operator sees them (ids,
filters, replay states, what can be replayed and how).

The rules only; reading the topic, the replay ledger and replaying are in
:mod:`shared.operations.replay`, the commands and their output in :mod:`cli.dlq`.

* A dead letter's id is its own place on the dead-letter topic, ``<partition>:<offset>``.
* A Kafka message (kind ``topic``) is replayed by publishing its original bytes again to its
  original topic, keyed as the topic registry says, once they are a valid message of that topic.
* A response file's bad row (kind ``file``) is replayed by parsing it again under the file's header
  line with the connector as configured now; it needs the context the gatherer records.
* Webhook calls and API items are not replayed: a failed authentication never is, and the other
  cases need what is not kept (the call's signature, the API page's context) — the ESP resends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Protocol

import orjson

from shared.model.errors import InvalidMessageError
from shared.model.messages import DeadLetter, EventSource, ResponseEvent
from shared.model.topics import Topic

KINDS = ("file", "api", "webhook", "topic")
STATES = ("new", "replayed", "failing", "not-replayable")
AUTH_ERRORS = frozenset({"WebhookAuthError"})
LEFT_IN_PLACE = frozenset({"UnreadableFileName", "HiddenResponseFile"})
"""Errors of response files that were never read, only reported: nothing of them to replay."""


class ConsumedRecord(Protocol):
    """A record read from a Kafka topic, as the dead letter of a ``topic`` source needs it."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def value(self) -> bytes | None: ...


def record_letter(
    record: ConsumedRecord, error: Exception, service: str, *, max_message: int | None = None
) -> DeadLetter:
    """The dead letter of a consumed Kafka record: its original bytes and its place on its topic,
    what a replay publishes again; the error's text cut to ``max_message`` characters if given."""
    text = str(error)
    return DeadLetter(
        source=EventSource(kind="topic", name=record.topic, partition=record.partition, offset=record.offset),
        payload=bytes(record.value or b""),
        error_class=type(error).__name__,
        message=text if max_message is None else text[:max_message],
        service=service,
    )


def file_row_letter(
    esp: str,
    account: str,
    path: str,
    line: int,
    payload: bytes,
    reason: str,
    service: str,
    *,
    header: str | None,
) -> DeadLetter:
    """The dead letter of a bad row of a response file. A replay parses ``payload`` again under the
    file's ``header`` line with the account's connector; without a header it is not replayable."""
    context = {"esp": esp, "account": account}
    if header is not None:
        context["header"] = header
    return DeadLetter(
        source=EventSource(kind="file", name=path, line=line),
        payload=payload,
        error_class="BadResponseRow",
        message=reason,
        service=service,
        context=context,
    )


def file_name_letter(where: str, raw_name: bytes, service: str) -> DeadLetter:
    """The dead letter of a response file whose name is not UTF-8 (``where`` shows it escaped;
    the payload is the name's bytes): the file is left on the ESP's site."""
    return DeadLetter(
        source=EventSource(kind="file", name=where),
        payload=raw_name,
        error_class="UnreadableFileName",
        message=(
            "the response file's name is not UTF-8, so espbridge cannot record or gather it; "
            "it is left in place: rename it on the ESP's site and it is gathered at the next scan"
        ),
        service=service,
    )


def hidden_file_letter(esp: str, account: str, path: str, grace_s: float, service: str) -> DeadLetter:
    """The dead letter of a hidden response file (a name starting with ``.`` or ending in
    ``.partial``) unchanged for longer than uploads in progress take: the file is left on the
    ESP's site, unread (payload: its name's bytes)."""
    return DeadLetter(
        source=EventSource(kind="file", name=path),
        payload=path.rsplit("/", 1)[-1].encode("utf-8"),
        error_class="HiddenResponseFile",
        message=(
            f"the response file's name says it is not ready (a leading '.' or a .partial ending), "
            f"yet it has not changed for over {grace_s:g} s; espbridge does not read it and leaves "
            "it in place: if it holds responses, rename it on the ESP's site and it is gathered at "
            "the next scan"
        ),
        service=service,
        context={"esp": esp, "account": account},
    )


def webhook_letter(
    esp: str,
    account: str,
    payload: bytes,
    error_class: str,
    reason: str,
    service: str,
    *,
    line: int | None = None,
    authenticated: bool = True,
) -> DeadLetter:
    """The dead letter of a webhook call to ``esp``/``account`` (or of its item at ``line``).

    A call that failed authentication keeps only its body's size: the body may carry a
    credential, and such a letter is never replayed.
    """
    context = {} if authenticated else {"body_bytes": str(len(payload))}
    return DeadLetter(
        source=EventSource(kind="webhook", name=f"webhook:{esp}/{account}", line=line),
        payload=payload if authenticated else b"",
        error_class=error_class,
        message=reason,
        service=service,
        context=context,
    )


def api_item_letter(
    esp: str, account: str, broadcast: str, page: int, payload: bytes, reason: str, service: str
) -> DeadLetter:
    """The dead letter of an item of a response API's page that could not become an event."""
    return DeadLetter(
        source=EventSource(kind="api", name=f"{esp}/{account}", page=page),
        payload=payload,
        error_class="BadResponseItem",
        message=reason,
        service=service,
        context={"esp": esp, "account": account, "broadcast": broadcast},
    )


def subscription_letter(
    record: ConsumedRecord, esp: str, account: str, list_id: str, reason: str, service: str
) -> DeadLetter:
    """The dead letter of a subscription request the ESP refused (a bad or blocked address): the
    request's bytes and its place on its topic, with the ESP's reason. A replay publishes it to its
    topic again, and the request is pushed again (a refused push is not recorded as taken)."""
    return DeadLetter(
        source=EventSource(kind="topic", name=record.topic, partition=record.partition, offset=record.offset),
        payload=bytes(record.value or b""),
        error_class="ContactRefused",
        message=reason,
        service=service,
        context={"esp": esp, "account": account, "list": list_id},
    )


@dataclass(frozen=True, slots=True)
class Letter:
    """A dead letter and its place on the dead-letter topic."""

    partition: int
    offset: int
    letter: DeadLetter
    fingerprint: str
    """sha256 of the record's bytes: tells a recreated topic's reused offsets from this letter."""

    @property
    def id(self) -> str:
        """The operator's name for it: ``<partition>:<offset>``."""
        return f"{self.partition}:{self.offset}"


@dataclass(frozen=True, slots=True)
class Replay:
    """What the replay ledger knows about a dead letter."""

    state: str
    """``replayed`` or ``failing``."""
    detail: str
    events: int
    replayed_to: str | None
    attempts: int
    last_at: datetime
    replayed_at: datetime | None


@dataclass(frozen=True, slots=True)
class Filters:
    """Which dead letters a command is about (every given filter must match)."""

    service: str | None = None
    kind: str | None = None
    broadcast: str | None = None
    since: datetime | None = None
    state: str | None = None
    ids: tuple[str, ...] = field(default_factory=tuple)

    @property
    def any(self) -> bool:
        """Whether any filter narrows the selection."""
        return any((self.service, self.kind, self.broadcast, self.since, self.state, self.ids))


def parse_id(text: str) -> str:
    """A dead letter id as given on the command line, normalized (``"0:17"``)."""
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", text)
    if not match:
        raise InvalidMessageError(f"a dead letter id is PARTITION:OFFSET, like 0:17, not {text!r}")
    return f"{int(match.group(1))}:{int(match.group(2))}"


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_since(text: str, now: datetime) -> datetime:
    """``--since``: a duration back from now (``30m``, ``2h``, ``7d``) or an ISO 8601 time (UTC if
    it has no zone)."""
    match = _DURATION.match(text.strip())
    if match:
        return now - timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidMessageError(
            f"--since wants a duration like 2h or 7d, or an ISO 8601 time, not {text!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def broadcast_of(letter: DeadLetter) -> str | None:
    """The broadcast a dead letter belongs to, where it is known."""
    if letter.context.get("broadcast"):
        return letter.context["broadcast"]
    if letter.source.kind == "topic":
        try:
            doc = orjson.loads(letter.payload)
        except orjson.JSONDecodeError:
            return None
        if isinstance(doc, dict):
            for key in ("job_id", "broadcast_id"):
                if isinstance(doc.get(key), str):
                    return str(doc[key])
    return None


def origin_topic(letter: DeadLetter, prefix: str) -> Topic | None:
    """The registry topic a ``topic`` dead letter came from, under this deployment's prefix."""
    name = letter.source.name
    if letter.source.kind != "topic" or not name.startswith(prefix):
        return None
    try:
        return Topic(name[len(prefix) :])
    except ValueError:
        return None


def not_replayable(letter: DeadLetter, prefix: str) -> str | None:
    """Why a dead letter cannot be replayed, or None if it can be."""
    kind = letter.source.kind
    if kind == "webhook":
        if letter.error_class in AUTH_ERRORS:
            return (
                "the webhook call failed authentication; an unauthenticated call is never "
                "replayed into the pipeline"
            )
        return "webhook calls are not replayed (their signature is not kept); the ESP must send them again"
    if kind == "api":
        return "API items are not replayed; the ESP's API is pulled again from a reset cursor"
    if kind == "topic":
        topic = origin_topic(letter, prefix)
        if topic is None:
            return f"{letter.source.name} is not a topic of this deployment (prefix {prefix!r})"
        if topic is Topic.DEADLETTER:
            return "dead letters of the dead-letter topic are not replayed"
        return None
    if letter.error_class in LEFT_IN_PLACE:
        return "the file was left unread on the ESP's site: rename it there and the next scan gathers it"
    if not letter.context.get("esp") or not letter.context.get("account"):
        return "the dead letter does not say which ESP account read the file (written by an older version)"
    if "header" not in letter.context:
        return "the row's original bytes or the file's header were not kept; gather the file again"
    return None


def replay_file(letter: DeadLetter) -> bytes:
    """The response file a ``file`` dead letter is parsed from again: the header line, then the
    row's original bytes (a dead letter of line 1 holds the whole file already)."""
    if letter.source.line == 1:
        return letter.payload
    header = letter.context["header"].encode("utf-8")
    if not header.endswith((b"\n", b"\r")):
        header += b"\n"
    return header + letter.payload


def original_line(letter: DeadLetter, parsed: int) -> int:
    """The line in the original file of a line of :func:`replay_file`."""
    first = letter.source.line or 1
    return parsed if first == 1 else first + parsed - 2


def at_original_line(event: ResponseEvent, letter: DeadLetter) -> ResponseEvent:
    """An event parsed from :func:`replay_file`, with the place it has in the original file."""
    line = original_line(letter, event.source.line or 2)
    source = EventSource(kind="file", name=letter.source.name, line=line)
    return event.model_copy(update={"source": source})


def state_of(letter: Letter, replay: Replay | None, prefix: str) -> str:
    """``new``, ``replayed``, ``failing`` or ``not-replayable``."""
    if replay is not None:
        return replay.state
    return "not-replayable" if not_replayable(letter.letter, prefix) else "new"


def state_text(letter: Letter, replay: Replay | None, prefix: str, replay_of: str | None = None) -> str:
    """The replay state as the list shows it."""
    state = state_of(letter, replay, prefix)
    if replay is not None and state == "replayed":
        when = replay.replayed_at or replay.last_at
        text = f"replayed {when.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
        if replay.replayed_to:
            text += f" to {replay.replayed_to}"
        elif replay.events:
            text += f" ({plural(replay.events, 'event')})"
        return text
    if replay is not None:
        last = f"{replay.last_at.astimezone(UTC):%Y-%m-%d %H:%M:%S}"
        return f"still failing ({plural(replay.attempts, 'replay')}, last {last})"
    if replay_of is not None:
        return f"{state} (replay of {replay_of} failed again)"
    return state


def matches(letter: Letter, filters: Filters, state: str) -> bool:
    """Whether a dead letter passes the filters."""
    dl = letter.letter
    return (
        (not filters.ids or letter.id in filters.ids)
        and (filters.service is None or dl.service == filters.service)
        and (filters.kind is None or dl.source.kind == filters.kind)
        and (filters.broadcast is None or broadcast_of(dl) == filters.broadcast)
        and (filters.since is None or dl.at >= filters.since)
        and (filters.state is None or state == filters.state)
    )


def plural(n: int, noun: str) -> str:
    """``1 event``, ``3 events``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"
