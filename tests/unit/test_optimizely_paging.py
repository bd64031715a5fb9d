"""Optimizely's bounces paged as ``GET /responses`` is documented: no ``offset``, only ``limit``
(at most 10000), ``mailingId``, ``recipientIds`` and ``category``.

The connector asks for a mailing's bounces; a full page is read again by ``recipientIds``, a page
of the batch's recipient list (``GET /recipients/{recipientListId}``, offset paging) at a time. The
fake ESP is the one of tests/unit/test_optimizely_connector.py, which refuses an ``offset``, reached
through the contract proxy that holds every call to Optimizely's OpenAPI document.
"""

from __future__ import annotations

import logging
from collections import Counter
from itertools import pairwise
from typing import Any
from urllib.parse import quote

import orjson
import pytest

from shared.esp.cursor import CursorError
from shared.esp.optimizely import RECIPIENT_IDS_BUDGET, Cursor, recipient_slices
from shared.model.messages import ResponseEvent
from tests.fixtures.contract import checked_fake
from tests.fixtures.fake_esp import Seen
from tests.unit.test_optimizely_connector import (
    CLIENT,
    FakeOptimizely,
    bounce,
    broadcast,
    connector,
    pull_round,
)

LIST_ID = 3001
"""The recipient list of the fake's batches."""


def sent_batch(esp: FakeOptimizely, recipients: list[str], bounced: dict[str, str]) -> None:
    """A sent batch of a running campaign (mailing 8004): its recipient list and their bounces."""
    esp.batch("job-1", state="sent", campaign=7002)
    esp.campaigns[7002]["status"] = "running"
    esp.recipients[LIST_ID] = sorted(recipients)
    esp.bounces = [
        bounce(r, category, f"2026-11-22T11:{n // 60:02d}:{n % 60:02d}+01:00")
        for n, (r, category) in enumerate(sorted(bounced.items()))
    ]


def keys(count: int) -> list[str]:
    return [f"R{n:03d}" for n in range(1, count + 1)]


def responses_asked(esp: FakeOptimizely) -> list[dict[str, str]]:
    return [s.query for s in esp.seen if s.path == f"/{CLIENT}/responses"]


def recipient_pages(esp: FakeOptimizely) -> list[Seen]:
    return esp.calls(f"/{CLIENT}/recipients/")


def pulled_bounces(items: list[Any]) -> Counter[tuple[str, str]]:
    """How often each (recipient, type) was pulled."""
    return Counter(
        (i.communication_key or "", i.type.value)
        for i in items
        if isinstance(i, ResponseEvent) and i.type.value.startswith("bounce")
    )


esp = checked_fake(FakeOptimizely)


async def test_a_short_mailing_page_is_complete_and_no_recipient_is_asked_for(esp: FakeOptimizely) -> None:
    sent_batch(esp, keys(10), {"R002": "hardbounce", "R005": "softbounce"})
    items, _, _ = await pull_round(connector(esp), broadcast(), None)
    assert pulled_bounces(items) == {("R002", "bounce_hard"): 1, ("R005", "bounce_soft"): 1}
    assert responses_asked(esp) == [
        {"category": "hardbounce", "mailingId": "8004", "limit": "10000"},
        {"category": "softbounce", "mailingId": "8004", "limit": "10000"},
    ]
    assert recipient_pages(esp) == []


async def test_a_full_mailing_page_is_read_again_by_recipients_and_every_bounce_is_pulled(
    esp: FakeOptimizely,
) -> None:
    bounced = {r: "hardbounce" for r in ("R001", "R004", "R005", "R007", "R009", "R011", "R012")}
    sent_batch(esp, keys(12), {**bounced, "R003": "softbounce"})
    items, cursor, pages = await pull_round(connector(esp, responses_limit=3, page_size=5), broadcast(), None)
    pulled = pulled_bounces(items)
    assert set(pulled) == {(r, "bounce_hard") for r in bounced} | {("R003", "bounce_soft")}
    # The mailing's full page (3 of 7) is read again in the sweep: those three events come twice,
    # with one id each, so the loader keeps them once.
    ids = {i.event_id for i in items if isinstance(i, ResponseEvent)}
    assert len(ids) == len(pulled) == 8
    assert sum(pulled.values()) == 8 + 3
    # The recipient list was read page by page, and its recipients were asked for by recipientIds.
    assert [s.query for s in recipient_pages(esp)] == [
        {"offset": "0", "limit": "5"},
        {"offset": "5", "limit": "5"},
        {"offset": "10", "limit": "5"},
    ]
    narrowed = [q for q in responses_asked(esp) if "recipientIds" in q]
    assert all(q["mailingId"] == "8004" and q["limit"] == "3" for q in narrowed)
    asked = [r for q in narrowed for r in q["recipientIds"].split(",")]
    assert set(asked) == set(keys(12))
    assert all("offset" not in q for q in responses_asked(esp))
    assert orjson.loads(cursor or "{}")["sweeps"] == {}, "the round ends with no sweep in progress"
    assert pages > 4


async def test_a_full_answer_for_some_recipients_is_asked_for_again_in_halves(esp: FakeOptimizely) -> None:
    sent_batch(esp, keys(4), dict.fromkeys(keys(4), "hardbounce"))
    items, _, _ = await pull_round(connector(esp, responses_limit=2, page_size=4), broadcast(), None)
    assert set(pulled_bounces(items)) == {(r, "bounce_hard") for r in keys(4)}
    narrowed = [q["recipientIds"] for q in responses_asked(esp) if "recipientIds" in q]
    assert narrowed == ["R001,R002,R003,R004", "R001,R002", "R001", "R002", "R003,R004", "R003", "R004"]


async def test_the_sweep_goes_on_from_the_stored_cursor(esp: FakeOptimizely) -> None:
    sent_batch(esp, keys(12), dict.fromkeys(keys(12), "hardbounce"))
    b = broadcast()
    first = connector(esp, responses_limit=5, page_size=5)
    cursor = None
    while not any(s.query.get("offset") == "5" for s in recipient_pages(esp)):
        cursor = (await first.pull_responses(b, cursor)).cursor
    assert orjson.loads(cursor or "{}")["sweeps"] == {"8004:hardbounce": 10}
    seen = len(esp.seen)
    # Another process (a restarted gatherer) goes on where the stored cursor says.
    items, _, _ = await pull_round(connector(esp, responses_limit=5, page_size=5), b, cursor)
    assert [s.query["offset"] for s in esp.seen[seen:] if "/recipients/" in s.path] == ["10"]
    assert {r for r, _ in pulled_bounces(items)} == {"R011", "R012"}


async def test_a_version_1_cursor_is_read_and_its_bounces_start_again_from_the_mailing(
    esp: FakeOptimizely,
) -> None:
    sent_batch(esp, keys(6), dict.fromkeys(keys(6), "hardbounce"))
    stored = (
        '{"v":1,"batch":5001,"mailings":[8004],"pos":0,"offsets":{"8004:hardbounce":4},'
        '"unsubscribes":{"high_water":null,"offset":0,"top":null}}'
    )
    upgraded = Cursor.load(stored)
    assert (upgraded.mailings, upgraded.recipient_list, upgraded.sweeps) == ([8004], None, {})
    items, cursor, _ = await pull_round(connector(esp, responses_limit=4, page_size=10), broadcast(), stored)
    assert set(pulled_bounces(items)) == {(r, "bounce_hard") for r in keys(6)}
    assert all("offset" not in q for q in responses_asked(esp))
    # The list id was not in the old cursor: it is read from the batch once, then kept.
    assert len(esp.calls("/sending/batches/5001")) == 1
    assert orjson.loads(cursor or "{}")["recipient_list"] == LIST_ID
    assert orjson.loads(cursor or "{}")["v"] == 2
    with pytest.raises(CursorError, match="a version 1 cursor of another shape: pos"):
        Cursor.load(stored.replace('"pos":0', '"pos":-1'))


async def test_recipients_whose_ids_recipient_ids_cannot_carry_are_reported(
    esp: FakeOptimizely, caplog: pytest.LogCaptureFixture
) -> None:
    sent_batch(esp, ["R001", "R,002", "R003"], {"R001": "hardbounce", "R003": "hardbounce"})
    caplog.set_level(logging.WARNING, logger="shared.esp.optimizely")
    items, _, _ = await pull_round(connector(esp, responses_limit=1), broadcast(), None)
    assert set(pulled_bounces(items)) == {("R001", "bounce_hard"), ("R003", "bounce_hard")}
    (warning,) = [r for r in caplog.records if "recipientIds cannot carry" in r.getMessage()]
    assert warning.__dict__["recipients"] == 1
    assert all("R,002" not in q.get("recipientIds", "") for q in responses_asked(esp))


async def test_an_unknown_recipient_list_ends_the_sweep_with_a_warning(
    esp: FakeOptimizely, caplog: pytest.LogCaptureFixture
) -> None:
    sent_batch(esp, keys(3), dict.fromkeys(keys(3), "hardbounce"))
    del esp.recipients[LIST_ID]
    caplog.set_level(logging.WARNING, logger="shared.esp.optimizely")
    items, _, _ = await pull_round(connector(esp, responses_limit=2), broadcast(), None)
    assert set(pulled_bounces(items)) == {("R001", "bounce_hard"), ("R002", "bounce_hard")}
    assert any("recipient list cannot be read" in r.getMessage() for r in caplog.records)


async def test_long_recipient_ids_are_asked_for_in_slices_that_keep_the_url_short(
    esp: FakeOptimizely,
) -> None:
    long_keys = [f"{n:04d}-" + "ü" * 60 for n in range(300)]
    sent_batch(esp, long_keys, {long_keys[7]: "hardbounce", long_keys[250]: "hardbounce"})
    items, _, _ = await pull_round(connector(esp, responses_limit=1, page_size=300), broadcast(), None)
    assert {r for r, _ in pulled_bounces(items)} == {long_keys[7], long_keys[250]}
    narrowed = [q["recipientIds"] for q in responses_asked(esp) if "recipientIds" in q]
    assert len(narrowed) > 1
    assert all(len(quote(ids, safe=",")) <= RECIPIENT_IDS_BUDGET for ids in narrowed)


def test_recipient_slices_keep_the_ids_in_order_within_the_budget() -> None:
    ids = [f"id-{n}" + "é" * (n % 7) for n in range(500)]
    slices = list(recipient_slices(ids, budget=200))

    def encoded(group: list[str]) -> int:
        return len(",".join(quote(i, safe="") for i in group))

    assert [i for s in slices for i in s] == ids
    assert all(encoded(s) <= 200 for s in slices)
    assert all(encoded([*s, n[0]]) > 200 for s, n in pairwise(slices)), "each slice is as long as it can be"
    assert list(recipient_slices(["a", "b" * 300, "c"], budget=200)) == [["a"], ["b" * 300], ["c"]]
    assert list(recipient_slices([], budget=200)) == []


async def test_the_retired_offset_paging_option_is_ignored_with_a_warning(
    esp: FakeOptimizely, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="shared.esp.optimizely")
    c = connector(esp, responses_offset_paging=True)
    assert not hasattr(c.options, "responses_offset_paging")
    assert any("responses_offset_paging is ignored" in r.getMessage() for r in caplog.records)
