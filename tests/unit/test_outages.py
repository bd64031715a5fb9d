"""Which errors mean a server is unreachable, the capped backoff between retries, and the watches
that report an outage the client libraries noticed by themselves, and its end."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
from typing import Any

import asyncpg
import asyncssh
import pytest
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

from shared.infra.outages import Outages, backoff_s, unreachable_server
from shared.model.errors import UnavailableError
from shared.runtime.watches import KafkaWatch, PostgresWatch


def test_backoff_doubles_and_is_capped() -> None:
    assert [backoff_s(n) for n in range(1, 9)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(6, high=10) == 10


@pytest.mark.parametrize(
    ("exc", "server"),
    [
        (asyncpg.CannotConnectNowError("the database system is shutting down"), "PostgreSQL"),
        (asyncpg.AdminShutdownError("terminating connection"), "PostgreSQL"),
        (asyncpg.ConnectionDoesNotExistError("connection was closed"), "PostgreSQL"),
        (
            asyncpg.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
            "PostgreSQL",
        ),
        (asyncpg.InterfaceError("connection is closed"), "PostgreSQL"),
        (KafkaTimeoutError(), "Kafka"),
        (asyncssh.ConnectionLost("lost"), "SFTP server"),
        (asyncssh.SFTPNoConnection("Connection not open"), "SFTP server"),
    ],
)
def test_client_errors_name_their_server(exc: BaseException, server: str) -> None:
    assert unreachable_server(exc) == server
    wrapped = UnavailableError("loading failed")
    wrapped.__cause__ = exc
    assert unreachable_server(wrapped) == server


@pytest.mark.parametrize(
    "exc",
    [
        asyncpg.UniqueViolationError("duplicate key"),
        asyncpg.QueryCanceledError("statement timeout"),
        OutOfOrderSequenceNumber(),
        OSError("disk full"),  # raised outside any client library
        ValueError("bad data"),
    ],
)
def test_other_errors_are_not_outages(exc: BaseException) -> None:
    assert unreachable_server(exc) is None


class _Recorded(Outages):
    """Outages that also tell the test when a server was reported back."""

    def __init__(self) -> None:
        super().__init__()
        self.back = asyncio.Event()

    def reachable(self, server: str, **extra: Any) -> None:
        super().reachable(server, **extra)
        self.back.set()


def _pool_line() -> logging.LogRecord:
    """The warning asyncpg's pool logs when it cannot restore its connections."""
    try:
        raise asyncpg.CannotConnectNowError("the database system is shutting down")
    except asyncpg.CannotConnectNowError:
        exc_info = sys.exc_info()
    msg = "Failed to restore the pool connection floor; retrying"
    return logging.LogRecord("asyncpg.pool", logging.WARNING, __file__, 1, msg, None, exc_info)


async def test_postgres_lost_by_an_idle_pool_is_reported_back_when_it_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers = iter([False, False, True])

    async def answer() -> bool:
        return next(answers)

    outages = _Recorded()
    watch = PostgresWatch(answer, outages, probe_min_s=0.001, probe_max_s=0.002)
    caplog.set_level(logging.WARNING, logger="shared.infra.outages")

    first = _pool_line()
    assert watch.filter(first)
    assert first.getMessage() == "PostgreSQL unreachable, the connection pool reconnects in the background"
    assert first.exc_info is None
    assert first.__dict__["error"] == "the database system is shutting down"
    assert watch.filter(first), "the line that marked the outage is shown by every handler"
    assert not watch.filter(_pool_line()), "the pool's next attempts are held back while it is down"
    unrelated = logging.LogRecord("asyncpg.pool", logging.WARNING, __file__, 1, "close is slow", None, None)
    assert watch.filter(unrelated)

    task = asyncio.create_task(watch.run())
    try:
        await asyncio.wait_for(outages.back.wait(), 10)
        lines = [(r.getMessage(), r.__dict__.get("retrying")) for r in caplog.records]
        assert lines[:2] == [
            ("PostgreSQL unreachable, retrying in 0.001 s", "the connection"),
            ("PostgreSQL unreachable, retrying in 0.002 s", "the connection"),
        ]
        assert lines[2][0].startswith("PostgreSQL reachable again after ")
        assert caplog.records[2].__dict__["client_lines_held_back"] == 1
        assert not outages.is_down("PostgreSQL")

        again = _pool_line()
        assert watch.filter(again), "a later outage is shown again"
        assert again.getMessage().startswith("PostgreSQL unreachable")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_kafka_client_lines_are_held_back_while_kafka_is_down() -> None:
    async def answer() -> bool:
        return True

    watch = KafkaWatch(answer, Outages())

    def client_line(msg: str) -> logging.LogRecord:
        return logging.LogRecord("aiokafka.conn", logging.ERROR, __file__, 1, msg, None, None)

    assert watch.filter(client_line("Unable connect to node with id 1: Connect call failed"))
    assert not watch.filter(client_line("Unable connect to node with id 1: Connect call failed"))
    assert watch.filter(
        logging.LogRecord("shared.infra.kafka", logging.ERROR, __file__, 1, "ours", None, None)
    )
