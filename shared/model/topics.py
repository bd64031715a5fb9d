"""The one registry of Kafka topics: versioned names, their message models and their keys.

No other module spells a topic name; everything goes through :class:`Topic` and :data:`REGISTRY`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from shared.model import messages as m
from shared.model.messages import Message


class Topic(StrEnum):
    """Every topic espbridge reads or writes (without the per-deployment prefix); what flows on
    each is said once, in :data:`REGISTRY`."""

    BROADCAST_JOBS = "broadcast.jobs.v1"
    BROADCAST_LISTS = "broadcast.lists.v1"
    BROADCAST_STATUS = "broadcast.status.v1"
    BROADCAST_CANCELS = "broadcast.cancels.v1"
    RESPONSE_FILES = "responses.files.v1"
    RESPONSE_EVENTS = "responses.events.v1"
    SUBSCRIPTION_CHANGES = "subscriptions.changes.v1"
    SUBSCRIPTION_REQUESTS = "subscriptions.requests.v1"
    CRM_CAPTURED = "crm.subscriptions.captured.v1"
    DEADLETTER = "deadletter.v1"


def topic_name(topic: Topic, prefix: str = "") -> str:
    """The full topic name for a deployment prefix such as ``"staging."``."""
    return f"{prefix}{topic.value}"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """A topic's message model, how a message's Kafka key is derived, and what flows there."""

    topic: Topic
    model: type[Message]
    key: Callable[[Any], str]
    description: str


REGISTRY: dict[Topic, TopicSpec] = {
    spec.topic: spec
    for spec in (
        TopicSpec(
            Topic.BROADCAST_JOBS,
            m.BroadcastJob,
            lambda msg: msg.job_id,
            "Broadcast jobs to run, from a CRM, the CLI or any producer (BroadcastJob).",
        ),
        TopicSpec(
            Topic.BROADCAST_LISTS,
            m.ListUploaded,
            lambda msg: msg.job_id,
            "Recipient lists uploaded to an ESP, ready for import and send (ListUploaded).",
        ),
        TopicSpec(
            Topic.BROADCAST_STATUS,
            m.BroadcastStatus,
            lambda msg: msg.job_id,
            "Every stage of every broadcast, from every service (BroadcastStatus).",
        ),
        TopicSpec(
            Topic.BROADCAST_CANCELS,
            m.CancelRequest,
            lambda msg: msg.job_id,
            "Requests to cancel a broadcast, from the CLI or any producer (CancelRequest).",
        ),
        TopicSpec(
            Topic.RESPONSE_FILES,
            m.ResponseFile,
            lambda msg: f"{msg.esp}/{msg.account}/{msg.path}",
            "Remote response files found by a gatherer scan, one message per file (ResponseFile).",
        ),
        TopicSpec(
            Topic.RESPONSE_EVENTS,
            m.ResponseEvent,
            lambda msg: f"{msg.broadcast_id}/{msg.communication_key or msg.email}",
            "Normalized response events from files, APIs and webhooks (ResponseEvent).",
        ),
        TopicSpec(
            Topic.SUBSCRIPTION_CHANGES,
            m.SubscriptionChange,
            lambda msg: msg.email,
            "Subscription states the ESPs reported, and their follow-ons, for the CRM (SubscriptionChange).",
        ),
        TopicSpec(
            Topic.SUBSCRIPTION_REQUESTS,
            m.SubscriptionRequest,
            lambda msg: msg.email,
            "Changes to push to an ESP account: from any producer, the CRM's captured changes and "
            "follow-ons (SubscriptionRequest).",
        ),
        TopicSpec(
            Topic.CRM_CAPTURED,
            m.CapturedChange,
            lambda msg: str((msg.after or msg.before or {}).get("email", "")),
            "Row changes of the CRM's crm.subscriptions, published by Debezium in Kafka Connect "
            "(CapturedChange).",
        ),
        TopicSpec(
            Topic.DEADLETTER,
            m.DeadLetter,
            lambda msg: msg.source.kind,
            "Anything rejected, with the original bytes and the reason (DeadLetter).",
        ),
    )
}
"""Topic → its message model, key and what flows there; a unit test checks every Topic is here."""


def spec_for_model(model: type[Message]) -> TopicSpec:
    """The topic a message model is published to."""
    for spec in REGISTRY.values():
        if spec.model is model:
            return spec
    raise KeyError(f"no topic carries {model.__name__}")
