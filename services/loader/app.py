"""Wiring of the loader: its pool, its batch subscriber on responses.events.v1."""

from __future__ import annotations

from typing import Any

from faststream import FastStream, StreamMessage
from faststream.kafka.annotations import KafkaMessage

from services.loader import handlers
from services.loader.settings import Settings
from shared.model.topics import Topic
from shared.runtime.runtime import Runtime, ServiceSpec

DESCRIPTION = (
    "Consumes response events (responses.events.v1) in batches, loads them into the response database "
    "idempotently (COPY, merge on event_id, per-broadcast counts, then offsets), and publishes opt-outs "
    "on subscriptions.changes.v1."
)


async def undecoded(message: StreamMessage[Any]) -> None:
    """The handler reads the batch's raw records itself: faststream's decoding (a message object
    and a JSON parse per record) would double the work per event."""
    return None


async def create_app(settings: Settings, runtime: Runtime) -> FastStream:
    """The loader's app: consumes responses.events.v1 in the espbridge-loader consumer group."""
    pool = await runtime.open_pool(settings.pg)
    loader = handlers.Loader(settings, runtime, pool)

    @runtime.subscriber(
        Topic.RESPONSE_EVENTS,
        batch=True,
        max_records=settings.batch_max,
        batch_timeout_ms=settings.batch_wait_ms,
        max_partition_fetch_bytes=settings.fetch_partition_bytes,
        decoder=undecoded,
    )
    async def on_batch(message: KafkaMessage) -> None:
        raw = message.raw_message
        # The consumer the batch came from: batches it has fetched since are loaded in the same go.
        consumer = getattr(message, "consumer", None)
        await handlers.handle_batches(raw if isinstance(raw, tuple) else (raw,), consumer, loader)

    return FastStream(runtime.broker)


SERVICE = ServiceSpec("loader", DESCRIPTION, Settings, create_app)
"""What ``python -m services.loader`` runs."""
