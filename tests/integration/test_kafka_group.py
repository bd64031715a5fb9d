"""Two processes of one service share a 6-partition topic; a rebalance loses and doubles nothing."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from aiokafka.admin import AIOKafkaAdminClient
from faststream.kafka import KafkaBroker

from shared.infra.kafka import ensure_topics, publish
from shared.infra.settings import KafkaSettings
from shared.model.messages import BroadcastStatus, Stage, State
from shared.model.topics import Topic
from tests.fixtures.kafka import group_members
from tests.fixtures.processes import running, service_env, stop
from tests.fixtures.servers import Servers
from tests.fixtures.waits import wait_for


async def publish_statuses(kafka: KafkaSettings, start: int, count: int) -> None:
    broker = KafkaBroker(kafka.bootstrap_servers)
    await broker.start()
    try:
        for i in range(start, start + count):
            await publish(
                broker, kafka, BroadcastStatus(job_id=f"job-{i}", stage=Stage.UPLOAD, state=State.QUEUED)
            )
    finally:
        await broker.stop()


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


async def test_two_processes_share_six_partitions_exactly_once(
    servers: Servers, kafka: KafkaSettings, tmp_path: Path
) -> None:
    kafka6 = kafka.model_copy(update={"partitions_default": 6})
    await ensure_topics(kafka6, [Topic.BROADCAST_STATUS])
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap_servers)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics([kafka6.topic(Topic.BROADCAST_STATUS)])
    finally:
        await admin.close()
    assert len(meta["partitions"]) == 6

    out = tmp_path / "consumed.txt"
    env = service_env(
        servers.env,
        ESPBRIDGE_KAFKA_TOPIC_PREFIX=kafka.topic_prefix,
        ESPBRIDGE_KAFKA_PARTITIONS_DEFAULT="6",
        ESPBRIDGE_TESTMEMBER_OUT=str(out),
        ESPBRIDGE_HTTP_ENABLED="false",
    )
    group = f"{kafka.topic_prefix}espbridge-testmember"
    await publish_statuses(kafka, 0, 300)
    module = "tests.fixtures.group_member"
    with running(module, env, tmp_path / "a.log") as first:
        await wait_for(lambda: len(lines(out)) >= 100, what="the first member to consume")
        with running(module, env, tmp_path / "b.log") as second:
            await wait_for(lambda: _two_members(kafka, group), timeout_s=60, what="both members in the group")
            await publish_statuses(kafka, 300, 300)
            await wait_for(lambda: len(lines(out)) >= 600, timeout_s=90, what="all 600 messages consumed")
            assert stop(second) == 0
        assert stop(first) == 0

    consumed = lines(out)
    counts = Counter(job for _, job, _ in consumed)
    assert len(counts) == 600, "a message was lost"
    assert [job for job, n in counts.items() if n > 1] == [], "a message was consumed twice"
    by_pid = Counter(pid for pid, _, _ in consumed)
    assert len(by_pid) == 2, f"both processes consume: {by_pid}"
    assert {int(p) for _, _, p in consumed} == set(range(6))
    assert await group_members(kafka, group) == []


async def _two_members(kafka: KafkaSettings, group: str) -> bool:
    members = await group_members(kafka, group)
    return len(members) == 2 and all(m["state"] == "Stable" for m in members)
