"""The many-broadcasts scenario: hundreds of broadcasts published at once, a tenth of them
scheduled ahead, through upload → import → send against the sandbox ESP (generic flavor), with
real uploader and monitor processes.

A broadcast counts as sent when its job's status in ``control.jobs`` is ``send`` ``done``, at the
time that status was recorded; ``control.job_history`` gives the stages before it. The arithmetic
(percentiles, rates, phases, what was in flight) is pure and tested without servers.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
from faststream.kafka import KafkaBroker

from bench.generate import customers_for
from bench.harness import ESP, BenchEnv, Service, create_topics, say, start_sandbox, usage, wait_for
from shared.infra.db import Conn, connect
from shared.infra.kafka import publish_many
from shared.model.messages import BroadcastJob
from shared.model.topics import Topic
from shared.operations.jobs import build_job
from tools.demo import FLAVORS, NOT_OPTED_OUT, demo_job, seed_customers, write_accounts_file

SENT = "send/done"
"""The status that makes a broadcast sent (``stage/state``)."""
UNSENT_STATES = ("failed", "cancelled")
"""States that end a broadcast without its send."""
PHASES = (
    ("waiting for an uploader", None, "upload/running"),
    ("upload", "upload/running", "upload/done"),
    ("waiting for a monitor", "upload/done", "import/running"),
    ("import", "import/running", "import/done"),
    ("send", "import/done", SENT),
)
"""The spans of an immediate broadcast: (name, from status, to status); None is the publication."""
SANDBOX_SETTINGS = {
    "FLAVOR": "generic",
    # The sandbox stands in for an ESP's own machines but shares these cores: it writes the sent,
    # delivered and bounce responses only, no opens, clicks or complaints.
    "RATE_OPEN": "0",
    "RATE_COMPLAINT": "0",
}
"""The sandbox ESP's settings (``ESPBRIDGE_SANDBOX_<key>``) beside its root, account and token."""


@dataclass(frozen=True)
class BroadcastsPlan:
    """How many broadcasts, how large, how many of them scheduled, and the processes that carry them."""

    broadcasts: int
    recipients: int
    uploaders: int = 2
    monitors: int = 2
    scheduled_every: int = 10
    """Every n-th broadcast is scheduled (a tenth of them)."""
    scheduled_ahead_s: float = 120.0
    timeout_s: float = 900.0
    """How long the scenario waits for every broadcast, from the publication; then it reports what
    finished."""

    def is_scheduled(self, index: int) -> bool:
        """Whether the ``index``-th broadcast (from 0) has a send time ahead."""
        return index % self.scheduled_every == self.scheduled_every - 1

    @property
    def scheduled(self) -> int:
        """How many of the broadcasts are scheduled."""
        return sum(1 for i in range(self.broadcasts) if self.is_scheduled(i))


@dataclass
class Timeline:
    """One broadcast as control.jobs and control.job_history tell it."""

    job_id: str
    send_at: datetime | None
    """Its send time, for a scheduled broadcast."""
    first: dict[str, datetime] = field(default_factory=dict)
    """When each ``stage/state`` was first recorded."""
    sent_at: datetime | None = None
    unsent: str | None = None
    """How it ended without a send (``import/failed: …``), if it did."""
    unsent_at: datetime | None = None

    @property
    def finished(self) -> bool:
        """Sent, or ended without a send."""
        return self.sent_at is not None or self.unsent is not None

    @property
    def ended_at(self) -> datetime | None:
        """When it was sent or ended unsent."""
        return self.sent_at or self.unsent_at

    def first_of(self, stage: str) -> datetime | None:
        """The first status of a stage (``import``), any state."""
        return min((at for k, at in self.first.items() if k.startswith(f"{stage}/")), default=None)


def percentile(values: Sequence[float], pct: float) -> float | None:
    """The nearest-rank percentile: the smallest value with ``pct`` % of the values at or below it."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def percentile_with_unfinished(
    finished: Sequence[float], unfinished: int, bound: float, pct: float = 95
) -> tuple[float | None, bool]:
    """The percentile of durations where ``unfinished`` ones are still running after ``bound``
    seconds: (value, False) when it falls on a finished one, else (``bound``, True), a lower bound."""
    total = len(finished) + unfinished
    if total == 0:
        return None, False
    rank = max(1, math.ceil(pct / 100 * total))
    if rank <= len(finished):
        return sorted(finished)[rank - 1], False
    return bound, True


def per_minute(count: int, seconds: float) -> float:
    """A count over a span, per minute (0 for an empty span)."""
    return 0.0 if seconds <= 0 else count * 60 / seconds


def peak_overlap(spans: Sequence[tuple[datetime, datetime]]) -> int:
    """The most spans open at one instant (a span ending as another starts does not overlap it)."""
    edges = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    peak = now = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def summarize(timelines: Sequence[Timeline], published_at: datetime, ended_at: datetime) -> dict[str, Any]:
    """The scenario's figures from the broadcasts' timelines.

    ``broadcasts_per_min`` is the immediate broadcasts sent per minute from the publication to the
    last immediate one's end (or to ``ended_at``, when some had not finished: a timeout); the p95
    of publication → sent counts the unfinished ones as later than any, so when they are more than
    5 % it is ``ended_at`` as a lower bound. Scheduled broadcasts count only in how late they were sent.
    """
    immediate = [t for t in timelines if t.send_at is None]
    scheduled = [t for t in timelines if t.send_at is not None]
    waited_s = (ended_at - published_at).total_seconds()

    def since(start: datetime, end: datetime) -> float:
        return (end - start).total_seconds()

    sent = [t for t in immediate if t.sent_at is not None]
    ends = [t.ended_at for t in immediate]
    last = max((e for e in ends if e is not None), default=None)
    window_s = since(published_at, last) if last is not None and None not in ends else waited_s
    to_sent = [since(published_at, t.sent_at) for t in sent if t.sent_at is not None]
    running = sum(1 for t in immediate if not t.finished)
    p95, p95_bound = percentile_with_unfinished(to_sent, running, waited_s)
    late = [since(t.send_at, t.sent_at) for t in scheduled if t.send_at and t.sent_at]
    late_running = [t for t in scheduled if not t.finished and t.send_at is not None]
    late_bound = max((since(t.send_at, ended_at) for t in late_running if t.send_at), default=0.0)
    late_p95, late_p95_bound = percentile_with_unfinished(late, len(late_running), max(0.0, late_bound))
    phases: dict[str, dict[str, float | None]] = {}
    for name, start, end in PHASES:
        spans = [
            since(t.first[start] if start else published_at, t.first[end])
            for t in sent
            if end in t.first and (start is None or start in t.first)
        ]
        phases[name] = {
            "mean_s": round(sum(spans) / len(spans), 2) if spans else None,
            "p95_s": _round(percentile(spans, 95)),
        }
    in_flight = [
        (started, t.ended_at or ended_at) for t in timelines if (started := t.first_of("import")) is not None
    ]
    return {
        "broadcasts_per_min": round(per_minute(len(sent), window_s), 1),
        "publish_to_sent_p95_s": _round(p95),
        "publish_to_sent_p95_is_lower_bound": p95_bound,
        "publish_to_sent_p50_s": _round(percentile(to_sent, 50)),
        "publish_to_sent_max_s": _round(max(to_sent, default=None)),
        "scheduled_late_p95_s": _round(late_p95),
        "scheduled_late_p95_is_lower_bound": late_p95_bound,
        "scheduled_late_max_s": _round(max(late, default=None)),
        "immediate": len(immediate),
        "immediate_sent": len(sent),
        "immediate_unsent": sum(1 for t in immediate if t.unsent is not None),
        "immediate_running": running,
        "scheduled": len(scheduled),
        "scheduled_sent": len(late),
        "scheduled_early": sum(1 for s in late if s < 0),
        "scheduled_unsent": sum(1 for t in scheduled if t.unsent is not None),
        "scheduled_running": len(late_running),
        "window_s": round(window_s, 2),
        "waited_s": round(waited_s, 2),
        "timed_out": any(not t.finished for t in timelines),
        "phases": phases,
        "peak_in_flight": peak_overlap(in_flight),
        "unsent_reasons": sorted({t.unsent for t in timelines if t.unsent})[:5],
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


async def run_broadcasts(env: BenchEnv, plan: BroadcastsPlan) -> dict[str, Any]:
    """The scenario end to end: seed the audience, start the sandbox ESP, the uploaders and the
    monitors, publish every job at once, follow control.jobs until all are sent or the timeout;
    its figures (:func:`summarize`) with the processes' CPU seconds and the ESP's send counts."""
    conn = await connect(env.pg)
    try:
        await seed_customers(conn, customers_for(plan.recipients))
        # the condition is the demo's constant SQL, no input
        selected = await conn.fetchval(f"SELECT count(*) FROM crm.customers WHERE {NOT_OPTED_OUT}")  # noqa: S608
        if selected != plan.recipients:
            raise RuntimeError(
                f"crm.customers leaves {selected} recipients, not {plan.recipients}: run this part "
                "before the upload part, which seeds more customers"
            )
        sandbox, url = await start_sandbox(env, ESP, SANDBOX_SETTINGS)
        accounts_file = env.work / "accounts-broadcasts.json"
        write_accounts_file(
            accounts_file, [FLAVORS[ESP].account_entry(ESP, env.account, url, env.token_file)]
        )
        prefix = env.next_prefix()
        kafka = env.kafka_for(prefix)
        await create_topics(kafka)
        service_env = env.service_env(prefix, ESPBRIDGE_ACCOUNTS_FILE=str(accounts_file))
        services = [env.start("uploader", service_env) for _ in range(plan.uploaders)]
        services += [env.start("monitor", service_env) for _ in range(plan.monitors)]
        await env.wait_ready(services)
        jobs, timelines = plan_jobs(env.token, env.account, plan, datetime.now(UTC))
        broker = KafkaBroker(kafka.bootstrap_servers, client_id="espbridge-bench")
        await broker.start()
        try:
            published_at = datetime.now(UTC)
            await publish_many(broker, kafka, jobs)
            publish_s = (datetime.now(UTC) - published_at).total_seconds()
        finally:
            await broker.stop()
        say(f"  published {len(jobs)} jobs in {publish_s:.2f} s")
        processes = [sandbox, *services]
        cpu_before = _cpu(processes)
        ended_at, cpu_after = await _follow(conn, processes, timelines, published_at, plan.timeout_s)
        await _read_history(conn, timelines)
        figures = summarize(list(timelines.values()), published_at, ended_at)
        figures["publish_s"] = round(publish_s, 2)
        figures["lists_partitions"] = kafka.partitions(Topic.BROADCAST_LISTS)
        figures["sends_per_broadcast_max"] = await _most_sends(url, env, list(timelines))
        figures["cpu_s"] = {k: round(v - cpu_before.get(k, 0.0), 1) for k, v in cpu_after.items()}
        env.stop_all()
    finally:
        await conn.close()
    return figures


def plan_jobs(
    token: str, account: str, plan: BroadcastsPlan, now: datetime
) -> tuple[list[BroadcastJob], dict[str, Timeline]]:
    """The jobs to publish (the demo's broadcast, each its own list name) and their empty
    timelines; the scheduled ones due ``scheduled_ahead_s`` after ``now``, rounded up to the whole
    second (the generic ESP takes send times in whole seconds)."""
    due = now + timedelta(seconds=plan.scheduled_ahead_s)
    if due.microsecond:
        due = due.replace(microsecond=0) + timedelta(seconds=1)
    jobs, timelines = [], {}
    for i in range(plan.broadcasts):
        send_at = due if plan.is_scheduled(i) else None
        document = demo_job(f"bench-{token}-b{i:04d}", ESP, account)
        document |= {"list_name": f"bench broadcast {i}", "requested_by": "bench", "send_at": send_at}
        job = build_job(document)
        jobs.append(job)
        timelines[job.job_id] = Timeline(job.job_id, send_at)
    return jobs, timelines


def _cpu(processes: list[Service]) -> dict[str, float]:
    """CPU seconds used so far per service (all its processes)."""
    cpu: dict[str, float] = {}
    for s in processes:
        cpu[s.name] = cpu.get(s.name, 0.0) + usage(s.pid).cpu_s
    return cpu


async def _follow(
    conn: Conn,
    processes: list[Service],
    timelines: dict[str, Timeline],
    published_at: datetime,
    timeout_s: float,
) -> tuple[datetime, dict[str, float]]:
    """Read control.jobs until every broadcast is sent or ended unsent, or until ``timeout_s`` from
    the publication (a timeout is a result: the figures say what finished). Returns when it stopped
    and the processes' CPU seconds when the last immediate broadcast ended (or at the stop)."""
    ids = list(timelines)
    last_said = time.monotonic()
    cpu: dict[str, float] = {}

    async def finished() -> bool:
        nonlocal last_said
        for s in processes:
            if not s.alive():
                raise RuntimeError(f"{s.name} exited with {s.proc.returncode}:\n{s.tail()}")
        rows = await conn.fetch(
            "SELECT job_id, stage, state, detail, updated_at FROM control.jobs WHERE job_id = ANY($1)", ids
        )
        for r in rows:
            t = timelines[r["job_id"]]
            status = f"{r['stage']}/{r['state']}"
            t.first.setdefault(status, r["updated_at"])
            if status == SENT and t.sent_at is None:
                t.sent_at = r["updated_at"]
            elif r["state"] in UNSENT_STATES and not t.finished:
                t.unsent, t.unsent_at = f"{status}: {r['detail']}", r["updated_at"]
        if not cpu and all(t.finished for t in timelines.values() if t.send_at is None):
            cpu.update(_cpu(processes))
        if time.monotonic() - last_said >= 15:
            last_said = time.monotonic()
            say(f"  {_progress(timelines.values())}")
        return all(t.finished for t in timelines.values())

    remaining = timeout_s - (datetime.now(UTC) - published_at).total_seconds()
    try:
        await wait_for(finished, "every broadcast sent", max(0.0, remaining), 0.5)
    except TimeoutError:
        say(f"  timed out after {timeout_s:.0f} s: {_progress(timelines.values())}")
    else:
        say(f"  {_progress(timelines.values())}")
    return datetime.now(UTC), cpu or _cpu(processes)


def _progress(timelines: Iterable[Timeline]) -> str:
    """Where the broadcasts are, in one line."""
    items = list(timelines)
    immediate = [t for t in items if t.send_at is None]
    scheduled = [t for t in items if t.send_at is not None]
    unsent = sum(1 for t in items if t.unsent)
    return (
        f"sent {sum(1 for t in immediate if t.sent_at)}/{len(immediate)} immediate, "
        f"{sum(1 for t in scheduled if t.sent_at)}/{len(scheduled)} scheduled, {unsent} ended unsent"
    )


async def _read_history(conn: Conn, timelines: dict[str, Timeline]) -> None:
    """Each broadcast's stages, first time each, from control.job_history."""
    rows = await conn.fetch(
        """
        SELECT job_id, stage || '/' || state AS status, min(at) AS at FROM control.job_history
        WHERE job_id = ANY($1) GROUP BY job_id, stage, state
        """,
        list(timelines),
    )
    for r in rows:
        t = timelines[r["job_id"]]
        t.first[r["status"]] = min(r["at"], t.first.get(r["status"], r["at"]))
        if r["status"] == SENT:
            t.sent_at = min(r["at"], t.sent_at or r["at"])


async def _most_sends(url: str, env: BenchEnv, job_ids: list[str]) -> int:
    """The most sends the ESP created for one of the broadcasts (1: none was sent twice)."""
    where, query, headers = FLAVORS[ESP].stats_request(url, env.account, env.token_file.read_text())
    async with aiohttp.ClientSession() as http, http.get(where, params=query, headers=headers) as answer:
        answer.raise_for_status()
        created: dict[str, int] = (await answer.json())["sends_created"]
    return max((created.get(j, 0) for j in job_ids), default=0)
