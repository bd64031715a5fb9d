"""The Kafka Connect worker killed (kill -9) and started again while the CRM keeps opting contacts
out, the whole way to the ESP: every update made before, during and after the kill reaches the
ESP, and none twice — the ESP's contact book changed each contact once, it was called once per
batch the syncer pushed, and the CRM's log holds each captured update once.

The worker is the test's own (``infra/connect/connect-local.sh`` on a free port): the shared one
keeps serving the other tests. The ESP is the generic connector's sandbox flavor; what the kill
could break — a change lost, or one captured twice and pushed twice — is the capture's and the
syncer's, the same for every connector (each connector's pushes are in
tests/integration/test_subscription_sync.py)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import aiohttp
import asyncpg
import pytest

from shared.model.topics import Topic
from tests.fixtures.capture import Capture, PrivateWorker, espbridge_write, private_worker
from tests.fixtures.deployment import Deployment
from tests.fixtures.kafka import count_records
from tests.fixtures.processes import log_records, stop
from tests.fixtures.sandbox import Sandboxes
from tests.fixtures.servers import Servers
from tests.fixtures.subscriptions import SYNC_FLAVORS, Place, synced_esp

pytestmark = pytest.mark.xdist_group("subscription_sync")

PER_PHASE = 20
"""CRM updates before the kill, while the worker is dead, and after its restart."""
CONTACTS = [f"c{n:03}@example.com" for n in range(3 * PER_PHASE)]


@contextmanager
def log_on_failure(worker: PrivateWorker) -> Iterator[None]:
    """On a failure, the worker's log tail in the test's output (its folder goes with the worker)."""
    try:
        yield
    except BaseException:
        log = worker.state_dir / "connect" / "logs" / "connect.out"
        print(log.read_text(errors="replace")[-6000:] if log.exists() else f"no {log}")
        raise


async def test_a_worker_killed_mid_stream_loses_no_update_and_pushes_none_twice(
    servers: Servers, deployment: Deployment, sandbox: Sandboxes, db: asyncpg.Connection
) -> None:
    flavor = SYNC_FLAVORS["generic"]
    account = f"{deployment.account}a"
    news = Place(account, flavor.lists[0])
    # the contacts' subscriptions are the CRM's history: written before the capture, never pushed
    await espbridge_write(
        db,
        "INSERT INTO crm.subscriptions (email, esp, account, list, state)"
        " SELECT unnest($1::text[]), $2, $3, $4, 'subscribed'",
        CONTACTS,
        flavor.esp,
        news.account,
        news.list,
    )
    before, during, after = (CONTACTS[n : n + PER_PHASE] for n in range(0, len(CONTACTS), PER_PHASE))
    with private_worker(servers, deployment.kafka) as worker, log_on_failure(worker), ExitStack() as stack:
        async with aiohttp.ClientSession() as http:
            capture = Capture(http, worker.connect, deployment.kafka, deployment.database)
            try:
                async with synced_esp(stack, deployment, sandbox, flavor, {account: "list"}, capture) as esp:
                    for email in before:
                        await esp.crm_update(email, news, "unsubscribed", "asked us")
                    await esp.captured(before[-1], news, "unsubscribed")
                    await worker.kill()
                    for email in during:
                        await esp.crm_update(email, news, "unsubscribed", "asked us")
                    worker.script("start")
                    for email in after:
                        await esp.crm_update(email, news, "unsubscribed", "asked us")

                    for email in CONTACTS:
                        await esp.record_in(email, news, "unsubscribed", timeout_s=120)
                    await esp.settled()
                    histories = {email: esp.history(email, news) for email in CONTACTS}
                    calls = await esp.calls(account)
                    for name, proc in esp.procs.items():
                        assert stop(proc) == 0, f"{name} did not stop cleanly"
            finally:
                await capture.disable()

    assert {e: [(h["state"], h["via"]) for h in hs] for e, hs in histories.items()} == {
        email: [("unsubscribed", "api")] for email in CONTACTS
    }, "each update changed the ESP's contact once"
    logged = await db.fetch("SELECT email, origin, outcome FROM crm.subscription_log ORDER BY email")
    assert [tuple(r) for r in logged] == [(email, "capture", "applied") for email in CONTACTS]
    assert await db.fetchval("SELECT count(*) FROM crm.subscription_pushes WHERE accepted") == len(CONTACTS)
    batches = [
        r
        for r in log_records(deployment.folder / "syncer.log")
        if r.get("msg") == "subscription requests pushed"
    ]
    assert calls == len([b for b in batches if b["pushed"]]), "one call per batch pushed (a list, one kind)"
    captured = await count_records(deployment.kafka, Topic.CRM_CAPTURED)
    print(f"{captured} captured records for {len(CONTACTS)} updates; {calls} calls to the ESP")
