"""Finding response data: files in the accounts' response folders, and pages of their APIs.

* :func:`scan` lists each account's response folders, records new files in the ledger
  (control.gathered_files) and publishes one ResponseFile per new file for the gatherer workers,
  in one transaction that commits after Kafka acknowledged the messages.
  The ledger's unique key makes concurrent scans publish each file once; a file recorded but not
  taken after ``republish_after_s`` is published again (its first message may have been lost).
  A hidden file there (a leading ``.`` or a ``.partial`` ending) is an upload in progress while
  young, and reported once when old; espbridge's own partial uploads that old are removed from
  the accounts' list folders.
* :func:`pull_api` asks each API-capable account for the responses of its recently sent
  broadcasts, page by page from a stored cursor (control.api_cursors), publishing the events
  before it stores the next cursor; an advisory lock keeps two gatherers off the same broadcast.
  Each pull that brought responses is reported on the broadcast's status; so is a pull that
  failed (once per distinct error, until it works again): ``failed`` when only the operator can
  fix the cause (refused credentials, a bad configuration), ``running`` with the error otherwise.

Used by every gatherer process on its interval and by ``espbridge gather now`` (:func:`gather_now`).
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import math
import posixpath
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import asyncpg
from asyncssh import SFTPClient
from faststream.kafka import KafkaBroker

from shared.esp import AccountConfig, AccountsSettings, BadRow, Connector, Connectors
from shared.esp.resources import EspResources
from shared.infra.db import Conn, create_pool, cursors, files, jobs
from shared.infra.db.jobs import SentBroadcast
from shared.infra.health import Metrics
from shared.infra.kafka import ensure_topics, publish_many
from shared.infra.settings import KafkaSettings, PostgresSettings, SftpSettings
from shared.infra.sftp import (
    HiddenFile,
    RemoteFile,
    SftpPool,
    is_partial_upload,
    list_folder,
    remove_if_present,
    shown_path,
)
from shared.model.deadletters import api_item_letter, file_name_letter, hidden_file_letter
from shared.model.errors import EspbridgeError, PermanentError
from shared.model.messages import (
    BroadcastStatus,
    DeadLetter,
    Message,
    ResponseEvent,
    ResponseFile,
    Stage,
    State,
)

log = logging.getLogger(__name__)


HIDDEN_GRACE_S = 3600.0
"""How long a hidden file may stay unchanged before it is no longer taken for an upload in progress."""


async def scan(
    connectors: Connectors,
    sftp: SftpPool,
    pool: asyncpg.Pool,
    broker: KafkaBroker,
    kafka: KafkaSettings,
    republish_after_s: float = 300.0,
    unreadable: set[str] | None = None,
    *,
    hidden_grace_s: float = HIDDEN_GRACE_S,
    metrics: Metrics | None = None,
    swept: dict[str, float] | None = None,
) -> list[ResponseFile]:
    """One scan of every configured account's response folders; returns the files it published.

    A file whose name is not UTF-8 is left on the site and reported as a dead letter (payload:
    the name's bytes); ``unreadable`` remembers those reported, so a process scanning on an
    interval reports each once. A hidden file (see :class:`~shared.infra.sftp.HiddenFile`) is
    left alone while it changed within ``hidden_grace_s`` (an upload in progress); after that it
    is reported, never read nor removed: a dead letter, a ``failed`` ledger row that makes it
    once per version of the file, a warning and ``hidden_files_reported_total``. espbridge's own
    partial uploads that old in the accounts' list folders are removed (see
    :func:`remove_stale_partials`). ``swept`` remembers when each list folder was last swept, so a
    process scanning on an interval lists it once per quarter of the grace, not on every scan (a
    partial upload only becomes stale after the grace); without it every scan sweeps.
    """
    found: list[ResponseFile] = []
    hidden: list[ResponseFile] = []
    letters: list[DeadLetter] = []
    unreadable = set() if unreadable is None else unreadable
    changed_since = time.time() - hidden_grace_s  # remote mtimes against our clock: the grace absorbs skew
    cleaned: set[str] = set()
    sweep_after = time.monotonic() - hidden_grace_s / 4

    def report_unreadable(where: str, raw: bytes) -> None:
        if where not in unreadable:
            unreadable.add(where)
            letters.append(file_name_letter(where, raw, "gatherer"))
            log.warning("response file name is not UTF-8, file left in place", extra={"file": where})

    for connector in connectors.all():
        account = connector.account
        drop = posixpath.join(account.sftp_root, connector.list_format.drop_folder)
        async with sftp.session() as session:
            if drop not in cleaned and (swept is None or swept.get(drop, -math.inf) <= sweep_after):
                cleaned.add(drop)
                if swept is not None:
                    swept[drop] = time.monotonic()
                removed = await remove_stale_partials(session, drop, changed_since)
                _count(metrics, "stale_partials_removed_total", len(removed), account.esp)
            for source in connector.response_sources:
                folder = posixpath.join(account.sftp_root, source.folder)
                try:
                    listing = await list_folder(session, folder)
                except PermanentError as exc:
                    # One account's missing folder must not stop the scan of the others.
                    log.warning("response folder not scanned", extra={"folder": folder, "error": str(exc)})
                    continue
                for raw in listing.unreadable:
                    report_unreadable(shown_path(folder, raw), raw)
                for hid in listing.hidden:
                    if hid.mtime > changed_since:
                        continue  # an upload in progress, most likely
                    if hid.name is None:
                        report_unreadable(hid.shown, hid.raw_name)
                    elif not (folder == drop and is_partial_upload(hid.name)):
                        hidden.append(_response_file(account, posixpath.join(folder, hid.name), hid))
                for remote in listing.files:
                    if fnmatch.fnmatch(posixpath.basename(remote.path), source.pattern):
                        found.append(_response_file(account, remote.path, remote))
    to_publish: list[ResponseFile] = []
    reported: list[ResponseFile] = []
    # The new rows commit only once Kafka has the files' messages: if publishing fails (Kafka
    # down), the next scan finds the files new again instead of waiting for republish_after_s.
    async with pool.acquire() as conn, conn.transaction():
        for file in found:
            if await files.record_found(conn, file, republish_after_s):
                to_publish.append(file)
        for file in hidden:
            letter = hidden_file_letter(file.esp, file.account, file.path, hidden_grace_s, "gatherer")
            if await files.record_unread(conn, file, letter.message):
                letters.append(letter)
                reported.append(file)
        await publish_many(broker, kafka, [*letters, *to_publish])
    for file in reported:
        log.warning(
            "hidden response file unchanged for longer than an upload takes: reported, left unread",
            extra={"file": file.path, "esp": file.esp, "account": file.account, "size": file.size},
        )
        _count(metrics, "hidden_files_reported_total", 1, file.esp)
    if to_publish:
        log.info("response files found", extra={"files": len(to_publish)})
    return to_publish


async def remove_stale_partials(session: SFTPClient, folder: str, changed_since: float) -> list[str]:
    """Remove from a list folder espbridge's own partial uploads unchanged since ``changed_since``
    (an upload that crashed before its rename); returns the paths removed.

    Only names exactly of the uploader's form are touched (:func:`~shared.infra.sftp.is_partial_upload`);
    a file another process removed first is no error. A folder not there yet holds nothing.
    """
    try:
        listing = await list_folder(session, folder)
    except PermanentError:
        return []
    removed: list[str] = []
    for hid in listing.hidden:
        if hid.name is None or hid.mtime > changed_since or not is_partial_upload(hid.name):
            continue
        path = posixpath.join(folder, hid.name)
        try:
            if not await remove_if_present(session, path):
                continue
        except PermanentError as exc:
            log.warning("stale partial upload not removed", extra={"file": path, "error": str(exc)})
            continue
        log.warning("stale partial upload removed", extra={"file": path, "size": hid.size})
        removed.append(path)
    return removed


def _response_file(account: AccountConfig, path: str, remote: RemoteFile | HiddenFile) -> ResponseFile:
    return ResponseFile(
        esp=account.esp,
        account=account.account,
        path=path,
        size=remote.size,
        mtime=datetime.fromtimestamp(remote.mtime, UTC),
    )


def _count(metrics: Metrics | None, name: str, value: int, esp: str) -> None:
    if metrics is not None and value:
        metrics.inc(name, value, esp=esp)


@dataclass
class PullResult:
    """What one API pull of one broadcast published."""

    job_id: str
    pages: int = 0
    events: int = 0
    bad_items: int = 0


async def pull_api(
    connectors: Connectors,
    pool: asyncpg.Pool,
    broker: KafkaBroker,
    kafka: KafkaSettings,
    window_days: float = 30.0,
    service: str = "gatherer",
    reported: dict[str, str] | None = None,
) -> list[PullResult]:
    """Pull new responses of every recently sent broadcast of every API-capable account.

    ``reported`` maps a job id to the last pull error published for it; a process that pulls on
    an interval keeps it between calls so that a lasting error is reported once, not every pass.
    """
    results: list[PullResult] = []
    reported = {} if reported is None else reported
    for connector in connectors.all():
        if not connector.pulls_api:
            continue
        account = connector.account
        async with pool.acquire() as conn:
            broadcasts = await jobs.sent_broadcasts(conn, account.esp, account.account, window_days)
        for broadcast in broadcasts:
            async with pool.acquire() as conn:
                if not await cursors.try_lock_pull(conn, broadcast.job_id):
                    continue  # another gatherer is pulling this broadcast right now
                try:
                    result = await _pull_one(connector, broadcast, conn, broker, kafka, service)
                except EspbridgeError as exc:
                    # One broadcast's trouble must not stop the others; the next pass tries again
                    # from the stored cursor.
                    error = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "API pull failed",
                        extra={
                            "job_id": broadcast.job_id,
                            "esp": account.esp,
                            "account": account.account,
                            "error_class": type(exc).__name__,
                            "error": str(exc),
                        },
                    )
                    if reported.get(broadcast.job_id) != error:
                        reported[broadcast.job_id] = error
                        await publish_many(
                            broker, kafka, [pull_failed_status(broadcast.job_id, exc, service)]
                        )
                else:
                    results.append(result)
                    recovered = reported.pop(broadcast.job_id, None) is not None
                    if result.events or result.bad_items or recovered:
                        await publish_many(broker, kafka, [pulled_status(result, recovered, service)])
                finally:
                    await cursors.unlock_pull(conn, broadcast.job_id)
    return results


def pull_failed_status(job_id: str, exc: EspbridgeError, service: str) -> BroadcastStatus:
    """The status of a broadcast whose API pull failed: ``failed`` if the cause needs the operator."""
    lasting = isinstance(exc, PermanentError)
    return BroadcastStatus(
        job_id=job_id,
        stage=Stage.GATHER,
        state=State.FAILED if lasting else State.RUNNING,
        detail=f"API pull failed ({type(exc).__name__}): {exc}; retried every scan"
        + ("; fix the account's configuration" if lasting else ""),
        service=service,
    )


def pulled_status(result: PullResult, recovered: bool, service: str) -> BroadcastStatus:
    """The status of a broadcast after an API pull that worked."""
    detail = f"{result.events} events from the ESP's API"
    return BroadcastStatus(
        job_id=result.job_id,
        stage=Stage.GATHER,
        state=State.RUNNING,
        counts={"events": result.events, "bad_items": result.bad_items},
        detail=("API pull works again; " if recovered else "") + detail,
        service=service,
    )


async def _pull_one(
    connector: Connector,
    broadcast: SentBroadcast,
    conn: Conn,
    broker: KafkaBroker,
    kafka: KafkaSettings,
    service: str,
) -> PullResult:
    account = connector.account
    cursor = await cursors.api_cursor(conn, account.esp, account.account, broadcast.job_id)
    result = PullResult(broadcast.job_id)
    while True:
        page = await connector.pull_responses(broadcast, cursor)
        messages: list[Message] = []
        for item in page.items:
            if isinstance(item, ResponseEvent):
                messages.append(item)
                result.events += 1
            elif isinstance(item, BadRow):
                result.bad_items += 1
                messages.append(
                    api_item_letter(
                        account.esp,
                        account.account,
                        broadcast.job_id,
                        result.pages,
                        item.raw,
                        item.error,
                        service,
                    )
                )
        await publish_many(broker, kafka, messages)  # acknowledged before the cursor moves on
        result.pages += 1
        cursor = page.cursor
        await cursors.store_api_cursor(
            conn,
            account.esp,
            account.account,
            broadcast.job_id,
            cursor,
            sum(1 for m in messages if isinstance(m, ResponseEvent)),
            sum(1 for m in messages if isinstance(m, DeadLetter)),
        )
        if not page.more:
            break
    if result.events or result.bad_items:
        log.info(
            "API responses pulled",
            extra={"job_id": broadcast.job_id, "pages": result.pages, "events": result.events},
        )
    return result


async def gather_now(
    kafka: KafkaSettings, pg: PostgresSettings, sftp: SftpSettings, accounts: AccountsSettings
) -> list[ResponseFile]:
    """One scan of every configured account, announcing new response files to the gatherers, and
    one API pull of every account that has one (``espbridge gather now``)."""
    async with contextlib.AsyncExitStack() as stack:
        esp = await EspResources.open(stack, accounts, sftp, pg)
        await ensure_topics(kafka)
        pool = await create_pool(pg)
        stack.push_async_callback(pool.close)
        broker = KafkaBroker(kafka.bootstrap_servers, client_id=f"{kafka.client_id}-cli")
        await broker.start()
        stack.push_async_callback(broker.stop)
        found = await scan(esp.connectors, esp.sftp, pool, broker, kafka, republish_after_s=0.0)
        await pull_api(esp.connectors, pool, broker, kafka, service="cli")
        return found
