"""Publishing to the registry topics: one message, many at once, or whole record batches.

Every message goes to the topic its model belongs to, keyed as the registry says
(:mod:`shared.model.topics`); :class:`BatchPublisher` puts records on the partitions Kafka's
default partitioner would pick, so consumers see no difference.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from faststream.kafka import KafkaBroker

from shared.infra.settings import KafkaSettings
from shared.model.errors import InvalidMessageError, UnavailableError
from shared.model.messages import Message
from shared.model.topics import Topic, spec_for_model


def _headers(message: Message) -> dict[str, str]:
    return {"content-type": "application/json", "schema-version": str(message.schema_version)}


async def publish(broker: KafkaBroker, settings: KafkaSettings, message: Message) -> None:
    """Publish a message to the topic its model belongs to, keyed as the registry says."""
    spec = spec_for_model(type(message))
    await broker.publish(
        message.to_json(),
        topic=settings.topic(spec.topic),
        key=spec.key(message).encode(),
        headers=_headers(message),
    )


def record_bytes(message: Message) -> int:
    """The size the producer counts for a message as :func:`publish` sends it (key, value, headers and
    a record batch's overhead), which must stay within its ``max_request_size`` and the topic's
    ``max.message.bytes``."""
    spec = spec_for_model(type(message))
    headers: list[tuple[str, bytes | None]] = [(k, v.encode()) for k, v in _headers(message).items()]
    size: int = DefaultRecordBatchBuilder.estimate_size_in_bytes(
        spec.key(message).encode(), message.to_json(), headers
    )
    return size


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
                headers=_headers(message),
                no_confirm=True,
            )
        )
    if pending:
        await asyncio.gather(*pending)
    return len(pending)


PRODUCER_MAX_REQUEST_BYTES = 1024 * 1024
"""The producers' ``max_request_size``: aiokafka's default, which every espbridge producer keeps."""

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
