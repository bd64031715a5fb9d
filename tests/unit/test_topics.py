"""The topic registry: every topic has a model and a key; no topic name is spelled elsewhere."""

from __future__ import annotations

import re
from pathlib import Path

from shared.infra.settings import KafkaSettings
from shared.model.topics import REGISTRY, Topic, spec_for_model, topic_name
from tests.unit.test_messages import examples

ROOT = Path(__file__).resolve().parents[2]


def test_every_topic_has_a_spec_and_a_distinct_model() -> None:
    assert set(REGISTRY) == set(Topic)
    models = [spec.model for spec in REGISTRY.values()]
    assert len(set(models)) == len(models)


def test_topic_names_are_versioned() -> None:
    for topic in Topic:
        assert re.fullmatch(r"[a-z]+(\.[a-z]+)*\.v\d+", topic.value), topic


def test_keys_follow_the_design() -> None:
    keys = {spec_for_model(type(m)).topic: spec_for_model(type(m)).key(m) for m in examples()}
    assert keys[Topic.BROADCAST_JOBS] == "job-1"
    assert keys[Topic.BROADCAST_CANCELS] == "job-1", "a cancel lands on its job's partition"
    assert keys[Topic.RESPONSE_FILES] == "sandbox/demo/responses/opens.csv"
    assert keys[Topic.RESPONSE_EVENTS] == "job-1/ck-1"
    assert keys[Topic.SUBSCRIPTION_CHANGES] == "a@example.com"


def test_prefix_and_partitions_come_from_settings() -> None:
    settings = KafkaSettings(topic_prefix="t1.", partitions_responses=6, partitions_default=2)
    assert settings.topic(Topic.RESPONSE_EVENTS) == "t1.responses.events.v1"
    assert topic_name(Topic.DEADLETTER, "x.") == "x.deadletter.v1"
    assert settings.partitions(Topic.RESPONSE_EVENTS) == 6
    assert settings.partitions(Topic.BROADCAST_JOBS) == 2


def test_no_topic_name_literal_outside_the_registry() -> None:
    names = [t.value for t in Topic]
    offenders = []
    for path in [*ROOT.glob("shared/**/*.py"), *ROOT.glob("services/**/*.py")]:
        if path.name == "topics.py":
            continue
        text = path.read_text()
        offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names if f'"{n}"' in text or f"'{n}'" in text]
    assert offenders == []
