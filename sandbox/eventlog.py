"""A send's event log: the response items a flavor serves over its API, released step by step.

The log is append-only and split into named **streams** (e.g. one per export type); an item's
offset in its stream never changes, so clients page with ``offset``/``limit``. Each release step
is one file ``<account>/.sandbox-events/<send_id>/<seq>.jsonl`` (a JSON ``[stream, item]`` per
line), written under a hidden name and renamed, and then appended to the in-memory streams. A
restarted sandbox loads the steps on disk; the resumed send regenerates the same steps from the
seed and writes only those not on disk, so no item is released twice or moves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson

from sandbox.files import atomic_write_bytes

log = logging.getLogger(__name__)


class SendInterruptedError(Exception):
    """The sandbox is stopping; the send resumes from what is on disk when it restarts."""


EVENTS_FOLDER = ".sandbox-events"

Record = tuple[str, Any]
"""One item of a step: (stream, JSON-serialisable item)."""


def _step_path(folder: Path, seq: int) -> Path:
    return folder / f"{seq:06d}.jsonl"


def read_step(folder: Path, seq: int) -> list[Record] | None:
    """Step ``seq`` of the event log in ``folder`` as written, or None while it is not on disk
    (blocking; a flavor that acts on each released step reads them with it)."""
    path = _step_path(folder, seq)
    if not path.is_file():
        return None
    lines = path.read_bytes().splitlines()
    return [(str(stream), item) for stream, item in (orjson.loads(line) for line in lines if line)]


class EventLog:
    """The released items of one send, per stream, in release order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.steps = 0
        self._streams: dict[str, list[Any]] = {}

    def load(self) -> None:
        """Read the steps written so far (1, 2, … while they exist); remove a half-written one."""
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)
        while (records := read_step(self.folder, self.steps + 1)) is not None:
            self._append(records)
        if self.steps:
            log.info("event log loaded", extra={"folder": str(self.folder), "steps": self.steps})

    def _write_step(self, seq: int, records: Sequence[Record]) -> None:
        """Write step ``seq`` to disk (blocking: :meth:`release` calls it in a worker thread)."""
        if seq != self.steps + 1:
            raise ValueError(f"step {seq} written after step {self.steps}")
        self.folder.mkdir(parents=True, exist_ok=True)
        data = b"".join(orjson.dumps([stream, item]) + b"\n" for stream, item in records)
        atomic_write_bytes(_step_path(self.folder, seq), data)

    async def release(self, seq: int, records: Sequence[Record], stop: threading.Event) -> bool:
        """Write step ``seq`` (in a worker thread), then make its items visible to the API, unless an
        earlier run released it; True if released now. Raises ``SendInterruptedError`` once ``stop``
        is set."""
        if seq <= self.steps:
            return False
        if stop.is_set():
            raise SendInterruptedError
        await asyncio.to_thread(self._write_step, seq, records)
        self._append(records)
        return True

    def _append(self, records: Sequence[Record]) -> None:
        for stream, item in records:
            self._streams.setdefault(stream, []).append(item)
        self.steps += 1

    def total(self, stream: str) -> int:
        """How many items of ``stream`` are released."""
        return len(self._streams.get(stream, ()))

    def page(self, stream: str, offset: int, limit: int) -> list[Any]:
        """At most ``limit`` items of ``stream`` from ``offset`` on (none past the end)."""
        return self._streams.get(stream, [])[offset : offset + limit]

    def totals(self) -> dict[str, int]:
        """How many items each stream has."""
        return {stream: len(items) for stream, items in self._streams.items()}
