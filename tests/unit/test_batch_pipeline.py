"""Pipelined batches (the loader's consumption): every batch is stored before offsets are
committed, and a failure rewinds the consumer exactly to what was not stored (nothing skipped,
nothing lost)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition

from shared.infra.kafka import BatchPipeline, BatchStages, Records
from shared.model.errors import UnavailableError
from shared.runtime.runtime import Runtime
from shared.runtime.settings import ServiceSettings


def records(partition: int, first: int, count: int) -> list[ConsumerRecord[bytes, bytes]]:
    return [ConsumerRecord("t", partition, first + i, 0, 0, b"k", b"v", None, 1, 1, ()) for i in range(count)]


class FakeConsumer:
    def __init__(self, batches: list[list[ConsumerRecord[bytes, bytes]]]) -> None:
        self.batches = batches
        self.seeks: dict[tuple[str, int], int] = {}

    async def getmany(self, *, timeout_ms: int, max_records: int | None) -> dict[Any, list[Any]]:
        if not self.batches:
            return {}
        fetched: dict[Any, list[Any]] = {}
        for r in self.batches.pop(0):
            fetched.setdefault(TopicPartition(r.topic, r.partition), []).append(r)
        return fetched

    def seek(self, partition: TopicPartition, offset: int) -> None:
        self.seeks[(partition.topic, partition.partition)] = offset


@dataclass
class Batch:
    """A prepared batch: the offset of its first record names it."""

    first: int


class Steps:
    """prepare/store/finish that record what happened; ``fail`` names a step and a batch's first offset."""

    def __init__(self, fail: tuple[str, int] | None = None) -> None:
        self.fail = fail
        self.committed: list[int] = []
        self.finished: list[int] = []

    async def prepare(self, batch: Records) -> Batch:
        first = batch[0].offset
        if self.fail == ("prepare", first):
            raise UnavailableError("prepare failed")
        return Batch(first)

    async def store(self, prepared: Batch) -> None:
        await asyncio.sleep(0)
        if self.fail == ("store", prepared.first):
            raise UnavailableError("PostgreSQL went away")
        self.committed.append(prepared.first)

    async def finish(self, prepared: Batch, stored: None) -> None:
        assert prepared.first in self.committed, "a batch is finished only after its commit"
        self.finished.append(prepared.first)

    def pipeline(
        self, depth: int = 8, stop_early: Callable[[], bool] = lambda: False
    ) -> BatchPipeline[Batch, None]:
        return BatchPipeline(
            BatchStages(self.prepare, self.store, self.finish),
            depth,
            max_records=100,
            wait_ms=0,
            stop_early=stop_early,
        )


def chain() -> tuple[list[ConsumerRecord[bytes, bytes]], FakeConsumer]:
    # Batch offsets: 0 (partition 0), then 10 (partitions 0 and 1), then 20 (partition 1).
    later = [records(0, 10, 3) + records(1, 10, 2), records(1, 20, 4)]
    return records(0, 0, 5), FakeConsumer(later)


async def test_batches_fetched_after_the_first_are_stored_before_returning() -> None:
    steps = Steps()
    first, consumer = chain()
    await steps.pipeline().run(first, consumer)
    assert steps.committed == steps.finished == [0, 10, 20]
    assert consumer.seeks == {}


async def test_the_chain_stops_at_its_length() -> None:
    steps = Steps()
    first, consumer = chain()
    await steps.pipeline(depth=2).run(first, consumer)
    assert steps.committed == [0, 10]
    assert len(consumer.batches) == 1  # the third batch was not fetched


async def test_without_a_consumer_the_first_batch_is_handled_alone() -> None:
    steps = Steps()
    await steps.pipeline().run(records(0, 0, 5), None)
    assert steps.committed == steps.finished == [0]


@pytest.mark.parametrize("why", ["stopping", "rebalance"])
async def test_the_chain_stops_when_the_service_stops_or_a_rebalance_waits(why: str) -> None:
    steps = Steps()
    runtime = Runtime("loader", ServiceSettings())
    if why == "stopping":
        runtime.stopping.set()
    else:
        runtime.inflight.draining = True
    first, consumer = chain()
    await steps.pipeline(stop_early=runtime.stop_early).run(first, consumer)
    assert steps.committed == [0]
    assert len(consumer.batches) == 2


@pytest.mark.parametrize("step", ["prepare", "store"])
async def test_a_later_batch_failing_rewinds_to_it_and_keeps_the_earlier_ones(step: str) -> None:
    steps = Steps(fail=(step, 10))
    first, consumer = chain()
    await steps.pipeline().run(first, consumer)  # returns: offsets up to batch 10 commit
    assert steps.finished == [0]
    # Batch 10 and everything fetched after it come again; batch 0 is not rewound.
    assert consumer.seeks == {("t", 0): 10, ("t", 1): 10}


async def test_the_first_batch_failing_goes_to_the_error_policy_with_the_rest_rewound() -> None:
    steps = Steps(fail=("store", 0))
    first, consumer = chain()
    with pytest.raises(UnavailableError):
        await steps.pipeline().run(first, consumer)
    assert steps.finished == []
    # The first batch is rewound by the error policy (nack) or dead-lettered; those fetched after it here.
    assert consumer.seeks == {("t", 0): 10, ("t", 1): 10}


async def test_a_failure_while_the_previous_batch_is_in_the_database_lets_that_batch_commit() -> None:
    steps = Steps(fail=("prepare", 20))  # batch 10 is being stored when batch 20 fails to read
    first, consumer = chain()
    await steps.pipeline().run(first, consumer)
    assert steps.finished == [0, 10]
    assert consumer.seeks == {("t", 1): 20}


async def test_cancelled_while_a_batch_is_in_the_database_rewinds_from_that_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    steps = Steps()
    first, consumer = chain()
    in_database = asyncio.Event()

    async def store(prepared: Batch) -> None:
        if prepared.first == 10:
            in_database.set()
            await asyncio.Event().wait()  # held in the database until cancelled
        steps.committed.append(prepared.first)

    monkeypatch.setattr(steps, "store", store)
    task = asyncio.ensure_future(steps.pipeline().run(first, consumer))
    await in_database.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert steps.committed == [0]
    assert consumer.seeks == {("t", 0): 10, ("t", 1): 10}
