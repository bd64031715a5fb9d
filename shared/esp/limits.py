"""ESP rate limits for a whole deployment: however many processes call an account, together they keep
to its calls per second.

The rule is the kit's :class:`~shared.esp.rest.RateLimiter`: at most ``calls`` calls in any
``per_s`` seconds, a call holding its slot from its start until ``per_s`` after its end. A process
with a database keeps the account's slots in PostgreSQL (:class:`SharedRateLimiter`, the table
control.esp_rate_slots), so every uploader, monitor and gatherer draws on the same ones; a process
without a database (the CLI's) keeps them in memory. Connectors ask :func:`rate_limiter` for their
account's limiter and give it to their :class:`~shared.esp.rest.EspClient`.

Taking a slot is one statement and giving it back another; an empty account is waited for the
time PostgreSQL computes. When PostgreSQL cannot be reached the call is not made: it fails as
:class:`~shared.model.errors.UnavailableError` and is retried like all work that needs PostgreSQL
(docs/connectors/README.md says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import asyncpg

from shared.esp.accounts import AccountConfig
from shared.esp.base import ConnectorContext
from shared.esp.rest import Limiter, RateLimiter
from shared.infra.db import create_pool
from shared.infra.db.core import Conn
from shared.infra.db.rate_slots import Attempt, add_slots, end_slot, take_slot
from shared.infra.outages import POSTGRES, unreachable_server
from shared.infra.settings import PostgresSettings
from shared.model.errors import UnavailableError

log = logging.getLogger(__name__)

T = TypeVar("T")

POOL_SIZE = 4
"""Connections of a process's limiters: their own pool, so a call never waits for a connection
held by the work that makes it."""
STATEMENT_TIMEOUT_S = 5.0
"""Taking or giving back a slot (and getting a connection for it) at most; longer is an outage."""
LEASE_MARGIN_S = 5.0
"""A slot's lease is the request timeout, ``per_s`` and this: it ends only after the call surely has."""
CONTENDED_S = 0.01
"""The pause before trying again when a free slot went to another process in the same instant."""


def wait_s(attempt: Attempt, per_s: float) -> float:
    """How long to wait after an attempt that found no free slot.

    Until the first slot is free; when every slot is held by a running call, no longer than
    ``per_s``: a call ending now frees its slot then, and nothing tells this process earlier.
    """
    first = attempt.first_free_s if attempt.first_free_s is not None else per_s
    wait = first if attempt.cooling_s is not None else min(first, per_s)
    return max(wait, CONTENDED_S)


class SharedRateLimiter:
    """At most ``calls`` calls in any ``per_s`` seconds to one account, from every process sharing
    the database (see the module docstring).

    In this process, calls wait for their turn in order and only the first asks PostgreSQL; across
    processes, the first to ask when a slot is free gets it.
    """

    def __init__(
        self, pool: asyncpg.Pool, account: AccountConfig, calls: int, per_s: float, lease_s: float
    ) -> None:
        if calls < 1 or per_s <= 0:
            raise ValueError("a rate limit needs calls >= 1 and per_s > 0")
        self.account = account
        self.calls = calls
        self.per_s = per_s
        self.lease_s = lease_s
        self._pool = pool
        self._turns = asyncio.Lock()  # FIFO: this process's calls queue here, the first one asks
        self._ended = asyncio.Event()  # replaced each time one of this process's calls ends

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a free slot, hold it while the block runs, and for ``per_s`` after it."""
        lease = uuid.uuid4()
        async with self._turns:
            slot = await self._take(lease)
        try:
            yield
        finally:
            await self._end(slot, lease)

    async def _take(self, lease: uuid.UUID) -> int:
        esp, account = self.account.esp, self.account.account
        while True:
            attempt = await self._in_postgres(
                lambda conn: take_slot(
                    conn, esp, account, self.calls, lease, self.lease_s, STATEMENT_TIMEOUT_S
                )
            )
            if attempt.slot is not None:
                return attempt.slot
            if attempt.slots < self.calls:
                await self._in_postgres(lambda conn: add_slots(conn, esp, account, self.calls))
                continue
            ended = self._ended
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ended.wait(), wait_s(attempt, self.per_s))

    async def _end(self, slot: int, lease: uuid.UUID) -> None:
        esp, account = self.account.esp, self.account.account
        try:
            await self._in_postgres(
                lambda conn: end_slot(conn, esp, account, slot, lease, self.per_s, STATEMENT_TIMEOUT_S)
            )
        except UnavailableError as exc:
            # the call itself is done: its slot stays taken until its lease ends, which is safe
            log.warning(
                "ESP rate limit slot not given back; it is free again when its lease ends",
                extra={"account": self.account.name, "lease_s": self.lease_s, "error": str(exc)},
            )
        finally:
            self._ended.set()
            self._ended = asyncio.Event()

    async def _in_postgres(self, work: Callable[[Conn], Awaitable[T]]) -> T:
        """``work`` on a connection of the limiters' pool; an outage is an UnavailableError."""
        try:
            async with self._pool.acquire(timeout=STATEMENT_TIMEOUT_S) as conn:
                return await work(conn)
        except Exception as exc:
            if unreachable_server(exc) != POSTGRES and not isinstance(exc, TimeoutError):
                raise
            raise UnavailableError(
                f"the rate limit of ESP account {self.account.name} is kept in PostgreSQL, "
                f"which cannot be reached: {type(exc).__name__}: {exc}"
            ) from exc


class RateLimits:
    """A process's rate limiters, one per account and rate: shared through ``pool``, else in memory."""

    def __init__(self, pool: asyncpg.Pool | None = None) -> None:
        self.pool = pool
        self._made: dict[tuple[str, str, int, float], Limiter] = {}

    @classmethod
    async def open(cls, stack: contextlib.AsyncExitStack, database: PostgresSettings | None) -> RateLimits:
        """Limiters shared through ``database`` (None: in memory). Their pool, closed with ``stack``,
        connects only when a limited call is made, so opening needs no server."""
        if database is None:
            return cls()
        pool = await create_pool(database.model_copy(update={"pool_min_size": 0, "pool_max_size": POOL_SIZE}))
        stack.push_async_callback(pool.close)
        return cls(pool)

    def limiter(self, account: AccountConfig, calls: int, per_s: float) -> Limiter:
        """The account's limiter of ``calls`` calls in any ``per_s`` seconds."""
        key = (account.esp, account.account, calls, per_s)
        if key not in self._made:
            lease_s = account.request_timeout_s + per_s + LEASE_MARGIN_S
            self._made[key] = (
                RateLimiter(calls, per_s)
                if self.pool is None
                else SharedRateLimiter(self.pool, account, calls, per_s, lease_s)
            )
        return self._made[key]


def rate_limiter(context: ConnectorContext, account: AccountConfig, calls: int, per_s: float) -> Limiter:
    """A connector's limiter for its account: from the context's :class:`RateLimits` (shared by every
    process when the process has a database), else one of its own in memory."""
    if context.rates is None:
        return RateLimiter(calls, per_s)
    return context.rates.limiter(account, calls, per_s)
