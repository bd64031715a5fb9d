"""Kafka helpers: the faststream broker factory, topic creation, typed publishing, error policy.

The error policy is the one place where a handler's exception becomes a retry (transient) or a
dead letter with the original bytes (permanent); handlers never catch to decide that themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar, cast

from aiokafka import AIOKafkaProducer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from faststream import BaseMiddleware, StreamMessage
from faststream.kafka import KafkaBroker
from pydantic import ValidationError

from shared.errors import InvalidMessageError, StoppingError, UnavailableError, is_transient
from shared.logs import log_context
from shared.messages import DeadLetter, EventSource, Message
from shared.outages import Outages, backoff_s, unreachable_server
from shared.settings import KafkaSettings
from shared.topics import Topic, spec_for_model

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Message)

RETRY_BACKOFF_MIN_S = 0.5
RETRY_BACKOFF_MAX_S = 30.0


def back_off_failed_metadata_updates() -> None:
    """Make every Kafka client wait its ``retry_backoff_ms`` after a metadata update that failed.

    aiokafka's producer asks for metadata again as soon as an update ends while a batch waits
    for a partition leader it does not know. With the broker down every update fails at once
    (connection refused), so a producer with records in hand spun through updates for as long as
    Kafka was down: a whole core and thousands of client log lines a second. With the wait it
    asks ten times a second, as the Java client does (``retry.backoff.ms``). Applied once, at import.
    """
    update = AIOKafkaClient._metadata_update
    if getattr(update, "backs_off", False):
        return

    async def _metadata_update(self: AIOKafkaClient, cluster_metadata: Any, topics: Any) -> bool:
        updated = bool(await update(self, cluster_metadata, topics))
        if not updated:
            await asyncio.sleep(self._retry_backoff)  # the client's retry backoff after a failure
        return updated

    _metadata_update.backs_off = True  # type: ignore[attr-defined]
    AIOKafkaClient._metadata_update = _metadata_update  # type: ignore[method-assign]


back_off_failed_metadata_updates()


def make_broker(
    settings: KafkaSettings,
    *,
    client_id: str,
    graceful_timeout_s: float = 30.0,
    middlewares: Iterable[Any] = (),
) -> KafkaBroker:
    """A faststream Kafka broker for one service process (not connected until started)."""
    return KafkaBroker(
        settings.bootstrap_servers,
        client_id=f"{settings.client_id}-{client_id}",
        graceful_timeout=graceful_timeout_s,
        middlewares=tuple(middlewares),
        acks="all",
        # Not idempotent: aiokafka's idempotent producer stops for good on OutOfOrderSequenceNumber,
        # which a broker restart can cause. A retried send may duplicate a record; every consumer
        # absorbs duplicates (event ids, the file ledger, the recorded send).
        enable_idempotence=False,
        linger_ms=5,  # lets the client batch records published in a burst
        logger=logging.getLogger(f"espbridge.kafka.{client_id}"),
    )


async def ensure_topics(settings: KafkaSettings, topics: Iterable[Topic] = tuple(Topic)) -> list[str]:
    """Create the registry topics that do not exist yet, with their configured partition counts.

    Returns the names of the topics it created. An existing topic with fewer partitions than
    configured is reported in the log, never shrunk or silently accepted as sized.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers, client_id=f"{settings.client_id}-admin"
    )
    try:
        await admin.start()
    except KafkaError as exc:
        raise UnavailableError(f"Kafka at {settings.bootstrap_servers} is unreachable: {exc}") from exc
    try:
        wanted = {settings.topic(t): settings.partitions(t) for t in topics}
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=n, replication_factor=settings.replication_factor)
            for name, n in wanted.items()
            if name not in existing
        ]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(missing)
            for name, code, *_ in cast(Any, response).topic_errors:
                if code == 0:
                    created.append(name)
                elif code != TopicAlreadyExistsError.errno:
                    raise UnavailableError(f"creating topic {name} failed with Kafka error {code}")
        present = [name for name in wanted if name in existing]
        if present:
            for meta in await admin.describe_topics(present):
                have = len(meta.get("partitions", []))
                if have < wanted[meta["topic"]]:
                    log.warning(
                        "topic has fewer partitions than configured",
                        extra={"topic": meta["topic"], "have": have, "configured": wanted[meta["topic"]]},
                    )
        if created:
            await _wait_until_visible(admin, {name: wanted[name] for name in created})
            log.info("created topics", extra={"topics": created})
        return created
    finally:
        await admin.close()


async def kafka_answers(settings: KafkaSettings, timeout_s: float = 5.0) -> bool:
    """Whether the bootstrap servers answer a metadata request now."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-probe",
        request_timeout_ms=int(timeout_s * 1000),
    )
    try:
        await admin.start()
    except (KafkaError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return True


async def _wait_until_visible(
    admin: AIOKafkaAdminClient, partitions: dict[str, int], timeout_s: float = 30.0
) -> None:
    """Wait until new topics show all their partitions with leaders (metadata lags creation)."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = await admin.describe_topics(list(partitions))
        ready = {
            meta["topic"]
            for meta in described
            if meta.get("error_code", 0) == 0
            and len(meta.get("partitions", [])) == partitions.get(meta["topic"], -1)
            and all(p.get("leader", -1) >= 0 for p in meta["partitions"])
        }
        if ready >= set(partitions):
            return
        if time.monotonic() > deadline:
            missing = sorted(set(partitions) - ready)
            raise UnavailableError(f"topics not ready after {timeout_s:.0f}s: {', '.join(missing)}")
        await asyncio.sleep(0.1)  # poll interval while the controller propagates metadata


async def publish(broker: KafkaBroker, settings: KafkaSettings, message: Message) -> None:
    """Publish a message to the topic its model belongs to, keyed as the registry says."""
    spec = spec_for_model(type(message))
    await broker.publish(
        message.to_json(),
        topic=settings.topic(spec.topic),
        key=spec.key(message).encode(),
        headers={"content-type": "application/json", "schema-version": str(message.schema_version)},
    )


async def publish_many(broker: KafkaBroker, settings: KafkaSettings, messages: Iterable[Message]) -> int:
    """Publish many messages without a round trip each, then wait for every acknowledgement."""
    pending = []
    for message in messages:
        spec = spec_for_model(type(message))
        pending.append(
            await broker.publish(
                message.to_json(),
                topic=settings.topic(spec.topic),
                key=spec.key(message).encode(),
                headers={"content-type": "application/json", "schema-version": str(message.schema_version)},
                no_confirm=True,
            )
        )
    if pending:
        await asyncio.gather(*pending)
    return len(pending)


BATCH_BYTES = 512 * 1024
"""The size of one record batch of :class:`BatchPublisher` (under the broker's 1 MB message limit)."""

HEADERS_JSON_V1 = [("content-type", b"application/json"), ("schema-version", b"1")]
"""The headers :func:`publish` gives a version-1 JSON message."""


MURMUR2_SEED = 0x9747B28C
"""The seed of Kafka's default partitioner's murmur2."""


def murmur2_python(key: bytes) -> int:
    """Kafka's murmur2 of a key (the same arithmetic as ``aiokafka.partitioner.murmur2``, with the
    key's words read in one call): what :func:`murmur2_partition` uses where the C extension is missing."""
    m = 0x5BD1E995
    length = len(key)
    h = MURMUR2_SEED ^ length
    whole = length & ~3
    for (word,) in struct.iter_unpack("<I", key[:whole]):
        k = (word * m) & 0xFFFFFFFF
        k ^= k >> 24
        k = (k * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    rest = length & 3
    if rest:
        if rest == 3:
            h ^= key[whole + 2] << 16
        if rest >= 2:
            h ^= key[whole + 1] << 8
        h ^= key[whole]
        h = (h * m) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * m) & 0xFFFFFFFF
    h ^= h >> 15
    return h


_murmur2_c: Callable[[bytes, int], int] | None = None
try:  # the standard MurmurHash2 in C, 17 times faster (the gatherer hashes every event's key)
    from murmurhash2 import murmurhash2 as _c_function

    _murmur2_c = _c_function
except ImportError:  # pragma: no cover - a platform without the wheel
    pass


def murmur2(key: bytes) -> int:
    """Kafka's murmur2 of a key, as an unsigned 32-bit number."""
    if _murmur2_c is not None:
        return int(_murmur2_c(key, MURMUR2_SEED))
    return murmur2_python(key)


def murmur2_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a key (murmur2, as the Java client and aiokafka)."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


class BatchPublisher:
    """Publishes keyed records of one topic as whole record batches, one per partition at a time.

    Records go to the partition Kafka's default partitioner picks for their key (the same as
    :func:`publish`), so consumers see no difference; only the producer's work per record is less.
    """

    def __init__(self, producer: AIOKafkaProducer, topic: str, headers: Sequence[tuple[str, bytes]]) -> None:
        self._producer = producer
        self._topic = topic
        self._headers = list(headers)

    @classmethod
    async def open(
        cls, settings: KafkaSettings, topic: Topic, *, client_id: str, headers: Sequence[tuple[str, bytes]]
    ) -> BatchPublisher:
        """A publisher with its own producer (acks from all replicas), started.

        Not idempotent, like every espbridge producer (see :func:`make_broker`): a batch sent again
        after a lost acknowledgement duplicates its events, which the loader merges away by event id.
        """
        producer = AIOKafkaProducer(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=f"{settings.client_id}-{client_id}-batches",
            acks="all",
            enable_idempotence=False,
            max_batch_size=BATCH_BYTES,
            max_request_size=2 * BATCH_BYTES,
        )
        try:
            await producer.start()
        except KafkaError as exc:
            await producer.stop()
            raise UnavailableError(f"Kafka at {settings.bootstrap_servers} is unreachable: {exc}") from exc
        return cls(producer, settings.topic(topic), headers)

    @property
    def topic(self) -> str:
        """The full topic name it publishes to."""
        return self._topic

    async def close(self) -> None:
        """Send what is queued and stop the producer."""
        await self._producer.stop()

    async def send(self, records: Iterable[tuple[bytes, bytes]]) -> list[asyncio.Future[Any]]:
        """Queue ``(key, value)`` records; returns the futures of their batches (all must succeed)."""
        partitions = sorted(await self._producer.partitions_for(self._topic))
        count = len(partitions)
        batches: dict[int, Any] = {}
        futures: list[asyncio.Future[Any]] = []
        headers = self._headers
        for key, value in records:
            partition = partitions[(murmur2(key) & 0x7FFFFFFF) % count]
            batch = batches.get(partition)
            if batch is None:
                batch = batches[partition] = self._producer.create_batch()
            if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                futures.append(await self._send(batch, partition))
                batch = batches[partition] = self._producer.create_batch()
                if batch.append(key=key, value=value, timestamp=None, headers=headers) is None:
                    raise InvalidMessageError(f"a record of {len(value)} bytes does not fit a Kafka batch")
        for partition, batch in batches.items():
            futures.append(await self._send(batch, partition))
        return futures

    async def _send(self, batch: Any, partition: int) -> asyncio.Future[Any]:
        try:
            future: asyncio.Future[Any] = await self._producer.send_batch(
                batch, self._topic, partition=partition
            )
        except KafkaError as exc:
            raise UnavailableError(f"publishing to {self._topic} failed: {exc}") from exc
        return future

    async def acknowledged(self, futures: Sequence[asyncio.Future[Any]]) -> None:
        """Wait until Kafka acknowledged every batch of :meth:`send`."""
        try:
            await asyncio.gather(*futures)
        except KafkaError as exc:
            raise UnavailableError(f"publishing to {self._topic} failed: {exc}") from exc


def decode(model: type[M], body: bytes) -> M:
    """Validate a raw message body against a model; bad bytes raise :class:`InvalidMessageError`."""
    try:
        return model.from_json(body)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(message)'}: {err['msg']}"
            for err in exc.errors()[:20]
        )
        raise InvalidMessageError(f"not a valid {model.__name__}: {problems}") from None


class InFlight:
    """Counts messages between receipt and offset commit, so a rebalance can wait for them."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False
        """A rebalance waits for the messages in flight: work that can stop early should."""

    def enter(self) -> None:
        """A message is being handled."""
        self._count += 1
        self._idle.clear()

    def leave(self) -> None:
        """A message is done: committed, handed back, or dead-lettered and committed."""
        self._count -= 1
        if self._count == 0:
            self._idle.set()

    @property
    def count(self) -> int:
        """Messages in flight now."""
        return self._count

    async def drained(self, timeout_s: float) -> bool:
        """Wait until nothing is in flight; False if the timeout passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True


class DrainOnRevoke(ConsumerRebalanceListener):
    """Before partitions are taken away, let the message in hand finish and commit.

    Without this, a message being handled during a rebalance is committed under the old
    generation (the commit fails) and handled again by the partition's new owner.
    """

    def __init__(self, inflight: InFlight, timeout_s: float) -> None:
        self._inflight = inflight
        self._timeout_s = timeout_s

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if not revoked:
            return
        self._inflight.draining = True
        try:
            if not await self._inflight.drained(self._timeout_s):
                log.warning(
                    "rebalance proceeds with a message still in flight", extra={"timeout_s": self._timeout_s}
                )
        finally:
            self._inflight.draining = False

    async def on_partitions_assigned(self, assigned: Any) -> None:
        log.info(
            "partitions assigned",
            extra={"partitions": sorted(f"{tp.topic}:{tp.partition}" for tp in assigned)},
        )


def error_policy(
    service: str,
    dead_letter: Callable[[DeadLetter], Awaitable[None]],
    inflight: InFlight,
    outages: Outages | None = None,
) -> type[BaseMiddleware]:
    """A faststream middleware that owns the outcome of every message, in one place:

    * success: commit the offset;
    * transient failure: wait with bounded backoff, then rewind to the message (it is retried);
      a server that cannot be reached (Kafka, PostgreSQL, SFTP) is named in the retry's log line,
      and its recovery is logged when a message of the subscriber goes through again;
    * the service stopping (:class:`StoppingError`): leave the offset uncommitted for the next process;
    * permanent failure: publish a DeadLetter with the original bytes, partition and offset, then
      commit, so one bad message never blocks its partition.

    Subscribers use ``AckPolicy.MANUAL`` so that the commit happens here, inside the in-flight
    window that :class:`DrainOnRevoke` and graceful shutdown wait for.
    """
    failures: dict[tuple[str, int], int] = {}  # per partition: attempts that failed in a row
    down: set[str] = set()  # servers a failed message could not reach, until a message goes through
    tracker = outages if outages is not None else Outages()

    class ErrorPolicy(BaseMiddleware):
        async def consume_scope(
            self, call_next: Callable[..., Awaitable[Any]], msg: StreamMessage[Any]
        ) -> Any:
            raw = msg.raw_message
            records = raw if isinstance(raw, tuple) else (raw,)  # batch subscribers get a tuple
            first = records[0]
            # a batch's records may span partitions, and come back starting on another one
            partitions = {(r.topic, r.partition) for r in records}
            inflight.enter()
            try:
                with log_context(topic=first.topic, partition=first.partition, offset=first.offset):
                    try:
                        result = await call_next(msg)
                    except Exception as exc:
                        if isinstance(exc, StoppingError):
                            log.info("handed back unfinished at shutdown (offset not committed)")
                            return None
                        server = unreachable_server(exc)
                        if server is not None or is_transient(exc):
                            n = max(failures.get(p, 0) for p in partitions) + 1
                            failures.update(dict.fromkeys(partitions, n))
                            delay = backoff_s(n, RETRY_BACKOFF_MIN_S, RETRY_BACKOFF_MAX_S)
                            if server is not None:
                                down.add(server)
                                tracker.failed(server, exc, delay, "the message")
                            else:
                                log.warning(
                                    "transient failure, retrying the message",
                                    extra={"error": repr(exc), "attempt": n, "retry_in_s": delay},
                                )
                            await asyncio.sleep(delay)  # bounded backoff before the redelivery
                            await msg.nack()
                            return None
                        for p in partitions:
                            failures.pop(p, None)
                        log.error(
                            "message rejected to the dead-letter topic",
                            extra={
                                "error_class": type(exc).__name__,
                                "error": str(exc)[:2000],
                                "messages": len(records),
                            },
                        )
                        for record in records:
                            await dead_letter(
                                DeadLetter(
                                    source=EventSource(
                                        kind="topic",
                                        name=record.topic,
                                        partition=record.partition,
                                        offset=record.offset,
                                    ),
                                    payload=bytes(record.value or b""),
                                    error_class=type(exc).__name__,
                                    message=str(exc)[:10_000],
                                    service=service,
                                )
                            )
                        await msg.ack()
                        return None
                    for p in partitions:
                        failures.pop(p, None)
                    await msg.ack()
                    # Any message of this subscriber going through (its records may start on another
                    # partition than the failed one's) used the servers it could not reach before.
                    while down:
                        tracker.reachable(down.pop())
                    return result
            finally:
                inflight.leave()

    return ErrorPolicy
