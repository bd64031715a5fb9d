"""What an account knows about its imports and sends, in memory and in ``<account>/.sandbox-state.json``.

The file is rewritten atomically after every change, before the API answers, so a restarted
sandbox still knows every import and send and never sends an ``external_id`` twice.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from sandbox.files import atomic_write_bytes
from sandbox.protocol import ImportState, SendState
from sandbox.settings import Rates

log = logging.getLogger(__name__)

STATE_VERSION = 1


class PublicImport(BaseModel):
    """An import as ``GET /imports/<import_id>`` shows it; :class:`ImportRecord` adds the rest."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    import_id: str
    external_id: str
    state: ImportState = ImportState.QUEUED
    rows_total: int = 0
    rows_valid: int = 0
    rows_invalid: int = 0
    errors: list[dict[str, int | str]] = Field(default_factory=list)
    list_id: str | None = None

    def public(self) -> dict[str, Any]:
        """The body of ``GET /imports/<import_id>``."""
        return self.model_dump(mode="json", include=set(PublicImport.model_fields))


class ImportRecord(PublicImport):
    """One import, with the fields the API shows and the ones the sandbox needs to redo it."""

    file: str
    list_name: str | None = None
    created_at: str
    source: Literal["file", "rows"] = "file"
    """``rows``: the recipients came in API requests and were staged in ``file`` (comma CSV)."""
    receiving: bool = False
    """A ``rows`` import still taking chunks: not started until the flavor submits it."""
    chunks: int = 0
    """A ``rows`` import's chunks of rows staged so far."""
    attrs: dict[str, str] = Field(default_factory=dict)
    """The flavor's own attributes (e.g. the list it imports into)."""
    contact_list: str | None = None
    """The account's contact list the recipients are subscribed to once imported (none: no list)."""


class PublicSend(BaseModel):
    """A send as ``GET /sends/<send_id>`` shows it; :class:`SendRecord` adds the rest."""

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    send_id: str
    external_id: str
    import_id: str
    message: str
    state: SendState = SendState.SCHEDULED
    recipients: int
    send_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    def public(self) -> dict[str, Any]:
        """The body of ``GET /sends/<send_id>``."""
        return self.model_dump(mode="json", include=set(PublicSend.model_fields))


class SendRecord(PublicSend):
    """One send; ``responses_complete`` tells a restarted sandbox whether response files remain to write."""

    starts_at: float | None = None
    """When a scheduled send starts (epoch seconds: ``send_at`` to the microsecond); None: at once."""
    created_at: str
    responses_complete: bool = False
    # The simulation parameters the send was created under: a resumed send must regenerate the
    # very same events and file cuts even if the sandbox restarted with other settings.
    seed: int
    rows_per_file: int
    rates: Rates
    malformed_every: int = 0
    # The response file names chosen so far, in writing order: saved before each file is written,
    # so a resumed send writes a missing file under the name it had, and skips a written one.
    files: list[str] = Field(default_factory=list)
    error: str | None = None
    """Why a ``failed`` send failed."""
    attrs: dict[str, str] = Field(default_factory=dict)
    """The flavor's own attributes (e.g. the list it was sent to); also ``Broadcast.attrs``."""


class _StateFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    version: int = STATE_VERSION
    imports: list[ImportRecord] = Field(default_factory=list)
    sends: list[SendRecord] = Field(default_factory=list)


class AccountState:
    """The imports and sends of one account, indexed for the API, saved to one JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.imports: dict[str, ImportRecord] = {}
        self.sends: dict[str, SendRecord] = {}
        self._save_lock = asyncio.Lock()

    def load(self) -> None:
        """Read the state file if there is one (a fresh account has none)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        saved = _StateFile.model_validate_json(data)
        self.imports = {i.import_id: i for i in saved.imports}
        self.sends = {s.send_id: s for s in saved.sends}
        log.info(
            "state loaded",
            extra={"path": str(self.path), "imports": len(self.imports), "sends": len(self.sends)},
        )

    def import_by_external_id(self, external_id: str) -> ImportRecord | None:
        """The import created with this ``external_id``, if any."""
        return next((i for i in self.imports.values() if i.external_id == external_id), None)

    def sends_by_external_id(self, external_id: str) -> list[SendRecord]:
        """The sends created with this ``external_id`` (at most one, by construction)."""
        return [s for s in self.sends.values() if s.external_id == external_id]

    def stats(self) -> dict[str, dict[str, int]]:
        """How many imports and sends were created, and sends cancelled, per ``external_id`` (tests
        prove "exactly once" and "never sent")."""
        cancelled = (s.external_id for s in self.sends.values() if s.state is SendState.CANCELLED)
        return {
            "sends_created": dict(Counter(s.external_id for s in self.sends.values())),
            "sends_cancelled": dict(Counter(cancelled)),
            "imports_created": dict(Counter(i.external_id for i in self.imports.values())),
        }

    async def save(self) -> None:
        """Write the current state atomically.

        The snapshot is taken inside the lock, so whichever save runs last writes the newest state
        even when saves from several tasks overlap.
        """
        async with self._save_lock:
            snapshot = _StateFile(imports=list(self.imports.values()), sends=list(self.sends.values()))
            data = orjson.dumps(snapshot.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
            await asyncio.to_thread(atomic_write_bytes, self.path, data)
