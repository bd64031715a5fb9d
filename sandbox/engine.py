"""The ESP's behaviour per account: create imports and sends, and carry them out in the background.

This is what every flavor shares; the account's flavor reads the list files and writes the
response files (or serves an event log), and its routes or its watcher call
:meth:`Account.create_import` (or :meth:`Account.create_import_from_rows`) and
:meth:`Account.create_send`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sandbox.contacts import CONTACTS_FILE, ContactBook, ContactEvent
from sandbox.errors import EspError
from sandbox.eventlog import EVENTS_FOLDER, EventLog, SendInterruptedError
from sandbox.files import atomic_writer, csv_line
from sandbox.limits import CallsPerSecond, RateLimiter, TokenBucket, rate_limited
from sandbox.listfile import ImportInterruptedError, ImportResult, import_list, recipients
from sandbox.protocol import (
    LISTS_FOLDER,
    MANIFEST,
    RESPONSES,
    STATE_FILE,
    UPLOADS_FOLDER,
    EventType,
    ImportState,
    SendState,
    parse_utc,
    utc_text,
)
from sandbox.responses import Broadcast, PendingFile, ResponseFormat, ResponsePhase
from sandbox.settings import Settings
from sandbox.state import AccountState, ImportRecord, SendRecord

if TYPE_CHECKING:
    from sandbox.flavors.base import Flavor

log = logging.getLogger(__name__)


__all__ = ["Account"]


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(6)}"


def _now() -> datetime:
    return datetime.now(UTC)


def _cancelled(record: SendRecord) -> bool:
    """Whether a send was cancelled; asked after each wait, since a cancel may come during any."""
    return record.state is SendState.CANCELLED


class Account:
    """One ESP account: its folder tree, its imports and sends, and the background work for them."""

    def __init__(
        self, name: str, folder: Path, settings: Settings, flavor: Flavor, stop: threading.Event
    ) -> None:
        self.name = name
        self.folder = folder
        self.settings = settings
        self.flavor = flavor
        self.state = AccountState(folder / STATE_FILE)
        self.stopping = stop
        """Set when the sandbox stops: worker threads check it between rows, files and steps."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._running_imports: dict[str, asyncio.Task[None]] = {}
        self._send_wakeups: dict[str, asyncio.Event] = {}
        """Set to wake a send waiting for its start (or in its send delay): it was cancelled."""
        self._writing: set[str] = set()
        """Sends whose responses are being written: past the point a cancel can stop them."""
        self._logs: dict[str, EventLog] = {}
        self._staging = asyncio.Lock()
        self.limiter: RateLimiter | None = (
            TokenBucket(settings.api_limit_per_s, settings.api_limit_burst)
            if settings.api_limit_per_s
            else None
        )
        """The account's API rate limit (``API_LIMIT_PER_S``/``API_LIMIT_BURST``; None when off)."""
        self.counters: Counter[str] = Counter()
        """In-memory counts for a flavor's ``_sandbox/stats`` (``rate_limited`` is kept here)."""
        self.calls = CallsPerSecond()
        """The account's API calls per second (counted by ``sandbox.api.account_of``)."""
        self.contacts = ContactBook(folder / CONTACTS_FILE)
        """Who is on which of the account's lists (``sandbox.contacts``), shared by every flavor."""

    def open(self) -> None:
        """Create the account's missing folders, load its state, remove its own stale temporary files."""
        for sub in dict.fromkeys((*self.flavor.folders, MANIFEST, LISTS_FOLDER)):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        self.state.load()
        self.contacts.load()
        # A killed sandbox may leave half-written files under hidden temporary names; only the
        # sandbox writes in these folders (the client's list folders are left alone).
        written = {str(PurePosixPath(f).parent) for snd in self.state.sends.values() for f in snd.files}
        staged = {
            f"{UPLOADS_FOLDER}/{i.import_id}" for i in self.state.imports.values() if i.source == "rows"
        }
        for sub in {".", RESPONSES, MANIFEST, LISTS_FOLDER, UPLOADS_FOLDER, *written, *staged}:
            for stale in (self.folder / sub).glob(".*.tmp"):
                stale.unlink(missing_ok=True)

    def stats(self) -> dict[str, Any]:
        """The shared ``_sandbox/stats``: imports and sends created per ``external_id``, and the
        account's API calls per second."""
        return {**self.state.stats(), "calls_per_second": self.calls.seconds()}

    def check_rate_limit(self) -> None:
        """Raise the 429 ``rate_limited`` (with ``Retry-After``) if the account's API is over its limit.

        A flavor calls it in its handlers after authentication; refused calls are counted in
        ``counters["rate_limited"]``.
        """
        if self.limiter is None:
            return
        wait_s = self.limiter.acquire()
        if wait_s > 0:
            self.counters["rate_limited"] += 1
            raise rate_limited(wait_s)

    def event_log(self, send_id: str) -> EventLog:
        """The send's event log (for a flavor with an :class:`EventLogFormat`), loaded from disk once."""
        found = self._logs.get(send_id)
        if found is None:
            found = EventLog(self.folder / EVENTS_FOLDER / send_id)
            found.load()
            self._logs[send_id] = found
        return found

    def start(self) -> None:
        """Continue the imports and sends an earlier run left unfinished; start the flavor's watcher."""
        for imp in self.state.imports.values():
            if imp.state in (ImportState.QUEUED, ImportState.RUNNING) and not imp.receiving:
                log.info("resuming import", extra={"account": self.name, "import_id": imp.import_id})
                self._start_import(imp)
        for snd in self.state.sends.values():
            if snd.state is not SendState.FAILED and not snd.responses_complete:
                log.info("resuming send", extra={"account": self.name, "send_id": snd.send_id})
                self.spawn(self._run_send(snd), f"send {snd.send_id}")
        if self.flavor.watch is not None:
            self.spawn(self.flavor.watch(self), f"{self.flavor.name} watcher")

    async def close(self) -> None:
        """Stop the background work; what is unfinished resumes at the next start."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.contacts.close()

    def spawn(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """Run ``work`` in the background until it ends or the sandbox stops."""
        task = asyncio.create_task(work, name=f"{self.name}: {name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _log_created(self, what: str, **fields: object) -> None:
        log.info(f"{what} created", extra={"account": self.name, **fields})

    def list_store(self, import_id: str) -> Path:
        """Where an import's valid recipients are kept (``sandbox.listfile.recipients`` reads them)."""
        return self.folder / LISTS_FOLDER / f"{import_id}.csv"

    # Contacts

    async def subscribe_imported(self, import_id: str, list_id: str) -> int:
        """Subscribe an imported broadcast list's recipients to the account's list ``list_id`` (those
        not on it yet: an unsubscribed one stays so), so an unsubscribe by link has a row to change.
        How many were added; read and written in a worker thread."""
        store = self.list_store(import_id)

        def add() -> int:
            if not store.is_file():
                return 0
            return self.contacts.add_subscribed(list_id, (email for email, _ in recipients(store)))

        added = await asyncio.to_thread(add)
        if added:
            log.info(
                "recipients subscribed",
                extra={"account": self.name, "import_id": import_id, "list": list_id, "added": added},
            )
        return added

    def send_of_job(self, job: str) -> SendRecord | None:
        """The send a control route's ``job`` names: by its ``external_id`` (the job id) or send id."""
        found = self.state.sends.get(job)
        if found is not None:
            return found
        sends = self.state.sends_by_external_id(job)
        return sends[0] if sends else None

    def recipient_key(self, import_id: str, email: str) -> str | None:
        """The communication key an imported list gave ``email`` (None if it was not on the list);
        reads the list store, so call it in a worker thread."""
        store = self.list_store(import_id)
        if not store.is_file():
            return None
        wanted = email.strip().lower()
        return next((key for address, key in recipients(store) if address.strip().lower() == wanted), None)

    async def report_contact_event(self, event: ContactEvent) -> None:
        """Let the flavor report a change made on the ESP side (its ``on_contact_event``), if it does."""
        if self.flavor.on_contact_event is not None:
            await self.flavor.on_contact_event(self, event)

    # Imports

    async def create_import(
        self,
        file: str,
        list_name: str | None,
        external_id: str,
        attrs: Mapping[str, str] | None = None,
        *,
        contact_list: str | None = None,
    ) -> tuple[ImportRecord, bool]:
        """A new import (and True), or the existing one with this ``external_id`` (and False).

        ``file`` is relative to the account folder; the flavor has checked that it may be imported.
        ``attrs`` are the flavor's own attributes, saved with the import. With ``contact_list``
        the valid recipients are subscribed to that list before the import is ``done``
        (:meth:`subscribe_imported`).
        """
        existing = self.state.import_by_external_id(external_id)
        if existing is not None:
            return existing, False
        if not (self.folder / file).is_file():
            raise EspError(404, "file_not_found", f"{file} does not exist")
        record = ImportRecord(
            import_id=_new_id("imp"),
            external_id=external_id,
            file=file,
            list_name=list_name,
            created_at=utc_text(_now()),
            attrs=dict(attrs or {}),
            contact_list=contact_list,
        )
        self.state.imports[record.import_id] = record
        await self.state.save()
        self._log_created("import", import_id=record.import_id, external_id=external_id, file=file)
        self._start_import(record)
        return record, True

    async def imported_list(
        self,
        import_id: str,
        recipients: int,
        *,
        list_id: str | None = None,
        attrs: Mapping[str, str] | None = None,
    ) -> ImportRecord:
        """Record as done an import the flavor carried out itself (its ESP takes recipients its own
        way); its ``recipients`` valid rows are in :meth:`list_store` already. Again: the same record."""
        existing = self.state.imports.get(import_id)
        if existing is not None:
            return existing
        record = ImportRecord(
            import_id=import_id,
            external_id=import_id,
            file=f"{LISTS_FOLDER}/{import_id}.csv",
            state=ImportState.DONE,
            rows_total=recipients,
            rows_valid=recipients,
            list_id=list_id or _new_id("lst"),
            created_at=utc_text(_now()),
            attrs=dict(attrs or {}),
        )
        self.state.imports[import_id] = record
        await self.state.save()
        self._log_created("flavor's import", import_id=import_id, recipients=recipients)
        return record

    # Imports of recipients received in API requests

    def _chunk_path(self, import_id: str, chunk: int) -> Path:
        return self.folder / UPLOADS_FOLDER / import_id / f"{chunk:06d}.csv"

    def _write_chunk(self, path: Path, rows: Sequence[Sequence[str]]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path) as out:
            for row in rows:
                out.write(csv_line(row))

    async def create_import_from_rows(
        self,
        external_id: str,
        header: Sequence[str],
        rows: Iterable[Sequence[str]] = (),
        *,
        list_name: str | None = None,
        attrs: Mapping[str, str] | None = None,
        complete: bool = True,
        contact_list: str | None = None,
    ) -> tuple[ImportRecord, bool]:
        """A new import of recipients the flavor received in a request (and True), or the existing
        one with this ``external_id`` (and False).

        ``header`` and ``rows`` are the list's columns and records (``Email`` and
        ``CommunicationKey`` among them); they are validated like a list file's, whose line numbers
        the errors give (header = line 1). With ``complete=False`` the import takes more chunks
        with :meth:`add_rows` and starts at :meth:`submit_import`. ``contact_list`` is as for
        :meth:`create_import`.
        """
        existing = self.state.import_by_external_id(external_id)
        if existing is not None:
            return existing, False
        import_id = _new_id("imp")
        record = ImportRecord(
            import_id=import_id,
            external_id=external_id,
            file=f"{UPLOADS_FOLDER}/{import_id}.csv",
            list_name=list_name,
            created_at=utc_text(_now()),
            source="rows",
            receiving=True,
            attrs=dict(attrs or {}),
            contact_list=contact_list,
        )
        async with self._staging:
            await asyncio.to_thread(self._write_chunk, self._chunk_path(import_id, 0), [header])
            self.state.imports[import_id] = record
            await self.state.save()
        self._log_created("import from rows", import_id=import_id, external_id=external_id)
        await self.add_rows(import_id, rows, complete=complete)
        return record, True

    async def add_rows(
        self, import_id: str, rows: Iterable[Sequence[str]], *, complete: bool = False
    ) -> ImportRecord:
        """Stage one more chunk of rows of a receiving import (saved before this returns); with
        ``complete`` the import starts. 404 ``import_not_found``, 409 ``import_not_receiving``."""
        chunk = list(rows)
        async with self._staging:
            record = self.state.imports.get(import_id)
            if record is None:
                raise EspError(404, "import_not_found", f"no import {import_id}")
            if not record.receiving:
                raise EspError(409, "import_not_receiving", f"import {import_id} takes no more rows")
            if chunk:
                path = self._chunk_path(import_id, record.chunks + 1)
                await asyncio.to_thread(self._write_chunk, path, chunk)
                record.chunks += 1
                await self.state.save()
        if complete:
            await self.submit_import(import_id)
        return record

    async def submit_import(self, import_id: str) -> ImportRecord:
        """Start a receiving import with the rows staged so far (again: nothing happens)."""
        async with self._staging:
            record = self.state.imports[import_id]
            if not record.receiving:
                return record
            record.receiving = False
            await self.state.save()
        self._start_import(record)
        return record

    def _combine_chunks(self, record: ImportRecord) -> None:
        """Concatenate the staged chunks (header first) into the import's ``file``."""
        with atomic_writer(self.folder / record.file) as out:
            for n in range(record.chunks + 1):
                out.write(self._chunk_path(record.import_id, n).read_text(encoding="utf-8"))

    def _read_rows_import(self, record: ImportRecord, store: Path, stop: threading.Event) -> ImportResult:
        self._combine_chunks(record)
        return import_list(self.folder / record.file, store, stop)

    def _start_import(self, record: ImportRecord) -> None:
        task = self.spawn(self._run_import(record), f"import {record.import_id}")
        self._running_imports[record.import_id] = task
        task.add_done_callback(lambda _: self._running_imports.pop(record.import_id, None))

    async def finished_import(self, import_id: str) -> ImportRecord:
        """The import once its background work has ended: ``done`` or ``failed`` (unless stopping)."""
        task = self._running_imports.get(import_id)
        if task is not None:
            await asyncio.wait({task})
        return self.state.imports[import_id]

    async def _run_import(self, record: ImportRecord) -> None:
        delay = self.settings.import_delay_s
        try:
            if record.state is ImportState.QUEUED:
                await asyncio.sleep(delay)
                record.state = ImportState.RUNNING
                await self.state.save()
            try:
                store = self.list_store(record.import_id)
                if record.source == "rows":
                    result = await asyncio.to_thread(self._read_rows_import, record, store, self.stopping)
                else:
                    result = await asyncio.to_thread(
                        self.flavor.read_list, self.folder / record.file, store, self.stopping
                    )
            except OSError as exc:
                log.exception("import could not be read", extra={"import_id": record.import_id})
                result = ImportResult(failed=True)
                result.error(1, f"cannot import the file: {exc.strerror or exc}")
            # The import stays observable as running for a moment, as at a real ESP.
            await asyncio.sleep(delay)
        except ImportInterruptedError:
            log.info("import interrupted; redone at the next start", extra={"import_id": record.import_id})
            return
        record.rows_total = result.rows_total
        record.rows_valid = result.rows_valid
        record.rows_invalid = result.rows_invalid
        record.errors = result.errors
        if result.failed:
            record.state = ImportState.FAILED
        else:
            if record.contact_list is not None:
                await self.subscribe_imported(record.import_id, record.contact_list)
            record.list_id = _new_id("lst")
            record.state = ImportState.DONE
        await self.state.save()
        log.info(
            "import finished",
            extra={
                "account": self.name,
                "import_id": record.import_id,
                "state": record.state.value,
                "rows_valid": record.rows_valid,
                "rows_invalid": record.rows_invalid,
            },
        )

    # Sends

    async def create_send(
        self,
        import_id: str,
        message: str,
        external_id: str,
        send_at: datetime | None,
        attrs: Mapping[str, str] | None = None,
    ) -> tuple[SendRecord, bool]:
        """A new send (and True), or the existing one with this ``external_id`` (and False).

        ``attrs`` are the flavor's own attributes, saved with the send and given to its response
        format as ``Broadcast.attrs``.
        """
        existing = self.state.sends_by_external_id(external_id)
        if existing:
            return existing[0], False
        imported = self.state.imports.get(import_id)
        if imported is None:
            raise EspError(404, "import_not_found", f"no import {import_id}")
        if imported.state is not ImportState.DONE:
            raise EspError(409, "import_not_done", f"import {import_id} is {imported.state.value}, not done")
        record = SendRecord(
            send_id=_new_id("snd"),
            external_id=external_id,
            import_id=import_id,
            message=message,
            recipients=imported.rows_valid,
            send_at=utc_text(send_at) if send_at is not None else None,
            starts_at=send_at.timestamp() if send_at is not None else None,
            created_at=utc_text(_now()),
            seed=self.settings.seed,
            rows_per_file=self.settings.rows_per_file,
            rates=self.settings.rate,
            malformed_every=self.settings.malformed_every,
            attrs=dict(attrs or {}),
        )
        self.state.sends[record.send_id] = record
        await self.state.save()
        self._log_created(
            "send",
            send_id=record.send_id,
            external_id=external_id,
            recipients=record.recipients,
            send_at=record.send_at,
        )
        self.spawn(self._run_send(record), f"send {record.send_id}")
        return record, True

    async def cancel_send(self, send_id: str) -> SendRecord:
        """Cancel a send whose messages have not gone out: it ends ``cancelled`` with no responses.

        A send already cancelled is answered as it is; one past that point keeps its state (the
        caller tells the client it is too late). 404 ``send_not_found``.
        """
        record = self.state.sends.get(send_id)
        if record is None:
            raise EspError(404, "send_not_found", f"no send {send_id}")
        if record.state not in (SendState.SCHEDULED, SendState.SENDING) or send_id in self._writing:
            return record
        record.state = SendState.CANCELLED
        record.finished_at = utc_text(_now())
        record.responses_complete = True  # none will be written; a restart does not resume it
        self._send_wakeups.setdefault(send_id, asyncio.Event()).set()
        await self.state.save()
        log.info("send cancelled", extra={"account": self.name, "send_id": send_id})
        return record

    async def _until(self, record: SendRecord, seconds: float) -> None:
        """Wait ``seconds``, or less if the send is cancelled meanwhile."""
        woken = self._send_wakeups.setdefault(record.send_id, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(woken.wait(), max(0.0, seconds))

    async def _run_send(self, record: SendRecord) -> None:
        try:
            await self._send(record)
        except SendInterruptedError:
            log.info("send interrupted; resumed at the next start", extra={"send_id": record.send_id})
        except Exception as exc:
            log.exception("send failed", extra={"account": self.name, "send_id": record.send_id})
            if record.state in (SendState.SCHEDULED, SendState.SENDING):
                record.state = SendState.FAILED
                record.finished_at = utc_text(_now())
                record.error = f"the send could not be carried out: {exc}"
            await self.state.save()
        finally:
            self._send_wakeups.pop(record.send_id, None)
            self._writing.discard(record.send_id)

    async def _send(self, record: SendRecord) -> None:
        if record.state is SendState.SCHEDULED:
            if record.starts_at is not None:
                await self._until(record, record.starts_at - time.time())
            if _cancelled(record):
                return
            record.state = SendState.SENDING
            record.started_at = utc_text(_now())
            await self.state.save()
            log.info("sending", extra={"account": self.name, "send_id": record.send_id})
            if self.settings.send_delay_s:
                await self._until(record, self.settings.send_delay_s)  # a real send takes a while
        if _cancelled(record):
            return
        self._writing.add(record.send_id)
        store = self.list_store(record.import_id)
        if not store.is_file():
            raise FileNotFoundError(f"the imported list of {record.import_id} is gone: {store}")
        started = parse_utc(record.started_at) if record.started_at else _now()
        broadcast = Broadcast(
            account_dir=self.folder,
            send_id=record.send_id,
            external_id=record.external_id,
            message=record.message,
            recipients=record.recipients,
            list_store=store,
            t0=int(started.timestamp()),
            seed=record.seed,
            rates=record.rates,
            rows_per_file=record.rows_per_file,
            malformed_every=record.malformed_every,
            attrs=dict(record.attrs),
        )
        responses = self.flavor.responses
        writer = responses.writer(self, record, broadcast)
        await writer.start()
        for index, phase in enumerate(responses.phases):
            # Responses trickle in: a pause before each later phase, once this run has written a file.
            if index and writer.files_written:
                await asyncio.sleep(self.settings.phase_delay_s)
            await writer.write_phase(phase)
            if EventType.SENT in phase.types and record.state is SendState.SENDING:
                record.state = SendState.SENT
                record.finished_at = utc_text(_now())
                await self.state.save()
                log.info("sent", extra={"account": self.name, "send_id": record.send_id})
        await writer.finish()
        record.responses_complete = True
        await self.state.save()
        log.info(
            "responses complete",
            extra={"account": self.name, "send_id": record.send_id, "counts": writer.counts},
        )

    async def name_file(
        self, record: SendRecord, broadcast: Broadcast, phase: ResponsePhase, seq: int
    ) -> str:
        """The path of the send's ``seq``-th response file: the saved one, or a new one saved now."""
        if seq <= len(record.files):
            return record.files[seq - 1]
        responses = self.flavor.responses
        assert isinstance(responses, ResponseFormat)
        path = responses.file_name(PendingFile(broadcast, phase, seq, _now(), self._path_taken))
        record.files.append(path)
        await self.state.save()
        return path

    def _path_taken(self, path: str) -> bool:
        """Whether a response file path is in use: on disk, archived, or chosen by a send of this account."""
        responses = self.flavor.responses
        assert isinstance(responses, ResponseFormat)
        archive = self.folder / responses.archive_folder
        return (
            (self.folder / path).exists()
            or (archive / PurePosixPath(path).name).exists()
            or any(path in snd.files for snd in self.state.sends.values())
        )
