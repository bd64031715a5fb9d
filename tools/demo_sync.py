"""``make demo-sync``: subscriptions kept in sync both ways, CRM ⇄ ESP, in real time.

    python -m tools.demo_sync run [--esp mailup] [--account demo]
    python -m tools.demo_sync stop     turn off the capture `run` turned on (``make demo-stop``)

``run`` starts the sandbox ESP (its flavor reporting ESP-side changes to the gatherer's webhook
endpoint), the gatherer, the loader and the syncer with the capture on (the Debezium connector on
the Kafka Connect worker), seeds three CRM contacts subscribed on the account's synced lists
(captured and pushed to the ESP), then times a CRM opt-out — an UPDATE of ``crm.subscriptions`` —
to the ESP's contact record, and an ESP unsubscribe — a recipient clicking the link — to the CRM's
row, with the follow-on its account's ``unsubscribe_scope`` makes. Everything keeps running.

Expects the servers' settings in the environment (``make demo-sync`` sources .run/espbridge.env).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import secrets
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from shared.infra.db import Conn, connect
from shared.infra.kafka import ensure_topics
from shared.infra.settings import CrmSettings, KafkaSettings, PostgresSettings
from shared.model.errors import EspbridgeError
from shared.operations.capture import ConnectSettings, capture_names, disable_capture
from tools.demo import (
    FLAVORS,
    Processes,
    demo_state,
    say,
    service_env,
    start_sandbox,
    wait_until,
    write_accounts_file,
)

SYNC_SERVICES = ("gatherer", "loader", "syncer")
"""The services of the demo: webhooks in, response events' changes, the syncer itself."""
NAMES = ("ada", "ben", "cleo")
"""The CRM contacts the demo seeds (new addresses each run): ada opts out in the CRM, ben
unsubscribes at the ESP, cleo stays subscribed."""
CAPTURE_MARK = "capture.json"
"""In the demo's folder while the capture `run` turned on is on: ``stop`` turns it off."""


@dataclass(frozen=True)
class SyncFlavor:
    """How the demo keeps one ESP's subscriptions in sync against its sandbox flavor."""

    lists: tuple[str, ...]
    """The ESP lists the demo account keeps in sync (the first is its broadcast list)."""
    settings: Callable[[str, str], dict[str, str]]
    """(espbridge's webhook URL, the sandbox token) → the flavor's ``ESPBRIDGE_SANDBOX_<key>``
    settings that make it report ESP-side changes there."""
    options: dict[str, Any] = field(default_factory=dict)
    """Connector options the account needs for those lists, over the demo's own."""


def _optimizely_hooks(url: str, token: str) -> dict[str, str]:
    auth = {"type": "basicAuth", "userName": "espbridge", "password": token}
    return {"OPT_WEBHOOK_URL": url, "OPT_WEBHOOK_AUTH": json.dumps(auth)}


SYNC_FLAVORS = {
    "mailup": SyncFlavor(("1", "2"), lambda url, _token: {"MAILUP_WEBHOOK_URL": url}),
    "sandbox": SyncFlavor(("news", "offers"), lambda url, _token: {"GENERIC_WEBHOOK_URL": url}),
    "instiller": SyncFlavor(
        ("newsletter", "offers"),
        lambda url, _token: {"INSTILLER_LISTS": "newsletter,offers", "INSTILLER_WEBHOOK_URL": url},
    ),
    "deployteq": SyncFlavor(
        ("optin", "offers"),
        lambda url, _token: {"DEPLOYTEQ_LIST_FIELDS": "optin,offers", "DEPLOYTEQ_WEBHOOK_URL": url},
        {"list_fields": {"optin": "optin", "offers": "offers"}},
    ),
    "optimizely": SyncFlavor(("4001", "4002"), _optimizely_hooks),
}
"""``make demo-sync ESP=<name>``: the ESPs whose subscriptions the demo keeps in sync
(``generic_sftp`` has no API, so nothing to sync with)."""


def sync_account_entry(esp: str, account: str, url: str, token_file: Path) -> dict[str, Any]:
    """The account's entry in the accounts file: the demo's, syncing the flavor's lists; an
    unsubscribe from one list also unsubscribes the contact from the account's others."""
    entry = FLAVORS[esp].account_entry(esp, account, url, token_file)
    entry["options"] = {**entry.get("options", {}), **SYNC_FLAVORS[esp].options}
    entry["subscriptions"] = {"lists": list(SYNC_FLAVORS[esp].lists), "unsubscribe_scope": "account"}
    return entry


def earlier_accounts(accounts_file: Path, esp: str, account: str) -> list[dict[str, Any]]:
    """The other accounts of the last demo's accounts file, syncing no lists: the opt-outs of its
    broadcasts (on ``subscriptions.changes.v1``) reach the CRM instead of being dead letters."""
    if not accounts_file.exists():
        return []
    entries: list[dict[str, Any]] = orjson.loads(accounts_file.read_bytes()).get("accounts", [])
    return [
        {k: v for k, v in e.items() if k != "subscriptions"}
        for e in entries
        if (e.get("esp"), e.get("account")) != (esp, account)
    ]


def free_port() -> int:
    """A free TCP port on the loopback interface (for the gatherer's webhook endpoint)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class EspRecord:
    """A contact's record on one list at the sandbox ESP."""

    email: str
    list: str
    state: str
    via: str
    """How it got there: api (a caller such as espbridge), link, complaint, file, confirm, bounce."""
    changed_at: float
    """Unix time of its last change, on the ESP's clock."""

    @classmethod
    def of(cls, doc: dict[str, Any]) -> EspRecord:
        """From the sandbox's JSON."""
        return cls(doc["email"], doc["list"], doc["state"], doc["via"], float(doc["changed_at"]))


@dataclass(frozen=True)
class EspContacts:
    """The sandbox ESP's contact control routes (every flavor): a change made on the ESP's side,
    and the contact records."""

    http: aiohttp.ClientSession
    url: str
    account: str
    token: str

    @property
    def _base(self) -> str:
        return f"{self.url.rstrip('/')}/api/v1/accounts/{self.account}/_sandbox/contacts"

    @property
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def act(self, action: str, email: str, list_id: str) -> EspRecord:
        """``unsubscribe_link``, ``complaint``, ``subscribe``…: what a recipient does at the ESP."""
        body = {"email": email, "list": list_id, "action": action}
        async with self.http.post(self._base, json=body, headers=self._headers) as resp:
            answer = await resp.json()
            if resp.status != 200:
                raise RuntimeError(f"the sandbox ESP refused {action} of {email}: {resp.status} {answer}")
        return EspRecord.of(answer)

    async def records(self, email: str | None = None, list_id: str | None = None) -> list[EspRecord]:
        """The account's records (of one email and/or list)."""
        query = {k: v for k, v in (("email", email), ("list", list_id)) if v is not None}
        async with self.http.get(self._base, params=query, headers=self._headers) as resp:
            resp.raise_for_status()
            return [EspRecord.of(r) for r in (await resp.json())["contacts"]]

    async def record(self, email: str, list_id: str) -> EspRecord | None:
        """The contact's record on a list, if it has one."""
        found = await self.records(email, list_id)
        return found[0] if found else None


@dataclass(frozen=True)
class CrmRow:
    """A row of crm.subscriptions."""

    email: str
    list: str
    state: str
    reason: str
    source: str
    written_by: str
    updated_at: datetime


SUBSCRIBE_SQL = """
INSERT INTO crm.subscriptions (email, esp, account, list, state, reason)
SELECT e, $2, $3, l, 'subscribed', 'demo sign-up' FROM unnest($1::text[]) AS e, unnest($4::text[]) AS l
ON CONFLICT (email, esp, account, list) DO UPDATE SET state = 'subscribed', reason = EXCLUDED.reason
"""
"""The CRM signs contacts up on lists (its own write: captured and pushed)."""
OPT_OUT_SQL = """
UPDATE crm.subscriptions SET state = 'unsubscribed', reason = $5
WHERE (email, esp, account, list) = ($1, $2, $3, $4) RETURNING updated_at
"""
"""The CRM opts a contact out of a list (its own write: captured and pushed)."""


async def crm_rows(conn: Conn, esp: str, account: str, emails: Sequence[str]) -> list[CrmRow]:
    """The contacts' rows of the account, by email and list."""
    rows = await conn.fetch(
        "SELECT email, list, state, reason, source, written_by, updated_at FROM crm.subscriptions "
        "WHERE esp = $1 AND account = $2 AND email = ANY($3::text[]) ORDER BY email, list",
        esp,
        account,
        list(emails),
    )
    return [CrmRow(**dict(r)) for r in rows]


async def pushes_since(conn: Conn, key: tuple[str, str, str, str], since: float) -> int:
    """How many requests of one row (email, esp, account, list) the syncer pushed since ``since``."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM crm.subscription_pushes WHERE (email, esp, account, list) = ($1, $2, $3, $4) "
        "AND pushed_at >= to_timestamp($5)",
        *key,
        since,
    )
    return count


async def pushes_of_others(conn: Conn, contacts: Sequence[str], since: float) -> int:
    """How many requests of other contacts the syncer pushed since ``since`` (Unix time)."""
    count: int = await conn.fetchval(
        "SELECT count(*) FROM crm.subscription_pushes "
        "WHERE email <> ALL($1::text[]) AND pushed_at >= to_timestamp($2)",
        list(contacts),
        since,
    )
    return count


def _logged_ready(log: Path, offset: int) -> bool:
    """Whether the service's log says it is ready after ``offset`` (this run's part of it)."""
    with log.open("rb") as f:
        f.seek(offset)
        return b"service ready" in f.read()


async def start_services(procs: Processes, env: dict[str, str], gatherer_port: int) -> None:
    """Start the gatherer (its webhook endpoint on ``gatherer_port``), the loader and the syncer;
    return once each is ready (the syncer once the capture runs)."""
    offsets = {}
    for name in SYNC_SERVICES:
        log = procs.folder / f"{name}.log"
        offsets[name] = log.stat().st_size if log.exists() else 0
        own = {"ESPBRIDGE_HTTP_PORT": str(gatherer_port)} if name == "gatherer" else {}
        procs.start(name, f"services.{name}", {**env, **own})

    async def ready() -> bool:
        for name in SYNC_SERVICES:
            if procs.running(name) is None:
                tail = (procs.folder / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
                raise RuntimeError(f"the {name} exited:\n" + "\n".join(tail))
        return all(_logged_ready(procs.folder / f"{n}.log", offsets[n]) for n in SYNC_SERVICES)

    await wait_until("the gatherer, loader and syncer to be ready", ready, 180, 0.2)


async def run(esp: str, account: str) -> int:
    """The demo: set up, seed, then time one change each way; 0 when both arrived."""
    if esp not in SYNC_FLAVORS:
        known = ", ".join(sorted(SYNC_FLAVORS))
        raise SystemExit(f"{esp!r} keeps no subscriptions in sync in the demo: choose one of {known}")
    sync, flavor = SYNC_FLAVORS[esp], FLAVORS[esp]
    procs, token_file = demo_state()
    stopped = await procs.stop_all()
    if stopped:
        say(f"stopped the previous demo's {', '.join(stopped)}")
    port = free_port()
    token = token_file.read_text().strip()
    webhook = f"http://127.0.0.1:{port}/webhooks/{esp}/{{account}}"
    url = await start_sandbox(procs, esp, account, token_file, sync.settings(webhook, token))
    say(f"sandbox ESP {esp}/{account} ({flavor.sandbox_flavor} flavor) at {url}, its webhooks to {webhook}")
    accounts_file = procs.folder / "accounts.json"
    entries = [sync_account_entry(esp, account, url, token_file)]
    write_accounts_file(accounts_file, entries + earlier_accounts(accounts_file, esp, account))
    kafka, pg = KafkaSettings(), PostgresSettings()
    crm = CrmSettings().resolve(pg)
    await ensure_topics(kafka)
    (procs.folder / CAPTURE_MARK).write_bytes(
        orjson.dumps({"connector": capture_names(kafka, crm).connector})
    )
    connect_url = ConnectSettings().url
    await start_services(procs, service_env(accounts_file, ESPBRIDGE_SYNCER_CAPTURE="true"), port)
    say(
        f"started {', '.join(SYNC_SERVICES)} (logs in {procs.folder}); the capture of crm.subscriptions "
        f"runs on the Kafka Connect worker at {connect_url} (connector {capture_names(kafka, crm).connector})"
    )
    lists = sync.lists
    async with aiohttp.ClientSession() as http:
        contacts = EspContacts(http, url, account, token)
        conn = await connect(crm)
        try:
            return await _show(conn, contacts, esp, account, lists)
        finally:
            await conn.close()


async def _show(conn: Conn, esp_side: EspContacts, esp: str, account: str, lists: tuple[str, ...]) -> int:
    """Seed the contacts, then time a CRM opt-out to the ESP and an ESP unsubscribe to the CRM."""
    tag = secrets.token_hex(2)
    contacts = [f"{name}.{tag}@example.com" for name in NAMES]
    ada, ben = contacts[0], contacts[1]
    first, others = lists[0], lists[1:]
    t0, started = time.monotonic(), time.time()
    await conn.execute(SUBSCRIBE_SQL, contacts, esp, account, list(lists))
    say(f"CRM: {', '.join(contacts)} subscribed on lists {', '.join(lists)} (INSERT into crm.subscriptions)")
    expected = len(contacts) * len(lists)

    async def all_subscribed() -> bool:
        at_esp = [r for r in await esp_side.records() if r.email in contacts and r.state == "subscribed"]
        return len(at_esp) >= expected

    await wait_until("the contacts subscribed at the ESP", all_subscribed, 120, 0.1)
    say(f"  captured and pushed: {expected} subscriptions at the ESP after {time.monotonic() - t0:.1f} s")
    earlier = await pushes_of_others(conn, contacts, started)
    if earlier:
        say(f"  (and {earlier} earlier changes meanwhile, such as the opt-outs of `make demo`'s broadcasts)")

    # CRM → ESP: the CRM's own UPDATE, captured by Debezium, pushed by the syncer.
    updated_at = await conn.fetchval(OPT_OUT_SQL, ada, esp, account, first, "asked by phone")
    say(f"CRM: {ada} opted out of list {first} (UPDATE crm.subscriptions … SET state = 'unsubscribed')")
    opted_out = await wait_until(
        f"{ada} unsubscribed at the ESP", lambda: _esp_state(esp_side, ada, first, "unsubscribed"), 60, 0.05
    )
    crm_to_esp = opted_out.changed_at - updated_at.timestamp()
    say(f"  at the ESP: {ada} {opted_out.state} on list {first} after {crm_to_esp:.2f} s")

    # ESP → CRM: a recipient clicks the unsubscribe link; the ESP calls the gatherer's webhook.
    clicked = await esp_side.act("unsubscribe_link", ben, first)
    say(f"ESP: {ben} clicked the unsubscribe link of list {first}")
    source = f"{esp}/{account}"
    row = await wait_until(
        f"{ben} unsubscribed in the CRM",
        lambda: _crm_row(conn, esp, account, ben, first, "unsubscribed", source),
        60,
        0.05,
    )
    esp_to_crm = row.updated_at.timestamp() - clicked.changed_at
    say(f"  in the CRM: {ben} {row.state} on list {first} (source {row.source}) after {esp_to_crm:.2f} s")
    follow_ons: list[tuple[str, str]] = []
    for other in others:
        record = await wait_until(
            f"the follow-on of {ben} on list {other} at the ESP",
            functools.partial(_esp_state, esp_side, ben, other, "unsubscribed"),
            60,
            0.05,
        )
        follow_ons.append((other, _at_esp(record, clicked, row.updated_at.timestamp())))
        say(f"  and its follow-on on list {other}: in the CRM, and {follow_ons[-1][1]}")
    echoes = await pushes_since(conn, (ben, esp, account, first), clicked.changed_at)

    print()
    print(f"subscriptions kept in sync — {esp}/{account}, lists {', '.join(lists)}")
    print(f"  CRM → ESP  {ada} opted out of list {first} in the CRM: {crm_to_esp:.2f} s to the ESP")
    print(f"  ESP → CRM  {ben} clicked unsubscribe on list {first}: {esp_to_crm:.2f} s to the CRM")
    for other, at_esp in follow_ons:
        print(f"{'':<13}its follow-on on list {other} (unsubscribe_scope: account): {at_esp}")
    print(f"\ncrm.subscriptions of {ada} and {ben}")
    print(f"  {'email':<24}{'list':<12}{'state':<14}{'source':<18}{'written_by':<12}reason")
    for r in await crm_rows(conn, esp, account, (ada, ben)):
        print(f"  {r.email:<24}{r.list:<12}{r.state:<14}{r.source:<18}{r.written_by:<12}{r.reason}")
    print(
        f"\nNo echo: {ben}'s unsubscribe came from the ESP, so espbridge wrote it to the CRM as its own "
        f"and pushed nothing back to list {first} ({echoes} pushes since the click)."
    )
    print(
        "The sandbox ESP, the gatherer, loader and syncer keep running and the capture stays on: "
        "`make demo-stop` stops them and turns the capture off, `make down` the servers."
    )
    return 1 if echoes else 0


def _at_esp(follow_on: EspRecord, clicked: EspRecord, in_crm: float) -> str:
    """When a follow-on reached the ESP, after the click that caused it (``in_crm``: when the CRM
    took the click, before which no follow-on can have been pushed)."""
    if follow_on.changed_at < in_crm:  # e.g. Optimizely: one unsubscribe list for every list
        return "the ESP had unsubscribed it there itself with the click"
    return f"{follow_on.changed_at - clicked.changed_at:.2f} s to the ESP"


async def _esp_state(esp_side: EspContacts, email: str, list_id: str, state: str) -> EspRecord | None:
    record = await esp_side.record(email, list_id)
    return record if record is not None and record.state == state else None


async def _crm_row(
    conn: Conn, esp: str, account: str, email: str, list_id: str, state: str, source: str
) -> CrmRow | None:
    rows = [r for r in await crm_rows(conn, esp, account, (email,)) if r.list == list_id]
    return rows[0] if rows and rows[0].state == state and rows[0].source == source else None


async def stop() -> int:
    """Turn off the capture ``run`` turned on (its connector, replication slot and publication)."""
    procs, _ = demo_state()
    mark = procs.folder / CAPTURE_MARK
    if not mark.exists():
        return 0
    kafka, pg, connect_settings = KafkaSettings(), PostgresSettings(), ConnectSettings()
    try:
        async with aiohttp.ClientSession() as http:
            outcome = await disable_capture(http, connect_settings.url, kafka, CrmSettings().resolve(pg))
    except (EspbridgeError, OSError) as exc:
        say(f"the capture is still on ({exc}); `espbridge crm capture disable` turns it off")
        return 0
    mark.unlink()
    say(f"capture disabled: connector {outcome.names.connector} deleted, replication slot dropped")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo_sync", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run_p = sub.add_parser("run", help="show a CRM opt-out reaching the ESP and an ESP unsubscribe the CRM")
    run_p.add_argument("--esp", default="mailup", help=f"one of {', '.join(sorted(SYNC_FLAVORS))}")
    run_p.add_argument("--account", default="demo")
    sub.add_parser("stop", help="turn off the capture the demo turned on")
    args = parser.parse_args(argv)
    if args.cmd == "stop":
        return asyncio.run(stop())
    try:
        return asyncio.run(run(args.esp, args.account))
    except (TimeoutError, RuntimeError, EspbridgeError) as exc:
        say(f"the demo stopped: {exc}")
        say("the logs are in .run/demo; `espbridge dlq list` shows what was refused, and why")
        return 1


if __name__ == "__main__":
    sys.exit(main())
