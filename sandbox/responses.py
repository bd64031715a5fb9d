"""Release a broadcast's responses phase by phase, and its manifest after every step.

A flavor's responses are either **files** (a :class:`ResponseFormat`: the response files on its
SFTP site) or an **event log** its API serves (an :class:`EventLogFormat`: items per stream in a
:class:`sandbox.eventlog.EventLog`). The rest is shared: the events come from the seeded
simulation; each phase regenerates them and keeps its own types, cut into steps (files) of at most
``ROWS_PER_FILE`` events in time order, so memory stays at one step's worth whatever the list size;
the blocking work runs in worker threads; and a resumed broadcast skips the steps it had released.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import orjson

from sandbox.eventlog import Record, SendInterruptedError
from sandbox.files import atomic_write_bytes, atomic_writer
from sandbox.limits import MalformedRows
from sandbox.listfile import recipients
from sandbox.protocol import ARCHIVE, COUNTED_TYPES, ESP_ONLY_TYPES, MANIFEST, EventType
from sandbox.settings import Rates
from sandbox.simulate import Event, distinct_seconds, phase_files, simulate

if TYPE_CHECKING:
    from sandbox.engine import Account
    from sandbox.state import SendRecord

log = logging.getLogger(__name__)

_STOP_CHECK_EVENTS = 10_000


@dataclass(frozen=True)
class Broadcast:
    """What the writer and the format need to know about one send."""

    account_dir: Path
    send_id: str
    external_id: str
    message: str
    recipients: int
    list_store: Path
    t0: int
    seed: int
    rates: Rates
    rows_per_file: int
    malformed_every: int = 0
    attrs: Mapping[str, str] = field(default_factory=dict)
    """The flavor's own attributes of the send (``SendRecord.attrs``)."""


@dataclass(frozen=True)
class ResponsePhase:
    """A group of response steps released together: its name and the event types it carries."""

    name: str
    types: frozenset[EventType]


OPTOUTS = frozenset({EventType.UNSUBSCRIBE, EventType.COMPLAINT})


def usual_phases(
    sent: str,
    bounces: str,
    opens: str,
    clicks: str,
    optouts: str,
    optout_types: Collection[EventType] = OPTOUTS,
) -> tuple[ResponsePhase, ...]:
    """The order most ESPs report in, under the ESP's names: sends; hard and soft bounces; opens;
    clicks; opt-outs (``optout_types``: unsubscribes and complaints unless the ESP has fewer)."""
    return (
        ResponsePhase(sent, frozenset({EventType.SENT})),
        ResponsePhase(bounces, frozenset({EventType.BOUNCE_HARD, EventType.BOUNCE_SOFT})),
        ResponsePhase(opens, frozenset({EventType.OPEN})),
        ResponsePhase(clicks, frozenset({EventType.CLICK})),
        ResponsePhase(optouts, frozenset(optout_types)),
    )


@dataclass(frozen=True)
class PendingFile:
    """A response file about to be written, to be named by its format."""

    broadcast: Broadcast
    phase: ResponsePhase
    seq: int
    """The broadcast's file number, from 1."""
    now: datetime
    taken: Callable[[str], bool]
    """Whether a path (relative to the account) is in use already in this account."""


class PhasedFormat(ABC):
    """What both kinds of response formats share. Event types in none of the phases are not released."""

    phases: tuple[ResponsePhase, ...]
    """In release order, ``PHASE_DELAY_S`` apart; the send counts as sent after the phase with ``sent``."""

    distinct_seconds: bool = False
    """True for formats without an event id: no two events of one recipient with the same type and
    URL fall in the same second (the later ones move on a second)."""

    time_ordered_phases: bool = False
    """True: a phase's events are sorted by time as a whole before they are cut into steps, so its
    steps follow each other in time order (the phase's events are held in memory); False: each step
    is in time order on its own, and memory stays at one step's worth."""

    def manifest_fields(self, broadcast: Broadcast) -> dict[str, Any]:
        """The flavor's own manifest fields (after ``send_id``); none by default."""
        return {}

    def adjust(self, events: Iterator[Event]) -> Iterator[Event]:
        """The simulated events as the flavor's ESP reports them (e.g. some left out, or its own
        links); unchanged by default. Applied before ``distinct_seconds`` and counting; it must be
        deterministic (a recipient's events come together)."""
        return events

    @property
    def esp_only(self) -> frozenset[EventType]:
        """The ESP-only event types the phases carry (simulated only then; ``esp_only`` in the manifest)."""
        return frozenset(t for p in self.phases for t in p.types if t in ESP_ONLY_TYPES)

    @abstractmethod
    def writer(self, account: Account, record: SendRecord, broadcast: Broadcast) -> PhaseWriter:
        """The writer that releases one send's responses in this format (the engine runs it)."""


class ResponseFormat(PhasedFormat):
    """How one flavor writes response files."""

    archive_folder: str = ARCHIVE
    """Where the client moves the files it has processed: a file found there counts as written."""

    @abstractmethod
    def file_name(self, file: PendingFile) -> str:
        """The path of a file about to be written, relative to the account folder (``responses/…``).

        Called once per file: the path is kept in the send's saved state, and a resumed broadcast
        reuses it.
        """

    @abstractmethod
    def write(self, out: IO[str], broadcast: Broadcast, phase: ResponsePhase, events: list[Event]) -> None:
        """Write one whole file (header and rows) of ``events``, which are in time order."""

    def writer(self, account: Account, record: SendRecord, broadcast: Broadcast) -> PhaseWriter:
        """A :class:`ResponseWriter`."""
        return ResponseWriter(self, account, record, broadcast)


class EventLogFormat(PhasedFormat):
    """How one flavor serves responses over its API: each event becomes an item of a stream.

    The engine appends each step to the send's :class:`sandbox.eventlog.EventLog`
    (``Account.event_log(send_id)``), which the flavor's routes page through.
    """

    malformed_kinds: int = 0
    """How many kinds of malformed items :meth:`malformed_item` makes (0: the flavor makes none)."""

    @abstractmethod
    def stream(self, event: Event) -> str:
        """The stream an event's item goes to (e.g. its export type)."""

    @abstractmethod
    def item(self, broadcast: Broadcast, event: Event) -> Any:
        """The event's item as the API serves it (JSON-serialisable)."""

    def malformed_item(self, broadcast: Broadcast, stream: str, k: int, after: Any) -> Any:
        """The send's ``k``-th malformed item (kind ``MalformedRows.kind(k, malformed_kinds)``),
        following the well-formed item ``after`` of ``stream`` (with ``MALFORMED_EVERY``)."""
        raise NotImplementedError

    def writer(self, account: Account, record: SendRecord, broadcast: Broadcast) -> PhaseWriter:
        """An :class:`EventLogWriter`."""
        return EventLogWriter(self, account, record, broadcast)


class PhaseWriter(ABC):
    """Releases one send's responses: the engine awaits :meth:`start`, :meth:`write_phase` for each
    phase in order (``PHASE_DELAY_S`` apart), then :meth:`finish`.

    Every step is regenerated and counted, also when an earlier run released it already (then it
    is only skipped), so the counts and the manifest are those of the whole broadcast so far. A
    flavor whose ESP releases in its own way subclasses it (its format's ``writer`` makes one).
    """

    def __init__(self, fmt: PhasedFormat, account: Account, record: SendRecord, broadcast: Broadcast) -> None:
        self.format = fmt
        self.account = account
        self.record = record
        self.broadcast = broadcast
        self._stop: threading.Event = account.stopping
        self.manifest_path = broadcast.account_dir / MANIFEST / f"{broadcast.external_id}.json"
        self.counts: dict[str, int] = {t.value: 0 for t in COUNTED_TYPES}
        self.esp_only: dict[str, int] = {t.value: 0 for t in EventType if t in fmt.esp_only}
        self.files_written = 0
        """Steps this run released (not those skipped)."""
        self._seq = 0

    def manifest(self, complete: bool) -> dict[str, Any]:
        """The manifest body: counts so far, and the format's and the writer's own fields."""
        b = self.broadcast
        body: dict[str, Any] = {"broadcast_id": b.external_id, "send_id": b.send_id}
        body.update(self.format.manifest_fields(b))
        body["recipients"] = b.recipients
        body["counts"] = dict(self.counts)
        if self.esp_only:
            body["esp_only"] = dict(self.esp_only)
        body.update(self._manifest_extra())
        body["complete"] = complete
        return body

    def _manifest_extra(self) -> dict[str, Any]:
        return {}

    def _write_manifest(self, complete: bool) -> None:
        data = orjson.dumps(self.manifest(complete), option=orjson.OPT_INDENT_2)
        atomic_write_bytes(self.manifest_path, data)

    async def start(self) -> None:
        """Before the first phase: write the first (empty) manifest of a broadcast that has none yet."""
        if not self.manifest_path.exists():
            await asyncio.to_thread(self._write_manifest, False)

    def _count(self, events: list[Event]) -> None:
        for e in events:
            if e.event_type in ESP_ONLY_TYPES:
                self.esp_only[e.event_type.value] += 1
            else:
                self.counts[e.event_type.value] += 1

    def _unless_stopped(self, events: Iterator[Event]) -> Iterator[Event]:
        # A phase may scan many recipients before its next step is full; stop promptly anyway.
        for n, event in enumerate(events):
            if n % _STOP_CHECK_EVENTS == 0 and self._stop.is_set():
                raise SendInterruptedError
            yield event

    def events(self) -> Iterator[Event]:
        """The broadcast's events as its ESP reports them, recipient by recipient (from the seed)."""
        b, fmt = self.broadcast, self.format
        events = fmt.adjust(
            simulate(recipients(b.list_store), b.seed, b.external_id, b.t0, b.rates, fmt.esp_only)
        )
        return distinct_seconds(events) if fmt.distinct_seconds else events

    def _chunks(self, phase: ResponsePhase) -> Iterator[list[Event]]:
        events = self._unless_stopped(self.events())
        return phase_files(events, phase.types, self.broadcast.rows_per_file, self.format.time_ordered_phases)

    @abstractmethod
    async def _release(self, phase: ResponsePhase, seq: int, events: list[Event]) -> bool:
        """Release step ``seq`` unless an earlier run did, count it; True if it was released now."""

    async def write_phase(self, phase: ResponsePhase) -> int:
        """Release this phase's steps that are not released yet; returns how many it released."""
        chunks = self._chunks(phase)
        wrote = 0
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            self._seq += 1
            if self._stop.is_set():
                raise SendInterruptedError
            if await self._release(phase, self._seq, chunk):
                wrote += 1
        self.files_written += wrote
        return wrote

    async def finish(self) -> None:
        """After the last phase: mark the manifest complete, every response of the broadcast is released."""
        await asyncio.to_thread(self._write_manifest, True)


class ResponseWriter(PhaseWriter):
    """Writes the response files of one broadcast; ``files`` in the manifest lists them in order."""

    format: ResponseFormat

    def __init__(
        self, fmt: ResponseFormat, account: Account, record: SendRecord, broadcast: Broadcast
    ) -> None:
        super().__init__(fmt, account, record, broadcast)
        self._written_before = self._previous_files()
        self.files: list[str] = []

    def _manifest_extra(self) -> dict[str, Any]:
        return {"files": list(self.files)}

    def _previous_files(self) -> set[str]:
        """Files an earlier run of this broadcast listed in the manifest."""
        try:
            previous = orjson.loads(self.manifest_path.read_bytes())
        except FileNotFoundError:
            return set()
        return set(previous.get("files", [])) if self._same_send(previous) else set()

    def _same_send(self, manifest: dict[str, Any]) -> bool:
        """Whether a manifest on disk is this send's (the client may reuse a broadcast id)."""
        return bool(manifest.get("send_id") == self.broadcast.send_id)

    def _already_written(self, path: str) -> bool:
        # The manifest is updated after the file's rename, so a stop between the two leaves the
        # file unlisted; and the client may have moved it to its archive folder already.
        folder = self.broadcast.account_dir
        return (
            path in self._written_before
            or (folder / path).exists()
            or (folder / self.format.archive_folder / PurePosixPath(path).name).exists()
        )

    def _write_file(self, phase: ResponsePhase, path: str, events: list[Event]) -> bool:
        """Write the file unless an earlier run did; then count it and list it in the manifest."""
        if self._stop.is_set():
            raise SendInterruptedError
        fresh = not self._already_written(path)
        if fresh:
            target = self.broadcast.account_dir / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with atomic_writer(target) as out:
                self.format.write(out, self.broadcast, phase, events)
        self._count(events)
        self.files.append(path)
        if fresh:
            # Only after a new file, so a resumed broadcast's manifest never shrinks while the
            # files it had written are being skipped.
            self._write_manifest(complete=False)
        return fresh

    async def _release(self, phase: ResponsePhase, seq: int, events: list[Event]) -> bool:
        path = await self.account.name_file(self.record, self.broadcast, phase, seq)
        fresh = await asyncio.to_thread(self._write_file, phase, path, events)
        if fresh:
            log.info(
                "response file written",
                extra={"send_id": self.broadcast.send_id, "file": path, "events": len(events)},
            )
        return fresh


class EventLogWriter(PhaseWriter):
    """Appends one broadcast's steps to its event log; ``malformed`` in the manifest counts the bad items.

    With ``MALFORMED_EVERY`` = n (saved with the send) and a format that makes malformed items, a
    malformed item follows every n-th well-formed item of each stream. It is in the log (and in
    ``malformed``, per stream), never in ``counts``.
    """

    format: EventLogFormat

    def __init__(
        self, fmt: EventLogFormat, account: Account, record: SendRecord, broadcast: Broadcast
    ) -> None:
        super().__init__(fmt, account, record, broadcast)
        self.log = account.event_log(record.send_id)
        self.malformed = MalformedRows(broadcast.malformed_every if fmt.malformed_kinds else 0)

    def _manifest_extra(self) -> dict[str, Any]:
        return {"malformed": dict(sorted(self.malformed.counts.items()))}

    def _records(self, events: list[Event]) -> list[Record]:
        b, fmt = self.broadcast, self.format
        records: list[Record] = []
        for e in events:
            stream, item = fmt.stream(e), fmt.item(b, e)
            records.append((stream, item))
            k = self.malformed.after_good(stream)
            if k is not None:
                records.append((stream, fmt.malformed_item(b, stream, k, item)))
        return records

    async def _release(self, phase: ResponsePhase, seq: int, events: list[Event]) -> bool:
        records = await asyncio.to_thread(self._records, events)
        self._count(events)
        if not await self.log.release(seq, records, self._stop):
            return False
        await asyncio.to_thread(self._write_manifest, False)
        log.info(
            "responses released",
            extra={
                "send_id": self.broadcast.send_id,
                "step": seq,
                "phase": phase.name,
                "items": len(records),
            },
        )
        return True
