"""What a bench run stands on: its own database, topic prefix, ESP account folder and processes.

Every resource is opened in :func:`bench_env` and removed when it ends, also on failure: service
processes are stopped (SIGTERM, then SIGKILL), topics under the run's prefix deleted, the
``bench_*`` database dropped, the account's folder on the SFTP site and the local files removed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from shared.infra.kafka import ensure_topics
from shared.infra.settings import KafkaSettings, PostgresSettings, SftpSettings
from tools.demo import wait_until, write_accounts_file
from tools.scratch import create_database, delete_topics, drop_database

ROOT = Path(__file__).resolve().parents[1]
ESP = "sandbox"
"""The default ESP (the generic connector, docs/generic-esp.md)."""
PARTITIONS_RESPONSES = 8
"""Partitions of responses.files.v1 and responses.events.v1: room for 4 loaders and 2 gatherers."""


def say(text: str) -> None:
    """A progress line of the bench."""
    sys.stdout.write(f"[bench {time.strftime('%H:%M:%S')}] {text}\n")
    sys.stdout.flush()


@dataclass
class Service:
    """A service process started by the bench."""

    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        """The process id (the Python interpreter itself: no shell in between)."""
        return self.proc.pid

    def alive(self) -> bool:
        """Whether the process still runs."""
        return self.proc.poll() is None

    def tail(self, lines: int = 20) -> str:
        """The end of its log."""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ready(self) -> bool:
        """Whether it logged that it is ready (joined Kafka, subscribed)."""
        try:
            return "service ready" in self.log.read_text(errors="replace")
        except OSError:
            return False


@dataclass(frozen=True)
class Usage:
    """What a process used: CPU seconds (user + system) and peak resident memory."""

    cpu_s: float
    peak_rss_mb: float


def usage(pid: int) -> Usage:
    """CPU time from /proc/<pid>/stat and VmHWM (the kernel's peak RSS) from /proc/<pid>/status."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    hwm = 0.0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return Usage(cpu, hwm)


@dataclass
class BenchEnv:
    """One bench run's resources and settings."""

    token: str
    base_env: dict[str, str]
    kafka: KafkaSettings
    pg_admin: PostgresSettings
    pg: PostgresSettings
    sftp: SftpSettings
    sftp_local_root: Path
    account: str
    work: Path
    accounts_file: Path
    services: list[Service] = field(default_factory=list)
    runs: int = 0

    @property
    def account_dir(self) -> Path:
        """The ESP account's folder on the SFTP site, on local disk."""
        return self.sftp_local_root / ESP / self.account

    @property
    def remote_root(self) -> str:
        """The account's folder as the services name it (relative to the SFTP login directory)."""
        return f"{ESP}/{self.account}"

    def next_prefix(self) -> str:
        """A fresh topic prefix (and so fresh consumer groups) for one measured run."""
        self.runs += 1
        return f"bench{self.token}r{self.runs}."

    def kafka_for(self, prefix: str) -> KafkaSettings:
        """Kafka settings of a run."""
        return self.kafka.model_copy(update={"topic_prefix": prefix})

    def service_env(self, prefix: str, **extra: str) -> dict[str, str]:
        """The environment of a service process of this run."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("ESPBRIDGE_")}
        env.update(self.base_env)
        env.update(
            {
                "ESPBRIDGE_KAFKA_TOPIC_PREFIX": prefix,
                "ESPBRIDGE_KAFKA_PARTITIONS_RESPONSES": str(PARTITIONS_RESPONSES),
                "ESPBRIDGE_PG_DATABASE": self.pg.database,
                "ESPBRIDGE_ACCOUNTS_FILE": str(self.accounts_file),
                "ESPBRIDGE_HTTP_PORT": "0",
                "ESPBRIDGE_LOG_FORMAT": "json",
                "PYTHONPATH": str(ROOT),
            }
        )
        env.update(extra)
        return env

    @property
    def token_file(self) -> Path:
        """The ESP account's API token (the sandbox ESP reads it, the accounts file names it)."""
        return self.work / "esp-token"

    def start(self, name: str, env: Mapping[str, str], module: str | None = None) -> Service:
        """Start ``python -m services.<name>``, or ``python -m <module>`` (several of one name get
        numbered logs)."""
        n = sum(1 for s in self.services if s.name == name)
        log = self.work / "logs" / f"run{self.runs}-{name}{n}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", module or f"services.{name}"],
                env=dict(env),
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        service = Service(name, proc, log)
        self.services.append(service)
        return service

    async def wait_ready(self, services: list[Service], timeout_s: float = 120) -> None:
        """Wait until every service logged that it is ready."""
        await wait_for(
            lambda: _all_ready(services), f"{', '.join(s.name for s in services)} ready", timeout_s, 0.1
        )

    def stop_all(self) -> None:
        """SIGTERM every service still running, SIGKILL what does not stop within a minute."""
        for s in self.services:
            if s.alive():
                s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 60
        for s in self.services:
            try:
                s.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                s.proc.kill()
                s.proc.wait()
        self.services.clear()


async def start_sandbox(env: BenchEnv, esp: str, settings: Mapping[str, str]) -> tuple[Service, str]:
    """The sandbox ESP on a free port, playing ``esp``/the bench's account on the SFTP site's
    folders, ``settings`` as its ``ESPBRIDGE_SANDBOX_<key>`` variables (``FLAVOR`` among them)."""
    url_file = env.work / f"sandbox-url-{env.runs}-{esp}"
    sandbox_env = {k: v for k, v in os.environ.items() if not k.startswith("ESPBRIDGE_")}
    sandbox_env |= {f"ESPBRIDGE_SANDBOX_{k}": v for k, v in settings.items()}
    sandbox_env |= {
        "ESPBRIDGE_SANDBOX_ROOT": str(env.sftp_local_root),
        "ESPBRIDGE_SANDBOX_ESP": esp,
        "ESPBRIDGE_SANDBOX_ACCOUNTS": env.account,
        "ESPBRIDGE_SANDBOX_PORT": "0",
        "ESPBRIDGE_SANDBOX_URL_FILE": str(url_file),
        "ESPBRIDGE_SANDBOX_TOKEN_FILE": str(env.token_file),
        "PYTHONPATH": str(ROOT),
    }
    sandbox = env.start("sandbox", sandbox_env, module="sandbox")

    async def listening() -> bool:
        if not sandbox.alive():
            raise RuntimeError(f"the sandbox ESP exited with {sandbox.proc.returncode}:\n{sandbox.tail()}")
        return url_file.exists() and bool(url_file.read_text().strip())

    await wait_for(listening, "the sandbox ESP", 60, 0.1)
    return sandbox, url_file.read_text().strip()


async def _all_ready(services: list[Service]) -> bool:
    for s in services:
        if not s.alive():
            raise RuntimeError(f"{s.name} exited with {s.proc.returncode}:\n{s.tail()}")
    return all(s.ready() for s in services)


async def wait_for(
    check: Callable[[], Awaitable[bool]], what: str, timeout_s: float, every_s: float = 0.25
) -> float:
    """Poll an async check until it is true (the demo's :func:`wait_until`); returns
    time.monotonic() when it was seen true: the end of what a scenario measures."""
    await wait_until(what, check, timeout_s, every_s)
    return time.monotonic()


@contextlib.asynccontextmanager
async def bench_env(base_env: Mapping[str, str], keep_work: bool = False) -> AsyncIterator[BenchEnv]:
    """Create the run's database, account folders and accounts file; remove everything after."""
    servers = {k: v for k, v in base_env.items() if k.startswith("ESPBRIDGE_")}
    saved = dict(os.environ)
    try:  # settings built exactly as a service builds them, from ESPBRIDGE_* variables
        os.environ.update(servers)
        kafka = KafkaSettings(partitions_responses=PARTITIONS_RESPONSES)
        pg_admin = PostgresSettings()
        sftp = SftpSettings()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    if "ESPBRIDGE_SFTP_LOCAL_ROOT" not in servers:
        raise RuntimeError(
            "ESPBRIDGE_SFTP_LOCAL_ROOT is not set: source .run/espbridge.env (make bench does)"
        )
    token = secrets.token_hex(4)
    work = Path(tempfile.mkdtemp(prefix=f"espbridge-bench-{token}-"))
    account = f"bench-{token}"
    env = BenchEnv(
        token=token,
        base_env=servers,
        kafka=kafka,
        pg_admin=pg_admin,
        pg=pg_admin.with_database(f"bench_{token}"),
        sftp=sftp,
        sftp_local_root=Path(servers["ESPBRIDGE_SFTP_LOCAL_ROOT"]),
        account=account,
        work=work,
        accounts_file=work / "accounts.json",
    )
    env.token_file.write_text(secrets.token_urlsafe(16))
    # The generic connector needs an API address; the bench's stages never call it.
    write_accounts_file(
        env.accounts_file,
        [
            {
                "esp": ESP,
                "account": account,
                "connector": "generic",
                "api_url": f"http://127.0.0.1:9/api/v1/accounts/{account}",
                "token_file": str(env.token_file),
            }
        ],
    )
    for folder in ("drop", "responses", "archive"):
        (env.account_dir / folder).mkdir(parents=True, exist_ok=True)
    try:
        await create_database(pg_admin, env.pg.database)
        say(f"bench {token}: database {env.pg.database}, topics bench{token}r*, folder {env.remote_root}")
        yield env
    finally:
        env.stop_all()
        await delete_topics(kafka, f"bench{token}")
        await drop_database(pg_admin, env.pg.database)
        shutil.rmtree(env.account_dir, ignore_errors=True)
        if not keep_work:
            shutil.rmtree(work, ignore_errors=True)
        kept = f", work folder {work} kept" if keep_work else ", local files"
        say(f"bench {token}: cleaned up (processes, topics, database, SFTP folder{kept})")


async def create_topics(kafka: KafkaSettings) -> None:
    """Create a run's topics before its processes start (so they never race to create them)."""
    await ensure_topics(kafka)


def kafka_version(bootstrap: str) -> str:
    """The Kafka release of the broker listening on ``bootstrap`` (from its process's class path)."""
    port = int(bootstrap.split(",")[0].rsplit(":", 1)[1])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                parts = line.split()
                if int(parts[1].rsplit(":", 1)[1], 16) == port and parts[3] == "0A":  # LISTEN
                    inodes.add(parts[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            links = {os.readlink(fd) for fd in (proc / "fd").iterdir()}
            if any(f"socket:[{i}]" in links for i in inodes):
                cmdline = (proc / "cmdline").read_bytes().decode(errors="replace")
                found = re.search(r"kafka[/_-](?:lib-|clients-|\d\.\d+-)?(\d+\.\d+\.\d+)", cmdline)
                return found.group(1) if found else "unknown"
    return "unknown"
