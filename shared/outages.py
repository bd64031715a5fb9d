"""Outages of the servers a service depends on: Kafka, PostgreSQL and the ESP's SFTP server.

* :func:`unreachable_server` tells from an exception which of them could not be reached (the
  client library that raised it decides), so the error policy retries instead of dead-lettering.
* :class:`Outages` writes the lines an operator reads: one warning per retry naming the server
  and the delay ("PostgreSQL unreachable, retrying in 4 s"), one when it answers again.
* :class:`KafkaWatch` and :class:`PostgresWatch` do the same for the reconnecting that the Kafka
  client and the PostgreSQL connection pool do by themselves: they hold back the client's own
  per-attempt lines while the server is known to be down, ask the server with capped backoff, and
  log when it answers again, also when no message ran into the outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
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


class ServerWatch(logging.Filter):
    """A server's outage as a few clear lines instead of its client library's own retry lines.

    Added to the log handlers: the client library's first line saying the server is lost marks
    it down (and is shown); while it is down the library's further warnings and errors about it
    are held back, and :meth:`run` asks the server (``answers``) with capped backoff, logging each
    failed attempt, until it answers, then logs that it is reachable again. The client reconnects
    by itself; this only watches and reports, so an outage that no message ran into (an idle
    service whose pool lost its connections) still ends with a line saying the server is back.
    """

    server: str
    probe: str
    """What ``answers`` asks the server, for the log lines."""

    def __init__(
        self,
        answers: Callable[[], Awaitable[bool]],
        outages: Outages,
        *,
        probe_min_s: float = BACKOFF_MIN_S,
        probe_max_s: float = PROBE_MAX_S,
    ) -> None:
        super().__init__()
        self._answers = answers
        self._outages = outages
        self._probe = (probe_min_s, probe_max_s)
        self._down = asyncio.Event()
        self._shown: logging.LogRecord | None = None  # the line that marked the outage
        self._held_back = 0

    def concerns(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` (a warning or worse) is the client library's line about this server."""
        raise NotImplementedError

    def says_down(self, record: logging.LogRecord) -> bool:
        """Whether ``record`` says the server is lost (it may rewrite the record to say it clearly)."""
        raise NotImplementedError

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not self.concerns(record):
            return True
        if record is self._shown:  # the same line passing another handler
            return True
        if self._down.is_set():
            self._held_back += 1
            return False
        if self.says_down(record):
            self._shown = record
            self._down.set()
        return True

    async def run(self) -> None:
        """Watch until cancelled."""
        low, high = self._probe
        while True:
            await self._down.wait()
            attempt = 0
            while not await self._answers():
                attempt += 1
                delay = backoff_s(attempt, low, high)
                self._outages.failed(self.server, f"no answer to {self.probe}", delay, "the connection")
                await asyncio.sleep(delay)  # capped backoff between two probes
            self._outages.reachable(self.server, client_lines_held_back=self._held_back)
            self._held_back = 0
            self._shown = None
            self._down.clear()


_KAFKA_DOWN_SIGNS = ("Unable connect to node", "KafkaConnectionError", "Connect call failed")


class KafkaWatch(ServerWatch):
    """Kafka's outage as a few clear lines instead of the Kafka client's ten error lines a second
    (``answers``: a metadata request)."""

    server = KAFKA
    probe = "a metadata request"

    def concerns(self, record: logging.LogRecord) -> bool:
        return record.name.startswith("aiokafka")

    def says_down(self, record: logging.LogRecord) -> bool:
        return any(sign in record.getMessage() for sign in _KAFKA_DOWN_SIGNS)


class PostgresWatch(ServerWatch):
    """PostgreSQL's outage as seen by a connection pool that reconnects in the background
    (``answers``: opening a connection).

    The pool's first reconnect warning is shown as one line without a traceback; the pool's later
    ones are held back while the watch asks the server itself, so the end of the outage is logged
    even when no message ran into it.
    """

    server = POSTGRES
    probe = "a new connection"

    def concerns(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.name == "asyncpg.pool" and record.exc_info else None
        return exc is not None and unreachable_server(exc) == POSTGRES

    def says_down(self, record: logging.LogRecord) -> bool:
        assert record.exc_info is not None  # concerns() held
        exc = record.exc_info[1]
        record.msg = "PostgreSQL unreachable, the connection pool reconnects in the background"
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.error = str(exc)[:500] or type(exc).__name__
        return True
