"""Fixtures of the integration and fault tests: real servers once per run (requested only by tests
that need them); unique topics, databases and folders per test."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from shared.infra.db import connect, migrate, quote_ident
from shared.infra.settings import KafkaSettings, PostgresSettings
from tests.fixtures.servers import (
    REQUIRED,
    Servers,
    servers_from_env,
    start_local_servers,
    stop_local_servers,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if "tests/integration" in path or "tests/faults" in path:
            item.add_marker(pytest.mark.integration)
        if "tests/faults" in path:
            item.add_marker(pytest.mark.faults)


@pytest.fixture(scope="session")
def servers() -> Iterator[Servers]:
    if all(os.environ.get(k) for k in REQUIRED):
        yield servers_from_env(os.environ)
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):
        pytest.fail(
            "parallel test workers share servers started before them: run `make test` "
            "(tests/with-servers.sh) or set the ESPBRIDGE_* server variables"
        )
    found = start_local_servers()
    try:
        yield found
    finally:
        if found.started_here:
            stop_local_servers()


@pytest.fixture
def unique() -> str:
    """A short unique token for this test's names."""
    return uuid.uuid4().hex[:10]


@pytest.fixture
async def kafka(servers: Servers, unique: str) -> AsyncIterator[KafkaSettings]:
    """Kafka settings whose topics and groups belong to this test alone (topics deleted after)."""
    settings = servers.kafka.model_copy(
        update={"topic_prefix": f"t{unique}.", "partitions_responses": 6, "partitions_default": 3}
    )
    yield settings
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        mine = [t for t in await admin.list_topics() if t.startswith(settings.topic_prefix)]
        if mine:
            await admin.delete_topics(mine)
    finally:
        await admin.close()


@pytest.fixture
async def database(servers: Servers, unique: str) -> AsyncIterator[PostgresSettings]:
    """A fresh database for this test with all migrations applied; dropped afterwards."""
    name = f"test_{unique}"
    admin = await connect(servers.pg)
    try:
        await admin.execute(f"CREATE DATABASE {quote_ident(name)}")
    finally:
        await admin.close()
    settings = servers.pg.with_database(name)
    conn = await connect(settings)
    try:
        await migrate(conn)
    finally:
        await conn.close()
    try:
        yield settings
    finally:
        admin = await connect(servers.pg)
        try:
            await drop_database(admin, name)
        finally:
            await admin.close()


async def drop_database(admin: asyncpg.Connection, name: str, timeout_s: float = 30.0) -> None:
    """Drop a test database, its sessions ended. A background process of the server (autovacuum)
    cannot be ended by a non-superuser, so the drop is tried again until it has left."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)")
            return
        except (asyncpg.InsufficientPrivilegeError, asyncpg.ObjectInUseError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.2)  # the server's own worker leaves by itself; nothing to wait on


@pytest.fixture
async def db(database: PostgresSettings) -> AsyncIterator[asyncpg.Connection]:
    conn = await connect(database)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def sftp_folder(servers: Servers, unique: str) -> tuple[str, Path]:
    """A folder on the SFTP site for this test: (remote path, the same folder on local disk)."""
    remote = f"tests/{unique}"
    local = servers.sftp_local_root / remote
    local.mkdir(parents=True)
    return remote, local
