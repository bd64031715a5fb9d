"""The unsubscriber export against a real CRM database: each filter honoured, the CRM's own rows
never exported, the file complete and atomic, memory flat however many rows, the syncer's schedule
writing each period's file once with two syncers racing, and ``espbridge subscriptions`` as an
operator runs it (export, show, request)."""

from __future__ import annotations

import csv
import logging
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from shared.infra.db import connect, create_pool
from shared.infra.db.unsubscribers import ListPattern, Unsubscriber
from shared.infra.settings import PostgresSettings
from shared.model.errors import ConfigurationError
from shared.model.messages import RequestOrigin, SubscriptionRequest, SubscriptionState
from shared.model.topics import Topic
from shared.operations import exporting
from shared.operations.exporting import (
    WRITTEN,
    Export,
    ExportSettings,
    Period,
    export_unsubscribers,
    schedule_unsubscriber_export,
)
from shared.runtime.runtime import Runtime
from shared.runtime.settings import ServiceSettings
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import read_until
from tests.fixtures.servers import Servers
from tests.fixtures.waits import wait_for
from tests.integration.test_dlq import Cli
from tools.scratch import create_database, drop_database

DAY = datetime(2026, 12, 7, 12, tzinfo=UTC)


def row(
    email: str,
    where: str,
    state: str = "unsubscribed",
    reason: str = "unsubscribe",
    source: str = "mailup/acme",
    at: datetime = DAY,
) -> Unsubscriber:
    """A crm.subscriptions row: ``where`` is esp/account/list."""
    esp, account, list_id = where.split("/")
    return Unsubscriber(email, esp, account, list_id, state, reason, source, at)


async def write(db: asyncpg.Connection, rows: Sequence[Unsubscriber], *, by_espbridge: bool = True) -> None:
    """Write rows as the syncer does (their source kept), or as the CRM does (its trigger makes
    them the CRM's own)."""
    async with db.transaction():
        if by_espbridge:
            await db.execute("SET LOCAL espbridge.writer = 'espbridge'")
        await db.executemany(
            "INSERT INTO crm.subscriptions (email, esp, account, list, state, reason, source, changed_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            [(r.email, r.esp, r.account, r.list, r.state, r.reason, r.source, r.changed_at) for r in rows],
        )


def read_export(path: Path) -> list[dict[str, str]]:
    """The file's rows as the CRM reads them (UTF-8, ``;``, a header)."""
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter=";"))


def emails(path: Path) -> list[str]:
    return [r["email"] for r in read_export(path)]


BOOK = [
    row("a@x.io", "mailup/acme/news", at=DAY),
    row("b@x.io", "mailup/acme/promo", reason="complaint", at=DAY + timedelta(minutes=1)),
    row("c@x.io", "mailup/acme/*", reason="bounce_hard", at=DAY + timedelta(minutes=2)),
    row("d@x.io", "mailup/other/news", state="removed", reason="deleted", at=DAY + timedelta(minutes=3)),
    row("e@x.io", "optimizely/shop/123", source="optimizely/shop", at=DAY + timedelta(minutes=4)),
    row("f@x.io", "*/*/*", reason="complaint", at=DAY + timedelta(minutes=5)),
    row("g@x.io", "mailup/acme/news", state="subscribed", reason="", at=DAY + timedelta(minutes=6)),
    row("h@x.io", "mailup/acme/news", state="pending", reason="", at=DAY + timedelta(minutes=7)),
]
"""What the ESPs reported: six unsubscribers (one of every list of an account, one of everywhere),
a subscriber and a contact pending its opt-in."""

CRM_OWN = [
    row("crm@x.io", "mailup/acme/news", source="crm", at=DAY + timedelta(minutes=8)),
    row("crm-all@x.io", "*/*/*", reason="opted out", source="crm", at=DAY + timedelta(minutes=9)),
]
"""Opt-outs the CRM wrote itself: it has them already."""


@pytest.fixture
async def book(db: asyncpg.Connection) -> asyncpg.Connection:
    """The CRM database with :data:`BOOK` and :data:`CRM_OWN` in crm.subscriptions."""
    await write(db, BOOK)
    await write(db, CRM_OWN, by_espbridge=False)
    return db


@pytest.fixture(scope="module")
async def shared_book(servers: Servers) -> AsyncIterator[PostgresSettings]:
    """A CRM database with :data:`BOOK` and :data:`CRM_OWN`, for the tests that only read it."""
    settings = await create_database(servers.pg, f"test_book_{uuid.uuid4().hex[:10]}")
    try:
        conn = await connect(settings)
        try:
            await write(conn, BOOK)
            await write(conn, CRM_OWN, by_espbridge=False)
        finally:
            await conn.close()
        yield settings
    finally:
        await drop_database(servers.pg, settings.database, timeout_s=30)


def patterns(*texts: str) -> tuple[ListPattern, ...]:
    return tuple(exporting.parse_list_pattern(t) for t in texts)


FILTERS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("everything", {}, ["a", "b", "c", "d", "e", "f"]),
    # an included list takes its account's opt-outs of every list, and those of everywhere
    ("one list", {"include_lists": patterns("mailup/acme/news")}, ["a", "c", "f"]),
    ("every list of an account", {"include_lists": patterns("mailup/acme/*")}, ["a", "b", "c", "f"]),
    (
        "lists of two ESPs",
        {"include_lists": patterns("mailup/acme/news", "optimizely/shop/123")},
        ["a", "c", "e", "f"],
    ),
    # an excluded list leaves out its own rows only
    ("all but one list", {"exclude_lists": patterns("mailup/acme/news")}, ["b", "c", "d", "e", "f"]),
    ("all but one account", {"exclude_lists": patterns("mailup/acme/*")}, ["d", "e", "f"]),
    (
        "an account but one of its lists",
        {"include_lists": patterns("mailup/acme/*"), "exclude_lists": patterns("mailup/acme/promo")},
        ["a", "c", "f"],
    ),
    ("one reason", {"include_reasons": ("complaint",)}, ["b", "f"]),
    ("reasons in any case", {"include_reasons": ("COMPLAINT", "Bounce_Hard")}, ["b", "c", "f"]),
    ("all but one reason", {"exclude_reasons": ("unsubscribe",)}, ["b", "c", "d", "f"]),
    ("a reason nobody gave", {"include_reasons": ("moved abroad",)}, []),
]


@pytest.mark.parametrize(("name", "selection", "exported"), FILTERS, ids=[f[0] for f in FILTERS])
async def test_the_export_holds_the_unsubscribers_its_filters_take_and_never_the_crms_own(
    shared_book: PostgresSettings, tmp_path: Path, name: str, selection: dict[str, Any], exported: list[str]
) -> None:
    conn = await connect(shared_book)
    try:
        outcome = await export_unsubscribers(conn, Export(tmp_path, **selection), DAY + timedelta(days=1))
    finally:
        await conn.close()

    assert emails(outcome.path) == [f"{e}@x.io" for e in exported]
    assert outcome.rows == len(exported)


async def test_the_file_is_utf8_semicolon_separated_with_a_header_and_times_in_the_exports_zone(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    at = datetime(2026, 12, 7, 9, 30, 15, 250000, tzinfo=UTC)
    await write(
        db,
        [
            row("zoë@exämple.it", "mailup/acme/news", at=at),
            row("quote@x.io", "mailup/acme/*", reason='said "no; never"', at=at + timedelta(seconds=1)),
        ],
    )

    outcome = await export_unsubscribers(db, Export(tmp_path, zone=ZoneInfo("Europe/Rome")), at)

    assert outcome.path.name == "unsubscribers_all_20261207T093015Z.csv"
    assert outcome.path.read_text(encoding="utf-8").splitlines() == [
        "email;esp;account;list;state;reason;source;changed_at",
        "zoë@exämple.it;mailup;acme;news;unsubscribed;unsubscribe;mailup/acme;2026-12-07T10:30:15.250+01:00",
        'quote@x.io;mailup;acme;*;unsubscribed;"said ""no; never""";mailup/acme;'
        "2026-12-07T10:30:16.250+01:00",
    ]


async def test_the_previous_day_is_the_day_before_in_the_configured_time_zone(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    # in Rome (UTC+1) 7 December runs from 23:00 UTC on the 6th to 23:00 UTC on the 7th
    edges = {
        "late-on-the-6th@x.io": datetime(2026, 12, 6, 22, 59, 59, tzinfo=UTC),
        "first-of-the-7th@x.io": datetime(2026, 12, 6, 23, 0, tzinfo=UTC),
        "last-of-the-7th@x.io": datetime(2026, 12, 7, 22, 59, 59, tzinfo=UTC),
        "first-of-the-8th@x.io": datetime(2026, 12, 7, 23, 0, tzinfo=UTC),
    }
    await write(db, [row(email, "mailup/acme/news", at=at) for email, at in edges.items()])
    now = datetime(2026, 12, 8, 5, tzinfo=UTC)
    (tmp_path / "rome").mkdir()
    (tmp_path / "utc").mkdir()

    rome = await export_unsubscribers(
        db, Export(tmp_path / "rome", Period.PREVIOUS_DAY, ZoneInfo("Europe/Rome")), now
    )
    utc = await export_unsubscribers(db, Export(tmp_path / "utc", Period.PREVIOUS_DAY), now)

    assert rome.path.name == utc.path.name == "unsubscribers_2026-12-07.csv"
    assert emails(rome.path) == ["first-of-the-7th@x.io", "last-of-the-7th@x.io"]
    assert emails(utc.path) == ["last-of-the-7th@x.io", "first-of-the-8th@x.io"]


async def test_a_large_export_is_complete_streamed_in_flat_memory_and_leaves_no_temporary_file(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    contacts = 40_000
    async with db.transaction():
        await db.execute("SET LOCAL espbridge.writer = 'espbridge'")
        await db.execute(
            """
            INSERT INTO crm.subscriptions (email, esp, account, list, state, reason, source, changed_at)
            SELECT 'contact' || n || '@example.com', 'mailup', 'acme', 'news', 'unsubscribed',
                   'unsubscribe', 'mailup/acme', $1::timestamptz + n * interval '1 second'
            FROM generate_series(1, $2) AS n
            """,
            DAY,
            contacts,
        )

    tracemalloc.start()
    try:
        outcome = await export_unsubscribers(db, Export(tmp_path), DAY, chunk=500)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    written = emails(outcome.path)
    assert outcome.rows == len(written) == contacts
    assert written[0] == "contact1@example.com"
    assert written[-1] == f"contact{contacts}@example.com"
    # a chunk of rows is held at once: all forty thousand would take some 25 MiB
    assert peak < 4 * 1024 * 1024, f"peak {peak} bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == [WRITTEN, outcome.path.name]


async def test_an_export_that_fails_halfway_leaves_the_earlier_file_as_it_was_and_nothing_partial(
    db: asyncpg.Connection, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    await write(db, [row(f"c{n}@x.io", "mailup/acme/news", at=DAY + timedelta(seconds=n)) for n in range(30)])
    export = Export(tmp_path, Period.PREVIOUS_DAY)
    first = await export_unsubscribers(db, export, DAY + timedelta(days=1), chunk=10)
    before = first.path.read_bytes()
    await write(db, [row("later@x.io", "mailup/acme/promo", at=DAY + timedelta(hours=1))])
    chunks = 0
    real_write = exporting._CsvFile.write

    def disk_full_at_the_second_chunk(self: Any, rows: Any) -> None:
        nonlocal chunks
        chunks += 1
        if chunks == 2:
            raise OSError(28, "No space left on device")
        real_write(self, rows)

    monkeypatch.setattr(exporting._CsvFile, "write", disk_full_at_the_second_chunk)

    with pytest.raises(OSError, match="No space left"):
        await export_unsubscribers(db, export, DAY + timedelta(days=1), chunk=10)

    assert first.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [WRITTEN, first.path.name]


@pytest.mark.parametrize(
    ("folder", "says"),
    [("missing", "does not exist"), ("a-file", "is not a folder")],
)
async def test_a_folder_that_cannot_take_the_file_is_a_one_line_error(
    db: asyncpg.Connection, tmp_path: Path, folder: str, says: str
) -> None:
    (tmp_path / "a-file").write_text("")

    with pytest.raises(ConfigurationError, match=f"the export folder {tmp_path / folder} {says}"):
        await export_unsubscribers(db, Export(tmp_path / folder), DAY)


@pytest.fixture
async def crm_pools(database: PostgresSettings) -> AsyncIterator[list[asyncpg.Pool]]:
    """Two syncers' CRM pools."""
    pools = [await create_pool(database) for _ in range(2)]
    try:
        yield pools
    finally:
        for pool in pools:
            await pool.close()


def exports(runtime: Runtime, outcome: str) -> float:
    return runtime.metrics.value("unsubscriber_exports_total", outcome=outcome)


@pytest.mark.parametrize("period", [Period.PREVIOUS_DAY, Period.ALL])
async def test_two_syncers_on_the_same_schedule_write_each_periods_file_once(
    db: asyncpg.Connection, crm_pools: list[asyncpg.Pool], tmp_path: Path, period: Period
) -> None:
    yesterday = datetime.now(UTC) - timedelta(days=1)
    await write(db, [row("yesterday@x.io", "mailup/acme/news", at=yesterday)])
    settings = ExportSettings(schedule="* * * * * *", dir=tmp_path, period=period)  # every second
    syncers = [Runtime("syncer", ServiceSettings()) for _ in crm_pools]
    for runtime, pool in zip(syncers, crm_pools, strict=True):
        assert schedule_unsubscriber_export(runtime, pool, settings)
        runtime.start_background()
    try:
        # both write the latest scheduled time's file at start (a race), then every second's
        await wait_for(
            lambda: all(exports(r, "written") + exports(r, "already_written") >= 4 for r in syncers),
            timeout_s=30,
            what="four scheduled exports by each syncer",
        )
    finally:
        for runtime in syncers:
            runtime.stopping.set()
            await runtime.stop_background()

    files = sorted(p for p in tmp_path.glob("unsubscribers_*.csv"))
    written = sum(exports(r, "written") for r in syncers)
    assert written == len(files), "every file was written once, by one of the syncers"
    if period is Period.PREVIOUS_DAY:  # each second's file is the same day's
        assert [f.name for f in files] == [f"unsubscribers_{yesterday.date().isoformat()}.csv"]
    else:
        assert len(files) >= 4
    assert all(emails(f) == ["yesterday@x.io"] for f in files)
    assert not list(tmp_path.glob(".*.tmp"))


async def test_a_file_the_crm_took_away_is_not_written_again_at_the_next_start(
    crm_pools: list[asyncpg.Pool], tmp_path: Path
) -> None:
    folder = tmp_path / "crm-in"
    folder.mkdir()
    settings = ExportSettings(schedule="0 6 * * *", dir=folder)

    async def start_and_stop() -> Runtime:
        runtime = Runtime("syncer", ServiceSettings())
        schedule_unsubscriber_export(runtime, crm_pools[0], settings)
        runtime.start_background()
        await wait_for(lambda: exports(runtime, "written") + exports(runtime, "already_written") == 1)
        runtime.stopping.set()
        await runtime.stop_background()
        return runtime

    first = await start_and_stop()
    (taken,) = folder.glob("unsubscribers_*.csv")
    taken.rename(tmp_path / "imported-by-the-crm.csv")

    again = await start_and_stop()

    assert (exports(first, "written"), exports(again, "already_written")) == (1, 1)
    assert not list(folder.glob("unsubscribers_*.csv"))


async def test_a_scheduled_export_into_a_missing_folder_is_logged_and_written_once_the_folder_is_there(
    crm_pools: list[asyncpg.Pool], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = tmp_path / "crm-in"
    runtime = Runtime("syncer", ServiceSettings())
    schedule_unsubscriber_export(runtime, crm_pools[0], ExportSettings(schedule="0 6 * * *", dir=folder))
    with caplog.at_level(logging.ERROR, logger="shared.operations.exporting"):
        runtime.start_background()
        try:
            await wait_for(lambda: any("does not exist" in m for m in caplog.messages), timeout_s=10)
            folder.mkdir()
            await wait_for(lambda: exports(runtime, "written") == 1, timeout_s=30)
        finally:
            runtime.stopping.set()
            await runtime.stop_background()

    assert f"unsubscriber export failed: the export folder {folder} does not exist" in caplog.messages
    assert len(list(folder.glob("unsubscribers_*.csv"))) == 1


async def test_subscriptions_export_writes_the_file_and_prints_it_with_its_row_count(
    deployment: Deployment, book: asyncpg.Connection
) -> None:
    folder = deployment.folder / "crm-in"
    folder.mkdir()
    cli = Cli(deployment.env(deployment.accounts_file([])))

    done = cli(
        "subscriptions",
        "export",
        "--dir",
        str(folder),
        "--include-list",
        "mailup/acme/*",
        "--exclude-reason",
        "bounce_hard",
    )

    assert done.returncode == 0, done.stderr
    (path,) = folder.glob("unsubscribers_all_*.csv")
    assert done.stdout == f"{path}\t3 unsubscriber(s)\n"
    assert emails(path) == ["a@x.io", "b@x.io", "f@x.io"]


async def test_subscriptions_request_publishes_a_producers_request_and_show_reads_the_crm(
    deployment: Deployment, db: asyncpg.Connection
) -> None:
    await write(db, [row("Ann@X.io", "mailup/acme/news", at=DAY), row("ann@x.io", "mailup/acme/*", at=DAY)])
    cli = Cli(deployment.env(deployment.accounts_file([])))

    shown = cli("subscriptions", "show", "ANN@x.io")
    requested = cli(
        "subscriptions",
        "request",
        "Ann@X.io",
        "--esp",
        "mailup",
        "--account",
        "acme",
        "--list",
        "news",
        "--subscribe",
        "--field",
        "FirstName=Ann",
        "--reason",
        "signed up at the till",
    )

    assert shown.returncode == 0, shown.stderr
    assert [line.split() for line in shown.stdout.splitlines()] == [
        ["ESP", "ACCOUNT", "LIST", "STATE", "REASON", "SOURCE", "CHANGED", "(UTC)"],
        ["mailup", "acme", "*", "unsubscribed", "unsubscribe", "mailup/acme", "2026-12-07", "12:00:00"],
        ["mailup", "acme", "news", "unsubscribed", "unsubscribe", "mailup/acme", "2026-12-07", "12:00:00"],
    ]
    assert requested.returncode == 0, requested.stderr
    (record,) = await read_until(deployment.kafka, Topic.SUBSCRIPTION_REQUESTS, lambda rs: len(rs) >= 1)
    assert record.key == b"ann@x.io"
    assert record.value is not None
    request = SubscriptionRequest.from_json(record.value)
    assert (request.email, request.esp, request.account, request.list) == (
        "ann@x.io",
        "mailup",
        "acme",
        "news",
    )
    assert (request.state, request.origin, request.source) == (
        SubscriptionState.SUBSCRIBED,
        RequestOrigin.PRODUCER,
        "crm",
    )
    assert (dict(request.fields), request.reason) == ({"FirstName": "Ann"}, "signed up at the till")
    assert requested.stdout.startswith(
        f"request {request.request_id}: subscribed ann@x.io at mailup/acme, list news, fields FirstName"
    )
