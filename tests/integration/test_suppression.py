"""Selections leave out what the CRM's subscription state suppresses for the job's account: a
crm.suppressions row for its broadcast list, for every list of the account ('*') or everywhere
('*', '*', '*'); emails compared lower-cased; counted apart from the suppression column's opt-outs.
The same on every read path (cursor, COPY, CSV, inline), in job check, and in the uploader reading a
CRM database of its own."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest

from shared.esp import AccountsSettings
from shared.infra.db import CRM_MIGRATIONS, connect
from shared.infra.settings import CrmSettings, PostgresSettings
from shared.model.messages import CsvSelection, InlineSelection, ListUploaded, TableSelection
from shared.model.topics import Topic
from shared.operations import selection
from shared.operations.checking import check_job
from shared.operations.jobs import build_job
from shared.operations.selection import SelectionSettings, SubscriptionScope, Tally
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import produce, read_until
from tests.fixtures.processes import stop
from tests.fixtures.servers import Servers
from tools.demo import demo_job
from tools.scratch import create_database, drop_database

SCOPE = SubscriptionScope("sandbox", "demo", "news")
"""The scope of the read-path tests; the tests of a CRM of its own use their own account."""
PEOPLE = [
    # email as the CRM table holds it, its own opted_out flag, its crm.subscriptions rows
    ("a@x.com", False, [("sandbox", "demo", "news", "unsubscribed")]),  # the broadcast list
    ("b@x.com", False, [("sandbox", "demo", "*", "unsubscribed")]),  # every list of the account
    ("c@x.com", False, [("*", "*", "*", "removed")]),  # everywhere
    ("d@x.com", False, [("sandbox", "demo", "other", "unsubscribed")]),  # another list: kept
    ("e@x.com", False, [("sandbox", "elsewhere", "news", "unsubscribed")]),  # another account: kept
    ("f@x.com", False, [("sandbox", "demo", "news", "subscribed"), ("mailup", "*", "*", "unsubscribed")]),
    ("g@x.com", False, [("sandbox", "demo", "news", "pending")]),  # not confirmed: not mailed
    ("Hal@X.com", False, [("sandbox", "demo", "news", "unsubscribed")]),  # compared lower-cased
    ("i@x.com", True, []),  # the table's own flag
    ("j@x.com", True, [("*", "*", "*", "unsubscribed")]),  # both: counted by the state
    ("k@x.com", False, []),
]
KEPT = ["d@x.com", "e@x.com", "f@x.com", "k@x.com"]
BY_STATE, BY_COLUMN = 6, 1
COLUMNS = ["email", "ck"]


async def seed_people(conn: asyncpg.Connection) -> None:
    """crm.people with its own opted_out flag, and the subscription rows of :data:`PEOPLE`."""
    await conn.execute("CREATE TABLE crm.people (email text, ck text, opted_out boolean)")
    await conn.executemany(
        "INSERT INTO crm.people VALUES ($1, $2, $3)",
        [(email, f"k-{email.lower()}", flag) for email, flag, _ in PEOPLE],
    )
    await conn.executemany(
        "INSERT INTO crm.subscriptions (email, esp, account, list, state) VALUES ($1, $2, $3, $4, $5)",
        [(email, *row) for email, _, rows in PEOPLE for row in rows],
    )


def rows_as_dicts() -> list[dict[str, Any]]:
    return [{"email": e, "ck": f"k-{e.lower()}", "opted_out": flag} for e, flag, _ in PEOPLE]


TABLE = TableSelection(kind="table", table="crm.people", columns=("email", "ck"))


async def read(db: asyncpg.Connection, path: str, tmp_path: Path) -> tuple[list[str], Tally]:
    """The emails a selection of crm.people's rows keeps, read by ``path``, and what it left out."""
    tally = Tally()
    if path in ("cursor", "copy"):
        suppression = await selection.suppression_for(db, TABLE, "opted_out", SCOPE, "email")
        async with db.transaction(readonly=True):
            if path == "cursor":
                rows = [r async for r in selection.from_table(db, TABLE, COLUMNS, suppression, tally, 100)]
                return sorted(str(r[0]) for r in rows), tally
            pieces: list[bytes] = []

            async def output(data: bytes) -> None:
                pieces.append(bytes(data))

            await selection.copy_table_csv(db, TABLE, COLUMNS, suppression, tally, ",", output)
        return sorted(line.split(",")[0] for line in b"".join(pieces).decode().splitlines()), tally
    if path == "csv":
        file = tmp_path / "people.csv"
        file.write_text(
            "email,ck,opted_out\n"
            + "".join(f"{r['email']},{r['ck']},{r['opted_out']}\n" for r in rows_as_dicts())
        )
        csv_sel = CsvSelection(path="people.csv")
        suppression = await selection.suppression_for(db, csv_sel, "opted_out", SCOPE, "email")
        found = [r async for r in selection.from_csv(file, csv_sel, COLUMNS, suppression, tally)]
    else:
        inline = InlineSelection(rows=tuple(rows_as_dicts()))
        suppression = await selection.suppression_for(db, inline, "opted_out", SCOPE, "email")
        found = [r async for r in selection.from_inline(inline, COLUMNS, suppression, tally)]
    return sorted(str(r[0]) for r in found), tally


@pytest.mark.parametrize("path", ["cursor", "copy", "csv", "inline"])
async def test_a_selection_leaves_out_the_emails_the_accounts_subscription_state_suppresses(
    db: asyncpg.Connection, tmp_path: Path, path: str
) -> None:
    await seed_people(db)

    kept, tally = await read(db, path, tmp_path)

    assert kept == KEPT
    assert (tally.by_state, tally.by_column) == (BY_STATE, BY_COLUMN)
    if path in ("cursor", "copy"):
        counted = await selection.count_table(
            db, TABLE, COLUMNS, await selection.suppression_for(db, TABLE, "opted_out", SCOPE, "email")
        )
        assert (counted.recipients, counted.by_state, counted.by_column) == (len(KEPT), BY_STATE, BY_COLUMN)
        assert counted.state_checked
        assert counted.suppression_checked


async def test_an_account_that_syncs_no_lists_honours_its_every_list_and_everywhere_rows(
    db: asyncpg.Connection,
) -> None:
    await seed_people(db)
    every_list = SubscriptionScope("sandbox", "demo", "*")

    suppression = await selection.suppression_for(db, TABLE, "opted_out", every_list, "email")
    counted = await selection.count_table(db, TABLE, COLUMNS, suppression)

    # b (the account's '*'), c and j (everywhere); a list's own rows do not apply to '*'
    assert (counted.recipients, counted.by_state, counted.by_column) == (7, 3, 1)


async def test_without_crm_suppressions_only_the_suppression_column_leaves_rows_out(
    db: asyncpg.Connection, tmp_path: Path
) -> None:
    await seed_people(db)
    await db.execute("DROP VIEW crm.suppressions")

    suppression = await selection.suppression_for(db, TABLE, "opted_out", SCOPE, "email")
    kept, tally = await read(db, "cursor", tmp_path)

    assert suppression.scope is None
    assert len(kept) == len(PEOPLE) - 2
    assert (tally.by_state, tally.by_column) == (0, 2)


async def test_filter_values_and_the_scope_travel_as_parameters(db: asyncpg.Connection) -> None:
    await seed_people(db)
    sneaky = SubscriptionScope("sandbox", "demo", "news') OR true --")
    filtered = TableSelection(
        kind="table", table="crm.people", columns=("email", "ck"), filters={"ck": "k-a@x.com"}
    )

    counted = await selection.count_table(
        db, filtered, COLUMNS, await selection.suppression_for(db, filtered, "opted_out", sneaky, "email")
    )

    assert (counted.recipients, counted.by_state) == (1, 0)  # a@x.com's row is for list 'news' alone


@pytest.fixture
async def own_crm(servers: Servers, unique: str) -> AsyncIterator[PostgresSettings]:
    """A CRM database of its own (the CRM migration set alone) with crm.people and its subscriptions."""
    settings = await create_database(servers.pg, f"crm_{unique}", (CRM_MIGRATIONS,))
    conn = await connect(settings)
    try:
        await seed_people(conn)
    finally:
        await conn.close()
    try:
        yield settings
    finally:
        await drop_database(servers.pg, settings.database, timeout_s=30)


ESP = "generic_sftp"
"""A file-only ESP whose account attributes response rows by key (the uploader records them)."""


def people_job(job_id: str, account: str) -> dict[str, Any]:
    return {
        **demo_job(job_id, ESP, account),
        "selection": {"kind": "table", "table": "crm.people", "columns": COLUMNS},
        "field_map": {"email": "Email"},
        "communication_key": "ck",
        "mode": "upload_only",
    }


def account_entry(deployment: Deployment, **changes: Any) -> dict[str, Any]:
    """The test's account, broadcasting to list 'news', attributing rows by key, its lists in CSV."""
    entry = deployment.offline_account(ESP, deployment.account)
    options = {"attribution": ["column", "communication_key"], "list_delimiter": ",", "list_suffix": ".csv"}
    return entry | {"subscriptions": {"lists": ["news", "other"]}, "options": options, **changes}


async def test_job_check_counts_a_crm_database_of_its_own_by_state_and_by_column(
    deployment: Deployment, own_crm: PostgresSettings
) -> None:
    accounts = deployment.accounts_file([account_entry(deployment)])
    job = build_job(people_job(f"check-{deployment.unique}", deployment.account))
    conn = await connect(own_crm)
    try:  # k is suppressed for this test's account, not for 'demo'
        await conn.execute(
            "INSERT INTO crm.subscriptions (email, esp, account, list, state) "
            "VALUES ('k@x.com', $1, $2, 'news', 'unsubscribed')",
            ESP,
            deployment.account,
        )
    finally:
        await conn.close()

    checked = await check_job(
        job,
        kafka=deployment.kafka,
        pg=deployment.database,
        accounts=AccountsSettings(accounts_file=accounts),
        reading=SelectionSettings(crm=CrmSettings(database=own_crm.database)),
    )

    findings = {f.check: f.detail for f in checked.findings}
    assert checked.ok, checked.problems
    # c and j everywhere, k for this account; i by its flag
    assert (
        findings["recipients"]
        == "7 to upload, 4 excluded: 3 by the subscription state, 1 as opted out (opted_out)"
    )
    assert checked.head is not None
    assert "k@x.com" not in checked.head.text


async def test_the_uploader_reads_a_crm_database_of_its_own_and_records_the_keys_it_uploaded(
    deployment: Deployment, own_crm: PostgresSettings, sftp_folder: tuple[str, Path]
) -> None:
    remote, local = sftp_folder
    (local / "drop").mkdir()
    accounts = deployment.accounts_file([account_entry(deployment, sftp_root=remote)])
    job_id = f"crm-{deployment.unique}"
    job = people_job(job_id, deployment.account) | {"created_at": datetime.now(UTC).isoformat()}
    env = deployment.env(accounts, ESPBRIDGE_CRM_DATABASE=own_crm.database)
    with ExitStack() as stack:
        proc = deployment.start(stack, "uploader", env)
        await produce(deployment.kafka, Topic.BROADCAST_JOBS, [(None, orjson.dumps(job))])
        [record] = await read_until(deployment.kafka, Topic.BROADCAST_LISTS, lambda rs: len(rs) >= 1)
        assert stop(proc) == 0
    uploaded = ListUploaded.from_json(record.value or b"")
    conn = await connect(deployment.database)
    try:
        keys = await conn.fetch(
            "SELECT k.communication_key FROM control.list_keys AS k JOIN control.uploaded_lists AS l "
            "USING (list_id) WHERE l.job_id = $1",
            job_id,
        )
    finally:
        await conn.close()

    # only the CRM database has crm.people: the list was read there, the keys recorded here
    everywhere_or_flagged = {"c@x.com", "i@x.com", "j@x.com"}
    expected = sorted(e for e, _, _ in PEOPLE if e not in everywhere_or_flagged)
    file_rows = (local / "drop" / f"{job_id}.csv").read_text().splitlines()
    assert file_rows[0] == "Email,CommunicationKey"
    assert sorted(row.split(",")[0] for row in file_rows[1:]) == expected
    assert (uploaded.rows, uploaded.excluded) == (len(expected), 3)
    assert sorted(r[0] for r in keys) == sorted(f"k-{e.lower()}" for e in expected)
