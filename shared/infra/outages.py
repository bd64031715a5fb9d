"""Outages of the servers a service depends on: Kafka, PostgreSQL and the ESP's SFTP server.

* :func:`unreachable_server` tells from an exception which of them could not be reached (the
  client library that raised it decides), so the error policy retries instead of dead-lettering.
* :class:`Outages` writes the lines an operator reads: one warning per retry naming the server
  and the delay ("PostgreSQL unreachable, retrying in 4 s"), one when it answers again.

The watches that notice outages no message ran into are the runtime's
(:mod:`shared.runtime.watches`).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import asyncpg
import asyncssh
from aiokafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError, NodeNotReadyError

log = logging.getLogger(__name__)

KAFKA = "Kafka"
POSTGRES = "PostgreSQL"
SFTP = "SFTP server"

BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
PROBE_MAX_S = 10.0
"""A probe costs one request: Kafka's return is noticed within this many seconds."""

# the client library whose code raised an error names the server it could not reach
_LIBRARIES = {"asyncpg": POSTGRES, "aiokafka": KAFKA, "asyncssh": SFTP}

_UNREACHABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,  # class 08, also a connection lost mid-query
    asyncpg.OperatorInterventionError,  # 57P01-03: the server shuts down, or is starting up
    # The connection broke in the middle of an operation (seen when the server stops during a
    # COPY): "cannot switch to state 15; another operation is in progress", "connection is closed".
    asyncpg.InternalClientError,
    asyncpg.InterfaceError,
    KafkaConnectionError,
    NodeNotReadyError,
    KafkaTimeoutError,
    asyncssh.DisconnectError,
    asyncssh.ChannelOpenError,
    asyncssh.SFTPConnectionLost,
    asyncssh.SFTPNoConnection,  # "Connection not open": a session of a connection that went away
)


def backoff_s(attempt: int, low: float = BACKOFF_MIN_S, high: float = BACKOFF_MAX_S) -> float:
    """The delay before retry number ``attempt`` (1, 2, …): doubling from ``low``, capped at ``high``."""
    return float(min(high, low * 2 ** max(0, attempt - 1)))


def _says_unreachable(exc: BaseException) -> bool:
    if isinstance(exc, asyncpg.QueryCanceledError):  # 57014 is a timeout of ours, not an outage
        return False
    return isinstance(exc, _UNREACHABLE) or (isinstance(exc, KafkaError) and exc.retriable)


def _raised_in(exc: BaseException) -> str | None:
    owner = _LIBRARIES.get(type(exc).__module__.partition(".")[0])
    tb = exc.__traceback__
    while tb is not None:  # the innermost frame of a known client library decides
        owner = _LIBRARIES.get(str(tb.tb_frame.f_globals.get("__name__", "")).partition(".")[0], owner)
        tb = tb.tb_next
    return owner


def unreachable_server(exc: BaseException) -> str | None:
    """The server (``Kafka``, ``PostgreSQL``, ``SFTP server``) that ``exc`` says cannot be reached
    now — the exception itself or one it was raised from — or None for any other error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if _says_unreachable(current):
            server = _raised_in(current)
            if server is not None:
                return server
        current = current.__cause__ or current.__context__
    return None


class Outages:
    """The servers this process cannot reach now, and the log lines about them."""

    def __init__(self) -> None:
        self._since: dict[str, float] = {}

    def is_down(self, server: str) -> bool:
        """Whether a retry against ``server`` failed and nothing has reached it since."""
        return server in self._since

    def failed(self, server: str, error: BaseException | str, retry_in_s: float, what: str) -> None:
        """An attempt to reach ``server`` failed; ``what`` is retried in ``retry_in_s`` seconds."""
        since = self._since.setdefault(server, time.monotonic())
        log.warning(
            "%s unreachable, retrying in %s s",
            server,
            f"{retry_in_s:g}",
            extra={
                "server": server,
                "retrying": what,
                "retry_in_s": retry_in_s,
                "down_for_s": round(time.monotonic() - since, 1),
                "error": str(error)[:500] or type(error).__name__,
            },
        )

    def reachable(self, server: str, **extra: Any) -> None:
        """``server`` answered; logs the end of its outage if one was logged."""
        since = self._since.pop(server, None)
        if since is not None:
            # a warning like the outage lines, so a log filtered to warnings shows the end too
            log.warning(
                "%s reachable again after %.0f s",
                server,
                time.monotonic() - since,
                extra={"server": server, "down_for_s": round(time.monotonic() - since, 1), **extra},
            )
