"""``make demo``: one real broadcast through the whole pipeline against the sandbox ESP.

    python -m tools.demo run [--recipients N]   start sandbox + services, seed, publish, wait, print
    python -m tools.demo stop                   stop the sandbox and services the demo started

Expects the servers' settings in the environment (``make demo`` sources .run/espbridge.env).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from shared.infra.db import Conn, connect
from shared.infra.db.responses import FUNNEL
from shared.infra.kafka import ensure_topics
from shared.infra.settings import KafkaSettings, PostgresSettings
from shared.model.messages import BroadcastStatus, Stage, State
from shared.operations.jobs import build_job, funnel, publish_job, read_statuses

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ("uploader", "monitor", "gatherer", "loader")
"""The broadcast's services (the end-to-end tests run these too)."""
DEMO_SERVICES = (*SERVICES, "syncer")
"""What `make demo` starts: the broadcast's services, and the syncer, which writes the ESP's
opt-outs to the CRM, so the next run's list leaves out whom the ESP no longer mails."""
FUNNEL_TYPES = (
    "sent",
    "delivered",
    "bounce_hard",
    "bounce_soft",
    "open",
    "click",
    "unsubscribe",
    "complaint",
)


NOT_OPTED_OUT = (
    "NOT EXISTS (SELECT 1 FROM crm.suppressions AS s "
    "WHERE s.email = lower(crm.customers.email) AND (s.esp, s.account, s.list) = ('*', '*', '*'))"
)
"""SQL true for a customer of crm.customers not opted out everywhere (the demo's opt-outs)."""


async def seed_customers(conn: Conn, total: int, opted_out_every: int = 33) -> int:
    """Top crm.customers up to ``total`` rows (deterministic data), every ``opted_out_every``-th
    opted out of everything in crm.subscriptions; returns the customers added."""
    have = await conn.fetchval("SELECT count(*) FROM crm.customers")
    if have >= total:
        return 0
    async with conn.transaction():
        await conn.execute(
            """
            INSERT INTO crm.customers (email, first_name, last_name, communication_key,
                                       city, country, segment, loyalty_points)
            SELECT 'customer' || n || '@example.com',
                   (ARRAY['Anna','Ben','Chloé','Dario','Emre','Fatma','Gustav','Hana'])[1 + n % 8],
                   (ARRAY['Smith','Jones','Müller','García','Dupont','Rossi','Novak','Kim'])[1 + (n / 8) % 8],
                   'ck-' || lpad(n::text, 9, '0'),
                   (ARRAY['London','Leeds','Bristol','Manchester, UK','Glasgow'])[1 + n % 5],
                   'GB',
                   (ARRAY['gold','silver','bronze'])[1 + n % 3],
                   (n * 37) % 1000
            FROM generate_series($1::bigint + 1, $2::bigint) AS n
            """,
            have,
            total,
        )
        # The seeded opt-outs are the CRM's history, not changes for the syncer to push: written as
        # espbridge's, as migration 0002 wrote the old opted_out flags (source stays 'crm').
        await conn.execute("SET LOCAL espbridge.writer = 'espbridge'")
        await conn.execute(
            """
            INSERT INTO crm.subscriptions (email, esp, account, list, state, reason, source, changed_at)
            SELECT 'customer' || n || '@example.com', '*', '*', '*', 'unsubscribed', 'opted out', 'crm', now()
            FROM generate_series($1::bigint + 1, $2::bigint) AS n
            WHERE n % $3 = 0
            ON CONFLICT (email, esp, account, list) DO NOTHING
            """,
            have,
            total,
            opted_out_every,
        )
    return total - int(have)


@dataclass(frozen=True)
class Flavor:
    """How the demo (and the end-to-end tests) run one ESP: the sandbox flavor, the connector,
    the job's mode, and how the account's entry points the connector at the sandbox."""

    sandbox_flavor: str
    connector: str
    mode: str = "upload_and_send"
    message: str = "demo-newsletter"
    """The ESP's id of the pre-created message the demo sends."""
    message_per_run: bool = False
    """Each run sends a message of its own (numbered by the time): an ESP whose sendings are
    tracked by message refuses a message sent before."""
    email_field: str = "Email"
    """The ESP's name for the email column of the list file."""

    def account_entry(self, esp: str, account: str, url: str, token_file: Path) -> dict[str, Any]:
        """The ESP account's entry in the accounts file (credentials as the sandbox flavor expects)."""
        entry: dict[str, Any] = {"esp": esp, "account": account, "connector": self.connector}
        base = url.rstrip("/")
        match self.connector:
            case "generic":
                entry |= {"api_url": f"{base}/api/v1/accounts/{account}", "token_file": str(token_file)}
            case "instiller":
                entry |= {
                    "api_url": f"{base}/rest",
                    "client_id": account,
                    "client_secret_file": str(token_file),
                    "token_file": str(token_file),  # the workflows' webhook secret
                    "options": {"double_opt_in_workflow": "double_opt_in"},
                }
            case "mailup":
                entry |= {
                    "api_url": f"{base}/api/v1/accounts/{account}",
                    "username": account,
                    "password_file": str(token_file),
                    "client_id": "espbridge",
                    "client_secret_file": str(token_file),
                    "token_file": str(token_file),  # the unsubscribe webhook's shared secret
                    "options": {"list_id": 1},
                }
            case "optimizely":
                entry |= {
                    "api_url": f"{base}/rest",
                    "client_id": account,
                    "username": "api-user@example.com",
                    "password_file": str(token_file),
                    "token_file": str(token_file),  # the webhooks' credential
                }
            case "deployteq":
                entry |= {
                    "api_url": f"{base}/deployteq/{account}/analytics-events",
                    "client_id": account,
                    "client_secret_file": str(token_file),
                    "token_file": str(token_file),  # the customer REST API's token
                    "password_file": str(token_file),  # the HTTP request objects' webhook secret
                    "options": {
                        "token_url": f"{base}/deployteq/{account}/oauth2/token",
                        "rest_url": f"{base}/deployteq/{account}/app/api/rest/public/v2",
                        "double_opt_in_url": f"{base}/deployteq/{account}/datahook/data-receiver/optin",
                    },
                }
        return entry

    def stats_request(self, url: str, account: str, token: str) -> tuple[str, dict[str, str], dict[str, str]]:
        """(url, query, headers) of the sandbox flavor's ``_sandbox/stats`` for an account."""
        base = url.rstrip("/")
        if self.connector == "instiller":
            return f"{base}/rest/_sandbox/stats", {"api_id": account, "api_key": token}, {}
        if self.connector == "deployteq":
            bearer = {"Authorization": f"Bearer {token}"}
            return f"{base}/deployteq/{account}/analytics-events/_sandbox/stats", {}, bearer
        if self.connector == "optimizely":
            basic = {"Authorization": aiohttp.encode_basic_auth("api-user@example.com", token)}
            return f"{base}/rest/{account}/_sandbox/stats", {}, basic
        return f"{base}/api/v1/accounts/{account}/_sandbox/stats", {}, {"Authorization": f"Bearer {token}"}


FLAVORS = {
    "sandbox": Flavor("generic", "generic"),
    "generic_sftp": Flavor("generic_sftp", "generic_sftp", "upload_only"),
    "instiller": Flavor("instiller", "instiller"),
    "mailup": Flavor("mailup", "mailup", message="42", message_per_run=True),
    "optimizely": Flavor("optimizely", "optimizely", message="1001", email_field="email"),
    "deployteq": Flavor("deployteq", "deployteq", email_field="emailAddress"),
}
"""``make demo ESP=<name>``: the ESP names the demo knows."""


def demo_job(
    job_id: str,
    esp: str,
    account: str,
    mode: str = "upload_and_send",
    message: str = "demo-newsletter",
    email_field: str = "Email",
) -> dict[str, Any]:
    """The demo broadcast: every customer not opted out, five fields."""
    return {
        "mode": mode,
        "job_id": job_id,
        "esp": esp,
        "account": account,
        "list_name": "espbridge demo",
        "message": message,
        "selection": {
            "kind": "table",
            "table": "crm.customers",
            "columns": ["email", "first_name", "last_name", "city", "communication_key"],
        },
        "field_map": {
            "email": email_field,
            "first_name": "FirstName",
            "last_name": "LastName",
            "city": "City",
        },
        "communication_key": "communication_key",
        "requested_by": "make demo",
    }


def write_accounts_file(path: Path, entries: list[dict[str, Any]]) -> None:
    """The ESP accounts file pointing the services at the sandbox(es)."""
    path.write_bytes(orjson.dumps({"accounts": entries}, option=orjson.OPT_INDENT_2))


@dataclass
class Processes:
    """The demo's background processes, tracked with pid files in the state folder."""

    folder: Path

    def pid_file(self, name: str) -> Path:
        return self.folder / f"{name}.pid"

    def start(self, name: str, module: str, env: Mapping[str, str]) -> int:
        log = (self.folder / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", module],
            env=dict(env),
            cwd=ROOT,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the demo command; `stop` ends it
        )
        self.pid_file(name).write_text(str(proc.pid))
        return proc.pid

    def running(self, name: str) -> int | None:
        try:
            pid = int(self.pid_file(name).read_text())
            os.kill(pid, 0)
        except (OSError, ValueError):
            return None
        return pid

    async def exited(self, name: str, pid: int) -> bool:
        """Whether the process ``pid`` started as ``name`` has exited (a zombie has)."""
        return self.running(name) is None or _zombie(pid)

    async def stop_all(self) -> list[str]:
        """SIGTERM each process still running, SIGKILL one that has not exited after 45 s; their names."""
        stopped = []
        for name in (*DEMO_SERVICES, "sandbox"):
            pid = self.running(name)
            if pid is None:
                self.pid_file(name).unlink(missing_ok=True)
                continue
            os.kill(pid, signal.SIGTERM)
            try:
                await wait_until(f"{name} to exit", functools.partial(self.exited, name, pid), 45, 0.1)
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
            self.pid_file(name).unlink(missing_ok=True)
            stopped.append(name)
        return stopped


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def say(text: str) -> None:
    """A progress line of the demo."""
    sys.stdout.write(f"[demo {datetime.now(UTC):%H:%M:%S}] {text}\n")
    sys.stdout.flush()


async def wait_until(
    what: str, check: Callable[[], Awaitable[Any]], timeout_s: float, every_s: float = 0.5
) -> Any:
    """Poll an async check until it returns something truthy; that value (TimeoutError after
    ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"gave up after {timeout_s:g}s waiting for {what}")
        await asyncio.sleep(every_s)  # polling interval of a condition with a deadline


def stage_times(statuses: list[BroadcastStatus], loaded_at: datetime) -> list[tuple[str, float]]:
    """Seconds per stage from the status timestamps."""

    def first(stage: Stage, state: State | None = None) -> datetime | None:
        return next(
            (s.at for s in statuses if s.stage is stage and (state is None or s.state is state)), None
        )

    out: list[tuple[str, float]] = []
    spans = [
        ("upload", first(Stage.UPLOAD), first(Stage.UPLOAD, State.DONE)),
        ("import", first(Stage.IMPORT), first(Stage.IMPORT, State.DONE)),
        ("send", first(Stage.SEND), first(Stage.SEND, State.DONE)),
        ("responses gathered + loaded", first(Stage.SEND, State.DONE) or first(Stage.SEND), loaded_at),
    ]
    for name, start, end in spans:
        if start and end:
            out.append((name, (end - start).total_seconds()))
    return out


def demo_state() -> tuple[Processes, Path]:
    """The demo's state folder (``.run/demo``: pid files, logs, the accounts file) as its
    processes, and the sandbox ESP's token file in it (made on the first run)."""
    state = ROOT / ".run" / "demo"
    state.mkdir(parents=True, exist_ok=True)
    token_file = state / "sandbox_token"
    if not token_file.exists():
        token_file.write_text(secrets.token_urlsafe(24))
        token_file.chmod(0o600)
    return Processes(state), token_file


async def start_sandbox(
    procs: Processes, esp: str, account: str, token_file: Path, settings: Mapping[str, str]
) -> str:
    """Start the sandbox ESP playing ``esp``/``account`` with its flavor on the SFTP site's folders,
    ``settings`` as its ``ESPBRIDGE_SANDBOX_<key>`` variables; its URL once it listens."""
    url_file = procs.folder / "sandbox_url"
    url_file.unlink(missing_ok=True)
    sandbox_env = {
        **os.environ,
        "ESPBRIDGE_SANDBOX_ROOT": os.environ["ESPBRIDGE_SFTP_LOCAL_ROOT"],
        "ESPBRIDGE_SANDBOX_ESP": esp,
        "ESPBRIDGE_SANDBOX_FLAVOR": FLAVORS[esp].sandbox_flavor,
        "ESPBRIDGE_SANDBOX_ACCOUNTS": account,
        "ESPBRIDGE_SANDBOX_PORT": "0",
        "ESPBRIDGE_SANDBOX_URL_FILE": str(url_file),
        "ESPBRIDGE_SANDBOX_TOKEN_FILE": str(token_file),
        **{f"ESPBRIDGE_SANDBOX_{key.upper()}": value for key, value in settings.items()},
        "PYTHONPATH": str(ROOT),
    }
    pid = procs.start("sandbox", "sandbox", sandbox_env)

    async def sandbox_url() -> str | None:
        if procs.running("sandbox") is None or _zombie(pid):
            tail = (procs.folder / "sandbox.log").read_text().splitlines()[-15:]
            raise RuntimeError("the sandbox ESP exited:\n" + "\n".join(tail))
        text = url_file.read_text().strip() if url_file.exists() else ""
        return text or None

    url: str = await wait_until("the sandbox ESP", sandbox_url, 30, 0.1)
    return url


def service_env(accounts_file: Path, **settings: str) -> dict[str, str]:
    """The environment of a service process of the demo: the servers' settings, the accounts
    file, and ``settings`` (``ESPBRIDGE_…`` variables)."""
    return {**os.environ, "ESPBRIDGE_ACCOUNTS_FILE": str(accounts_file), **settings, "PYTHONPATH": str(ROOT)}


async def run(recipients: int, esp: str, account: str) -> int:
    if esp not in FLAVORS:
        raise SystemExit(f"unknown ESP {esp!r}: choose one of {', '.join(sorted(FLAVORS))}")
    flavor = FLAVORS[esp]
    procs, token_file = demo_state()
    state = procs.folder
    stopped = await procs.stop_all()
    if stopped:
        say(f"stopped the previous demo's {', '.join(stopped)}")
    sftp_root = Path(os.environ["ESPBRIDGE_SFTP_LOCAL_ROOT"])
    url = await start_sandbox(procs, esp, account, token_file, {"PHASE_DELAY_S": "1.0"})
    say(f"sandbox ESP {esp}/{account} ({flavor.sandbox_flavor} flavor) at {url}")
    accounts_file = state / "accounts.json"
    write_accounts_file(accounts_file, [flavor.account_entry(esp, account, url, token_file)])
    kafka, pg = KafkaSettings(), PostgresSettings()
    await ensure_topics(kafka)
    env = service_env(
        accounts_file,
        ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="2",
        ESPBRIDGE_MONITOR_POLL_INITIAL_S="0.5",
        ESPBRIDGE_MONITOR_POLL_MAX_S="2",
    )
    for name in DEMO_SERVICES:
        procs.start(name, f"services.{name}", env)
    say(f"started {', '.join(DEMO_SERVICES)} (logs in {state})")

    conn = await connect(pg)
    try:
        added = await seed_customers(conn, recipients)
        counts = await conn.fetchrow(
            f"SELECT count(*) AS n, count(*) FILTER (WHERE NOT {NOT_OPTED_OUT}) AS o FROM crm.customers"
        )
    finally:
        await conn.close()
    assert counts is not None
    opted_out = f"{counts['o']} opted out in crm.subscriptions"
    say(f"crm.customers: {counts['n']} customers ({added} added now), {opted_out}")

    job = build_job(
        demo_job(
            f"demo-{datetime.now(UTC):%Y%m%d-%H%M%S}",
            esp,
            account,
            flavor.mode,
            str(int(time.time()) % 2_000_000_000) if flavor.message_per_run else flavor.message,
            flavor.email_field,
        )
    )
    t0 = time.monotonic()
    await publish_job(kafka, job)
    say(f"published job {job.job_id} to {kafka.topic_prefix}broadcast.jobs.v1")

    seen: set[tuple[str, str]] = set()

    async def sent() -> bool:
        for s in await read_statuses(kafka, job.job_id):
            if (s.stage, s.state) not in seen and s.stage in (Stage.UPLOAD, Stage.IMPORT, Stage.SEND):
                seen.add((s.stage, s.state))
                counts = " ".join(f"{k}={v}" for k, v in s.counts.items())
                say(f"  {s.stage:<6} {s.state:<8} {s.detail} {counts}".rstrip())
            if s.state is State.FAILED:
                raise RuntimeError(f"{s.stage} failed: {s.detail}")
        return (Stage.SEND, State.DONE) in seen or (Stage.SEND, State.CANCELLED) in seen

    await wait_until("the send", sent, 600)
    manifest_path = sftp_root / esp / account / "manifest" / f"{job.job_id}.json"

    async def all_loaded() -> dict[str, Any] | None:
        if not manifest_path.exists():
            return None
        manifest = orjson.loads(manifest_path.read_bytes())
        if not manifest.get("complete"):
            return None
        loaded = await _loaded_counts(pg, job.job_id)
        return manifest if all(loaded.get(t, 0) == manifest["counts"][t] for t in FUNNEL_TYPES) else None

    manifest = await wait_until("all responses loaded", all_loaded, 900, 1.0)
    loaded_at = datetime.now(UTC)
    statuses = await read_statuses(kafka, job.job_id)
    loaded_funnel = await funnel(pg, job.job_id) or {}
    upload = next((s for s in statuses if s.stage is Stage.UPLOAD and s.state is State.DONE), None)
    print()
    print(f"broadcast {job.job_id} — response funnel (responses.broadcast_funnel)")
    rows = [("recipients", upload.counts.get("rows", 0) if upload else 0, manifest["recipients"])]
    names = dict(zip(FUNNEL, FUNNEL_TYPES, strict=True))
    rows += [(label, loaded_funnel.get(label, 0), manifest["counts"][names[label]]) for label in FUNNEL]
    print(f"  {'':<14}{'loaded':>10}{'ESP manifest':>14}")
    for label, value, expected in rows:
        print(f"  {label:<14}{value:>10}{expected:>14}{'' if value == expected else '  MISMATCH'}")
    print("\nstage times")
    for name, seconds in stage_times(statuses, loaded_at):
        print(f"  {name:<30}{seconds:>8.1f} s")
    print(f"  {'total (publish → all loaded)':<30}{time.monotonic() - t0:>8.1f} s")
    print(
        "\nThe sandbox ESP and the services keep running: "
        "`make demo-stop` stops them, `make down` the servers."
    )
    mismatch = any(v != e for _, v, e in rows)
    return 1 if mismatch else 0


async def _loaded_counts(pg: PostgresSettings, broadcast_id: str) -> dict[str, int]:
    conn = await connect(pg)
    try:
        rows = await conn.fetch(
            "SELECT type, events FROM responses.broadcast_type_counts WHERE broadcast_id = $1", broadcast_id
        )
    finally:
        await conn.close()
    return {r["type"]: r["events"] for r in rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.demo", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    run_p = sub.add_parser("run", help="run one broadcast end to end and print its funnel")
    run_p.add_argument("--recipients", type=int, default=100_000)
    run_p.add_argument("--esp", default="sandbox")
    run_p.add_argument("--account", default="demo")
    sub.add_parser("stop", help="stop the demo's sandbox and services")
    args = parser.parse_args(argv)
    if args.cmd == "stop":
        stopped = asyncio.run(Processes(ROOT / ".run" / "demo").stop_all())
        say(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    return asyncio.run(run(args.recipients, args.esp, args.account))


if __name__ == "__main__":
    sys.exit(main())
