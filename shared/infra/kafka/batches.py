"""A batch subscriber's pipeline: the batches a consumer has already fetched are handled in one go,
each one's store (a database transaction) overlapping the preparing of the next.

A handler supplies three stages (:class:`BatchStages`): *prepare* reads a batch's records,
*store* commits it (the transaction), *finish* does what follows the commit (statuses, metrics).
The pipeline guarantees, for the error policy that commits the offsets once it returns:

* it returns only once every batch of the go is stored and finished, so offsets are committed
  only after the database commit;
* a go is at most ``depth`` batches, and ends early when the service stops or a rebalance waits
  (what is stored is then committed before partitions move);
* if a later batch fails, the earlier ones stay stored, the consumer is rewound to the failed
  batch's records (and everything fetched after them), and it returns normally: offsets are
  committed up to the failed batch, which comes again as a batch of its own under the error
  policy. If the first batch fails, the batches after it are rewound and the error goes to the
  error policy as for a single batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from aiokafka.structs import ConsumerRecord, TopicPartition
from faststream import StreamMessage

log = logging.getLogger(__name__)

Records = Sequence[ConsumerRecord[bytes, bytes]]
"""One batch: the raw records of a fetch, possibly of several partitions."""

Offsets = dict[tuple[str, int], int]
"""The earliest offset per (topic, partition) of a batch."""

P = TypeVar("P")
"""A batch prepared for the database."""
S = TypeVar("S")
"""What storing a batch returned."""


@dataclass(frozen=True, slots=True)
class BatchStages(Generic[P, S]):
    """What a handler does with each batch."""

    prepare: Callable[[Records], Awaitable[P | None]]
    """Read the records (dead-lettering bad ones); None when nothing is left to store."""
    store: Callable[[P], Awaitable[S]]
    """Commit the batch (one transaction); runs while the next batch is prepared."""
    finish: Callable[[P, S], Awaitable[None]]
    """What follows the batch's commit: statuses, metrics, the log line."""


class Fetcher(Protocol):
    """What the pipeline needs of the Kafka consumer a batch came from."""

    async def getmany(self, *, timeout_ms: int, max_records: int | None) -> dict[Any, list[Any]]: ...

    def seek(self, partition: Any, offset: int) -> None: ...


async def undecoded(message: StreamMessage[Any]) -> None:
    """The decoder of a batch subscriber: its stages read the raw records themselves, as faststream's
    decoding (a message object and a JSON parse per record) would double the work per record."""
    return None


@dataclass(frozen=True, slots=True)
class _Stored(Generic[P, S]):
    """A batch committed to the database, not finished yet."""

    index: int
    """Its place in the go (0: the batch the subscriber was handed)."""
    batch: P
    result: S


@dataclass(frozen=True, slots=True)
class _InDatabase(Generic[P, S]):
    """A batch whose store runs."""

    index: int
    batch: P
    store: asyncio.Future[S]

    async def stored(self) -> _Stored[P, S]:
        """Wait for its commit."""
        return _Stored(self.index, self.batch, await self.store)


@dataclass(frozen=True, slots=True)
class BatchPipeline(Generic[P, S]):
    """Handles a batch subscriber's batches in goes (see the module's docstring)."""

    stages: BatchStages[P, S]
    depth: int
    """Batches in one go at most (1: one batch at a time)."""
    max_records: int
    """Records per batch fetched after the first."""
    wait_ms: int
    """How long a fetch may wait to fill a batch while the previous one is in the database."""
    stop_early: Callable[[], bool]
    """Whether the go should end after the batch in hand: the service stops, or a rebalance waits."""

    async def consume(self, message: StreamMessage[Any]) -> None:
        """The subscriber's handler: the message's records, and the consumer that fetched them."""
        raw = message.raw_message
        await self.run(raw if isinstance(raw, tuple) else (raw,), getattr(message, "consumer", None))

    async def run(self, first: Records, consumer: Fetcher | None) -> None:
        """Handle ``first`` and the batches ``consumer`` has fetched after it, up to ``depth``;
        without a consumer, ``first`` alone."""
        earliest: list[Offsets] = []  # per batch of the go
        done = 0  # batches before this index are stored and finished
        in_database: _InDatabase[P, S] | None = None
        records = first
        try:
            while True:
                index = len(earliest)
                earliest.append(_earliest(records))
                batch = await self.stages.prepare(records)
                previous, in_database = in_database, None
                committed = await previous.stored() if previous is not None else None
                if batch is not None:  # into the database while the previous one is finished
                    in_database = _InDatabase(index, batch, asyncio.ensure_future(self.stages.store(batch)))
                    await asyncio.sleep(0)
                if committed is not None:
                    await self.stages.finish(committed.batch, committed.result)
                    done = committed.index + 1
                if batch is None:
                    done = index + 1
                if consumer is None or len(earliest) >= self.depth or self.stop_early():
                    break
                # Waiting for the next fetch costs nothing while the database works on this batch.
                wait_ms = self.wait_ms if in_database is not None else 0
                fetched = await consumer.getmany(timeout_ms=wait_ms, max_records=self.max_records)
                records = [r for rs in fetched.values() for r in rs]
                if not records:
                    break
            if in_database is not None:
                committed = await in_database.stored()
                await self.stages.finish(committed.batch, committed.result)
                done = committed.index + 1
                in_database = None
        except BaseException as exc:
            if in_database is not None:
                if isinstance(exc, Exception):  # the batch in the database may still commit
                    with contextlib.suppress(Exception):
                        committed = await in_database.stored()
                        if done == committed.index:
                            await self.stages.finish(committed.batch, committed.result)
                            done = committed.index + 1
                else:
                    in_database.store.cancel()
                    with contextlib.suppress(BaseException):
                        await in_database.store
            # The first batch is the error policy's to rewind (or dead-letter); the rest not done are ours.
            if consumer is not None and len(earliest) > max(done, 1):
                _rewind(consumer, earliest[max(done, 1) :])
            if done == 0 or not isinstance(exc, Exception):
                raise
            log.warning(
                "a batch failed after earlier ones were loaded: it comes again on its own",
                extra={"error": repr(exc), "batches_loaded": done},
            )


def _earliest(records: Records) -> Offsets:
    """The earliest offset of a batch's records per partition."""
    earliest: Offsets = {}
    for r in records:
        where = (r.topic, r.partition)
        if where not in earliest or r.offset < earliest[where]:
            earliest[where] = r.offset
    return earliest


def _rewind(consumer: Fetcher, batches: Sequence[Offsets]) -> None:
    """Seek each partition back to its earliest record among ``batches``."""
    earliest: Offsets = {}
    for batch in batches:
        for where, offset in batch.items():
            if where not in earliest or offset < earliest[where]:
                earliest[where] = offset
    for (topic, partition), offset in earliest.items():
        consumer.seek(TopicPartition(topic, partition), offset)
