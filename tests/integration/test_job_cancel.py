"""`espbridge job cancel` as an operator runs it: the request it publishes on broadcast.cancels.v1,
bad input refused before Kafka is asked, and Kafka down said in one line."""

from __future__ import annotations

import pytest

from shared.infra.settings import KafkaSettings
from shared.model.messages import CancelRequest
from shared.model.topics import Topic
from tests.fixtures.kafka import read_until
from tests.fixtures.processes import service_env
from tests.fixtures.servers import free_port
from tests.integration.test_dlq import Cli


def cli_for(kafka: KafkaSettings) -> Cli:
    return Cli(
        service_env(
            {
                "ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
                "ESPBRIDGE_KAFKA_TOPIC_PREFIX": kafka.topic_prefix,
            },
            LOGNAME="ops-anna",  # getpass.getuser() reads LOGNAME first, then USER
            USER="ops-anna",
        )
    )


def unreachable_kafka() -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}")


async def test_job_cancel_publishes_a_request_keyed_by_its_job_and_says_so(kafka: KafkaSettings) -> None:
    done = cli_for(kafka)("job", "cancel", "job-20261122-1", "--reason", "wrong list: the October one")

    assert done.returncode == 0, done.stderr
    (record,) = await read_until(kafka, Topic.BROADCAST_CANCELS, lambda rs: len(rs) >= 1)
    assert record.value is not None
    request = CancelRequest.from_json(record.value)
    assert record.key == b"job-20261122-1"
    assert (request.job_id, request.reason, request.requested_by) == (
        "job-20261122-1",
        "wrong list: the October one",
        "ops-anna",
    )
    said = done.stdout.splitlines()
    assert said[0].startswith("cancel of job job-20261122-1 requested by ops-anna at ")
    assert "reason 'wrong list: the October one'" in said[0]
    assert said[1] == "the outcome is reported by the monitor: espbridge job status job-20261122-1"


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["job 1"], "job_id: String should match pattern"),
        (["job-1", "--reason", "wrong list\nsend it again"], "reason: String should match pattern"),
        (["job-1", "--reason", "x" * 501], "reason: String should have at most 500 characters"),
    ],
    ids=["job id", "line break", "too long"],
)
def test_a_bad_cancel_is_refused_before_kafka_is_asked(args: list[str], named: str) -> None:
    # Kafka cannot be reached: exit 2 (not 1) shows the request was refused before any publishing.
    done = cli_for(unreachable_kafka())("job", "cancel", *args)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr.startswith("espbridge: the cancel request is not valid:\n")
    assert named in done.stderr


def test_kafka_down_is_said_in_one_line_and_exits_1() -> None:
    kafka = unreachable_kafka()
    done = cli_for(kafka)("job", "cancel", "job-1")
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr.splitlines() == [done.stderr.strip()], "one line, no traceback"
    assert done.stderr.startswith(f"espbridge: Kafka at {kafka.bootstrap_servers} is unreachable")
