"""Subscriptions kept in sync both ways, CRM ⇄ ESP, through every connector against its sandbox
flavor, with the real services as processes and Debezium capturing the CRM.

One sandbox per connector plays three accounts of its ESP, each syncing two lists: ``a`` with
``unsubscribe_scope: list``, ``b`` with ``account``, ``c`` with ``all_accounts``. The CRM first
subscribes the contacts (captured and pushed); then, in order:

1. a contact unsubscribes by a message's link at the ESP: the CRM's row says so, from that ESP;
2. the CRM opts a contact out with a plain UPDATE: Debezium captures it and the ESP holds it;
3. no echo: what came from the ESP went back to no one (no call, no push, no captured request);
4. an old unsubscribe arriving after a newer resubscribe changes nothing (logged stale);
5. post-operations: an unsubscribe at ``b`` reaches its other list, one at ``c`` every list of
   every account, and ``a``'s own report of what was pushed to it changes and pushes nothing;
6. bad requests are dead letters that say why (``espbridge dlq list``).

The times of 1 (the ESP's change → the CRM's row) and 2 (the CRM's commit → the ESP's record) are
printed, beside the 2 s and 5 s goals (``pytest -rP`` shows them; the bench measures them).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import timedelta

import orjson
import pytest

from shared.model.messages import SubscriptionChange, SubscriptionRequest, SubscriptionState
from shared.model.topics import Topic
from tests.fixtures.capture import Capture
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import count_records, produce, read_until
from tests.fixtures.processes import stop
from tests.fixtures.sandbox import Sandboxes
from tests.fixtures.subscriptions import SYNC_FLAVORS, Place, SyncedEsp, report_time, synced_esp
from tests.fixtures.waits import wait_for
from tests.integration.test_dlq import Cli

pytestmark = pytest.mark.xdist_group("subscription_sync")

ANN, BO, CY, DEE = "ann@example.com", "bo@example.com", "cy@example.com", "dee@example.com"


@pytest.fixture
def stack() -> Iterator[ExitStack]:
    with ExitStack() as processes:
        yield processes


async def requests_of(esp: SyncedEsp, email: str) -> list[SubscriptionRequest]:
    """Every request on subscriptions.requests.v1 for the contact."""
    kafka = esp.deployment.kafka
    total = await count_records(kafka, Topic.SUBSCRIPTION_REQUESTS)
    records = await read_until(kafka, Topic.SUBSCRIPTION_REQUESTS, lambda rs: len(rs) >= total)
    found = [SubscriptionRequest.from_json(r.value or b"") for r in records if r.key == email.encode()]
    return found


@pytest.mark.parametrize("connector", sorted(SYNC_FLAVORS))
async def test_subscriptions_stay_in_sync_both_ways(
    connector: str, deployment: Deployment, sandbox: Sandboxes, capture: Capture, stack: ExitStack
) -> None:
    flavor = SYNC_FLAVORS[connector]
    a, b, c = (f"{deployment.account}{suffix}" for suffix in "abc")
    scopes = {a: "list", b: "account", c: "all_accounts"}
    async with synced_esp(stack, deployment, sandbox, flavor, scopes, capture) as esp:
        first, second = flavor.lists
        a1, a2, b1, b2, c1, c2 = (Place(x, lst) for x in (a, b, c) for lst in (first, second))
        everywhere = [a1, a2, b1, b2, c1, c2]
        await esp.crm_subscribe([(ANN, a1), (BO, a1), (CY, b1), (CY, b2), *((DEE, p) for p in everywhere)])
        if flavor.reports_in_responses:
            # the ESP reports an unsubscribe only as a response row of the broadcast it came from
            await esp.broadcast(a, [ANN, DEE])
            await esp.broadcast(b, [CY])
            await esp.broadcast(c, [DEE])
        await esp.settled()

        # 1. An unsubscribe at the ESP reaches the CRM, as that ESP's change.
        calls_before = await esp.calls(a)
        link = await esp.act("unsubscribe_link", ANN, a1)
        row = await esp.row_in(ANN, a1, "unsubscribed")
        assert (row["reason"], row["source"], row["written_by"]) == (
            "unsubscribe",
            esp.source(a),
            "espbridge",
        )
        took = row["updated_at"].timestamp() - link["changed_at"]
        report_time(f"{connector}: ESP unsubscribe → CRM row", took, goal_s=2)

        # 3. No echo: Debezium captured espbridge's write, and nothing went back to the ESP.
        await esp.captured(ANN, a1, "unsubscribed")
        await esp.settled()
        assert await esp.calls(a) == calls_before  # None where the flavor does not count its calls
        assert esp.history(ANN, a1)[-1]["changed_at"] == link["changed_at"], "nothing changed it since"
        assert await esp.record(ANN, a1) == link
        assert [p for p in await esp.pushed() if p[0] == ANN] == [(ANN, a, first, "subscribed", "capture")]
        assert [r.origin.value for r in await requests_of(esp, ANN)] == ["capture"]  # the CRM's subscribe

        # 2. The CRM opts a contact out with a plain UPDATE: captured, it reaches the ESP.
        await esp.crm_update(BO, a1, "unsubscribed", "asked the call centre")
        record = await esp.record_in(BO, a1, "unsubscribed")
        row = await esp.row_in(BO, a1, "unsubscribed")
        assert (row["source"], row["written_by"]) == ("crm", "crm")
        took = record["changed_at"] - row["updated_at"].timestamp()
        report_time(f"{connector}: CRM opt-out → ESP record", took, goal_s=5)

        # 4. An old unsubscribe arriving after a newer resubscribe changes nothing.
        await esp.crm_update(ANN, a1, "subscribed", "signed up again")
        await esp.record_in(ANN, a1, "subscribed")
        resubscribed = await esp.row_in(ANN, a1, "subscribed")
        late = SubscriptionChange(
            change_id=uuid.uuid4(),
            email=ANN,
            esp=esp.esp,
            account=a,
            list=first,
            state=SubscriptionState.UNSUBSCRIBED,
            reason="unsubscribe",
            occurred_at=resubscribed["changed_at"] - timedelta(minutes=5),
        )  # as a response file gathered late would bring it
        await produce(deployment.kafka, Topic.SUBSCRIPTION_CHANGES, [(ANN.encode(), late.to_json())])
        await wait_for(lambda: esp.outcome(late.change_id), 30, what="the late unsubscribe logged")
        await esp.settled()
        assert await esp.outcome(late.change_id) == "stale"
        assert await esp.states(ANN, a1) == ("subscribed", "subscribed")

        # 5. Post-operations: b's unsubscribe covers b's other list, c's every list everywhere.
        pushed_before = await esp.pushed()
        await esp.act("unsubscribe_link", CY, b1)
        await esp.act("unsubscribe_link", DEE, c1)
        # each follow-on, and the account whose report it follows
        follow_ons = {(CY, b2): b, **{(DEE, p): c for p in everywhere if p != c1}}
        for email, at in [(CY, b1), (DEE, c1)]:
            await esp.row_in(email, at, "unsubscribed")
        for (email, at), origin in follow_ons.items():
            assert (await esp.row_in(email, at, "unsubscribed"))["source"] == esp.source(origin)
            await esp.record_in(email, at, "unsubscribed")
        await esp.settled()
        follow_on_pushes = [p for p in await esp.pushed() if p not in pushed_before]
        assert follow_on_pushes == sorted(
            (email, at.account, at.list, "unsubscribed", "follow_on") for email, at in follow_ons
        ), "each follow-on pushed once, and nothing back to b's or c's own list"

        # ... and no ping-pong: a's own report of the unsubscribe pushed to it changes nothing.
        report = await esp.act("unsubscribe_link", DEE, a1)
        reported = await wait_for(lambda: esp.reports(DEE, a1), 30, what="a's report logged")
        await esp.settled()
        assert reported == [("esp", esp.source(a), "unchanged")]
        assert (await esp.row_in(DEE, a1, "unsubscribed"))["source"] == esp.source(c)
        assert [p for p in await esp.pushed() if p not in pushed_before] == follow_on_pushes
        assert esp.history(DEE, a1)[-1]["changed_at"] == report["changed_at"]

        # 6. Bad requests are dead letters with the reason.
        await bad_requests_are_dead_letters(esp, a, first)

        for name, proc in esp.procs.items():
            assert stop(proc) == 0, f"{name} did not stop cleanly"


async def bad_requests_are_dead_letters(esp: SyncedEsp, account: str, first: str) -> None:
    """An unknown account, a bad address and an unknown list: each a dead letter with its reason,
    as ``espbridge dlq list`` shows it."""
    now = "2026-01-01T00:00:00+00:00"
    base = {"esp": esp.esp, "account": account, "list": first, "state": "unsubscribed", "requested_at": now}
    bad = {
        name: orjson.dumps({"request_id": str(uuid.uuid4()), **base, "email": "eve@example.com", **doc})
        for name, doc in {
            "unknown account": {"account": "nobody"},
            "bad email": {"email": "not an address"},
            "unknown list": {"list": "weekly"},
        }.items()
    }
    await produce(esp.deployment.kafka, Topic.SUBSCRIPTION_REQUESTS, [(b"eve", v) for v in bad.values()])
    await read_until(esp.deployment.kafka, Topic.DEADLETTER, lambda rs: len(rs) >= len(bad))
    cli = Cli(esp.env)
    listing = cli("dlq", "list", "--service", "syncer", "--json")
    assert listing.returncode == 0, listing.stderr
    reasons = {d["payload"]: d["message"] for d in orjson.loads(listing.stdout)}
    said = {name: reasons[payload.decode()] for name, payload in bad.items()}
    configured = ", ".join(esp.source(x) for x in sorted(esp.accounts))
    assert (
        said["unknown account"]
        == f"ESP account {esp.esp}/nobody is not configured (configured: {configured})"
    )
    assert said["unknown list"] == (
        f"list 'weekly' is not one of the lists ESP account {esp.source(account)} syncs"
        f" ({', '.join(esp.flavor.lists)})"
    )
    assert said["bad email"].startswith("not a valid SubscriptionRequest: email: ")
    assert "not an address" in said["bad email"]
    table = cli("dlq", "list", "--service", "syncer").stdout
    assert len([line for line in table.splitlines() if " syncer " in line]) == len(bad)
