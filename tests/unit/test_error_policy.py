"""The error policy: a permanent failure's dead letters, and the log lines about an unreachable
server and its recovery."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
from aiokafka.client import AIOKafkaClient

from shared.infra.kafka import back_off_failed_metadata_updates
from shared.infra.kafka import policy as policies
from shared.infra.outages import Outages
from shared.model.errors import InvalidMessageError
from shared.model.messages import DeadLetter
from tests.fixtures.servers import ROOT


@dataclass
class Record:
    topic: str
    partition: int
    offset: int
    value: bytes = b"{}"


@dataclass
class Message:
    """What the policy reads from faststream's message: the raw records, ack and nack."""

    raw_message: tuple[Record, ...]
    outcome: list[str] = field(default_factory=list)

    async def ack(self) -> None:
        self.outcome.append("ack")

    async def nack(self) -> None:
        self.outcome.append("nack")


async def _dead_letter(_: Any) -> None:
    raise AssertionError("nothing is dead-lettered here")


async def test_a_permanent_failure_dead_letters_every_record_with_its_bytes_then_commits() -> None:
    letters: list[DeadLetter] = []

    async def dead_letter(letter: DeadLetter) -> None:
        letters.append(letter)

    policy: Any = policies.error_policy("loader", dead_letter, policies.InFlight())(None, context=None)  # type: ignore[arg-type]

    async def refused(_: Any) -> None:
        raise InvalidMessageError("not a valid ResponseEvent: " + "x" * 20_000)

    batch = Message((Record("responses.events", 0, 10, b"{bad"), Record("responses.events", 1, 7, b"[]")))
    assert await policy.consume_scope(refused, batch) is None
    assert batch.outcome == ["ack"]  # committed: one bad message never blocks its partition
    assert [(d.source.partition, d.source.offset, d.payload) for d in letters] == [
        (0, 10, b"{bad"),
        (1, 7, b"[]"),
    ]
    assert {(d.source.kind, d.source.name, d.error_class, d.service) for d in letters} == {
        ("topic", "responses.events", "InvalidMessageError", "loader")
    }
    assert all(len(d.message) == policies.MAX_ERROR_CHARS for d in letters)


async def test_recovery_is_logged_when_a_message_of_another_partition_goes_through(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(policies, "RETRY_BACKOFF_MIN_S", 0.001)
    policy_class = policies.error_policy("loader", _dead_letter, policies.InFlight(), Outages())
    policy: Any = policy_class(None, context=None)  # type: ignore[arg-type]  # faststream gives both

    async def database_down(_: Any) -> None:
        raise asyncpg.CannotConnectNowError("the database system is starting up")

    async def loaded(_: Any) -> str:
        return "loaded"

    caplog.set_level(logging.WARNING, logger="shared.infra.outages")
    failed = Message((Record("responses.events", 0, 10), Record("responses.events", 1, 7)))
    await policy.consume_scope(database_down, failed)
    assert failed.outcome == ["nack"]
    assert [r.getMessage() for r in caplog.records] == ["PostgreSQL unreachable, retrying in 0.001 s"]

    # Redelivered starting on partition 1, they fail again: the backoff grows all the same.
    failed_again = Message((Record("responses.events", 1, 7), Record("responses.events", 0, 10)))
    await policy.consume_scope(database_down, failed_again)
    assert caplog.records[-1].getMessage() == "PostgreSQL unreachable, retrying in 0.002 s"
    caplog.clear()

    # A message of another partition goes through first: the server answered.
    again = Message((Record("responses.events", 2, 3),))
    assert await policy.consume_scope(loaded, again) == "loaded"
    assert again.outcome == ["ack"]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1
    assert lines[0].startswith("PostgreSQL reachable again after")

    # Once only: the next message says nothing more.
    await policy.consume_scope(loaded, Message((Record("responses.events", 0, 20),)))
    assert len(caplog.records) == 1


async def test_a_failed_metadata_update_waits_the_retry_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """With Kafka down, a producer holding records asks for metadata again at once after each failed
    update; the wait after a failure is what keeps it from spinning a core through the outage."""
    waits: list[float] = []
    sleep = asyncio.sleep

    async def recorded(delay: float, result: Any = None) -> Any:
        waits.append(delay)
        return await sleep(0, result)

    back_off_failed_metadata_updates()  # as the runtime and the CLI do when they start
    client = AIOKafkaClient(bootstrap_servers="127.0.0.1:9", retry_backoff_ms=250)  # nothing listens
    monkeypatch.setattr(asyncio, "sleep", recorded)
    try:
        assert await client._metadata_update(client.cluster, []) is False
    finally:
        monkeypatch.undo()
        await client.close()
    assert waits == [0.25]


def test_importing_the_library_changes_no_client_class() -> None:
    """The metadata back-off is applied by whoever starts (the runtime, the CLI), never by an import."""
    probe = (
        "import aiokafka.client, shared.infra.kafka, shared.runtime.main, cli.main; "
        "print(getattr(aiokafka.client.AIOKafkaClient._metadata_update, 'backs_off', False))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert result.stdout.strip() == "False"
