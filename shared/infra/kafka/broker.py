"""The faststream broker of a service process, and a fix to the Kafka client's metadata retries.

:func:`back_off_failed_metadata_updates` changes aiokafka's client class; nothing applies it at
import: the service runtime and the CLI call it once when they start.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

from aiokafka.client import AIOKafkaClient
from faststream.kafka import KafkaBroker

from shared.infra.settings import KafkaSettings


def back_off_failed_metadata_updates() -> None:
    """Make every Kafka client wait its ``retry_backoff_ms`` after a metadata update that failed.

    aiokafka's producer asks for metadata again as soon as an update ends while a batch waits
    for a partition leader it does not know. With the broker down every update fails at once
    (connection refused), so a producer with records in hand spun through updates for as long as
    Kafka was down: a whole core and thousands of client log lines a second. With the wait it
    asks ten times a second, as the Java client does (``retry.backoff.ms``). Applied once, by the runtime
    and the CLI as they start (idempotent).
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
