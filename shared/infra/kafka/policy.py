"""The error policy: the one place where a handler's exception becomes a retry (transient) or a
dead letter with the original bytes (permanent); handlers never catch to decide that themselves.

Also what a rebalance and a graceful stop wait for: the messages in flight between receipt and
offset commit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import ConsumerRebalanceListener
from faststream import BaseMiddleware, StreamMessage

from shared.infra.logs import log_context
from shared.infra.outages import Outages, backoff_s, unreachable_server
from shared.model.deadletters import record_letter
from shared.model.errors import StoppingError, is_transient
from shared.model.messages import DeadLetter

log = logging.getLogger(__name__)

RETRY_BACKOFF_MIN_S = 0.5
RETRY_BACKOFF_MAX_S = 30.0
MAX_ERROR_CHARS = 10_000
"""A dead letter keeps this much of the error's text: any handler's exception may end up here."""


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
                                record_letter(record, exc, service, max_message=MAX_ERROR_CHARS)
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
