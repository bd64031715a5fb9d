"""Response rows attributed by communication key: the uploader records the keys of the lists it
uploads for such an account, and the gatherer finds each row's broadcast among them — the latest
list uploaded before the event that held the key (docs/connectors/generic_sftp.md)."""

from __future__ import annotations

from contextlib import ExitStack
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from shared.infra.db import connect, uploaded_lists
from shared.model.messages import DeadLetter, TableSelection
from shared.model.topics import Topic
from shared.operations import lists, selection
from shared.operations.jobs import build_job, publish_job
from tests.fixtures.deployment import Deployment, place
from tests.fixtures.kafka import read_until
from tests.fixtures.processes import stop
from tests.fixtures.waits import wait_for
from tools.demo import demo_job

ESP = "generic_sftp"
NO_BROADCAST = "MessageType\turn\temail\ttimestamp\n"
"""A response file's header without the broadcast-id column."""


async def uploaded_at(deployment: Deployment, job_id: str) -> datetime | None:
    """When control.uploaded_lists says the job's list was uploaded (None: not recorded yet)."""
    conn = await connect(deployment.database)
    try:
        when = await conn.fetchval("SELECT uploaded_at FROM control.uploaded_lists WHERE job_id = $1", job_id)
    finally:
        await conn.close()
    return when if isinstance(when, datetime) else None


async def events_by_line(deployment: Deployment) -> dict[int, dict[str, Any]]:
    """The loaded rows of responses.events by their line in the response file."""
    conn = await connect(deployment.database)
    try:
        rows = await conn.fetch("SELECT broadcast_id, communication_key, source FROM responses.events")
    finally:
        await conn.close()
    return {int(r["source"].rsplit(":", 1)[1]): dict(r) for r in rows}


async def test_rows_without_a_broadcast_are_attributed_by_the_lists_that_held_their_keys(
    deployment: Deployment,
) -> None:
    account = deployment.account
    entry = deployment.offline_account(ESP, account)
    entry["options"] = {"attribution": ["column", "communication_key"]}
    accounts = deployment.accounts_file([entry])
    folder = deployment.response_folders(ESP, account)
    (folder / "drop").mkdir()
    await deployment.seed(40)  # ck-000000001 … ck-000000040; ck-000000033 is opted out

    # Monday's list is the table (the server's COPY), Tuesday's an inline selection (the row writer).
    monday = build_job({**demo_job("job-mon", ESP, account, "upload_only"), "requested_by": "test"})
    tuesday = build_job(
        {
            **demo_job("job-tue", ESP, account, "upload_only"),
            "requested_by": "test",
            "selection": {
                "kind": "inline",
                "rows": [
                    {"email": f"customer{n}@example.com", "communication_key": key}
                    for n, key in [(1, "ck-000000001"), (2, "ck-000000002"), (99, "ck-only-tuesday")]
                ],
            },
            "field_map": {"email": "Email"},
        }
    )
    with ExitStack() as stack:
        env = deployment.env(accounts, ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="0.5")
        procs = [deployment.start(stack, name, env) for name in ("uploader", "gatherer", "loader")]
        await publish_job(deployment.kafka, monday)
        mon = await wait_for(lambda: uploaded_at(deployment, "job-mon"), 60, what="Monday's list recorded")
        await publish_job(deployment.kafka, tuesday)
        tue = await wait_for(lambda: uploaded_at(deployment, "job-tue"), 60, what="Tuesday's list recorded")
        assert mon < tue
        between, later = mon + (tue - mon) / 2, tue + timedelta(hours=1)
        rows = [
            ("Open", "ck-000000003", later),  # line 2: Monday's list alone held it
            ("Open", "ck-000000001", between),  # line 3: both held it; only Monday's was there
            ("Click", "ck-000000001", later),  # line 4: both held it; Tuesday's is the latest
            ("Open", "ck-only-tuesday", between),  # line 5: before the only list that held it
            ("Open", "ck-nobody", later),  # line 6: in no list
            ("Open", "ck-000000033", later),  # line 7: opted out, so in no list
        ]
        place(
            folder / "responses",
            "20261124100000_FERGE_opens.txt",
            NO_BROADCAST + "".join(f"{kind}\t{key}\t\t{at.isoformat()}\n" for kind, key, at in rows),
        )
        await wait_for(
            lambda: (folder / "archive" / "20261124100000_FERGE_opens.txt").exists(), 60, what="file archived"
        )
        loaded = await wait_for(lambda: _when_loaded(deployment, 3), 60, what="the attributed rows loaded")
        records = await read_until(deployment.kafka, Topic.DEADLETTER, lambda rs: len(rs) >= 3)
        for proc in procs:
            assert stop(proc) == 0

    assert {line: row["broadcast_id"] for line, row in loaded.items()} == {
        2: "job-mon",
        3: "job-mon",
        4: "job-tue",
    }
    letters = {
        (d.source.line or 0): d.message for d in (DeadLetter.from_json(r.value or b"") for r in records)
    }
    assert letters == {
        5: f"communication key 'ck-only-tuesday' is in no list uploaded before the event "
        f"({between.isoformat()}); the first that held it, job-tue, was uploaded at {tue.isoformat()}",
        6: "communication key 'ck-nobody' is in no list uploaded to this account in the last 90 days",
        7: "communication key 'ck-000000033' is in no list uploaded to this account in the last 90 days",
    }
    conn = await connect(deployment.database)
    try:
        kept = {
            r["job_id"]: r["keys"]
            for r in await conn.fetch("SELECT job_id, keys FROM control.uploaded_lists")
        }
    finally:
        await conn.close()
    assert kept == {"job-mon": 39, "job-tue": 3}


async def _when_loaded(deployment: Deployment, n: int) -> dict[int, dict[str, Any]] | None:
    rows = await events_by_line(deployment)
    return rows if len(rows) >= n else None


async def test_a_lists_keys_are_recorded_alike_from_the_copy_and_the_row_writer_and_replaced_and_forgotten(
    db: asyncpg.Connection,
) -> None:
    await db.execute(
        """
        CREATE TABLE crm.keyed (email text, ck text, n integer, opted_out boolean);
        INSERT INTO crm.keyed VALUES ('a@x.com', 'K1', 1, false), ('b@x.com', '', 2, false),
            ('c@x.com', NULL, 3, false), ('d@x.com', 'K4', 4, true), ('e@x.com', 'Ünï "q"', 5, false);
        CREATE TABLE crm.numbered (email text, ck integer, opted_out boolean);
        INSERT INTO crm.numbered VALUES ('a@x.com', 7, false), ('b@x.com', NULL, false);
        """
    )
    start = datetime.fromisoformat("2026-11-23T09:00:00+00:00")
    for table, wanted in (("crm.keyed", {"K1", 'Ünï "q"'}), ("crm.numbered", {"7"})):
        sel = TableSelection(kind="table", table=table, columns=("email", "ck"))
        async with db.transaction():
            select, args = await selection.key_query(db, sel, "ck", selection.Suppression("opted_out"))
            copied = await uploaded_lists.start_list(db, f"copied-{table}", "e", "a", start)
            await uploaded_lists.insert_selected_keys(db, copied, select, args)
            rows = [
                r
                async for r in selection.from_table(
                    db, sel, ["ck"], selection.Suppression("opted_out"), selection.Tally(), 10
                )
            ]
            written = await uploaded_lists.start_list(db, f"written-{table}", "e", "a", start)
            await uploaded_lists.copy_keys(db, written, [k for (v,) in rows if (k := lists.text(v))])
        held = await uploaded_lists.lists_holding(db, "e", "a", [*wanted, "K4", ""])
        assert set(held) == wanted
        assert all(
            {x.job_id for x in lists} == {f"copied-{table}", f"written-{table}"} for lists in held.values()
        )

    # The same job uploaded again replaces its record; another account's lists are not this one's.
    again = await uploaded_lists.start_list(db, "written-crm.keyed", "e", "a", start + timedelta(days=1))
    await uploaded_lists.copy_keys(db, again, ["K9"])
    await uploaded_lists.copy_keys(db, await uploaded_lists.start_list(db, "other", "e", "b", start), ["K9"])
    held = await uploaded_lists.lists_holding(db, "e", "a", ["K1", "K9"])
    assert [x.job_id for x in held["K1"]] == ["copied-crm.keyed"]
    assert [(x.job_id, x.uploaded_at) for x in held["K9"]] == [
        ("written-crm.keyed", start + timedelta(days=1))
    ]

    assert await uploaded_lists.forget_lists(db, "e", "a", start + timedelta(hours=1)) == 3
    assert await uploaded_lists.lists_holding(db, "e", "a", ["K1", "7", "K9"]) == {"K9": held["K9"]}
    assert await db.fetchval("SELECT count(*) FROM control.list_keys") == 2  # K9 of "a" and of "b"
