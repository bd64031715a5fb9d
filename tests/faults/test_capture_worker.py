"""The Kafka Connect worker killed (kill -9) while the CRM keeps writing, then started again: every
change made before, during and after the kill is captured, and the events Debezium repeats (those
after its last committed position) make the same requests, so nothing is pushed twice.

The test runs a worker of its own (``infra/connect/connect-local.sh`` on a free port, its group and
internal topics under the test's prefix): the shared one keeps serving the other tests."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import aiohttp
import asyncpg

from shared.model.messages import SubscriptionRequest
from shared.model.topics import Topic
from tests.fixtures.capture import Capture, as_json, crm_write, private_worker, requests_of, subscribe_sql
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import Record, read_until
from tests.fixtures.servers import Servers

EMAIL = "ann@example.com"
PER_PHASE = 20
"""CRM updates before the kill, while the worker is dead, and after its restart."""
TOGGLE = (
    "UPDATE crm.subscriptions SET fields = jsonb_build_object('n', $2::int), state = CASE state"
    " WHEN 'subscribed' THEN 'unsubscribed' ELSE 'subscribed' END WHERE email = $1"
)


async def update(db: asyncpg.Connection, first: int, last: int) -> None:
    """CRM updates numbered ``first`` to ``last`` (fields.n), each one flipping the state."""
    for n in range(first, last + 1):
        await crm_write(db, TOGGLE, EMAIL, n)


def numbered(records: list[Record], prefix: str) -> list[SubscriptionRequest]:
    """The requests of the captured records (the insert and every update make one)."""
    return [r for r in requests_of(records, prefix) if r is not None]


def holds_up_to(last: int, prefix: str) -> Callable[[list[Record]], bool]:
    """A ``read_until`` condition: the requests of updates 0 to ``last`` are all on the topic."""
    return lambda records: {int(r.fields["n"]) for r in numbered(records, prefix)} >= set(range(last + 1))


async def test_a_worker_killed_mid_stream_loses_no_change_and_pushes_none_twice(
    servers: Servers, deployment: Deployment, db: asyncpg.Connection
) -> None:
    prefix = deployment.kafka.topic_prefix
    with private_worker(servers, deployment.kafka) as worker:
        async with aiohttp.ClientSession() as http:
            capture = Capture(http, worker.connect, deployment.kafka, deployment.database)
            try:
                await capture.enable()
                await crm_write(db, subscribe_sql(), EMAIL, "mailup", "emea", "2", as_json({"n": 0}))
                await update(db, 1, PER_PHASE)
                await read_until(deployment.kafka, Topic.CRM_CAPTURED, holds_up_to(PER_PHASE, prefix), 30)

                await worker.kill()
                await update(db, PER_PHASE + 1, 2 * PER_PHASE)
                worker.script("start")
                await update(db, 2 * PER_PHASE + 1, 3 * PER_PHASE)

                records = await read_until(
                    deployment.kafka, Topic.CRM_CAPTURED, holds_up_to(3 * PER_PHASE, prefix), 120
                )
            finally:
                await capture.disable()

    requests = numbered(records, prefix)
    ids_of: dict[int, set[str]] = defaultdict(set)
    for request in requests:
        ids_of[int(request.fields["n"])].add(str(request.request_id))
    assert sorted(ids_of) == list(range(3 * PER_PHASE + 1)), "every change before, during and after arrived"
    assert all(len(ids) == 1 for ids in ids_of.values()), "a repeated event is the same request"
    assert len({r.request_id for r in requests}) == 3 * PER_PHASE + 1
