"""The CRM's subscription store against a real database: a later change wins, an older one is
logged stale, each change is applied once, the trigger tells the CRM's writes from espbridge's,
and the suppressions view holds what is not to be mailed."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from shared.infra.db import connect, subscriptions
from shared.infra.db.subscriptions import Key, Origin, Outcome, Push, Write
from shared.infra.settings import PostgresSettings

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
KEY = Key("ann@example.com", "generic", "demo", "news")


def write(state: str | None, minutes: int, key: Key = KEY, **more: Any) -> Write:
    """A change from the account's ESP ``minutes`` after T0, with ``more`` of its fields set."""
    made = Write(
        uuid.uuid4(), key, state, T0 + timedelta(minutes=minutes), Origin.ESP, f"{key.esp}/{key.account}"
    )
    return replace(made, **more)


async def maybe_row(db: asyncpg.Connection, key: Key = KEY) -> asyncpg.Record | None:
    return await db.fetchrow(
        "SELECT * FROM crm.subscriptions WHERE email = $1 AND esp = $2 AND account = $3 AND list = $4",
        key.email,
        key.esp,
        key.account,
        key.list,
    )


async def row_of(db: asyncpg.Connection, key: Key = KEY) -> asyncpg.Record:
    row = await maybe_row(db, key)
    assert row is not None, f"no row {key}"
    return row


async def log_outcomes(db: asyncpg.Connection) -> dict[uuid.UUID, str]:
    return {r["change_id"]: r["outcome"] for r in await db.fetch("SELECT * FROM crm.subscription_log")}


async def test_a_later_change_wins_and_an_older_one_is_logged_stale(db: asyncpg.Connection) -> None:
    newer, older = write("unsubscribed", 10, reason="unsubscribe"), write("subscribed", 5)
    results = await subscriptions.apply(db, [newer])
    results += await subscriptions.apply(db, [older])
    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.STALE]
    row = await row_of(db)
    assert (row["state"], row["reason"], row["source"], row["changed_at"]) == (
        "unsubscribed",
        "unsubscribe",
        "generic/demo",
        newer.occurred_at,
    )
    assert (row["written_by"], row["change_id"]) == ("espbridge", newer.change_id)
    assert await log_outcomes(db) == {newer.change_id: "applied", older.change_id: "stale"}


async def test_a_change_is_applied_once_however_often_it_comes(db: asyncpg.Connection) -> None:
    change = write("unsubscribed", 10)
    (first,) = await subscriptions.apply(db, [change])
    resubscribed = write("subscribed", 20)
    await subscriptions.apply(db, [resubscribed])
    again = await subscriptions.apply(db, [change, change])
    assert first.outcome is Outcome.APPLIED
    assert [(r.outcome, r.first, r.superseded) for r in again] == [
        (Outcome.DUPLICATE, Outcome.APPLIED, True)
    ] * 2
    assert (await row_of(db))["state"] == "subscribed"
    assert await db.fetchval("SELECT count(*) FROM crm.subscription_log") == 2


async def test_the_same_state_is_unchanged_and_leaves_the_row_alone(db: asyncpg.Connection) -> None:
    first = write("unsubscribed", 10, reason="unsubscribe")
    await subscriptions.apply(db, [first])
    (same,) = await subscriptions.apply(db, [write("unsubscribed", 30, reason="complaint")])
    assert same.outcome is Outcome.UNCHANGED
    row = await row_of(db)
    assert (row["change_id"], row["reason"]) == (first.change_id, "unsubscribe")


async def test_a_batch_is_taken_in_arrival_order_per_row(db: asyncpg.Connection) -> None:
    other = Key("bo@example.com", "generic", "demo", "news")
    batch = [write("subscribed", 10), write("unsubscribed", 5), write("unsubscribed", 1, other)]
    results = await subscriptions.apply(db, batch)
    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.STALE, Outcome.APPLIED]
    first, second = await row_of(db), await row_of(db, other)
    assert (first["state"], second["state"]) == ("subscribed", "unsubscribed")


async def test_fields_merge_into_the_row_and_fields_alone_keep_its_state(db: asyncpg.Connection) -> None:
    await subscriptions.apply(
        db, [write("subscribed", 1, fields={"FirstName": "Ann"}, origin=Origin.PRODUCER)]
    )
    (fields_only,) = await subscriptions.apply(db, [write(None, 2, fields={"City": "Oslo"})])
    (nothing_new,) = await subscriptions.apply(db, [write(None, 3, fields={"City": "Oslo"})])
    (no_row,) = await subscriptions.apply(
        db, [write(None, 3, Key("x@example.com", "generic", "demo", "news"), fields={"A": "b"})]
    )
    assert [fields_only.outcome, nothing_new.outcome, no_row.outcome] == [
        Outcome.APPLIED,
        Outcome.UNCHANGED,
        Outcome.IGNORED,
    ]
    (row,) = await subscriptions.contact_rows(db, "ANN@example.com")
    assert (row.state, dict(row.fields), row.changed_at) == (
        "subscribed",
        {"FirstName": "Ann", "City": "Oslo"},
        T0 + timedelta(minutes=1),
    )


async def test_an_ignored_change_is_logged_and_changes_nothing(db: asyncpg.Connection) -> None:
    (ignored,) = await subscriptions.apply(db, [write("unsubscribed", 1, ignored=True, reason="bounce_hard")])
    assert ignored.outcome is Outcome.IGNORED
    assert await maybe_row(db) is None
    assert await log_outcomes(db) == {ignored.write.change_id: "ignored"}


async def test_a_follow_on_is_written_only_when_its_origin_changed_the_state(db: asyncpg.Connection) -> None:
    other_list = Key(KEY.email, KEY.esp, KEY.account, "offers")
    origin = write("unsubscribed", 10)
    follow = write("unsubscribed", 10, other_list, origin=Origin.FOLLOW_ON, after=origin.change_id)
    results = await subscriptions.apply(db, [origin, follow])
    assert [r.outcome for r in results] == [Outcome.APPLIED, Outcome.APPLIED]
    again = write("unsubscribed", 20)
    assert [
        r.outcome
        for r in await subscriptions.apply(
            db, [again, write("unsubscribed", 20, other_list, origin=Origin.FOLLOW_ON, after=again.change_id)]
        )
    ] == [Outcome.UNCHANGED]
    # the same batch again (a retry after its follow-ons could not be published): reported again
    retried = await subscriptions.apply(db, [origin, follow])
    assert [(r.outcome, r.first) for r in retried] == [(Outcome.DUPLICATE, Outcome.APPLIED)] * 2


async def test_a_change_already_in_the_crm_is_only_checked_against_its_row(db: asyncpg.Connection) -> None:
    await db.execute(
        "INSERT INTO crm.subscriptions (email, esp, account, list, state, changed_at) "
        "VALUES ($1, $2, $3, $4, 'unsubscribed', $5)",
        KEY.email,
        KEY.esp,
        KEY.account,
        KEY.list,
        T0 + timedelta(minutes=10),
    )
    current = write("unsubscribed", 10, in_crm=True, origin=Origin.CAPTURE, source="crm")
    old = write("subscribed", 5, in_crm=True, origin=Origin.CAPTURE, source="crm")
    results = await subscriptions.apply(db, [current, old])
    assert [(r.outcome, r.superseded) for r in results] == [(Outcome.APPLIED, False), (Outcome.STALE, True)]
    row = await row_of(db)
    assert (row["written_by"], row["change_id"]) == ("crm", None)


async def test_the_trigger_marks_a_crm_write_as_the_crms_and_stamps_a_state_change(
    db: asyncpg.Connection,
) -> None:
    await subscriptions.apply(db, [write("unsubscribed", 10, reason="unsubscribe")])
    before = await row_of(db)
    await db.execute(
        "UPDATE crm.subscriptions SET state = 'subscribed', source = 'generic/demo' WHERE email = $1",
        KEY.email,
    )
    after = await row_of(db)
    assert (after["written_by"], after["source"], after["change_id"]) == ("crm", "crm", None)
    assert after["changed_at"] > before["changed_at"]
    await db.execute(
        "INSERT INTO crm.subscriptions (email, esp, account, list, state) "
        "VALUES ('Cy@Example.com', 'generic', 'demo', '*', 'unsubscribed')"
    )
    (cy,) = await subscriptions.contact_rows(db, "cy@example.com")
    assert (cy.key.email, cy.written_by, cy.source) == ("cy@example.com", "crm", "crm")


async def test_the_suppressions_view_holds_what_is_not_to_be_mailed(db: asyncpg.Connection) -> None:
    states = ["pending", "subscribed", "unsubscribed", "removed"]
    await subscriptions.apply(
        db, [write(s, 1, Key(f"{s}@example.com", "generic", "demo", "news")) for s in states]
    )
    suppressed = {r["email"]: r["state"] for r in await db.fetch("SELECT * FROM crm.suppressions")}
    assert suppressed == {f"{s}@example.com": s for s in states if s != "subscribed"}


async def test_a_push_the_esp_took_is_never_pushed_again_and_a_refused_one_is(db: asyncpg.Connection) -> None:
    took, refused = uuid.uuid4(), uuid.uuid4()
    await subscriptions.record_pushes(
        db,
        [
            Push(took, KEY, "subscribed", "producer", True, "pending"),
            Push(refused, KEY, "subscribed", "producer", False, None, "blocklisted"),
        ],
    )
    assert await subscriptions.accepted_pushes(db, [took, refused]) == {took}
    await subscriptions.record_pushes(db, [Push(refused, KEY, "subscribed", "producer", True)])
    assert await subscriptions.accepted_pushes(db, [took, refused]) == {took, refused}


async def test_two_stores_writing_the_same_rows_at_once_never_deadlock(database: PostgresSettings) -> None:
    keys = [Key(f"c{n}@example.com", "generic", "demo", "news") for n in range(50)]
    conns = [await connect(database) for _ in range(2)]
    try:
        batches = [
            [write("unsubscribed", n, k) for n, k in enumerate(keys)],
            [write("subscribed", n, k) for n, k in reversed(list(enumerate(keys)))],
        ]
        for _ in range(5):
            await asyncio.gather(*(subscriptions.apply(c, b) for c, b in zip(conns, batches, strict=True)))
            batches = [[write(w.state, 60, w.key) for w in b] for b in batches]
    finally:
        for c in conns:
            await c.close()
