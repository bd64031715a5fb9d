"""Write a broadcast's response files phase by phase, and its manifest after every file.

The writer runs in a worker thread (it does blocking file I/O). Each phase regenerates the
broadcast's events from the seed and keeps that phase's, so memory stays at one file's worth of
events whatever the list size, and a resumed broadcast skips the files it had already written.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from sandbox.files import atomic_write_bytes, atomic_writer, csv_line
from sandbox.listfile import recipients
from sandbox.protocol import (
    ARCHIVE,
    MANIFEST,
    RESPONSE_HEADER,
    RESPONSES,
    EventType,
    Phase,
    response_file_name,
    utc_text,
)
from sandbox.settings import Rates
from sandbox.simulate import Event, phase_files, simulate

log = logging.getLogger(__name__)

_STOP_CHECK_EVENTS = 10_000


class SendInterruptedError(Exception):
    """The sandbox is stopping; the broadcast resumes from its manifest when it restarts."""


@dataclass(frozen=True)
class Broadcast:
    """What the writer needs to know about one send."""

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


class ResponseWriter:
    """Writes the response files of one broadcast; call :meth:`write_phase` for each phase in order."""

    def __init__(self, broadcast: Broadcast, stop: threading.Event) -> None:
        self.broadcast = broadcast
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

    def _already_written(self, name: str) -> bool:
        # The manifest is updated after the file's rename, so a stop between the two leaves the
        # file unlisted; and the client may have moved it to archive/ already.
        folder = self.broadcast.account_dir
        return (
            f"{RESPONSES}/{name}" in self._written_before
            or (folder / RESPONSES / name).exists()
            or (folder / ARCHIVE / name).exists()
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

    def _write_file(self, path: Path, events: list[Event]) -> None:
        b = self.broadcast
        with atomic_writer(path) as out:
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

    def _unless_stopped(self, events: Iterator[Event]) -> Iterator[Event]:
        # A phase may scan many recipients before its next file is full; stop promptly anyway.
        for n, event in enumerate(events):
            if n % _STOP_CHECK_EVENTS == 0 and self._stop.is_set():
                raise SendInterruptedError
            yield event

    def write_phase(self, phase: Phase) -> int:
        """Write this phase's files that are not written yet; returns how many it wrote."""
        b = self.broadcast
        events = simulate(recipients(b.list_store), b.seed, b.external_id, b.t0, b.rates)
        wrote = 0
        for chunk in phase_files(self._unless_stopped(events), phase, b.rows_per_file):
            if self._stop.is_set():
                raise SendInterruptedError
            self._seq += 1
            name = response_file_name(b.send_id, self._seq, phase)
            fresh = not self._already_written(name)
            if fresh:
                self._write_file(b.account_dir / RESPONSES / name, chunk)
            for e in chunk:
                self.counts[e.event_type.value] += 1
            self.files.append(f"{RESPONSES}/{name}")
            if fresh:
                # Only after a new file, so a resumed broadcast's manifest never shrinks while the
                # files it had written are being skipped.
                self._write_manifest(complete=False)
                wrote += 1
                log.info(
                    "response file written",
                    extra={"send_id": b.send_id, "file": name, "events": len(chunk)},
                )
        self.files_written += wrote
        return wrote

    def finish(self) -> None:
        """Mark the manifest complete: every response file of the broadcast is written."""
        self._write_manifest(complete=True)
