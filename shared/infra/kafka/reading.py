"""Reading a topic from its beginning up to now, outside any consumer group (the CLI's view)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError

from shared.infra.settings import KafkaSettings
from shared.model.errors import UnavailableError
from shared.model.topics import Topic

READ_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class Record:
    """One record of a topic."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes


async def _started(consumer: AIOKafkaConsumer, kafka: KafkaSettings) -> None:
    try:
        await consumer.start()
    except KafkaError as exc:
        await consumer.stop()
        raise UnavailableError(f"Kafka at {kafka.bootstrap_servers} is unreachable: {exc}") from exc


async def read_topic(kafka: KafkaSettings, topic: Topic, *, key: bytes | None = None) -> list[Record]:
    """Every record of a registry topic written before the call (only those with ``key`` if given),
    in partition order; [] when the topic does not exist yet. Raises UnavailableError when the
    records cannot be read within :data:`READ_TIMEOUT_S`."""
    name = kafka.topic(topic)
    probe = AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap_servers, group_id=None)
    await _started(probe, kafka)
    try:
        # A consumer of a topic that does not exist waits for it: nothing was ever written there.
        if name not in await probe.topics():
            return []
    finally:
        await probe.stop()
    consumer = AIOKafkaConsumer(
        name,
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await _started(consumer, kafka)
    out: list[Record] = []
    try:
        parts = list(consumer.assignment())  # without a group, every partition of the topic
        ends = await consumer.end_offsets(parts)
        pending = {tp for tp in parts if ends[tp] > 0}
        deadline = time.monotonic() + READ_TIMEOUT_S
        while pending:
            if time.monotonic() > deadline:
                raise UnavailableError(f"reading {name} took over {READ_TIMEOUT_S:.0f}s")
            batch = await consumer.getmany(timeout_ms=500)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    if key is None or record.key == key:
                        out.append(
                            Record(record.partition, record.offset, record.key, bytes(record.value or b""))
                        )
                    if record.offset + 1 >= ends[tp]:
                        pending.discard(tp)
    finally:
        await consumer.stop()
    return out
