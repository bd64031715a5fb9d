"""asyncpg connections and pools built from :class:`~shared.infra.settings.PostgresSettings`."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import Coroutine
from typing import Any, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from shared.infra.settings import PostgresSettings
from shared.model.errors import ConfigurationError, UnavailableError

Conn: TypeAlias = asyncpg.Connection | PoolConnectionProxy
"""A connection, or one borrowed from a pool: what query helpers accept."""


T = TypeVar("T")


async def outside_message_context(work: Coroutine[Any, Any, T]) -> T:
    """Run database work in an empty context, so that the pool keeps no message alive.

    asyncpg schedules timers (an idle timer of 300 s on each connection release) that keep the
    context they were created in; inside a handler that context holds the message being handled,
    which for a batch subscriber is thousands of records, kept for minutes.
    """
    return await asyncio.create_task(work, context=contextvars.Context())


def dsn_kwargs(settings: PostgresSettings) -> dict[str, Any]:
    """Keyword arguments for asyncpg (the password stays a secret until this call)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "database": settings.database,
        "user": settings.user,
        "password": settings.password.get_secret_value() if settings.password else None,
        "timeout": settings.connect_timeout_s,
    }


def _map_connect_error(settings: PostgresSettings, exc: BaseException) -> Exception:
    where = f"PostgreSQL at {settings.host}:{settings.port}/{settings.database}"
    if isinstance(exc, (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError)):
        return ConfigurationError(f"{where} refused user {settings.user!r}: {exc}")
    if isinstance(exc, asyncpg.InvalidCatalogNameError):
        return ConfigurationError(f"{where} has no database {settings.database!r}")
    return UnavailableError(f"{where} is unreachable: {exc}")


_CONNECT_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)


async def connect(settings: PostgresSettings) -> asyncpg.Connection:
    """One connection (for the migration runner and tools)."""
    try:
        return await asyncpg.connect(**dsn_kwargs(settings))
    except _CONNECT_ERRORS as exc:
        raise _map_connect_error(settings, exc) from exc


async def create_pool(settings: PostgresSettings) -> asyncpg.Pool:
    """The process's connection pool."""
    kwargs = dsn_kwargs(settings)
    try:
        pool = await asyncpg.create_pool(
            min_size=settings.pool_min_size, max_size=settings.pool_max_size, **kwargs
        )
    except _CONNECT_ERRORS as exc:
        raise _map_connect_error(settings, exc) from exc
    assert pool is not None  # create_pool returns the pool once awaited
    return pool


async def postgres_answers(settings: PostgresSettings) -> bool:
    """Whether PostgreSQL accepts a connection now (a refused login is an answer too: the server
    is there, and the work that needs it says what is wrong)."""
    try:
        conn = await connect(settings)
    except ConfigurationError:
        return True
    except UnavailableError:
        return False
    with contextlib.suppress(Exception):
        await conn.close(timeout=settings.connect_timeout_s)
    return True
