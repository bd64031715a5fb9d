"""Write a broadcast's response files phase by phase, and its manifest after every file.

What the files look like is the flavor's :class:`ResponseFormat`: its phases (which event types
each carries, in writing order), the file names, the rows. The rest is shared: the events come
from the seeded simulation; each phase regenerates them and keeps its own types, so memory stays
at one file's worth of events whatever the list size; the blocking work runs in worker threads;
and a resumed broadcast skips the files it had already written.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO, Any

import orjson

from sandbox.files import atomic_write_bytes, atomic_writer
from sandbox.listfile import recipients
from sandbox.protocol import ARCHIVE, MANIFEST, EventType
from sandbox.settings import Rates
from sandbox.simulate import Event, distinct_seconds, phase_files, simulate

log = logging.getLogger(__name__)

_STOP_CHECK_EVENTS = 10_000


class SendInterruptedError(Exception):
    """The sandbox is stopping; the broadcast resumes from its manifest when it restarts."""


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


@dataclass(frozen=True)
class ResponsePhase:
    """A group of response files written together: its name and the event types its files carry."""

    name: str
    types: frozenset[EventType]


class ResponseFormat(ABC):
    """How one flavor writes response files. Event types in none of its phases are never written."""

    phases: tuple[ResponsePhase, ...]
    """In writing order, ``PHASE_DELAY_S`` apart; the send counts as sent after the phase with ``sent``."""

    distinct_seconds: bool = False
    """True for formats without an event id: no two events of one recipient with the same type and
    URL fall in the same second (the later ones move on a second)."""

    archive_folder: str = ARCHIVE
    """Where the client moves the files it has processed: a file found there counts as written."""

    @abstractmethod
    def file_name(
        self,
        broadcast: Broadcast,
        phase: ResponsePhase,
        seq: int,
        now: datetime,
        taken: Callable[[str], bool],
    ) -> str:
        """The path of the broadcast's ``seq``-th file (1-based), about to be written, relative to
        the account folder (e.g. ``responses/…``).

        Called once per file: the path is kept in the send's saved state, and a resumed broadcast
        reuses it. ``taken(path)`` tells whether a path is in use already in this account.
        """

    @abstractmethod
    def write(self, out: IO[str], broadcast: Broadcast, phase: ResponsePhase, events: list[Event]) -> None:
        """Write one whole file (header and rows) of ``events``, which are in time order."""


FileNamer = Callable[[ResponsePhase, int], Awaitable[str]]
"""``(phase, seq) -> path``: the engine's, which asks the format once and saves the path."""


class ResponseWriter:
    """Writes the response files of one broadcast; await :meth:`write_phase` for each phase in order."""

    def __init__(
        self, broadcast: Broadcast, fmt: ResponseFormat, name_file: FileNamer, stop: threading.Event
    ) -> None:
        self.broadcast = broadcast
        self.format = fmt
        self._name_file = name_file
        self._stop = stop
        self.manifest_path = broadcast.account_dir / MANIFEST / f"{broadcast.external_id}.json"
        self._written_before = self._previous_files()
        self.counts: dict[str, int] = {t.value: 0 for t in EventType}
        self.files: list[str] = []
        self.files_written = 0
        self._seq = 0

    def _previous_files(self) -> set[str]:
        """Files an earlier run of this broadcast listed in the manifest."""
        try:
            previous = orjson.loads(self.manifest_path.read_bytes())
        except FileNotFoundError:
            return set()
        if previous.get("send_id") != self.broadcast.send_id:
            return set()
        return set(previous.get("files", []))

    def _already_written(self, path: str) -> bool:
        # The manifest is updated after the file's rename, so a stop between the two leaves the
        # file unlisted; and the client may have moved it to its archive folder already.
        folder = self.broadcast.account_dir
        return (
            path in self._written_before
            or (folder / path).exists()
            or (folder / self.format.archive_folder / PurePosixPath(path).name).exists()
        )

    def manifest(self, complete: bool) -> dict[str, Any]:
        """The manifest body: counts and files so far."""
        return {
            "broadcast_id": self.broadcast.external_id,
            "send_id": self.broadcast.send_id,
            "recipients": self.broadcast.recipients,
            "counts": dict(self.counts),
            "files": list(self.files),
            "complete": complete,
        }

    def _write_manifest(self, complete: bool) -> None:
        data = orjson.dumps(self.manifest(complete), option=orjson.OPT_INDENT_2)
        atomic_write_bytes(self.manifest_path, data)

    def start(self) -> None:
        """Write the first (empty) manifest of a broadcast that has none yet."""
        if not self.manifest_path.exists():
            self._write_manifest(complete=False)

    def _unless_stopped(self, events: Iterator[Event]) -> Iterator[Event]:
        # A phase may scan many recipients before its next file is full; stop promptly anyway.
        for n, event in enumerate(events):
            if n % _STOP_CHECK_EVENTS == 0 and self._stop.is_set():
                raise SendInterruptedError
            yield event

    def _chunks(self, phase: ResponsePhase) -> Iterator[list[Event]]:
        b = self.broadcast
        events: Iterator[Event] = simulate(recipients(b.list_store), b.seed, b.external_id, b.t0, b.rates)
        if self.format.distinct_seconds:
            events = distinct_seconds(events)
        return phase_files(self._unless_stopped(events), phase.types, b.rows_per_file)

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
        for e in events:
            self.counts[e.event_type.value] += 1
        self.files.append(path)
        if fresh:
            # Only after a new file, so a resumed broadcast's manifest never shrinks while the
            # files it had written are being skipped.
            self._write_manifest(complete=False)
        return fresh

    async def write_phase(self, phase: ResponsePhase) -> int:
        """Write this phase's files that are not written yet; returns how many it wrote."""
        chunks = self._chunks(phase)
        wrote = 0
        while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
            self._seq += 1
            path = await self._name_file(phase, self._seq)
            if await asyncio.to_thread(self._write_file, phase, path, chunk):
                wrote += 1
                log.info(
                    "response file written",
                    extra={"send_id": self.broadcast.send_id, "file": path, "events": len(chunk)},
                )
        self.files_written += wrote
        return wrote

    def finish(self) -> None:
        """Mark the manifest complete: every response file of the broadcast is written."""
        self._write_manifest(complete=True)
