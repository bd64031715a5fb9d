"""Checking a broadcast job before its run, against the live system, changing nothing: what
``espbridge job check`` and ``job publish`` (by default) do.

Every check a job would otherwise fail later, asynchronously, is made here with the code the
services run: the account and its connector (the mode it takes, its list format), the field map,
the table and every column it names, the recipients and those opted out, the first rows of the
list file exactly as the uploader would write them (:mod:`shared.operations.lists`), the send time,
the job id, and whether the job fits on its topic. Nothing is uploaded, published or sent.
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import aiohttp

from shared.esp import Accounts, AccountsSettings, Connector, ConnectorContext, ListFormat, connector_for
from shared.infra.db import Conn, connect, jobs
from shared.infra.kafka import PRODUCER_MAX_REQUEST_BYTES, max_message_bytes, record_bytes
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.errors import PermanentError
from shared.model.messages import (
    BroadcastJob,
    CsvSelection,
    InlineSelection,
    SendMode,
    TableSelection,
    utcnow,
)
from shared.model.topics import Topic
from shared.operations import lists, selection
from shared.operations.selection import Counted, SelectionSettings, Suppression

FIRST_ROWS = 5
"""How many rows of the list file the check shows."""


class Verdict(StrEnum):
    """What one check found."""

    OK = "ok"
    """Nothing stops the job here."""
    FAILED = "failed"
    """The job would fail: publishing it is refused."""
    SKIPPED = "skipped"
    """Not checked: what it needs failed, or cannot be seen from here (``detail`` says which)."""


@dataclass(frozen=True, slots=True)
class Finding:
    """One check of a job: what was checked, the verdict, and in words what was found."""

    check: str
    verdict: Verdict
    detail: str


@dataclass(frozen=True, slots=True)
class ListHead:
    """The start of the job's list file as the uploader would write it."""

    path: str
    """Where on the ESP's SFTP site it would be written."""
    text: str
    """The header and the first rows, decoded from the list format's encoding."""
    rows: int


@dataclass(frozen=True, slots=True)
class JobCheck:
    """Everything the check found about a job."""

    job: BroadcastJob
    findings: tuple[Finding, ...]
    counted: Counted | None
    head: ListHead | None

    @property
    def ok(self) -> bool:
        """Whether nothing would fail the job."""
        return all(f.verdict is not Verdict.FAILED for f in self.findings)

    @property
    def problems(self) -> list[str]:
        """Each failed check, as ``check: why``."""
        return [f"{f.check}: {f.detail}" for f in self.findings if f.verdict is Verdict.FAILED]


def _ok(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.OK, detail)


def _failed(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.FAILED, detail)


def _skipped(check: str, detail: str) -> Finding:
    return Finding(check, Verdict.SKIPPED, detail)


def _connector(job: BroadcastJob, accounts: Accounts, http: aiohttp.ClientSession) -> Connector | Finding:
    """The job's connector, or the finding that says why there is none for it."""
    try:
        connector = connector_for(accounts.get(job.esp, job.account), ConnectorContext(http))
        lists.check_mode(job, connector.can_send, connector.account.connector)
    except PermanentError as exc:
        return _failed("account", str(exc))
    return connector


def account_finding(job: BroadcastJob, connector: Connector) -> Finding:
    """What the account check says of an account that takes the job."""
    sends = "sends" if connector.can_send else "takes upload_only jobs only"
    return _ok("account", f"{job.esp}/{job.account}: the {connector.account.connector} connector ({sends})")


def field_map_finding(job: BroadcastJob, fmt: ListFormat) -> tuple[Finding, list[str] | None]:
    """The field map against the ESP's list format, and the list file's header if it is complete."""
    try:
        header = lists.list_columns(job, fmt.email_field, fmt.key_field)
    except lists.FieldMapError as exc:
        return _failed("field map", str(exc)), None
    pairs = [f"{column} → {field}" for column, field in job.field_map.items()]
    if fmt.key_field not in job.field_map.values():
        pairs.append(f"{job.communication_key} → {fmt.key_field} (the key, added)")
    return _ok("field map", ", ".join(pairs)), header


def send_time_finding(job: BroadcastJob, now: datetime) -> Finding:
    """The send time: none for upload_only jobs, else now or a time still ahead (any time ahead:
    the monitor holds every send until its ``send_at``, whatever the ESP can schedule)."""
    if job.mode is SendMode.UPLOAD_ONLY:
        return _ok("send time", "none: an upload_only job is uploaded and imported, not sent")
    if job.send_at is None:
        return _ok("send time", "as soon as the list is imported")
    when = f"{job.send_at:%Y-%m-%d %H:%M:%S} UTC"
    if job.send_at <= now:
        return _failed("send time", f"send_at {when} is in the past ({_span(now - job.send_at)} ago)")
    return _ok("send time", f"{when}, in {_span(job.send_at - now)}")


def _span(delta: timedelta) -> str:
    """A duration as a person says it: ``3 d 4 h``, ``2 h 5 min``, ``40 s``."""
    seconds = int(delta.total_seconds())
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h"
    if hours:
        return f"{hours} h {minutes} min"
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


async def job_id_finding(conn: Conn, job: BroadcastJob) -> Finding:
    """Whether the job id is new; publishing a known job again retries only an upload that failed."""
    row = await jobs.get_job(conn, job.job_id)
    if row is None and await jobs.cancel_requested(conn, job.job_id):
        return _failed("job id", f"{job.job_id} was cancelled before it was published: it would be refused")
    if row is None:
        return _ok("job id", f"{job.job_id} is new")
    if (row.stage, row.state) == ("upload", "failed"):
        return _ok("job id", f"{job.job_id} failed at upload before: publishing it again retries the upload")
    return _failed(
        "job id",
        f"{job.job_id} exists already ({row.stage} {row.state}): publishing it again does nothing; "
        "give the job a new job_id",
    )


async def size_finding(kafka: KafkaSettings, job: BroadcastJob) -> Finding:
    """Whether the job fits on broadcast.jobs.v1: the producer's limit and the topic's."""
    size = record_bytes(job)
    topic_limit = await max_message_bytes(kafka, Topic.BROADCAST_JOBS)
    limit, whose = PRODUCER_MAX_REQUEST_BYTES, "the producer's max_request_size"
    if topic_limit is not None and topic_limit < limit:
        limit, whose = topic_limit, f"{kafka.topic(Topic.BROADCAST_JOBS)}'s max.message.bytes"
    if size > limit:
        return _failed(
            "size",
            f"the job is {size:,} bytes, over the limit of {limit:,} bytes ({whose}): read the "
            "recipients out of a table or a CSV file rather than inline rows, or name fewer columns",
        )
    return _ok("size", f"{size:,} bytes of the {limit:,} {whose} allows")


def count_finding(counted: Counted, column: str) -> Finding:
    """The recipients and those excluded, by the subscription state and by the suppression column;
    nobody left is a failure, as the uploader's."""
    if counted.recipients == 0:
        excluded = lists.excluded_text(counted.by_state, counted.by_column)
        return _failed("recipients", f"the selection has no recipients ({excluded})")
    by_state = (
        f"{counted.by_state:,} by the subscription state"
        if counted.state_checked
        else "none by the subscription state (the CRM keeps none)"
    )
    by_column = (
        f"{counted.by_column:,} as opted out ({column})"
        if counted.suppression_checked
        else f"none as opted out (the selection has no {column} column)"
    )
    excluded = f"{counted.excluded:,} excluded" if counted.excluded else "nobody excluded"
    return _ok("recipients", f"{counted.recipients:,} to upload, {excluded}: {by_state}, {by_column}")


async def _count_rows(rows: AsyncIterator[Any]) -> int:
    n = 0
    async for _ in rows:
        n += 1
    return n


async def count_recipients(
    conn: Conn, job: BroadcastJob, wanted: list[str], reading: SelectionSettings, suppression: Suppression
) -> Counted:
    """How many recipients the selection holds and how many it leaves out (the uploader's rules),
    read through the CRM connection."""
    sel, column = job.selection, reading.suppression_column
    state_checked = suppression.scope is not None
    if isinstance(sel, TableSelection):
        return await selection.count_table(conn, sel, wanted, suppression)
    tally = selection.Tally()
    if isinstance(sel, CsvSelection):
        path = selection.resolve_csv(reading.csv_dir, sel.path)
        with path.open(encoding="utf-8-sig", newline="") as f:
            has_column = column in next(csv.reader(f, delimiter=sel.delimiter), [])
        kept = await _count_rows(selection.from_csv(path, sel, wanted, suppression, tally))
    else:
        assert isinstance(sel, InlineSelection)
        has_column = any(column in row for row in sel.rows)
        kept = await _count_rows(selection.from_inline(sel, wanted, suppression, tally))
    return Counted(kept, tally.by_column, has_column, tally.by_state, state_checked)


async def list_head(
    conn: Conn,
    job: BroadcastJob,
    connector: Connector,
    header: list[str],
    reading: SelectionSettings,
    suppression: Suppression,
    rows: int = FIRST_ROWS,
) -> ListHead:
    """The header and first rows of the list file, written by the uploader's own code."""
    fmt = connector.list_format
    wanted = lists.source_columns(job, fmt.key_field)
    stream = lists.ListStream(header=header, fmt=fmt, limit=rows)
    copied = isinstance(job.selection, TableSelection) and lists.copy_can_write(fmt)
    async with conn.transaction(readonly=True):
        file = lists.list_file(stream, job, wanted, reading, suppression, conn, copied=copied)
        data = b"".join([chunk async for chunk in file])
    return ListHead(connector.list_path(job), data.decode(fmt.encoding, "replace"), stream.rows)


def _selection_text(job: BroadcastJob, counted: Counted) -> str:
    sel = job.selection
    if isinstance(sel, TableSelection):
        filters = f", filtered on {', '.join(sel.filters)}" if sel.filters else ""
        return f"{sel.table}: every one of its {len(sel.columns)} selected columns exists{filters}"
    if isinstance(sel, CsvSelection):
        return f"CSV file {sel.path}: has every column the field map and key name"
    return f"{counted.recipients + counted.excluded} inline rows, each with every mapped column"


async def _suppression(
    crm: Conn, job: BroadcastJob, connector: Connector | None, reading: SelectionSettings
) -> Suppression:
    """The uploader's suppression of the job; the suppression column alone without an account (or
    a field map that names the email)."""
    if connector is None:
        return Suppression(reading.suppression_column)
    return await lists.job_suppression(crm, job, connector, reading)


async def check_job(
    job: BroadcastJob,
    *,
    kafka: KafkaSettings,
    pg: PostgresSettings,
    accounts: AccountsSettings,
    reading: SelectionSettings,
    now: datetime | None = None,
    first_rows: int = FIRST_ROWS,
) -> JobCheck:
    """Check a job against the live system; nothing is changed. A server that cannot be reached
    raises (UnavailableError); everything the job itself gets wrong is a failed finding."""
    findings: list[Finding] = []
    counted: Counted | None = None
    head: ListHead | None = None
    async with aiohttp.ClientSession() as http:  # connectors are built, never called
        found = _connector(job, Accounts.load(accounts), http)
        connector = found if isinstance(found, Connector) else None
        if connector is None:
            assert isinstance(found, Finding)
            findings += [found, _skipped("field map", "needs the account's list format")]
            header = None
            wanted = [*job.field_map, job.communication_key]
        else:
            fmt = connector.list_format
            findings.append(account_finding(job, connector))
            field_map, header = field_map_finding(job, fmt)
            findings.append(field_map)
            wanted = lists.source_columns(job, fmt.key_field)
        async with contextlib.AsyncExitStack() as opened:
            conn = await connect(pg)
            opened.push_async_callback(conn.close)
            findings.append(await job_id_finding(conn, job))
            crm = conn  # selections are read from the CRM database, espbridge's unless moved
            if not reading.crm.same_database(pg):
                crm = await connect(reading.crm.resolve(pg))
                opened.push_async_callback(crm.close)
            if isinstance(job.selection, CsvSelection) and reading.csv_dir is None:
                findings.append(
                    _skipped(
                        "selection",
                        "the uploader reads CSV files from its ESPBRIDGE_UPLOADER_CSV_DIR, not set "
                        "here: set it to the same folder to check the file",
                    )
                )
            else:
                try:
                    suppression = await _suppression(crm, job, connector if header else None, reading)
                    counted = await count_recipients(crm, job, wanted, reading, suppression)
                except selection.SelectionError as exc:
                    findings.append(_failed("selection", str(exc)))
                else:
                    findings += [
                        _ok("selection", _selection_text(job, counted)),
                        count_finding(counted, reading.suppression_column),
                    ]
                    if connector is not None and header is not None and counted.recipients:
                        head = await list_head(crm, job, connector, header, reading, suppression, first_rows)
    findings.append(send_time_finding(job, now or utcnow()))
    findings.append(await size_finding(kafka, job))
    return JobCheck(job, tuple(findings), counted, head)
