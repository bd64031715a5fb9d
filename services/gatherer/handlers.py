"""The gatherer: a scan loop that announces new files, and a worker per file message.

A worker downloads the file to local disk (constant memory), parses it as a stream, publishes its
events (waiting for Kafka's acknowledgements), dead-letters bad rows with file and line, and only
then archives the file on the ESP side. A crash anywhere re-processes the file; the events' ids
are deterministic, so the loader absorbs the duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import asyncssh
from aiohttp import web

from services.gatherer import core
from services.gatherer.originals import RecordReader, row_letter, with_originals
from services.gatherer.settings import Settings
from shared.esp import BadRow, NotSupportedError, WebhookAuthError, attribution
from shared.esp.accounts import UnknownAccountError
from shared.esp.resources import EspResources
from shared.infra.db import files
from shared.infra.kafka import BatchPublisher
from shared.infra.logs import log_context
from shared.infra.outages import backoff_s, unreachable_server
from shared.infra.sftp import download_stream, safe_local_name
from shared.model.deadletters import webhook_letter
from shared.model.errors import PermanentError, is_transient
from shared.model.events import EncodedEvent
from shared.model.messages import Message, ResponseEvent, ResponseFile, SubscriptionChange, decode
from shared.operations.gathering import pull_api, scan
from shared.runtime.failpoints import Point
from shared.runtime.runtime import Runtime
from shared.runtime.status import StatusReporter

log = logging.getLogger(__name__)


@dataclass
class Gatherer:
    """The gatherer's per-process resources."""

    settings: Settings
    runtime: Runtime
    pool: asyncpg.Pool
    esp: EspResources
    work_dir: Path
    events: BatchPublisher
    """Publishes the events of response files (whole record batches)."""
    statuses: StatusReporter
    """Publishes the gather statuses of files (published only, not recorded in control.jobs)."""
    pull_errors: dict[str, str] = field(default_factory=dict)
    """The last API pull error reported per job (see :func:`shared.operations.gathering.pull_api`)."""
    unreadable: set[str] = field(default_factory=set)
    """Response files with names that are not UTF-8, reported once
    (see :func:`shared.operations.gathering.scan`)."""
    swept: dict[str, float] = field(default_factory=dict)
    """When each account's list folder was last swept of stale partial uploads."""

    async def scan_once(self) -> int:
        """Scan every account's folders and pull its API once; returns files announced + events pulled."""
        kafka = self.settings.kafka
        files = await scan(
            self.esp.connectors,
            self.esp.sftp,
            self.pool,
            self.runtime.broker,
            kafka,
            self.settings.republish_after_s,
            self.unreadable,
            hidden_grace_s=self.settings.hidden_file_grace_s,
            metrics=self.runtime.metrics,
            swept=self.swept,
        )
        pulled = await pull_api(
            self.esp.connectors,
            self.pool,
            self.runtime.broker,
            kafka,
            self.settings.api_window_days,
            reported=self.pull_errors,
        )
        return len(files) + sum(p.events for p in pulled)

    async def scan_forever(self) -> None:
        """Scan on the configured interval until cancelled; no failure ends the loop.

        While a server is unreachable (or another transient failure lasts) the scan is retried
        with capped backoff, never more often than the interval; any other failure is logged with
        its traceback and the next scan comes at the interval.
        """
        failures = 0
        down: str | None = None
        while True:
            delay = self.settings.scan_interval_s
            try:
                await self.scan_once()
            except Exception as exc:
                server = unreachable_server(exc)
                if server is None and not is_transient(exc):
                    log.exception("scan failed, trying again next interval")
                else:
                    failures += 1
                    delay = max(delay, backoff_s(failures))
                    if server is not None:
                        down = server
                        self.runtime.outages.failed(server, exc, delay, "the scan")
                    else:
                        log.warning("scan failed, retrying", extra={"error": str(exc), "retry_in_s": delay})
            else:
                failures = 0
                if down is not None:
                    self.runtime.outages.reachable(down)
                    down = None
            await asyncio.sleep(delay)  # the scan interval, or the backoff after a failure


async def handle_file(body: bytes, gatherer: Gatherer) -> None:
    """Gather one remote response file."""
    file = decode(ResponseFile, body)
    with log_context(file=core.file_key(file)):
        connector = gatherer.esp.connectors.get(file.esp, file.account)
        account = connector.account
        async with gatherer.pool.acquire() as conn:
            taken = await files.take(conn, file)
        if not taken:
            log.info("file already gathered")
            return
        archive = core.archive_path(file.path, account.sftp_root, connector.archive_folder)
        local = gatherer.work_dir / safe_local_name(file.path)
        try:
            async with gatherer.esp.sftp.session() as sftp:
                if not await _download(sftp, file.path, local):
                    if await sftp.exists(archive):
                        await _archived(gatherer, file, archive, None, None)
                        log.info("file was archived by an earlier attempt")
                        return
                    raise PermanentError(f"response file {file.path} is gone from the ESP's site")
            async with gatherer.pool.acquire() as conn:
                # Where rows are attributed by communication key, the file's keys are looked up first.
                items = await attribution.encoded_file(connector, local, file.path, conn)
            with RecordReader(local) as records:
                events, bad = await _publish_file(gatherer, file, items, records)
            async with gatherer.esp.sftp.session() as sftp:
                await sftp.posix_rename(file.path, archive)
            await _archived(gatherer, file, archive, events, bad)
        finally:
            with contextlib.suppress(FileNotFoundError):
                local.unlink()


async def _download(sftp: asyncssh.SFTPClient, remote: str, local: Path) -> bool:
    """Stream a remote file to local disk; False if it does not exist."""
    try:
        with local.open("wb") as out:
            async for chunk in download_stream(sftp, remote):
                out.write(chunk)
    except asyncssh.SFTPNoSuchFile:
        return False
    return True


LETTER_BYTES = 4 * 1024 * 1024
"""Dead letters of bad rows are published once their payloads reach this size (or at the end)."""


async def _publish_file(
    gatherer: Gatherer, file: ResponseFile, rows: Iterable[EncodedEvent | BadRow], records: RecordReader
) -> tuple[int, int]:
    """Publish a parsed file's events and dead letters; returns (events, bad rows).

    Events go out in windows of ``publish_batch``: a window is sent, then the one before it must be
    acknowledged, so parsing overlaps Kafka's work and at most two windows are held. A bad row's
    dead letter waits for the next item, whose line ends the row's original bytes.
    """
    window: list[tuple[bytes, bytes]] = []
    in_flight: list[asyncio.Future[Any]] = []
    letters: list[Message] = []
    letter_bytes = 0
    per_broadcast: Counter[str] = Counter()
    events = bad = 0
    header = records.header_text()
    size = gatherer.settings.publish_batch
    for item in with_originals(rows, records):  # parsed from local disk, a window at a time
        if isinstance(item, EncodedEvent):
            events += 1
            per_broadcast[item.broadcast_id] += 1
            window.append((item.key, item.body))
            if len(window) >= size:
                sent = await gatherer.events.send(window)
                window = []
                await gatherer.events.acknowledged(in_flight)
                in_flight = sent
                # part of the file is published
                await gatherer.runtime.failpoints.reach(Point.GATHERER_MID_FILE)
        else:
            bad += 1
            letter = row_letter(file, *item, header)
            letters.append(letter)
            letter_bytes += len(letter.payload)
            if letter_bytes >= LETTER_BYTES or len(letters) >= size:
                await gatherer.runtime.publish_many(letters)
                letters, letter_bytes = [], 0
    sent = await gatherer.events.send(window)
    await gatherer.events.acknowledged([*in_flight, *sent])
    await gatherer.runtime.publish_many(letters)
    await gatherer.statuses.report_all(core.gather_statuses(file, per_broadcast, bad))
    gatherer.runtime.metrics.inc("messages_published_total", events, type="ResponseEvent")
    gatherer.runtime.metrics.inc("events_gathered_total", events, esp=file.esp)
    gatherer.runtime.metrics.inc("bad_rows_total", bad, esp=file.esp)
    log.info("file gathered", extra={"events": events, "bad_rows": bad})
    return events, bad


async def _archived(
    gatherer: Gatherer, file: ResponseFile, archive: str, events: int | None, bad: int | None
) -> None:
    """Mark the file archived in the ledger, with its counts when this attempt gathered it."""
    async with gatherer.pool.acquire() as conn:
        await files.archived(conn, file, archive, events, bad)


async def handle_webhook(request: web.Request, gatherer: Gatherer) -> web.Response:
    """``POST /webhooks/{esp}/{account}``: authenticate, parse, publish; bad items are dead-lettered."""
    esp, account = request.match_info["esp"], request.match_info["account"]
    body = await request.read()
    where = f"webhook:{esp}/{account}"
    # Calls to accounts that have no webhooks are answered 404 and logged, naming no account.
    try:
        connector = gatherer.esp.connectors.get(esp, account)
        items = connector.parse_webhook(request.headers, body)
    except (UnknownAccountError, NotSupportedError):
        log.warning(
            "webhook call to an account without webhooks refused",
            extra={"webhook": where, "peer": request.remote},
        )
        return web.json_response(
            {"error": "not_found", "message": f"no webhook at {esp}/{account}"}, status=404
        )
    except WebhookAuthError as exc:
        log.warning(
            "webhook refused: not authenticated",
            extra={"webhook": where, "error": str(exc), "peer": request.remote},
        )
        gatherer.runtime.metrics.inc("webhook_unauthorized_total", esp=esp)
        # Recorded for the operator (an ESP with an outdated secret shows in `espbridge dlq list`);
        # the letter keeps the body's size only, as it may carry a credential.
        await gatherer.runtime.dead_letter(
            webhook_letter(
                esp, account, body, type(exc).__name__, str(exc), core.SERVICE_NAME, authenticated=False
            )
        )
        return web.json_response({"error": "unauthorized", "message": str(exc)}, status=401)
    except PermanentError as exc:
        await gatherer.runtime.dead_letter(
            webhook_letter(esp, account, body, type(exc).__name__, str(exc), core.SERVICE_NAME)
        )
        log.warning(
            "webhook body rejected to the dead-letter topic",
            extra={"webhook": where, "error_class": type(exc).__name__, "error": str(exc)[:2000]},
        )
        return web.json_response({"error": "rejected", "message": str(exc)}, status=400)
    events = [i for i in items if isinstance(i, ResponseEvent)]
    changes = [i for i in items if isinstance(i, SubscriptionChange)]
    letters = [
        webhook_letter(esp, account, i.raw, "BadWebhookItem", i.error, core.SERVICE_NAME, line=i.line)
        for i in items
        if isinstance(i, BadRow)
    ]
    # acknowledged by Kafka before we answer 200
    await gatherer.runtime.publish_many([*events, *changes, *letters])
    gatherer.runtime.metrics.inc("webhook_events_total", len(events), esp=esp)
    gatherer.runtime.metrics.inc("webhook_subscription_changes_total", len(changes), esp=esp)
    accepted = len(events) + len(changes)
    log.info(
        "webhook received",
        extra={"webhook": where, "accepted": accepted, "changes": len(changes), "rejected": len(letters)},
    )
    return web.json_response({"accepted": accepted, "rejected": len(letters)})


def default_work_dir() -> Path:
    """A private download folder for this process."""
    return Path(tempfile.mkdtemp(prefix="espbridge-gatherer-"))
