"""The per-process objects a service's handlers use: broker, publishing, metrics, pools, stopping.

All resources (broker, HTTP server, pools) are opened on one ``AsyncExitStack`` (:attr:`Runtime.stack`)
and closed in reverse when the service stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import asyncpg
from faststream import AckPolicy, FastStream
from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage

from shared.infra.db import create_pool, postgres_answers
from shared.infra.health import HealthServer, Metrics
from shared.infra.kafka import (
    BatchPipeline,
    BatchStages,
    DrainOnRevoke,
    InFlight,
    error_policy,
    make_broker,
    publish,
    publish_many,
    undecoded,
)
from shared.infra.outages import Outages
from shared.infra.settings import PostgresSettings
from shared.model.errors import StoppingError
from shared.model.messages import DeadLetter, Message
from shared.model.topics import Topic
from shared.runtime.failpoints import Failpoints
from shared.runtime.settings import ServiceSettings
from shared.runtime.watches import PostgresWatch, ServerWatch

log = logging.getLogger(__name__)

Handler = Callable[..., Awaitable[None]]
P = TypeVar("P")
S = TypeVar("S")


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
        self._background: list[tuple[str, Callable[[], Coroutine[Any, Any, None]]]] = []
        self._running: list[asyncio.Task[None]] = []
        self.stack = contextlib.AsyncExitStack()
        self.http = HealthServer(settings.http, self.metrics, lambda: self.ready)
        self.broker: KafkaBroker = make_broker(
            settings.kafka,
            client_id=name,
            graceful_timeout_s=settings.shutdown_timeout_s,
            middlewares=[error_policy(name, self.dead_letter, self.inflight, self.outages)],
        )

    def subscriber(self, *topics: Topic, **options: Any) -> Callable[[Handler], Any]:
        """A subscriber on registry topics (one consumer for them all) in this service's consumer group.

        Offsets are committed by the error policy after the handler finished; a transient failure
        rewinds to the message (retry), a permanent one is dead-lettered and committed. Before a
        rebalance takes partitions away, the message in hand finishes and commits.
        """
        subscriber: Callable[[Handler], Any] = self.broker.subscriber(
            *(self.settings.kafka.topic(topic) for topic in topics),
            group_id=options.pop("group_id", None) or self.settings.group_id(self.name),
            ack_policy=AckPolicy.MANUAL,
            listener=DrainOnRevoke(self.inflight, self.settings.shutdown_timeout_s),
            auto_offset_reset="earliest",
            session_timeout_ms=self.settings.kafka.session_timeout_ms,
            heartbeat_interval_ms=self.settings.kafka.session_timeout_ms // 3,
            **options,
        )
        return subscriber

    def batch_subscriber(
        self,
        topic: Topic,
        stages: BatchStages[P, S],
        *,
        depth: int,
        max_records: int,
        wait_ms: int,
        **options: Any,
    ) -> None:
        """A subscriber on a registry topic that hands its batches to ``stages`` in pipelined goes
        of up to ``depth`` batches (:mod:`shared.infra.kafka.batches`): offsets are committed after
        every batch of a go is stored; a go ends early when the service stops or a rebalance waits.
        """
        pipeline = BatchPipeline(stages, depth, max_records, wait_ms, self.stop_early)

        @self.subscriber(
            topic, batch=True, max_records=max_records, batch_timeout_ms=wait_ms, decoder=undecoded, **options
        )
        async def on_batch(message: KafkaMessage) -> None:
            await pipeline.consume(message)

    def stop_early(self) -> bool:
        """Whether work of many steps should end after the one in hand: the service stops, or a
        rebalance waits for the messages in flight."""
        return self.stopping.is_set() or self.inflight.draining

    def run_in_background(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work()`` beside the subscribers from the moment the service is ready.

        It must return soon after :attr:`stopping` is set (SIGTERM): the stop waits for it, up to
        the shutdown grace, before the consumers and the broker stop, and cancels it after that.
        """
        self._background.append((name, work))

    def start_background(self) -> None:
        """Start the work given to :meth:`run_in_background` (the service is ready)."""
        for name, work in self._background:
            task = asyncio.create_task(work(), name=name)
            task.add_done_callback(_log_failure)
            self._running.append(task)

    async def stop_background(self) -> None:
        """Wait for the background work to return (:attr:`stopping` is set), cancelling what is
        still running when the shutdown grace is over."""
        if not self._running:
            return
        _, late = await asyncio.wait(self._running, timeout=self.settings.shutdown_timeout_s)
        for task in late:
            log.warning(
                "background work cut off at the end of the shutdown grace", extra={"work": task.get_name()}
            )
            task.cancel()
        await asyncio.gather(*late, return_exceptions=True)
        self._running.clear()

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


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error(
            "background work ended with an error", extra={"work": task.get_name()}, exc_info=task.exception()
        )


class AppFactory(Protocol):
    """``create_app(settings, runtime)`` of a service: opens its resources on ``runtime.stack``
    (closed in reverse at shutdown), wires subscribers, returns the app."""

    def __call__(self, settings: Any, runtime: Runtime, /) -> Awaitable[FastStream]: ...


@dataclass(frozen=True, slots=True)
class ServiceSpec:
    """What the runtime needs to run a service: its name, what it does, its settings and its app."""

    name: str
    description: str
    """For ``--help``: what the service consumes, does and publishes."""
    settings: type[ServiceSettings]
    create_app: AppFactory
