"""Kafka's admin side: creating the registry topics, checking them, asking whether Kafka answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError

from shared.infra.settings import KafkaSettings
from shared.model.errors import UnavailableError
from shared.model.topics import Topic

log = logging.getLogger(__name__)


def _admin(settings: KafkaSettings, role: str, timeout_s: float | None = None) -> AIOKafkaAdminClient:
    if timeout_s is None:
        return AIOKafkaAdminClient(
            bootstrap_servers=settings.bootstrap_servers, client_id=f"{settings.client_id}-{role}"
        )
    return AIOKafkaAdminClient(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"{settings.client_id}-{role}",
        request_timeout_ms=int(timeout_s * 1000),
    )


async def _started(admin: AIOKafkaAdminClient, settings: KafkaSettings) -> None:
    try:
        await admin.start()
    except (KafkaError, OSError) as exc:
        with contextlib.suppress(Exception):
            await admin.close()
        raise UnavailableError(f"Kafka at {settings.bootstrap_servers} is unreachable: {exc}") from exc


@dataclass(frozen=True, slots=True)
class TopicReport:
    """A registry topic as the cluster has it."""

    name: str
    configured: int
    """The partitions the settings ask for."""
    partitions: int | None
    """The partitions it has; None when it does not exist."""

    @property
    def problem(self) -> str | None:
        """What is not as configured, or None."""
        if self.partitions is None:
            return "missing (a service creates it when it starts)"
        if self.partitions < self.configured:
            return f"{self.partitions} partitions, fewer than the {self.configured} configured"
        return None


async def check_topics(
    settings: KafkaSettings, topics: Iterable[Topic] = tuple(Topic), timeout_s: float = 10.0
) -> list[TopicReport]:
    """Each registry topic as it is on the cluster; reads only, creates nothing."""
    admin = _admin(settings, "check", timeout_s)
    await _started(admin, settings)
    try:
        wanted = {settings.topic(t): settings.partitions(t) for t in topics}
        existing = set(await admin.list_topics())
        present = [name for name in wanted if name in existing]
        have = {
            meta["topic"]: len(meta.get("partitions", []))
            for meta in (await admin.describe_topics(present) if present else [])
        }
        return [TopicReport(name, n, have.get(name)) for name, n in wanted.items()]
    finally:
        await admin.close()


async def ensure_topics(settings: KafkaSettings, topics: Iterable[Topic] = tuple(Topic)) -> list[str]:
    """Create the registry topics that do not exist yet, with their configured partition counts.

    Returns the names of the topics it created. An existing topic with fewer partitions than
    configured is reported in the log, never shrunk or silently accepted as sized.
    """
    admin = _admin(settings, "admin")
    await _started(admin, settings)
    try:
        wanted = {settings.topic(t): settings.partitions(t) for t in topics}
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(name, num_partitions=n, replication_factor=settings.replication_factor)
            for name, n in wanted.items()
            if name not in existing
        ]
        created: list[str] = []
        if missing:
            response = await admin.create_topics(missing)
            for name, code, *_ in cast(Any, response).topic_errors:
                if code == 0:
                    created.append(name)
                elif code != TopicAlreadyExistsError.errno:
                    raise UnavailableError(f"creating topic {name} failed with Kafka error {code}")
        present = [name for name in wanted if name in existing]
        if present:
            for meta in await admin.describe_topics(present):
                have = len(meta.get("partitions", []))
                if have < wanted[meta["topic"]]:
                    log.warning(
                        "topic has fewer partitions than configured",
                        extra={"topic": meta["topic"], "have": have, "configured": wanted[meta["topic"]]},
                    )
        if created:
            await _wait_until_visible(admin, {name: wanted[name] for name in created})
            log.info("created topics", extra={"topics": created})
        return created
    finally:
        await admin.close()


async def max_message_bytes(settings: KafkaSettings, topic: Topic, timeout_s: float = 10.0) -> int | None:
    """The largest record batch the topic takes (its ``max.message.bytes``, the broker's default
    unless set); None when the topic does not exist yet."""
    admin = _admin(settings, "check", timeout_s)
    await _started(admin, settings)
    try:
        name = settings.topic(topic)
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, name, {"max.message.bytes": None})]
        )
    finally:
        await admin.close()
    for resource in cast(Any, response).to_object()["resources"]:
        for entry in resource["config_entries"]:
            if resource["error_code"] == 0 and entry["config_names"] == "max.message.bytes":
                return int(entry["config_value"])
    return None


async def kafka_answers(settings: KafkaSettings, timeout_s: float = 5.0) -> bool:
    """Whether the bootstrap servers answer a metadata request now."""
    admin = _admin(settings, "probe", timeout_s)
    try:
        await admin.start()
    except (KafkaError, OSError):
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return True


async def _wait_until_visible(
    admin: AIOKafkaAdminClient, partitions: dict[str, int], timeout_s: float = 30.0
) -> None:
    """Wait until new topics show all their partitions with leaders (metadata lags creation)."""
    deadline = time.monotonic() + timeout_s
    while True:
        described = await admin.describe_topics(list(partitions))
        ready = {
            meta["topic"]
            for meta in described
            if meta.get("error_code", 0) == 0
            and len(meta.get("partitions", [])) == partitions.get(meta["topic"], -1)
            and all(p.get("leader", -1) >= 0 for p in meta["partitions"])
        }
        if ready >= set(partitions):
            return
        if time.monotonic() > deadline:
            missing = sorted(set(partitions) - ready)
            raise UnavailableError(f"topics not ready after {timeout_s:.0f}s: {', '.join(missing)}")
        await asyncio.sleep(0.1)  # poll interval while the controller propagates metadata
