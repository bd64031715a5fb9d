"""The syncer's push step against a real CRM database and a connector that fails on cue: an outage
retries the batch and nothing the ESP took is pushed again; the state an ESP answers with (pending
for a double opt-in) is written back to the CRM; a stale request is never pushed."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import asyncpg
import pytest
from aiokafka.structs import ConsumerRecord

from services.syncer import core, handlers
from services.syncer.settings import Settings
from shared.esp import Connectors
from shared.esp.accounts import AccountConfig, Accounts, SubscriptionPolicy
from shared.esp.base import ContactChange, ContactResult
from shared.infra.db import create_pool
from shared.infra.settings import PostgresSettings
from shared.model.errors import TransientError
from shared.model.messages import SubscriptionRequest, SubscriptionState
from shared.runtime.runtime import Runtime

pytestmark = pytest.mark.integration

T0 = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)
ACCOUNTS = Accounts(
    (
        AccountConfig(
            esp="generic", account="a", subscriptions=SubscriptionPolicy(lists=("news",), double_opt_in=True)
        ),
    )
)


class FlakyConnector:
    """Takes two contacts a call; the calls numbered in ``fail_on`` fail once, as an outage."""

    contacts_per_call = 2

    def __init__(self, *fail_on: int) -> None:
        self.fail_on = set(fail_on)
        self.calls: list[list[str]] = []

    async def apply_contacts(self, changes: Sequence[ContactChange]) -> list[ContactResult]:
        self.calls.append([c.email for c in changes])
        if len(self.calls) in self.fail_on:
            raise TransientError("the ESP answered 503")
        return [
            ContactResult(
                c.email,
                c.list,
                True,
                SubscriptionState.PENDING if c.double_opt_in else c.state,
                "confirmation sent",
            )
            for c in changes
        ]


class OneConnector:
    """Stands in for the process's connectors: the one flaky connector for every account."""

    def __init__(self, connector: FlakyConnector) -> None:
        self.connector = connector

    def get(self, esp: str, account: str) -> FlakyConnector:
        return self.connector


@pytest.fixture
async def crm(database: PostgresSettings) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database)
    try:
        yield pool
    finally:
        await pool.close()


def syncer(crm: asyncpg.Pool, connector: FlakyConnector) -> handlers.Syncer:
    connectors = cast(Connectors, OneConnector(connector))
    return handlers.Syncer(Settings(), cast(Runtime, None), crm, ACCOUNTS, connectors)


def batch(*requests: SubscriptionRequest) -> handlers.Requests:
    items = [
        handlers.Item(
            r,
            core.request_target(r, ACCOUNTS),
            ConsumerRecord("subscriptions.requests.v1", 0, n, 0, 0, None, r.to_json(), None, 0, 0, ()),
        )
        for n, r in enumerate(requests)
    ]
    return handlers.Requests(items, len(items))


def request(n: int, **more: Any) -> SubscriptionRequest:
    values: dict[str, Any] = {
        "request_id": uuid.UUID(int=n),
        "email": f"c{n}@example.com",
        "esp": "generic",
        "account": "a",
        "state": SubscriptionState.SUBSCRIBED,
        "requested_at": T0,
    } | more
    return SubscriptionRequest(**values)


async def test_an_outage_retries_the_batch_and_pushes_nothing_twice(crm: asyncpg.Pool) -> None:
    connector = FlakyConnector(2)
    requests = batch(*(request(n) for n in range(1, 6)))
    with pytest.raises(TransientError):
        await handlers.push_requests(requests, syncer(crm, connector))
    retried = await handlers.push_requests(requests, syncer(crm, connector))
    assert connector.calls == [
        ["c1@example.com", "c2@example.com"],
        ["c3@example.com", "c4@example.com"],  # the outage
        ["c3@example.com", "c4@example.com"],
        ["c5@example.com"],
    ]
    assert (retried.pushed, retried.skipped, retried.refused) == ({"generic": 3}, 2, [])
    async with crm.acquire() as conn:
        pushes = await conn.fetchval("SELECT count(*) FROM crm.subscription_pushes WHERE accepted")
        states = await conn.fetch("SELECT DISTINCT state, source FROM crm.subscriptions")
    assert pushes == 5
    assert [tuple(s) for s in states] == [("pending", "generic/a")]  # the ESP's answer, written back


async def test_a_request_older_than_its_row_is_logged_stale_and_never_pushed(crm: asyncpg.Pool) -> None:
    connector = FlakyConnector()
    newer = request(1, state=SubscriptionState.UNSUBSCRIBED, requested_at=T0 + timedelta(minutes=5))
    older = request(2, email=newer.email, requested_at=T0)  # the same contact, later on the topic
    pushed = await handlers.push_requests(batch(newer, older), syncer(crm, connector))
    assert connector.calls == [[newer.email]]
    assert pushed.skipped == 1
    again = await handlers.push_requests(batch(request(3, email=newer.email)), syncer(crm, connector))
    assert (again.skipped, connector.calls[1:]) == (1, [])
    async with crm.acquire() as conn:
        outcomes = await conn.fetch("SELECT change_id, outcome FROM crm.subscription_log ORDER BY change_id")
    assert [(r["change_id"].int, r["outcome"]) for r in outcomes] == [
        (1, "applied"),
        (2, "stale"),
        (3, "stale"),
    ]
