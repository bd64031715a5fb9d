"""What every service process shares: the entry point, the runtime it hands to handlers, start-up.

A service's ``__main__`` calls :func:`service_main` with its settings class and ``create_app``.
All resources (broker, HTTP server, pools) are opened in one ``AsyncExitStack`` and closed in
reverse; SIGTERM and SIGINT stop the consumers, let in-flight messages finish (long work that
polls, like the monitor following a send, hands its message back instead), and exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Protocol

import asyncpg
import orjson
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from pydantic import Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from shared.db import create_pool, postgres_answers
from shared.errors import EspbridgeError, StoppingError, UnavailableError
from shared.failpoints import Failpoints, FailpointSettings
from shared.http import HealthServer, Metrics
from shared.kafka import (
    DrainOnRevoke,
    InFlight,
    ensure_topics,
    error_policy,
    kafka_answers,
    make_broker,
    publish,
    publish_many,
)
from shared.logs import configure
from shared.messages import DeadLetter, Message
from shared.outages import KafkaWatch, Outages, PostgresWatch, ServerWatch, unreachable_server
from shared.settings import HttpSettings, KafkaSettings, LogSettings, PostgresSettings
from shared.topics import Topic

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[None]]


class ServiceSettings(BaseSettings):
    """Settings every service has; a service subclasses it with its own env prefix."""

    model_config = SettingsConfigDict(frozen=True, extra="ignore")

    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    failpoints: FailpointSettings = Field(default_factory=FailpointSettings)
    startup_timeout_s: float = Field(default=120.0, gt=0, description="how long to wait for Kafka at start")
    shutdown_timeout_s: float = Field(default=30.0, gt=0, description="grace for in-flight work on SIGTERM")

    def group_id(self, service: str) -> str:
        """The consumer group of a service, under the deployment's topic prefix."""
        return f"{self.kafka.topic_prefix}espbridge-{service}"

    def masked(self) -> dict[str, Any]:
        """The settings for the start-up log line, secrets masked."""
        return self.model_dump(mode="json")


class Runtime:
    """The per-process objects a service's handlers use: broker, publishing, metrics."""

    def __init__(self, name: str, settings: ServiceSettings) -> None:
        self.name = name
        self.settings = settings
        self.metrics = Metrics(name)
        self.ready = False
        self.stopping = asyncio.Event()
        self.inflight = InFlight()
        self.failpoints = Failpoints(settings.failpoints)
        self.outages = Outages()
        self._postgres_watched = False
        self.stack = contextlib.AsyncExitStack()
        self.http = HealthServer(settings.http, self.metrics, lambda: self.ready)
        self.broker: KafkaBroker = make_broker(
            settings.kafka,
            client_id=name,
            graceful_timeout_s=settings.shutdown_timeout_s,
            middlewares=[error_policy(name, self.dead_letter, self.inflight, self.outages)],
        )

    def subscriber(self, topic: Topic, **options: Any) -> Callable[[Handler], Any]:
        """A subscriber on a registry topic in this service's consumer group.

        Offsets are committed by the error policy after the handler finished; a transient failure
        rewinds to the message (retry), a permanent one is dead-lettered and committed. Before a
        rebalance takes partitions away, the message in hand finishes and commits.
        """
        subscriber: Callable[[Handler], Any] = self.broker.subscriber(
            self.settings.kafka.topic(topic),
            group_id=self.settings.group_id(self.name),
            ack_policy=AckPolicy.MANUAL,
            listener=DrainOnRevoke(self.inflight, self.settings.shutdown_timeout_s),
            auto_offset_reset="earliest",
            session_timeout_ms=self.settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.settings.kafka.session_timeout_ms // 3,
            **options,
        )
        return subscriber

    async def sleep(self, seconds: float) -> None:
        """Wait between polls of long work; raises :class:`StoppingError` once the service begins
        to stop, so the work hands its message back instead of holding shutdown past its grace."""
        try:
            await asyncio.wait_for(self.stopping.wait(), seconds)
        except TimeoutError:
            return
        raise StoppingError("the service is stopping; the message goes back to Kafka for the next process")

    async def publish(self, message: Message) -> None:
        """Publish a message to its registry topic."""
        await publish(self.broker, self.settings.kafka, message)
        self.metrics.inc("messages_published_total", type=type(message).__name__)

    async def publish_many(self, messages: Sequence[Message]) -> None:
        """Publish messages in one go, waiting until Kafka acknowledged all of them."""
        await publish_many(self.broker, self.settings.kafka, messages)
        if messages:
            self.metrics.inc("messages_published_total", len(messages), type=type(messages[0]).__name__)

    def watch(self, watch: ServerWatch) -> None:
        """Add ``watch`` to the log handlers and run it, until the runtime's stack closes."""
        handlers = list(logging.getLogger().handlers)
        for handler in handlers:
            handler.addFilter(watch)
        task = asyncio.create_task(watch.run(), name=f"{watch.server} watch")

        async def stop() -> None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for handler in handlers:
                handler.removeFilter(watch)

        self.stack.push_async_callback(stop)

    async def open_pool(self, settings: PostgresSettings) -> asyncpg.Pool:
        """The process's PostgreSQL connection pool, closed with the runtime's stack.

        The pool reconnects by itself after an outage; a :class:`PostgresWatch` turns its warnings
        into a line about the outage and one when PostgreSQL answers again.
        """
        pool = await create_pool(settings)
        self.stack.push_async_callback(pool.close)
        if not self._postgres_watched:
            self._postgres_watched = True
            self.watch(PostgresWatch(functools.partial(postgres_answers, settings), self.outages))
        return pool

    async def dead_letter(self, letter: DeadLetter) -> None:
        """Publish a dead letter and count it."""
        await self.publish(letter)
        self.metrics.inc("dead_letters_total", error_class=letter.error_class)


class AppFactory(Protocol):
    """``create_app(settings, runtime)`` of a service: opens its resources on ``runtime.stack``
    (closed in reverse at shutdown), wires subscribers, returns the app."""

    def __call__(self, settings: Any, runtime: Runtime, /) -> Awaitable[FastStream]: ...


async def wait_for_kafka(settings: KafkaSettings, timeout_s: float) -> None:
    """Create the topics, retrying with bounded backoff until Kafka answers or time runs out."""
    deadline = time.monotonic() + timeout_s
    delay = 0.5
    while True:
        try:
            await ensure_topics(settings)
            return
        except UnavailableError as exc:
            if time.monotonic() + delay > deadline:
                raise UnavailableError(f"Kafka not available after {timeout_s:.0f}s: {exc}") from exc
            log.warning("Kafka not available yet, retrying", extra={"error": str(exc), "retry_in_s": delay})
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


def watch_outages(runtime: Runtime) -> None:
    """Clear log lines for outages of Kafka (and of PostgreSQL, see :meth:`Runtime.open_pool`), for
    as long as the runtime's stack is open."""
    runtime.watch(KafkaWatch(functools.partial(kafka_answers, runtime.settings.kafka), runtime.outages))
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()

    def lost_in_outage(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        # A client library's helper task that failed with its connection (asyncssh's parallel
        # reads) is never awaited once the caller has the error: the outage lines say it already.
        exc = context.get("exception")
        if isinstance(exc, BaseException) and unreachable_server(exc) is not None:
            log.debug("a client task ended with its connection", extra={"error": repr(exc)})
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(lost_in_outage)

    async def restore() -> None:
        loop.set_exception_handler(previous)

    runtime.stack.push_async_callback(restore)


async def run_service(
    name: str,
    settings: ServiceSettings,
    create_app: AppFactory,
    on_ready: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Run a service until SIGTERM/SIGINT.

    A SIGTERM before the app runs (while it waits for Kafka or opens its pools) cancels the
    start-up: what was opened is closed and the service returns, as there is no message in hand.
    Once the app runs, SIGTERM is its graceful stop (faststream's handler replaces this one).
    """
    runtime = Runtime(name, settings)
    loop = asyncio.get_running_loop()
    starting = asyncio.current_task()
    assert starting is not None  # run_service runs as a task (asyncio.run)
    stopped_while_starting = False

    def stop_starting() -> None:
        nonlocal stopped_while_starting
        stopped_while_starting = True
        starting.cancel()

    loop.add_signal_handler(signal.SIGTERM, stop_starting)
    try:
        async with runtime.stack as stack:
            watch_outages(runtime)
            await wait_for_kafka(settings.kafka, settings.startup_timeout_s)
            app = await create_app(settings, runtime)
            if settings.http.enabled:  # after create_app: a service may have added routes (webhooks)
                await runtime.http.start()
                stack.push_async_callback(runtime.http.stop)

            async def mark_ready() -> None:
                runtime.ready = True
                log.info("service ready", extra={"group_id": settings.group_id(name)})
                if on_ready is not None:
                    await on_ready()

            async def mark_stopping() -> None:
                runtime.ready = False
                runtime.stopping.set()
                log.info("stopping: finishing in-flight messages")

            app.after_startup(mark_ready)
            app.on_shutdown(mark_stopping)
            await app.run(log_level=logging.DEBUG)  # its SIGTERM handler replaces stop_starting
    except asyncio.CancelledError:
        if not stopped_while_starting:
            raise
        log.info("stopped while starting (SIGTERM before the service was ready)")
        return
    log.info("stopped")


GC_THRESHOLDS = (50_000, 20, 100)
"""The cyclic collector's thresholds in a service process (Python's are 700, 10, 10)."""


def tune_gc() -> None:
    """Collect cycles less often: a service allocates millions of short-lived, acyclic objects per
    file or batch (freed by reference counting), and Python's default thresholds then run full
    collections over everything alive every few batches. The objects of start-up (modules,
    models) are moved out of the collector's way for good."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


MALLOC_MMAP_THRESHOLD = 16 * 2**20
"""Buffers up to this size come from the heap, not a mapping of their own (glibc's mallopt)."""
MALLOC_TRIM_THRESHOLD = 32 * 2**20
"""Freed heap up to this size stays in the process for the next batch (glibc's mallopt)."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)


def tune_malloc(environ: Mapping[str, str] = os.environ) -> bool:
    """Let glibc reuse the memory of one batch for the next instead of faulting it in again.

    A service holds several buffers of a few MiB at once (Kafka requests and fetches, a window of
    events, a COPY's text) and frees them together. With glibc's defaults such a buffer gets a
    mapping of its own, or the freed heap is given back to the system, and the next batch touches
    every page anew. Measured per million events in the end-to-end bench: 410,000 page faults in
    the gatherer and 295,000 in the loader with the defaults (2.2 s of system time between them),
    28,000 and 64,000 with these thresholds (0.9 s). They keep up to
    :data:`MALLOC_TRIM_THRESHOLD` of freed memory in each process.

    Returns False, changing nothing, without glibc (musl, macOS) or when the operator set
    ``MALLOC_MMAP_THRESHOLD_`` or ``MALLOC_TRIM_THRESHOLD_`` (their values stand).
    """
    if "MALLOC_MMAP_THRESHOLD_" in environ or "MALLOC_TRIM_THRESHOLD_" in environ:
        return False
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return False
        mallopt = ctypes.CDLL(None).mallopt
    except (ValueError, OSError, AttributeError):  # no such confstr name, no libc symbols
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def service_main(
    name: str,
    description: str,
    settings_cls: type[ServiceSettings],
    create_app: AppFactory,
    argv: Sequence[str] | None = None,
) -> int:
    """The entry point of ``python -m services.<name>``; returns the process exit code."""
    parser = argparse.ArgumentParser(
        prog=f"python -m services.{name}",
        description=description,
        epilog=(
            "Configuration comes from environment variables (ESPBRIDGE_KAFKA_*, ESPBRIDGE_PG_*, "
            "ESPBRIDGE_SFTP_*, ESPBRIDGE_HTTP_*, ESPBRIDGE_LOG_*); see the service's README. "
            "SIGTERM stops the service after in-flight messages are done."
        ),
    )
    parser.add_argument(
        "--print-settings", action="store_true", help="print the settings (secrets masked) and exit"
    )
    parser.add_argument(
        "--check", action="store_true", help="check the settings and that Kafka answers, then exit"
    )
    args = parser.parse_args(argv)
    try:
        settings = settings_cls()
    except ValidationError as exc:
        print(f"{name}: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    if args.print_settings:
        sys.stdout.write(orjson.dumps(settings.masked(), option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    configure(name, settings.log.level, settings.log.format)
    log.info("starting", extra={"settings": settings.masked()})
    tune_gc()
    tune_malloc()
    try:
        if args.check:
            asyncio.run(ensure_topics(settings.kafka))
            log.info("check passed")
            return 0
        asyncio.run(run_service(name, settings, create_app))
    except EspbridgeError as exc:
        log.error("fatal: %s", exc, extra={"error_class": type(exc).__name__})
        return 1
    except KeyboardInterrupt:
        return 0
    return 0
