"""Kafka: the service broker, the admin side (topics), publishing, the error policy, pipelined
batches, reading a topic.

The names services and tools use are importable from here; each lives in the module that says
what it is about.
"""

from shared.infra.kafka.admin import (
    TopicReport,
    check_topics,
    ensure_topics,
    kafka_answers,
    max_message_bytes,
)
from shared.infra.kafka.batches import BatchPipeline, BatchStages, Records, undecoded
from shared.infra.kafka.broker import back_off_failed_metadata_updates, make_broker
from shared.infra.kafka.policy import DrainOnRevoke, InFlight, error_policy
from shared.infra.kafka.publishing import (
    BATCH_BYTES,
    HEADERS_JSON_V1,
    PRODUCER_MAX_REQUEST_BYTES,
    BatchPublisher,
    murmur2,
    murmur2_partition,
    murmur2_python,
    publish,
    publish_many,
    record_bytes,
)
from shared.infra.kafka.reading import read_topic

__all__ = [
    "BATCH_BYTES",
    "HEADERS_JSON_V1",
    "PRODUCER_MAX_REQUEST_BYTES",
    "BatchPipeline",
    "BatchPublisher",
    "BatchStages",
    "DrainOnRevoke",
    "InFlight",
    "Records",
    "TopicReport",
    "back_off_failed_metadata_updates",
    "check_topics",
    "ensure_topics",
    "error_policy",
    "kafka_answers",
    "make_broker",
    "max_message_bytes",
    "murmur2",
    "murmur2_partition",
    "murmur2_python",
    "publish",
    "publish_many",
    "read_topic",
    "record_bytes",
    "undecoded",
]
