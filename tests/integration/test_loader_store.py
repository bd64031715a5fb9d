"""The loader's database step on its own: a batch of new events is COPYed straight in, a batch with
events already there is merged, and the per-broadcast counts equal the rows either way."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from services.loader import core, store
from shared.model.events import fields_of
from shared.model.messages import EventSource, EventType, ResponseEvent, event_id_for

pytestmark = pytest.mark.integration

START = datetime(2026, 11, 22, 9, 0, tzinfo=UTC)
TYPES = [EventType.SENT, EventType.OPEN, EventType.CLICK]


def events(first: int, last: int, broadcast: str = "job-1") -> list[ResponseEvent]:
    return [
        ResponseEvent(
            event_id=event_id_for("sandbox", esp_event_id=f"demo:{broadcast}:e{n}"),
            esp="sandbox",
            account="demo",
            broadcast_id=broadcast,
            communication_key=f"ck{n}",
            email=f"c{n}@x.com",
            type=TYPES[n % 3],
            occurred_at=START + timedelta(seconds=n, microseconds=(n % 7) * 1000),
            source=EventSource(kind="file", name="sandbox/demo/responses/r.csv", line=n + 1),
        )
        for n in range(first, last)
    ]


async def load(db: asyncpg.Connection, batch: list[ResponseEvent]) -> dict[str, int]:
    """Load a batch as the handler does: each event by the direct path when it can, else its values."""
    tally = core.Tally()
    lines = []
    for e in batch:
        fast = core.fast_copy_line(e.to_json())
        assert fast is not None
        tally.add(*fast[:3])
        lines.append(fast[3])
    return await store.load(db, b"".join(lines), tally)


async def counts_equal_rows(db: asyncpg.Connection) -> dict[tuple[str, str], tuple[int, datetime, datetime]]:
    counts = {
        (r["broadcast_id"], r["type"]): (r["events"], r["first_at"], r["last_at"])
        for r in await db.fetch("SELECT * FROM responses.broadcast_type_counts")
    }
    rows = {
        (r["broadcast_id"], r["type"]): (r["n"], r["first"], r["last"])
        for r in await db.fetch(
            "SELECT broadcast_id, type, count(*) AS n, min(occurred_at) AS first, max(occurred_at) AS last "
            "FROM responses.events GROUP BY 1, 2"
        )
    }
    assert counts == rows
    return counts


async def test_new_events_are_copied_and_counted(db: asyncpg.Connection) -> None:
    assert await load(db, events(0, 300)) == {"job-1": 300}
    counts = await counts_equal_rows(db)
    assert counts[("job-1", "open")][0] == 100
    assert await load(db, events(300, 450) + events(0, 30, "job-2")) == {"job-1": 150, "job-2": 30}
    await counts_equal_rows(db)


async def test_a_batch_with_events_already_loaded_adds_only_the_new_ones(db: asyncpg.Connection) -> None:
    assert await load(db, events(0, 200)) == {"job-1": 200}
    assert await load(db, events(0, 200)) == {}  # delivered again: nothing added, nothing doubled
    assert await load(db, events(150, 260)) == {"job-1": 60}  # overlapping
    twice = events(300, 310)
    assert await load(db, twice + twice) == {"job-1": 10}  # the same event twice in one batch
    counts = await counts_equal_rows(db)
    assert sum(n for n, _, _ in counts.values()) == 270
    assert await db.fetchval("SELECT count(*) FROM responses.events") == 270


async def test_the_values_path_loads_the_same_rows(db: asyncpg.Connection) -> None:
    batch = events(0, 50)
    tally = core.Tally()
    for e in batch:
        f = fields_of(e)
        tally.add(f.broadcast_id.encode(), f.type.encode(), f.occurred_at.encode())
    assert await store.load(db, b"".join(core.copy_line(fields_of(e)) for e in batch), tally) == {"job-1": 50}
    await counts_equal_rows(db)
    assert await load(db, batch) == {}
