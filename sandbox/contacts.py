"""An account's contact book: who is on which of its lists, in which state, shared by every flavor.

A record per (list, email) holds the contact's state (``pending``, ``subscribed``,
``unsubscribed``, ``removed``), why and how it got there (``via``), when, and the contact's fields.
Every change is an event with a sequence number, appended as one JSON line to
``<account>/.sandbox-contacts.jsonl`` before :meth:`ContactBook.set` returns; a restarted sandbox
replays the log. The log's first line names the book (a random id made with it), so the ids of its
events (:meth:`ContactBook.event_id`) are never those of another book, e.g. an account set up
anew. At the start a log holding many superseded changes is compacted to the latest event per
contact (sequence numbers kept), so it never grows without bound.

The book is thread-safe: list imports run in worker threads and add their recipients in one batch
(:meth:`ContactBook.set_many`, one write and one flush for the whole list).
"""

from __future__ import annotations

import bisect
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any

import orjson

from sandbox.files import atomic_write_bytes

log = logging.getLogger(__name__)

CONTACTS_FILE = ".sandbox-contacts.jsonl"

__all__ = [
    "CONTACTS_FILE",
    "ContactBook",
    "ContactChange",
    "ContactEvent",
    "ContactRecord",
    "ContactState",
    "Via",
    "valid_email",
]


class ContactState(StrEnum):
    """A contact's state on one list (the same four words as espbridge's)."""

    PENDING = "pending"
    """Subscribed with double opt-in, not confirmed yet: not mailed."""
    SUBSCRIBED = "subscribed"
    UNSUBSCRIBED = "unsubscribed"
    REMOVED = "removed"
    """Taken off the list (deleted), as opposed to opted out."""


class Via(StrEnum):
    """How a change was made: by an API caller, through a message's link, a complaint, a contacts
    or list file, a double opt-in confirmation, or a hard bounce."""

    API = "api"
    LINK = "link"
    COMPLAINT = "complaint"
    FILE = "file"
    CONFIRM = "confirm"
    BOUNCE = "bounce"


# The usual sanity check of an address (one @, a dotted domain, no blanks): what an ESP refuses as
# malformed; espbridge checks the same way, so a refused contact is a deliberately bad one.
_EMAIL_RE = re.compile(
    r"^[^@\s\"(),:;<>\[\\\]]+@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9-]+)+$"
)


def valid_email(email: str) -> bool:
    """Whether ``email`` is a well-formed address (flavors refuse contacts that are not)."""
    return len(email) <= 254 and _EMAIL_RE.fullmatch(email) is not None


@dataclass(frozen=True, slots=True)
class ContactRecord:
    """One contact on one list: its latest state."""

    email: str
    """Lower-cased."""
    list: str
    state: ContactState
    reason: str
    via: Via
    changed_at: float
    """Unix time of the change."""
    fields: dict[str, str] = field(default_factory=dict)

    def public(self) -> dict[str, Any]:
        """The record as JSON (``changed_at`` as Unix seconds)."""
        return {
            "email": self.email,
            "list": self.list,
            "state": self.state.value,
            "reason": self.reason,
            "via": self.via.value,
            "changed_at": self.changed_at,
            "fields": dict(self.fields),
        }


@dataclass(frozen=True, slots=True)
class ContactEvent:
    """One change of the book, in order: the record after it and the state before (None: new)."""

    seq: int
    record: ContactRecord
    previous_state: ContactState | None
    job: str | None = None
    """The broadcast whose message carried the link or drew the complaint, when the change came
    through the control route with a ``job`` (a flavor that reports opt-outs in a broadcast's
    responses needs it)."""


@dataclass(frozen=True, slots=True)
class ContactChange:
    """One change of a :meth:`ContactBook.set_many` batch."""

    list_id: str
    email: str
    state: ContactState | str
    reason: str = ""
    via: Via | str = Via.API
    fields: dict[str, str] | None = None


_STATES = {s.value: s for s in ContactState}
_VIAS = {v.value: v for v in Via}


def _state(value: ContactState | str) -> ContactState:
    """The state named ``value``; ValueError for another word (a dict lookup: imports set many)."""
    found = _STATES.get(value)
    if found is None:
        raise ValueError(f"unknown contact state {value!r} (one of {', '.join(_STATES)})")
    return found


def _via(value: Via | str) -> Via:
    found = _VIAS.get(value)
    if found is None:
        raise ValueError(f"unknown via {value!r} (one of {', '.join(_VIAS)})")
    return found


def _line(event: ContactEvent) -> bytes:
    r = event.record
    # orjson writes the enums as their values
    data = {
        "seq": event.seq,
        "email": r.email,
        "list": r.list,
        "state": r.state,
        "reason": r.reason,
        "via": r.via,
        "changed_at": r.changed_at,
        "fields": r.fields,
        "previous": event.previous_state,
    }
    if event.job is not None:
        data["job"] = event.job
    return orjson.dumps(data) + b"\n"


def _event(data: dict[str, Any]) -> ContactEvent:
    """An event of the log as :func:`_line` wrote it (KeyError, ValueError or TypeError otherwise)."""
    previous = data["previous"]
    record = ContactRecord(
        str(data["email"]),
        str(data["list"]),
        _state(data["state"]),
        str(data["reason"]),
        _via(data["via"]),
        float(data["changed_at"]),
        dict(data["fields"]),
    )
    job = data.get("job")
    return ContactEvent(int(data["seq"]), record, _state(previous) if previous else None, job)


class ContactBook:
    """The contacts of one account, per list; persisted in an append-only log (see the module)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.RLock()
        self._records: dict[tuple[str, str], ContactRecord] = {}
        self._lists_of: dict[str, set[str]] = {}
        """The lists each email is on: an email's records without reading them all."""
        self._events: list[ContactEvent] = []
        self._seqs: list[int] = []
        self._out: IO[bytes] | None = None
        self.book_id = ""
        """The book's random id, made with its log (see the module)."""

    @property
    def last_seq(self) -> int:
        """The sequence number of the latest event (0: none yet)."""
        with self._lock:
            return self._seqs[-1] if self._seqs else 0

    def load(self) -> None:
        """Replay the log (a half-written last line, left by a kill, is dropped); compact it when
        most of it is superseded."""
        with self._lock:
            self.close()
            self._records.clear()
            self._lists_of.clear()
            self._events.clear()
            self._seqs.clear()
            self.book_id = ""
            lines = 0
            data = self.path.read_bytes() if self.path.is_file() else b""
            for number, line in enumerate(data.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = orjson.loads(line)
                    if "book" in item:
                        self.book_id = str(item["book"])
                        continue
                    event = _event(item)
                except (orjson.JSONDecodeError, KeyError, ValueError, TypeError, AttributeError):
                    log.warning("unreadable contact log line dropped", extra={"line": number})
                    continue
                lines += 1
                self._remember(event)
            # A new log, a long one mostly superseded, or one whose last line a kill cut short
            # (appends must start on a line of their own) is rewritten.
            if not self.book_id or lines > 2 * len(self._records) + 1000 or not data.endswith(b"\n"):
                self.book_id = self.book_id or secrets.token_hex(6)
                self._compact()
            if self._records:
                log.info("contacts loaded", extra={"contacts": len(self._records), "events": lines})

    def _compact(self) -> None:
        """Keep the latest event of each contact, in sequence order (the feed stays in order)."""
        latest = sorted(
            (e for e in self._events if self._records.get((e.record.list, e.record.email)) is e.record),
            key=lambda e: e.seq,
        )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        header = orjson.dumps({"book": self.book_id}) + b"\n"
        atomic_write_bytes(self.path, header + b"".join(_line(e) for e in latest))
        self._events = latest
        self._seqs = [e.seq for e in latest]

    def _remember(self, event: ContactEvent) -> None:
        record = event.record
        self._records[(record.list, record.email)] = record
        self._lists_of.setdefault(record.email, set()).add(record.list)
        self._events.append(event)
        self._seqs.append(event.seq)

    def close(self) -> None:
        """Close the log file (the next change opens it again)."""
        with self._lock:
            if self._out is not None:
                self._out.close()
                self._out = None

    def _append(self, events: list[ContactEvent]) -> None:
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = self.path.open("ab")
        self._out.write(b"".join(_line(e) for e in events))
        self._out.flush()
        os.fsync(self._out.fileno())

    def event_id(self, event: ContactEvent) -> str:
        """An id of the event no other book's events have: ``<book id>-<seq>``."""
        return f"{self.book_id}-{event.seq}"

    def get(self, list_id: str, email: str) -> ContactRecord | None:
        """The contact's record on the list, or None if it never was on it."""
        with self._lock:
            return self._records.get((list_id, email.strip().lower()))

    def records(self, list_id: str | None = None, email: str | None = None) -> list[ContactRecord]:
        """The records of one list and/or one email (all without either), by list and email."""
        with self._lock:
            if email is not None:
                wanted = email.strip().lower()
                lists = sorted(self._lists_of.get(wanted, ()))
                return [self._records[(lst, wanted)] for lst in lists if list_id is None or lst == list_id]
            found = [r for (lst, _), r in self._records.items() if list_id is None or lst == list_id]
        return sorted(found, key=lambda r: (r.list, r.email))

    def lists(self) -> list[str]:
        """The lists that have any contact, by name."""
        with self._lock:
            return sorted({lst for lst, _ in self._records})

    def events_since(self, seq: int) -> list[ContactEvent]:
        """The events after ``seq``, in order (from 0: every event the log holds)."""
        with self._lock:
            return self._events[bisect.bisect_right(self._seqs, seq) :]

    def set(
        self,
        list_id: str,
        email: str,
        state: ContactState | str,
        *,
        reason: str = "",
        via: Via | str = Via.API,
        fields: dict[str, str] | None = None,
        job: str | None = None,
    ) -> ContactEvent:
        """Put the contact in ``state`` on the list, persisted before this returns; the event.

        ``fields`` are merged into the contact's fields (None keeps them as they are). A change to
        the same state is an event too (e.g. fields updated). ValueError for an unknown state or via.
        """
        return self.set_many([ContactChange(list_id, email, state, reason, via, fields)], job=job)[0]

    def set_many(self, changes: Iterable[ContactChange], *, job: str | None = None) -> list[ContactEvent]:
        """Apply ``changes`` in order, persisted with one write before this returns; their events.
        ValueError for an unknown state or via (nothing is changed then)."""
        with self._lock:
            now = time.time()
            seq = self._seqs[-1] if self._seqs else 0
            events: list[ContactEvent] = []
            pending: dict[tuple[str, str], ContactRecord] = {}
            for change in changes:
                key = (change.list_id, change.email.strip().lower())
                before = pending.get(key) or self._records.get(key)
                fields = dict(before.fields) if before is not None else {}
                if change.fields:
                    fields.update(change.fields)
                state, via = _state(change.state), _via(change.via)
                record = ContactRecord(key[1], change.list_id, state, change.reason, via, now, fields)
                seq += 1
                pending[key] = record
                events.append(ContactEvent(seq, record, before.state if before else None, job))
            if events:
                self._append(events)
                for event in events:
                    self._remember(event)
            return events

    def add_subscribed(
        self, list_id: str, emails: Iterable[str], *, via: Via | str = Via.FILE, reason: str = "imported"
    ) -> int:
        """Subscribe to the list each email it does not hold (or holds as ``removed``); one that
        unsubscribed, is pending or is subscribed already is left as it is. How many were added."""
        with self._lock:
            seen: set[str] = set()
            changes: list[ContactChange] = []
            for email in emails:
                address = email.strip().lower()
                if not address or address in seen:
                    continue
                seen.add(address)
                record = self._records.get((list_id, address))
                if record is None or record.state is ContactState.REMOVED:
                    changes.append(ContactChange(list_id, address, ContactState.SUBSCRIBED, reason, via))
            return len(self.set_many(changes))
