"""Fixtures of the integration and fault tests: real servers once per run (requested only by tests
that need them); unique topics, databases and folders per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from shared.infra.db import connect
from shared.infra.kafka import ensure_topics
from shared.infra.settings import KafkaSettings, PostgresSettings
from tests.fixtures.capture import Capture, connect_settings
from tests.fixtures.deployment import Deployment
from tests.fixtures.sandbox import Sandboxes
from tests.fixtures.servers import (
    REQUIRED,
    Servers,
    servers_from_env,
    start_local_servers,
    stop_local_servers,
)
from tools.scratch import create_database, delete_topics, drop_database


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
    settings = servers.kafka_for(unique)
    yield settings
    await delete_topics(settings, settings.topic_prefix)


@pytest.fixture
async def database(servers: Servers, unique: str) -> AsyncIterator[PostgresSettings]:
    """A fresh database for this test with all migrations applied; dropped afterwards."""
    settings = await create_database(servers.pg, f"test_{unique}")
    try:
        yield settings
    finally:
        await drop_database(servers.pg, settings.database, timeout_s=30)


@pytest.fixture
async def deployment(
    servers: Servers, kafka: KafkaSettings, database: PostgresSettings, unique: str, tmp_path: Path
) -> Deployment:
    """This test's topics (created) and database on the servers, with its folder and token."""
    await ensure_topics(kafka)
    return Deployment(servers, kafka, database, tmp_path, unique)


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


@pytest.fixture
async def sandbox(tmp_path: Path) -> AsyncIterator[Sandboxes]:
    """Starts sandbox ESPs for one test (see :class:`~tests.fixtures.sandbox.Sandboxes`); each must
    exit 0 at its end."""
    async with aiohttp.ClientSession() as http:
        with ExitStack() as running:
            yield Sandboxes(tmp_path, http, running)


@pytest.fixture
async def capture(servers: Servers, deployment: Deployment) -> AsyncIterator[Capture]:
    """The capture of this test's CRM (its database) onto its captured topic by the shared Kafka
    Connect worker, not yet enabled; whatever was enabled (by the test or a service it ran) is
    disabled afterwards: its connector deleted, its replication slot and publication dropped."""
    async with aiohttp.ClientSession() as http:
        found = Capture(http, connect_settings(servers.env), deployment.kafka, deployment.database)
        try:
            yield found
        finally:
            await found.disable()
