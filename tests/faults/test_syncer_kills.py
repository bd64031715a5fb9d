"""The syncer killed (kill -9) in the middle of its work and started again, and the CRM out of reach
in the middle of a push, against the generic connector's sandbox flavor: every change is applied
once and in time order, every request reaches the ESP, and nothing the ESP is known to have taken is
pushed again — but for the one call whose answer never reached the syncer, pushed again (the
contact calls are idempotent: the contacts' state is right, the ESP's history shows the repeat).

Each fault hits a point the test can see the syncer at, never a moment picked by the clock: a
contact's row locked by the test (the batch of its changes waits for the lock), a contact call the
sandbox holds (a fault rule, before or after the ESP did the call's work). Only the syncer runs:
the ESP's changes are published on subscriptions.changes.v1 as the gatherer and the loader publish
them, the producers' requests on subscriptions.requests.v1."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid
from collections.abc import Iterable
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Self, TypedDict

import asyncpg
import pytest

from shared.infra.db import connect
from shared.infra.db.subscriptions import LOCK_CLASS, Key
from shared.model.messages import SubscriptionChange, SubscriptionRequest, SubscriptionState
from shared.model.topics import Topic
from tests.fixtures.deployment import Deployment
from tests.fixtures.faults import readiness
from tests.fixtures.kafka import Record, committed, count_records, produce, read_until
from tests.fixtures.processes import log_records, stop
from tests.fixtures.sandbox import Sandboxes
from tests.fixtures.subscriptions import SYNC_FLAVORS, Place, SyncedEsp, accounts_entries
from tests.fixtures.waits import wait_for

pytestmark = pytest.mark.xdist_group("subscription_sync")

FLAVOR = SYNC_FLAVORS["generic"]
NEWS, OFFERS = FLAVOR.lists
SUBSCRIBED, UNSUBSCRIBED = SubscriptionState.SUBSCRIBED, SubscriptionState.UNSUBSCRIBED

SESSION = {"ESPBRIDGE_KAFKA_SESSION_TIMEOUT_MS": "6000"}
"""The broker's minimum: a killed syncer's partitions go to the next one soon."""
ONE_GO = {"ESPBRIDGE_SYNCER_PIPELINE_BATCHES": "100"}
"""Every batch fetched handled in one go, its offsets committed at the end: the batches stored
before a kill have no committed offsets, and all of them come again."""
BATCH = 20
"""Requests (or changes) in a batch: a contact call each, so that a stream makes many."""

CONTACTS = [f"c{n:03}@example.com" for n in range(100)]
"""The contacts whose ESP changes stream in: three changes each."""
REQUESTED = [f"r{n:03}@example.com" for n in range(300)]
"""The contacts of the producers' requests: one request each."""


class Gate:
    """A TCP relay on loopback to a server: closed, it cuts every connection through it and refuses
    new ones, as a server out of reach does; opened again, it relays on the same port. The test's
    event loop runs it, so a blocking wait in the test holds its traffic."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.listen_port = 0
        """Where it listens (a free port once opened)."""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def open(self) -> None:
        """Relay again (the first time: on a free port)."""
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.listen_port)
        self.listen_port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        """Cut every connection through it and refuse new ones."""
        if self._server is None:
            return
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()
        self._server = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.close()

    async def _relay(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        try:
            server_in, server_out = await asyncio.open_connection(self.host, self.port)
        except OSError:
            client_out.transport.abort()
            return
        self._writers |= {client_out, server_out}
        await asyncio.gather(_pipe(client_in, server_out), _pipe(server_in, client_out))
        self._writers -= {client_out, server_out}


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy one direction of a connection until it ends; then close the other side."""
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except OSError:
        pass  # the gate aborted the connection
    finally:
        sink.close()


def hold(path: str, when: str, skip: int = 0, delay_s: float = 60.0) -> dict[str, Any]:
    """The sandbox's fault rule that holds one contact call (the ``skip``+1-th to ``path``) for
    ``delay_s``, or until its caller goes away: ``before`` the ESP does the call's work (and then
    answers 504), or ``after`` it (and then answers as the call deserves)."""
    return {"name": "held", "path": path, "fault": "timeout", "when": when, "skip": skip, "delay_s": delay_s}


async def start_sync(
    stack: ExitStack,
    deployment: Deployment,
    sandbox: Sandboxes,
    crm: asyncpg.Connection,
    held: dict[str, Any],
    scope: str = "list",
    **settings: str,
) -> SyncedEsp:
    """The generic flavor's sandbox playing the test's account (syncing both lists, ``scope`` its
    unsubscribe scope), with the ``held`` fault rule, and a syncer (batches of :data:`BATCH`, and
    ``settings``), once ready."""
    account = deployment.account
    esp = sandbox("generic", accounts=account, faults=json.dumps([held]))
    token_file = deployment.folder / "esp.secret"
    token_file.write_text(esp.token)
    accounts_file = deployment.accounts_file(accounts_entries(FLAVOR, esp, token_file, {account: scope}))
    env = deployment.env(accounts_file, **{**SESSION, "ESPBRIDGE_SYNCER_BATCH_MAX": str(BATCH), **settings})
    synced = SyncedEsp(FLAVOR, esp, (account,), deployment, crm, {}, env)
    await start_syncer(stack, synced)
    return synced


async def start_syncer(stack: ExitStack, esp: SyncedEsp) -> subprocess.Popen[bytes]:
    """Start a syncer process (logging to the deployment's syncer.log) and wait until it is ready."""
    log = esp.deployment.folder / "syncer.log"
    before = readiness(log)
    proc = esp.deployment.start(stack, "syncer", esp.env)
    esp.procs["syncer"] = proc

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"the syncer exited ({proc.returncode}) at start")
        return readiness(log) > before

    await wait_for(ready, timeout_s=90, what="a syncer ready")
    return proc


def kill(esp: SyncedEsp) -> None:
    """kill -9 the syncer."""
    assert stop(esp.procs["syncer"], signal.SIGKILL) == -signal.SIGKILL


def holding(esp: SyncedEsp) -> bool:
    """Whether the sandbox holds the call its rule picked, having done its work or not as the rule
    says (it logs the fault once the handler, if it runs first, is done)."""
    return any(r.get("msg") == "fault injected" for r in log_records(esp.sandbox.log))


async def publish(
    deployment: Deployment, topic: Topic, messages: Iterable[SubscriptionChange | SubscriptionRequest]
) -> None:
    """Publish changes or requests as their producers do: keyed by the contact's email."""
    await produce(deployment.kafka, topic, [(m.email.encode(), m.to_json()) for m in messages])


class Contact(TypedDict):
    """A change's or request's contact: the email, and the ESP account's list."""

    email: str
    esp: str
    account: str
    list: str


def contact(email: str, at: Place) -> Contact:
    """The contact on the list of the test's ESP account."""
    return Contact(email=email, esp=FLAVOR.esp, account=at.account, list=at.list)


def request(email: str, at: Place) -> SubscriptionRequest:
    """A producer's request to subscribe the contact to the list."""
    return SubscriptionRequest(
        request_id=uuid.uuid4(), **contact(email, at), state=SUBSCRIBED, requested_at=datetime.now(UTC)
    )


async def book(esp: SyncedEsp, at: Place) -> dict[str, str]:
    """The ESP's contact book of a list: each contact's state."""
    records = await esp.sandbox.contacts(list_id=at.list, account=at.account)
    return {r["email"]: r["state"] for r in records}


async def book_holds(esp: SyncedEsp, at: Place, emails: Iterable[str], state: str) -> None:
    """Wait until the ESP holds each of these contacts on the list in ``state``."""
    wanted = dict.fromkeys(emails, state)

    async def holds() -> bool:
        found = await book(esp, at)
        return {e: found.get(e) for e in wanted} == wanted

    await wait_for(holds, 60, 0.1, what=f"{len(wanted)} contacts {state} on {at.list} at the ESP")


def histories(esp: SyncedEsp, at: Place, emails: Iterable[str]) -> dict[str, list[tuple[str, str]]]:
    """Each contact's changes on the list in the ESP's contact book: (state, via) in order."""
    return {e: [(h["state"], h["via"]) for h in esp.history(e, at)] for e in emails}


def logged(esp: SyncedEsp, msg: str) -> list[dict[str, Any]]:
    """The syncer's log lines (every process's) with this message."""
    return [r for r in log_records(esp.deployment.folder / "syncer.log") if r.get("msg") == msg]


def calls_made(esp: SyncedEsp) -> int:
    """The contact calls the syncer's log accounts for: one per batch it pushed (its requests are
    of one list and one kind, fewer than a call takes)."""
    return len([b for b in logged(esp, "subscription requests pushed") if b["pushed"]])


async def no_dead_letters(esp: SyncedEsp) -> None:
    """Nothing was dead-lettered: every fault was retried."""
    assert await count_records(esp.deployment.kafka, Topic.DEADLETTER) == 0, "a dead letter"


def change(email: str, at: Place, state: SubscriptionState, at_time: datetime) -> SubscriptionChange:
    """A change the ESP reported (its reason the event's type)."""
    reason = "unsubscribe" if state is UNSUBSCRIBED else "subscribe"
    return SubscriptionChange(
        change_id=uuid.uuid4(), **contact(email, at), state=state, reason=reason, occurred_at=at_time
    )


@dataclass(frozen=True)
class Pushes:
    """Where a stream of pushes stands at a fault."""

    recorded: set[str]
    """The contacts whose push the CRM recorded: the ESP took them, the syncer knows it."""
    in_flight: set[str]
    """The contacts the ESP holds whose push is not recorded: the call whose answer was lost."""


async def pushes_at_fault(esp: SyncedEsp, at: Place) -> Pushes:
    """What the CRM recorded as pushed to the list and what the ESP holds besides."""
    recorded = {email for email, *_ in await esp.pushed()}
    return Pushes(recorded, set(await book(esp, at)) - recorded)


async def assert_each_pushed_once(
    esp: SyncedEsp, at: Place, requests: list[SubscriptionRequest], again: set[str]
) -> None:
    """Every request reached the ESP and was recorded as pushed once; the contacts ``again`` (of
    the call whose answer the syncer never read) were pushed twice, the call made again. Nothing
    was dead-lettered."""
    emails = [r.email for r in requests]
    await book_holds(esp, at, emails, "subscribed")
    await esp.settled()
    assert histories(esp, at, emails) == {
        email: [("subscribed", "api")] * (2 if email in again else 1) for email in emails
    }
    calls = await esp.calls(at.account)
    assert calls == calls_made(esp) + bool(again), (
        "a call per batch pushed, and the one whose answer was lost"
    )
    assert sorted(await esp.pushed()) == sorted(
        (email, at.account, at.list, "subscribed", "producer") for email in emails
    )
    await no_dead_letters(esp)


async def test_a_syncer_killed_mid_stream_applies_every_change_once_and_pushes_each_follow_on_once(
    deployment: Deployment, sandbox: Sandboxes, db: asyncpg.Connection
) -> None:
    news, offers = Place(deployment.account, NEWS), Place(deployment.account, OFFERS)
    source = f"{FLAVOR.esp}/{deployment.account}"
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)  # ESPs report whole seconds
    # each contact subscribes, unsubscribes, and a subscribe older than the unsubscribe comes last
    made = {
        email: (
            change(email, news, SUBSCRIBED, t0),
            change(email, news, UNSUBSCRIBED, t0 + timedelta(seconds=2)),
            change(email, news, SUBSCRIBED, t0 + timedelta(seconds=1)),
        )
        for email in CONTACTS
    }
    await publish(deployment, Topic.SUBSCRIPTION_CHANGES, [c for cs in made.values() for c in cs])
    # the last contact's row locked: the batch of its changes waits in the middle of the stream
    locker = await connect(deployment.database)
    last = Key(CONTACTS[-1], FLAVOR.esp, news.account, news.list)
    await locker.execute("SELECT pg_advisory_lock(hashtextextended($1, $2))", last.lock_text, LOCK_CLASS)

    async def mid_stream(esp: SyncedEsp) -> bool:
        waiting = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND wait_event = 'advisory'"
        )
        return waiting > 0 and holding(esp)

    try:
        with ExitStack() as stack:
            held = hold(f"/lists/{OFFERS}/unsubscribe$", "before")  # the first follow-on's push
            batches = {"ESPBRIDGE_SYNCER_BATCH_MAX": str(BATCH // 2), **ONE_GO}
            esp = await start_sync(stack, deployment, sandbox, db, held, "account", **batches)
            await wait_for(
                lambda: mid_stream(esp), 60, 0.02, what="a batch waiting for the row, a follow-on's push held"
            )
            kill(esp)
            logged_at_kill = await db.fetchval(
                "SELECT count(*) FROM crm.subscription_log WHERE origin = 'esp'"
            )
            acknowledged = await committed(deployment.kafka, "syncer-changes", Topic.SUBSCRIPTION_CHANGES)
            assert 0 < logged_at_kill < len(CONTACTS) * 3, "the kill hit the stream in its middle"
            await locker.execute("SELECT pg_advisory_unlock_all()")

            await start_syncer(stack, esp)
            await book_holds(esp, offers, CONTACTS, "unsubscribed")
            await esp.settled()
            offers_history = histories(esp, offers, CONTACTS)
            news_book = await book(esp, news)
            calls = await esp.calls(news.account)
            assert stop(esp.procs["syncer"]) == 0
    finally:
        await locker.close()

    # every change once, in time order: the subscribe older than the unsubscribe is stale
    outcomes = await db.fetch("SELECT change_id, outcome FROM crm.subscription_log WHERE origin = 'esp'")
    assert {r["change_id"]: r["outcome"] for r in outcomes} == {
        c.change_id: outcome
        for cs in made.values()
        for c, outcome in zip(cs, ("applied", "applied", "stale"), strict=True)
    }
    # the changes stored before the kill whose offsets were not committed came again: duplicates
    written = logged(esp, "subscription changes written")
    assert sum(b.get("duplicate", 0) for b in written) == logged_at_kill - acknowledged > 0
    rows = await db.fetch("SELECT email, list, state, source, change_id FROM crm.subscriptions")
    assert {(r["email"], r["list"]): (r["state"], r["source"]) for r in rows} == {
        (email, at.list): ("unsubscribed", source) for email in CONTACTS for at in (news, offers)
    }
    assert {r["email"]: r["change_id"] for r in rows if r["list"] == NEWS} == {
        email: cs[1].change_id for email, cs in made.items()
    }, "each row holds its latest change"
    # the account scope's follow-ons: one per contact, published (again, the same, for the batches
    # that came again) and pushed once
    follow_ons = await db.fetch(
        "SELECT change_id, email, list, source, outcome FROM crm.subscription_log WHERE origin = 'follow_on'"
    )
    assert sorted((r["email"], r["list"], r["source"], r["outcome"]) for r in follow_ons) == [
        (email, OFFERS, source, "applied") for email in CONTACTS
    ]
    wanted = {r["change_id"] for r in follow_ons}

    def published(records: list[Record]) -> dict[uuid.UUID, set[bytes]]:
        """Each request id on the topic, with the bytes it was published with (each time)."""
        found: dict[uuid.UUID, set[bytes]] = {}
        for r in records:
            value = r.value or b""
            found.setdefault(SubscriptionRequest.from_json(value).request_id, set()).add(value)
        return found

    requests = published(
        await read_until(
            deployment.kafka, Topic.SUBSCRIPTION_REQUESTS, lambda rs: published(rs).keys() >= wanted
        )
    )
    assert requests.keys() == wanted
    assert all(len(versions) == 1 for versions in requests.values()), (
        "a follow-on published again is the same"
    )
    assert sorted(await esp.pushed()) == sorted(
        (email, offers.account, OFFERS, "unsubscribed", "follow_on") for email in CONTACTS
    )
    assert offers_history == {email: [("unsubscribed", "api")] for email in CONTACTS}, "each pushed once"
    assert news_book == {}, "nothing pushed back to the list the changes came from"
    assert calls == calls_made(esp)
    await no_dead_letters(esp)


@pytest.mark.parametrize(
    "when", ["before", "after"], ids=["before_the_esp_took_the_call", "after_the_esp_took_the_call"]
)
async def test_a_syncer_killed_mid_push_pushes_every_request_and_none_it_knew_the_esp_took_again(
    when: str, deployment: Deployment, sandbox: Sandboxes, db: asyncpg.Connection
) -> None:
    news = Place(deployment.account, NEWS)
    requests = [request(email, news) for email in REQUESTED]
    before_kill, while_down = requests[:150], requests[150:]
    with ExitStack() as stack:
        held = hold(f"/lists/{NEWS}/subscribe$", when, skip=4)  # the fifth call
        esp = await start_sync(stack, deployment, sandbox, db, held, **ONE_GO)
        await publish(deployment, Topic.SUBSCRIPTION_REQUESTS, before_kill)
        await wait_for(lambda: holding(esp), 60, 0.02, what="the ESP holding a push")
        kill(esp)
        at_kill = await pushes_at_fault(esp, news)
        acknowledged = await committed(deployment.kafka, "syncer-push", Topic.SUBSCRIPTION_REQUESTS)
        assert at_kill.recorded, "the kill came after some pushes"
        if when == "before":
            assert not at_kill.in_flight, "the ESP did nothing of the call held before its work"
        else:
            assert 0 < len(at_kill.in_flight) <= BATCH, "the ESP did the call held after its work"

        await publish(deployment, Topic.SUBSCRIPTION_REQUESTS, while_down)
        await start_syncer(stack, esp)
        await assert_each_pushed_once(esp, news, requests, at_kill.in_flight)
        assert stop(esp.procs["syncer"]) == 0

    # the batches stored before the kill came again: what the ESP had taken was skipped
    skipped = sum(b["skipped"] for b in logged(esp, "subscription requests pushed"))
    assert skipped == len(at_kill.recorded) - acknowledged > 0
    log = await db.fetch("SELECT change_id, origin, outcome FROM crm.subscription_log")
    assert sorted((r["change_id"], r["origin"], r["outcome"]) for r in log) == sorted(
        (r.request_id, "producer", "applied") for r in requests
    )
    rows = await db.fetch("SELECT email, state, source FROM crm.subscriptions WHERE list = $1", NEWS)
    assert sorted(map(tuple, rows)) == [(email, "subscribed", "crm") for email in REQUESTED]


async def test_the_crm_out_of_reach_mid_push_is_an_outage_retried_not_a_dead_letter(
    deployment: Deployment, sandbox: Sandboxes, db: asyncpg.Connection
) -> None:
    news = Place(deployment.account, NEWS)
    requests = [request(email, news) for email in REQUESTED[:200]]
    before_outage, during = requests[:100], requests[100:]
    pg = deployment.database
    async with Gate(pg.host, pg.port) as gate:
        with ExitStack() as stack:
            # the third call: the ESP takes it, its answer comes once the CRM is out of reach
            held = hold(f"/lists/{NEWS}/subscribe$", "after", skip=2, delay_s=3)
            crm = {"ESPBRIDGE_CRM_HOST": "127.0.0.1", "ESPBRIDGE_CRM_PORT": str(gate.listen_port)}
            esp = await start_sync(stack, deployment, sandbox, db, held, **crm)
            await publish(deployment, Topic.SUBSCRIPTION_REQUESTS, before_outage)
            await wait_for(lambda: holding(esp), 60, 0.02, what="the ESP holding a push")
            await gate.close()
            await wait_for(lambda: batches_retried(esp), 60, 0.05, what="a batch retried for the CRM")
            at_outage = await pushes_at_fault(esp, news)
            assert at_outage.recorded, "the outage came after some pushes"
            assert 0 < len(at_outage.in_flight) <= BATCH, "the ESP took the call the CRM could not record"

            await publish(deployment, Topic.SUBSCRIPTION_REQUESTS, during)
            await gate.open()
            await assert_each_pushed_once(esp, news, requests, at_outage.in_flight)
            proc = esp.procs["syncer"]
            assert proc.poll() is None, f"the syncer exited ({proc.returncode}) in the CRM's outage"
            assert await asyncio.to_thread(stop, proc) == 0  # its pool closes through the gate

    retried_at = batches_retried(esp)[0]["ts"]
    assert [r for r in outage_lines(esp, "reachable again") if r["ts"] > retried_at], "no line of its return"
    assert len(logged(esp, "starting")) == 1, "the syncer ran on through the outage"


def outage_lines(esp: SyncedEsp, what: str) -> list[dict[str, Any]]:
    """The syncer's log lines saying PostgreSQL is ``unreachable`` or ``reachable again``."""
    return [
        r
        for r in log_records(esp.deployment.folder / "syncer.log")
        if str(r.get("msg", "")).startswith(f"PostgreSQL {what}")
    ]


def batches_retried(esp: SyncedEsp) -> list[dict[str, Any]]:
    """The syncer's lines about a batch retried as PostgreSQL could not be reached (not those of its
    pool noticing the outage by itself)."""
    return [r for r in outage_lines(esp, "unreachable") if r.get("retrying") == "the message"]
