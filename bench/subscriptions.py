"""The subscriptions part: how long a subscription change takes each way, with real gatherer and
syncer processes against the sandbox ESP's MailUp flavor (its webhooks, its recipient calls and
its limit of 5 calls a second) and the CRM's capture by Debezium on the Kafka Connect worker.

- **webhook → CRM**: N recipients click the unsubscribe link at the ESP (the sandbox's control
  route), which calls MailUp's Unsubscribe webhook at the gatherer at once; the gatherer publishes
  the change, the syncer commits it to ``crm.subscriptions``. The figure is the syncer's own
  ``crm_lag_s`` (logged per applied change): from the change's ``occurred_at`` — MailUp's
  ``EventDate``, the ESP's time of the click, in milliseconds — to the syncer's commit.
- **CRM → ESP**: the CRM updates N rows to ``unsubscribed`` (one statement each, its own
  transaction, as a CRM does), paced within MailUp's limit (an unsubscribe is two calls); Debezium
  captures each, the syncer pushes it. The figure runs from the row's ``updated_at`` (the statement,
  which commits at once) to the time the ESP's contact record changed.

Both clocks are this machine's. The arithmetic (percentiles, what arrived) is pure and tested
without servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from bench.broadcasts import percentile, percentile_with_unfinished
from bench.harness import BenchEnv, Service, create_topics, say, start_sandbox, usage, wait_for
from shared.infra.db import Conn, connect
from shared.operations.capture import ConnectSettings, capture_status, disable_capture
from tools.demo import FLAVORS, write_accounts_file
from tools.demo_sync import EspContacts, EspRecord, free_port

ESP = "mailup"
LIST = "1"
"""The one list the bench's account syncs (no follow-ons: each change is one row and one push)."""
APPLIED = "subscription change applied"
"""The syncer's log line for each change an ESP reported that it committed (with ``crm_lag_s``)."""


@dataclass(frozen=True)
class SyncPlan:
    """How many changes each way, and how fast they are made."""

    changes: int
    webhooks_per_s: float = 10.0
    """Link clicks a second at the ESP."""
    crm_updates_per_s: float = 1.5
    """CRM updates a second: MailUp takes 5 calls a second and an unsubscribe is 2 (the status
    lookup, the unsubscribe), so 1.5 leaves room; a faster stream would measure the queue."""
    timeout_s: float = 120.0
    """How long to wait for the last change to arrive after it was made; then what arrived counts."""


@dataclass(frozen=True)
class Latencies:
    """One direction's figures: seconds each change took, of how many made."""

    made: int
    seconds: list[float]
    waited_s: float
    """How long the changes had, from the last one made, when the wait ended."""

    @property
    def arrived(self) -> int:
        """How many arrived."""
        return len(self.seconds)

    def figures(self) -> dict[str, Any]:
        """p95 (a lower bound when more than 5 % had not arrived), p50, max, counts."""
        p95, lower = percentile_with_unfinished(self.seconds, self.made - self.arrived, self.waited_s)
        return {
            "made": self.made,
            "arrived": self.arrived,
            "p95_s": _round(p95),
            "p95_is_lower_bound": lower,
            "p50_s": _round(percentile(self.seconds, 50)),
            "max_s": _round(max(self.seconds, default=None)),
        }


@dataclass(frozen=True)
class WebhookLatencies(Latencies):
    """The webhook direction, with a second reading: from the ESP's record of each click to the
    CRM row's ``updated_at`` (the syncer's write, just before its commit)."""

    to_row_seconds: list[float]

    def figures(self) -> dict[str, Any]:
        """The figures, and the second reading's p95 and max."""
        return {
            **super().figures(),
            "click_to_row_p95_s": _round(percentile(self.to_row_seconds, 95)),
            "click_to_row_max_s": _round(max(self.to_row_seconds, default=None)),
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def between(starts: Mapping[str, float], ends: Mapping[str, float]) -> list[float]:
    """Seconds from each key's start to its end, for the keys that have both."""
    return [ends[k] - starts[k] for k in starts if k in ends]


def crm_lags(log: Path) -> list[float]:
    """The ``crm_lag_s`` of every unsubscribe the syncer committed, from its JSON log."""
    lags = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if APPLIED not in line:
            continue
        with contextlib.suppress(orjson.JSONDecodeError):
            record = orjson.loads(line)
            if record.get("msg") == APPLIED and record.get("state") == "unsubscribed":
                lags.append(float(record["crm_lag_s"]))
    return lags


def emails(kind: str, n: int) -> list[str]:
    """The bench's contacts of one kind (``w``: unsubscribed by webhook, ``c``: by the CRM)."""
    return [f"{kind}{i:05d}@example.com" for i in range(n)]


async def run_subscriptions(env: BenchEnv, plan: SyncPlan) -> dict[str, Any]:
    """The part end to end: the ESP and the CRM seeded with 2N subscribed contacts, then N
    webhook unsubscribes and N CRM updates, one direction after the other; its figures."""
    connect_settings = ConnectSettings(**_connect_settings(env.base_env))
    prefix = env.next_prefix()
    kafka = env.kafka_for(prefix)
    async with aiohttp.ClientSession() as http:
        await capture_status(http, connect_settings.url, kafka, env.pg)  # a worker that is down says so now
        account_dir = env.sftp_local_root / ESP / env.account
        try:
            return await _measure(env, plan, http, prefix)
        finally:
            env.stop_all()
            outcome = await disable_capture(http, connect_settings.url, kafka, env.pg)
            say(f"  capture disabled: connector {outcome.names.connector}, slot {outcome.names.slot}")
            shutil.rmtree(account_dir, ignore_errors=True)


def _connect_settings(base_env: Mapping[str, str]) -> dict[str, Any]:
    """The worker's settings from the servers' environment (``ESPBRIDGE_CONNECT_*``)."""
    found = {
        "url": base_env.get("ESPBRIDGE_CONNECT_URL"),
        "secrets_file": base_env.get("ESPBRIDGE_CONNECT_SECRETS_FILE"),
    }
    return {k: v for k, v in found.items() if v}


async def _measure(env: BenchEnv, plan: SyncPlan, http: aiohttp.ClientSession, prefix: str) -> dict[str, Any]:
    port = free_port()
    webhook_url = f"http://127.0.0.1:{port}/webhooks/{ESP}/{{account}}"
    sandbox, url = await start_sandbox(
        env, ESP, {"FLAVOR": "mailup", "MAILUP_LISTS": LIST, "MAILUP_WEBHOOK_URL": webhook_url}
    )
    accounts_file = env.work / "accounts-subscriptions.json"
    entry = FLAVORS[ESP].account_entry(ESP, env.account, url, env.token_file)
    entry["subscriptions"] = {"lists": [LIST]}
    write_accounts_file(accounts_file, [entry])
    await create_topics(env.kafka_for(prefix))
    service_env = env.service_env(
        prefix, ESPBRIDGE_ACCOUNTS_FILE=str(accounts_file), ESPBRIDGE_SYNCER_CAPTURE="true"
    )
    gatherer = env.start("gatherer", {**service_env, "ESPBRIDGE_HTTP_PORT": str(port)})
    syncer = env.start("syncer", service_env)
    processes = [sandbox, gatherer, syncer]
    await env.wait_ready([gatherer, syncer])
    esp_side = EspContacts(http, url, env.account, env.token_file.read_text().strip())
    by_webhook, by_crm = emails("w", plan.changes), emails("c", plan.changes)
    conn = await connect(env.pg)
    try:
        t = time.monotonic()
        await _seed(env, conn, esp_side, [*by_webhook, *by_crm], processes)
        seeded_s = time.monotonic() - t
        say(f"  {2 * plan.changes} contacts subscribed at the ESP and in the CRM ({seeded_s:.0f} s)")
        cpu_before = _cpu(processes)
        webhook = await _webhook_to_crm(conn, esp_side, by_webhook, plan, processes, syncer)
        say(_line("webhook → CRM", webhook))
        crm = await _crm_to_esp(conn, esp_side, by_crm, plan, processes)
        say(_line("CRM → ESP", crm))
        cpu = {k: round(v - cpu_before.get(k, 0.0), 1) for k, v in _cpu(processes).items()}
    finally:
        await conn.close()
    return {
        "webhook_to_crm": webhook.figures(),
        "crm_to_esp": crm.figures(),
        "webhooks_per_s": plan.webhooks_per_s,
        "crm_updates_per_s": plan.crm_updates_per_s,
        "cpu_s": cpu,
    }


def _line(name: str, latencies: Latencies) -> str:
    f = latencies.figures()
    lower = " (a lower bound)" if f["p95_is_lower_bound"] else ""
    return (
        f"  {name}: {f['arrived']} of {f['made']} arrived, p95 {f['p95_s']} s{lower}, "
        f"p50 {f['p50_s']} s, max {f['max_s']} s"
    )


def _cpu(processes: Sequence[Service]) -> dict[str, float]:
    return {s.name: usage(s.pid).cpu_s for s in processes}


def _alive(processes: Sequence[Service]) -> None:
    for s in processes:
        if not s.alive():
            raise RuntimeError(f"the {s.name} exited with {s.proc.returncode}:\n{s.tail()}")


async def _seed(
    env: BenchEnv, conn: Conn, esp_side: EspContacts, contacts: list[str], processes: Sequence[Service]
) -> None:
    """Subscribe the contacts on the list at the ESP (a contacts file of MailUp's import data sync,
    which reports nothing back) and in the CRM (as espbridge's write, which is never pushed)."""
    folder = env.sftp_local_root / ESP / env.account / "import" / LIST
    folder.mkdir(parents=True, exist_ok=True)
    hidden = folder / ".bench-contacts.csv"
    hidden.write_text("Email;Status\n" + "".join(f"{e};subscribed\n" for e in contacts), encoding="utf-8")
    hidden.rename(folder / "bench-contacts.csv")  # the sandbox reads only visible names
    async with conn.transaction():
        await conn.execute("SET LOCAL espbridge.writer = 'espbridge'")
        await conn.execute(
            "INSERT INTO crm.subscriptions (email, esp, account, list, state, reason) "
            "SELECT e, $2, $3, $4, 'subscribed', 'bench' FROM unnest($1::text[]) AS e",
            contacts,
            ESP,
            env.account,
            LIST,
        )
    wanted = set(contacts)

    async def subscribed() -> bool:
        _alive(processes)
        records = await esp_side.records(list_id=LIST)
        return sum(1 for r in records if r.email in wanted and r.state == "subscribed") == len(wanted)

    await wait_for(subscribed, "the contacts subscribed at the ESP", 120, 0.2)


async def _paced(count: int, per_s: float, make: Callable[[int], Awaitable[None]]) -> None:
    """Call ``make(i)`` for i in 0…count-1, the i-th at i/per_s seconds from the start (or as soon
    as the one before it returned, when that is later)."""
    t0 = time.monotonic()
    for i in range(count):
        delay = t0 + i / per_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)  # the pace of the changes is what the scenario sets
        await make(i)


async def _webhook_to_crm(
    conn: Conn,
    esp_side: EspContacts,
    contacts: list[str],
    plan: SyncPlan,
    processes: Sequence[Service],
    syncer: Service,
) -> Latencies:
    """N link clicks at the ESP; each change's ``crm_lag_s`` once the CRM has every row (or the
    timeout passed), and beside them the seconds from each click to its row's ``updated_at``."""
    source = f"{ESP}/{esp_side.account}"
    clicked: dict[str, float] = {}

    async def click(i: int) -> None:
        clicked[contacts[i]] = (await esp_side.act("unsubscribe_link", contacts[i], LIST)).changed_at

    await _paced(len(contacts), plan.webhooks_per_s, click)
    last = time.monotonic()

    async def arrived() -> bool:
        _alive(processes)
        n = await conn.fetchval(
            "SELECT count(*) FROM crm.subscriptions WHERE email = ANY($1::text[]) AND state = 'unsubscribed' "
            "AND source = $2",
            contacts,
            source,
        )
        return bool(n == len(contacts))

    with contextlib.suppress(TimeoutError):
        await wait_for(arrived, "the unsubscribes in the CRM", plan.timeout_s, 0.1)
    waited_s = time.monotonic() - last
    rows = await conn.fetch(
        "SELECT email, updated_at FROM crm.subscriptions WHERE email = ANY($1::text[]) "
        "AND state = 'unsubscribed' AND source = $2",
        contacts,
        source,
    )
    written = {r["email"]: r["updated_at"].timestamp() for r in rows}

    async def logged() -> bool:  # the syncer logs each change just after its commit
        return len(crm_lags(syncer.log)) >= len(written)

    with contextlib.suppress(TimeoutError):
        await wait_for(logged, "the syncer's log lines of the changes", 10, 0.1)
    return WebhookLatencies(len(contacts), crm_lags(syncer.log), waited_s, between(clicked, written))


async def _crm_to_esp(
    conn: Conn, esp_side: EspContacts, contacts: list[str], plan: SyncPlan, processes: Sequence[Service]
) -> Latencies:
    """N CRM updates to unsubscribed; each from its row's ``updated_at`` to the ESP's record time."""
    committed: dict[str, float] = {}

    async def update(i: int) -> None:
        updated_at = await conn.fetchval(
            "UPDATE crm.subscriptions SET state = 'unsubscribed', reason = 'bench' "
            "WHERE (email, esp, account, list) = ($1, $2, $3, $4) RETURNING updated_at",
            contacts[i],
            ESP,
            esp_side.account,
            LIST,
        )
        committed[contacts[i]] = updated_at.timestamp()

    await _paced(len(contacts), plan.crm_updates_per_s, update)
    last = time.monotonic()
    wanted = set(contacts)
    at_esp: dict[str, EspRecord] = {}

    async def arrived() -> bool:
        _alive(processes)
        for r in await esp_side.records(list_id=LIST):
            if r.email in wanted and r.state == "unsubscribed":
                at_esp[r.email] = r
        return len(at_esp) == len(wanted)

    with contextlib.suppress(TimeoutError):
        await wait_for(arrived, "the CRM's updates at the ESP", plan.timeout_s, 0.2)
    ends = {email: r.changed_at for email, r in at_esp.items()}
    return Latencies(len(contacts), between(committed, ends), time.monotonic() - last)
