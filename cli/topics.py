"""``espbridge topics``: the registry topics on the cluster."""

from __future__ import annotations

from shared.infra.kafka import ensure_topics
from shared.infra.settings import KafkaSettings
from shared.model.topics import REGISTRY


async def topics_create() -> int:
    """``topics create``: create the registry topics that are missing."""
    created = await ensure_topics(KafkaSettings())
    for name in created:
        print(f"created {name}")
    if not created:
        print("all topics exist")
    return 0


def topics_list() -> int:
    """``topics list``: the registry — topic, model, partitions."""
    settings = KafkaSettings()
    for spec in REGISTRY.values():
        print(f"{settings.topic(spec.topic)}\t{spec.model.__name__}\t{settings.partitions(spec.topic)}")
    return 0
