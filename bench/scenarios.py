"""The measured runs: response ingestion (end to end, scale, memory, profile) and the list upload,
each beside its limit measured in the same run."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from faststream.kafka import KafkaBroker

from bench import limits
from bench.generate import Broadcast
from bench.harness import ESP, BenchEnv, Service, create_topics, say, usage, wait_for
from shared.infra.db import connect
from shared.infra.db.jobs import upsert_job
from shared.infra.kafka import publish
from shared.model.messages import ListUploaded
from shared.model.topics import Topic
from shared.operations.jobs import build_job
from tools.demo import NOT_OPTED_OUT, demo_job, seed_customers

LIMIT_TABLE = "bench_limit.events"
SPY_OPTIONS = ("--rate", "50", "--nonblocking")
"""py-spy: 50 samples a second, without pausing the process it samples."""


@dataclass
class IngestRun:
    """One timed ingestion: events loaded, seconds from the gatherers' start to the last row."""

    events: int
    seconds: float
    loaders: int
    gatherers: int
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds per service (all its processes), user + system."""
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    """The largest peak RSS (VmHWM) among a service's processes."""
    profiles: dict[str, Path] = field(default_factory=dict)
    """py-spy's raw stacks per service, when profiled."""

    @property
    def events_per_s(self) -> float:
        """Events loaded per second."""
        return self.events / self.seconds

    @property
    def label(self) -> str:
        """The scale key, e.g. ``loaders=2,gatherers=1``."""
        return f"loaders={self.loaders},gatherers={self.gatherers}"


async def record_jobs(env: BenchEnv, broadcasts: list[Broadcast]) -> None:
    """Record the broadcasts as jobs in control.jobs, as the uploader does when it takes a job
    (the loader dead-letters the events of broadcasts it does not know)."""
    conn = await connect(env.pg)
    try:
        for b in broadcasts:
            document = {
                **demo_job(b.job_id, ESP, env.account, "upload_only", b.message),
                "requested_by": "bench",
            }
            await upsert_job(conn, build_job(document))
    finally:
        await conn.close()


def _place(files: list[Path], folder: Path) -> None:
    """Put response files on the SFTP site (a hard link when the disk allows: no copy to wait for)."""
    for f in files:
        target = folder / f.name
        try:
            os.link(f, target)
        except OSError:
            shutil.copyfile(f, target)


def _clear(folder: Path) -> None:
    for f in folder.iterdir():
        f.unlink()


def _py_spy() -> str:
    beside = Path(sys.executable).with_name("py-spy")
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if found is None:
        raise RuntimeError("py-spy is not installed (it is a dev dependency: uv sync)")
    return found


def _spy(env: BenchEnv, service: Service) -> tuple[subprocess.Popen[bytes], Path]:
    """Sample a running service with py-spy until it exits (raw collapsed stacks)."""
    out = env.work / f"profile-run{env.runs}-{service.name}-{service.pid}.txt"
    with (env.work / "logs" / f"py-spy-{service.pid}.log").open("ab") as log:
        proc = subprocess.Popen(
            [_py_spy(), "record", "--pid", str(service.pid), "--format", "raw", "-o", str(out), *SPY_OPTIONS],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    return proc, out


async def ingest(
    env: BenchEnv,
    files: list[Path],
    expected: int,
    loaders: int = 1,
    gatherers: int = 1,
    profile: bool = False,
    timeout_s: float = 1800,
) -> IngestRun:
    """Response files on the SFTP site → rows in responses.events, with real gatherer and loader
    processes; timed from the gatherers' start to the commit of the last of ``expected`` rows."""
    prefix = env.next_prefix()
    await create_topics(env.kafka_for(prefix))
    conn = await connect(env.pg)
    try:
        await conn.execute(
            "TRUNCATE responses.events, responses.broadcast_type_counts, control.gathered_files"
        )
        for folder in ("responses", "archive"):
            _clear(env.account_dir / folder)
        _place(files, env.account_dir / "responses")
        service_env = env.service_env(prefix, ESPBRIDGE_GATHERER_SCAN_INTERVAL_S="0.5")
        started_loaders = [env.start("loader", service_env) for _ in range(loaders)]
        await env.wait_ready(started_loaders)
        spies = [(s, *_spy(env, s)) for s in started_loaders] if profile else []
        t0 = time.monotonic()
        started_gatherers = [env.start("gatherer", service_env) for _ in range(gatherers)]
        everyone = [*started_loaders, *started_gatherers]
        if profile:
            await env.wait_ready(started_gatherers)
            spies += [(s, *_spy(env, s)) for s in started_gatherers]

        async def loaded() -> bool:
            for s in everyone:
                if not s.alive():
                    raise RuntimeError(f"{s.name} exited with {s.proc.returncode}:\n{s.tail()}")
            # The per-broadcast counts are kept in the rows' own transaction, and cheap to read.
            n = await conn.fetchval("SELECT coalesce(sum(events), 0) FROM responses.broadcast_type_counts")
            return bool(n >= expected)

        try:
            t1 = await wait_for(loaded, f"{expected} events loaded", timeout_s, 0.05)
        except TimeoutError:
            n = await conn.fetchval("SELECT coalesce(sum(events), 0) FROM responses.broadcast_type_counts")
            states = await conn.fetch("SELECT state, count(*) FROM control.gathered_files GROUP BY state")
            raise TimeoutError(
                f"{n} of {expected} events loaded; files: {[tuple(r) for r in states]}; "
                f"logs in {env.work / 'logs'}"
            ) from None
        run = IngestRun(expected, t1 - t0, loaders, gatherers)
        for s in everyone:
            u = usage(s.pid)
            run.cpu_s[s.name] = run.cpu_s.get(s.name, 0.0) + u.cpu_s
            run.peak_rss_mb[s.name] = max(run.peak_rss_mb.get(s.name, 0.0), u.peak_rss_mb)
        env.stop_all()
        for s, spy, out in spies:
            with contextlib.suppress(subprocess.TimeoutExpired):
                spy.wait(timeout=60)
            if spy.poll() is None:
                spy.kill()
            if out.exists():
                run.profiles.setdefault(s.name, out)
        rows = await conn.fetchval("SELECT count(*) FROM responses.events")
        if rows != expected:
            raise RuntimeError(f"responses.events has {rows} rows, the files {expected} events")
    finally:
        await conn.close()
    say(
        f"  {run.label}: {run.events} events in {run.seconds:.1f} s = {run.events_per_s:,.0f}/s "
        f"(cpu s: {', '.join(f'{k} {v:.0f}' for k, v in run.cpu_s.items())})"
    )
    return run


async def copy_limit(env: BenchEnv, limit_csv: Path) -> float:
    """psql ``\\copy`` of the same rows into a table of responses.events' shape and indexes; seconds."""
    conn = await connect(env.pg)
    try:
        await conn.execute("CREATE SCHEMA IF NOT EXISTS bench_limit")
        await conn.execute(f"DROP TABLE IF EXISTS {LIMIT_TABLE}")
        await conn.execute(f"CREATE TABLE {LIMIT_TABLE} (LIKE responses.events INCLUDING ALL)")
        seconds = await limits.copy_in_limit(env.pg, limit_csv, LIMIT_TABLE)
        await conn.execute(f"DROP TABLE {LIMIT_TABLE}")
    finally:
        await conn.close()
    return seconds


@dataclass
class UploadRun:
    """The list upload beside its limit."""

    rows: int
    bytes: int
    seconds: float
    limit_copy_s: float
    limit_put_s: float
    limit_bytes: int
    seed_s: float
    uploader_cpu_s: float
    uploader_peak_rss_mb: float
    runs_s: list[float] = field(default_factory=list)
    limit_runs_s: list[float] = field(default_factory=list)

    @property
    def limit_s(self) -> float:
        """psql \\copy out + sftp put."""
        return self.limit_copy_s + self.limit_put_s


LIST_COLUMNS = ("email", "first_name", "last_name", "city", "communication_key")


async def upload(env: BenchEnv, rows: int, customers: int, runs: int) -> UploadRun:
    """A ``rows``-recipient selection from crm.customers → the list file on the ESP's SFTP site,
    timed from the job's publication to its ListUploaded; and psql ``\\copy (select …) to`` a file
    plus OpenSSH ``sftp put`` of it. Each ``runs`` times, in turns; the best of each is kept."""
    conn = await connect(env.pg)
    try:
        t = time.monotonic()
        await seed_customers(conn, customers)
        await conn.execute("VACUUM ANALYZE crm.customers")
        seed_s = time.monotonic() - t
        selected = await conn.fetchval(f"SELECT count(*) FROM crm.customers WHERE {NOT_OPTED_OUT}")
    finally:
        await conn.close()
    say(f"  crm.customers: {customers} customers, {selected} selected (seeded in {seed_s:.0f} s)")
    prefix = env.next_prefix()
    kafka = env.kafka_for(prefix)
    await create_topics(kafka)
    uploader = env.start("uploader", env.service_env(prefix))
    await env.wait_ready([uploader])
    consumer = AIOKafkaConsumer(
        kafka.topic(Topic.BROADCAST_LISTS),
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    broker = KafkaBroker(kafka.bootstrap_servers, client_id="espbridge-bench")
    await consumer.start()
    await broker.start()
    limit_runs: list[tuple[float, float, int]] = []
    upload_runs: list[tuple[float, ListUploaded]] = []
    try:
        for n in range(1, runs + 1):
            limit_runs.append(await _list_limit(env))
            job = build_job(
                {
                    **demo_job(f"bench-{env.token}-list-{n}", ESP, env.account, "upload_only"),
                    "requested_by": "bench",
                }
            )
            t0 = time.monotonic()
            await publish(broker, kafka, job)
            uploaded = await _list_uploaded(consumer, uploader, job.job_id, 1800)
            seconds = time.monotonic() - t0
            local = env.sftp_local_root / uploaded.remote_path
            if local.stat().st_size != uploaded.bytes or uploaded.rows != selected:
                raise RuntimeError(f"the list file {local} does not match its ListUploaded ({uploaded})")
            local.unlink()
            say(f"  uploader: {uploaded.rows} rows, {uploaded.bytes / 1e6:.0f} MB in {seconds:.1f} s")
            upload_runs.append((seconds, uploaded))
    finally:
        await broker.stop()
        await consumer.stop()
    u = usage(uploader.pid)
    env.stop_all()
    seconds, uploaded = min(upload_runs, key=lambda r: r[0])
    copy_s, put_s, limit_bytes = min(limit_runs, key=lambda r: r[0] + r[1])
    return UploadRun(
        rows=uploaded.rows,
        bytes=uploaded.bytes,
        seconds=seconds,
        limit_copy_s=copy_s,
        limit_put_s=put_s,
        limit_bytes=limit_bytes,
        seed_s=seed_s,
        uploader_cpu_s=u.cpu_s,
        uploader_peak_rss_mb=u.peak_rss_mb,
        runs_s=[r[0] for r in upload_runs],
        limit_runs_s=[c + p for c, p, _ in limit_runs],
    )


async def _list_limit(env: BenchEnv) -> tuple[float, float, int]:
    """psql ``\\copy (select …) to`` a local file, then OpenSSH ``sftp put`` of it: (copy s, put s, bytes)."""
    limit_csv = env.work / "limit-list.csv"
    select = f"SELECT {', '.join(LIST_COLUMNS)} FROM crm.customers WHERE {NOT_OPTED_OUT}"
    copy_s = await limits.copy_out_limit(env.pg, select, limit_csv)
    put_s = await limits.sftp_put(env.sftp, limit_csv, f"{env.remote_root}/drop/.limit-list.csv")
    limit_bytes = limit_csv.stat().st_size
    (env.account_dir / "drop" / ".limit-list.csv").unlink()
    limit_csv.unlink()
    say(f"  limit: psql \\copy out {copy_s:.1f} s + sftp put {put_s:.1f} s ({limit_bytes / 1e6:.0f} MB)")
    return copy_s, put_s, limit_bytes


async def _list_uploaded(
    consumer: AIOKafkaConsumer, uploader: Service, job_id: str, timeout_s: float
) -> ListUploaded:
    """The job's ListUploaded, read from the lists topic as soon as it is there."""
    found: list[ListUploaded] = []

    async def arrived() -> bool:
        if not uploader.alive():
            raise RuntimeError(f"the uploader exited:\n{uploader.tail()}")
        for records in (await consumer.getmany(timeout_ms=200)).values():
            found.extend(
                ListUploaded.from_json(r.value) for r in records if r.key == job_id.encode() and r.value
            )
        return bool(found)

    # getmany waits for records itself: no pause between the reads
    await wait_for(arrived, f"the ListUploaded of {job_id} (log: {uploader.log})", timeout_s, every_s=0)
    return found[0]
