"""Rate limits shared by every process through PostgreSQL: processes calling one account keep to its
limit together (three monitors against the sandbox ESP, counted by the ESP), a dead process's slot
comes back when its lease ends, and while PostgreSQL cannot be reached no call is made."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from shared.esp.accounts import AccountConfig
from shared.esp.limits import RateLimits
from shared.esp.rest import EspClient
from shared.infra.db import connect
from shared.infra.db.rate_slots import add_slots, take_slot
from shared.infra.outages import unreachable_server
from shared.infra.settings import PostgresSettings
from shared.model.errors import UnavailableError
from shared.model.topics import Topic
from shared.operations.jobs import build_job
from tests.fixtures.deployment import Deployment
from tests.fixtures.fake_esp import FakeEsp, served
from tests.fixtures.faults import readiness
from tests.fixtures.kafka import produce
from tests.fixtures.pipeline import start_pipeline
from tests.fixtures.waits import wait_for
from tools.demo import FLAVORS, demo_job

ACCOUNT = AccountConfig(esp="sandbox", account="limited", api_url="http://127.0.0.1:9", request_timeout_s=5)


@dataclass
class Esp(FakeEsp):
    """An ESP that answers every call; one in ``during_call`` waits for ``go_on`` first."""

    during_call: list[asyncio.Event] = field(default_factory=list)
    """Set while a call is being answered (the test breaks something then)."""
    go_on: asyncio.Event = field(default_factory=asyncio.Event)

    def application(self) -> web.Application:
        async def data(request: web.Request) -> web.Response:
            if self.during_call:
                self.during_call.pop(0).set()
                await self.go_on.wait()
            return web.json_response({"ok": True})

        app = web.Application()
        app.router.add_get("/data", data)
        return app


esp = served(Esp)


@contextlib.asynccontextmanager
async def process(database: PostgresSettings) -> AsyncIterator[RateLimits]:
    """The rate limits of one more process using ``database`` (its own pool)."""
    async with contextlib.AsyncExitStack() as stack:
        yield await RateLimits.open(stack, database)


def client(esp: Esp, rates: RateLimits, calls: int, per_s: float) -> EspClient:
    return EspClient(
        esp.http, esp.url, account=ACCOUNT.name, timeout_s=5, limiter=rates.limiter(ACCOUNT, calls, per_s)
    )


async def test_processes_calling_one_account_keep_to_its_limit_together(
    esp: Esp, database: PostgresSettings
) -> None:
    async with process(database) as one, process(database) as two, process(database) as three:
        clients = [client(esp, rates, 3, 0.5) for rates in (one, two, three) for _ in range(2)]
        await asyncio.gather(*(api.call("GET", "/data") for api in clients for _ in range(4)))
    assert len(esp.calls("/data")) == 24
    # each process alone would allow 3 per 0.5 s; together they still make at most 3 in any 0.5 s
    assert esp.most_within(0.5, "/data") <= 3
    arrivals = esp.arrivals("/data")
    assert all(later - earlier >= 0.5 for earlier, later in zip(arrivals, arrivals[3:], strict=False))


async def test_a_slot_whose_process_died_is_free_again_when_its_lease_ends(
    database: PostgresSettings,
) -> None:
    conn = await connect(database)
    try:
        # a process takes the only slot and dies in its call: the slot is never given back
        await add_slots(conn, ACCOUNT.esp, ACCOUNT.account, 1)
        died = await take_slot(conn, ACCOUNT.esp, ACCOUNT.account, 1, uuid.uuid4(), 1.0, 5.0)
        assert died.slot == 0
        attempt = await take_slot(conn, ACCOUNT.esp, ACCOUNT.account, 1, uuid.uuid4(), 1.0, 5.0)
    finally:
        await conn.close()
    assert attempt.slot is None, "the slot is held while its lease runs"
    assert attempt.cooling_s is None, "no slot has ended its call"
    assert attempt.first_free_s is not None
    assert attempt.first_free_s > 0
    async with process(database) as alive, alive.limiter(ACCOUNT, 1, 0.2).slot():
        pass  # taken once the lease ended


class PostgresProxy:
    """A TCP forwarder to PostgreSQL that a test can cut and restore: a server going away, as a
    process sees it, without touching the server the other tests share."""

    def __init__(self, target: PostgresSettings) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.StreamWriter] = set()

    @property
    def settings(self) -> PostgresSettings:
        """The target's settings, through the proxy."""
        return self.target.model_copy(
            update={"host": "127.0.0.1", "port": self.port, "connect_timeout_s": 2.0}
        )

    async def open(self) -> None:
        """Listen (again, on the same port)."""
        self._server = await asyncio.start_server(self._forward, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        """Stop listening and drop every connection."""
        assert self._server is not None
        self._server.close()
        for pipe in list(self._pipes):
            pipe.close()
        await self._server.wait_closed()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.target.host, self.target.port)
        self._pipes |= {writer, up_writer}

        async def pump(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            self._pipes -= {writer, up_writer}
            for pipe in (writer, up_writer):
                pipe.close()
                with contextlib.suppress(OSError):
                    await pipe.wait_closed()


async def test_while_postgres_cannot_be_reached_no_call_is_made(
    esp: Esp, database: PostgresSettings, caplog: pytest.LogCaptureFixture
) -> None:
    proxy = PostgresProxy(database)
    await proxy.open()
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(proxy.cut)
        rates = await RateLimits.open(stack, proxy.settings)
        api = client(esp, rates, 2, 0.2)
        await api.call("GET", "/data")
        await proxy.cut()
        with pytest.raises(UnavailableError, match="rate limit of ESP account sandbox/limited") as info:
            await api.call("GET", "/data")
        assert unreachable_server(info.value) == "PostgreSQL"  # retried as a PostgreSQL outage
        assert len(esp.calls("/data")) == 1, "no call without its slot"
        await proxy.open()
        # PostgreSQL goes away during a call: its answer still counts, its slot waits out its lease
        reached = asyncio.Event()
        esp.during_call.append(reached)
        call = asyncio.create_task(api.call("GET", "/data"))
        await reached.wait()
        await proxy.cut()
        esp.go_on.set()
        with caplog.at_level(logging.WARNING, "shared.esp.limits"):
            assert await call == (200, {"ok": True})
        assert "slot not given back" in caplog.text
        await proxy.open()
        assert await api.call("GET", "/data") == (200, {"ok": True})
    assert len(esp.calls("/data")) == 3


LIMIT = 5
"""The sandbox account's calls a second (the generic connector's ``requests_per_second``)."""
BROADCASTS = 10


async def test_three_monitors_together_never_make_more_calls_a_second_than_the_account_allows(
    deployment: Deployment,
) -> None:
    await deployment.seed(40)
    esp = "sandbox"
    with ExitStack() as stack:
        pipeline = start_pipeline(
            stack,
            deployment,
            [(esp, deployment.account)],
            account_options={"requests_per_second": LIMIT},
            services=("uploader", "monitor"),  # nothing else calls the generic ESP's API
        )
        # started together, the three join the monitors' group in one rebalance
        logs = ["monitor", "monitor-2", "monitor-3"]
        monitors = [pipeline.procs["monitor"]]
        monitors += [deployment.start(stack, "monitor", pipeline.envs["monitor"], log) for log in logs[1:]]
        await wait_for(
            lambda: all(readiness(deployment.folder / f"{log}.log") for log in logs),
            timeout_s=90,
            what="three monitors ready",
        )
        flavor = FLAVORS[esp]
        jobs = [
            build_job(
                demo_job(
                    f"limited-{n}-{deployment.unique}", esp, deployment.account, flavor.mode, flavor.message
                )
            )
            for n in range(BROADCASTS)
        ]
        await produce(
            deployment.kafka, Topic.BROADCAST_JOBS, [(j.job_id.encode(), j.to_json()) for j in jobs]
        )
        conn = await connect(deployment.database)
        claimed_by: set[str] = set()
        try:

            async def all_ended() -> bool:
                claimed_by.update(
                    await conn.fetchval("SELECT array_agg(DISTINCT claimed_by) FROM control.broadcast_work")
                    or []
                )
                ended = await conn.fetchval(
                    "SELECT count(*) FROM control.broadcast_work WHERE step = 'ended'"
                )
                return bool(ended == BROADCASTS)

            await wait_for(all_ended, timeout_s=120, interval_s=0.5, what="every broadcast sent and followed")
        finally:
            await conn.close()
        stats = await pipeline.stats(esp)
    assert stats["sends_created"] == {j.job_id: 1 for j in jobs}
    # The ESP counts its limit in its own seconds: however the calls of the three monitors fell
    # into them, no second holds more than the limit (the limiter holds for any 1 s window, so
    # whole seconds need no allowance at their edges).
    per_second = stats["calls_per_second"]
    assert max(per_second.values()) <= LIMIT, per_second
    # ...and it was the limit that held them back: they reached it, second after second.
    assert sum(1 for n in per_second.values() if n == LIMIT) >= 3, per_second
    assert {int(c.rpartition(":")[2]) for c in claimed_by if c} == {m.pid for m in monitors}
