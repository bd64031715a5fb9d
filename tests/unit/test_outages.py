"""Which errors mean a server is unreachable, and the capped backoff between retries."""

from __future__ import annotations

import asyncpg
import asyncssh
import pytest
from aiokafka.errors import KafkaTimeoutError, OutOfOrderSequenceNumber

from shared.errors import UnavailableError
from shared.outages import backoff_s, unreachable_server


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
