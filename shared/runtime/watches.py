"""Outages no message ran into: the Kafka client and the PostgreSQL pool reconnect by themselves.

:class:`KafkaWatch` and :class:`PostgresWatch` hold back the client's own per-attempt lines while
the server is known to be down, ask the server with capped backoff, and log when it answers again
(through :class:`~shared.infra.outages.Outages`), also when no message ran into the outage.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from shared.infra.outages import (
    BACKOFF_MIN_S,
    KAFKA,
    POSTGRES,
    PROBE_MAX_S,
    Outages,
    backoff_s,
    unreachable_server,
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
