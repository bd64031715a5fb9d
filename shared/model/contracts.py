"""The contracts for producers outside espbridge, built from the topic registry and the message models:
one standalone JSON Schema (Draft 2020-12) per message and an AsyncAPI 3.0 document of every topic.

Pure functions returning dicts; ``espbridge schema --write`` writes them under ``docs/`` and a unit
test fails when the committed files drift from what these return.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic.json_schema import models_json_schema

from shared.model.messages import Message
from shared.model.topics import REGISTRY, Topic

ASYNCAPI_VERSION = "1.0.0"
"""The AsyncAPI document's own version: raise it when a topic or a message changes."""

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
ASYNCAPI_COMPONENTS = "#/components/schemas/{model}"

LOCAL_KAFKA = "127.0.0.1:9092"
"""The local Kafka of ``make demo`` and the tests (the default of ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS)."""


PARTIES: dict[str, str] = {
    "producers": "a CRM or any producer outside espbridge",
    "cli": "the operator's espbridge command",
    "uploader": "the uploader service",
    "monitor": "the monitor service",
    "gatherer": "the gatherer service",
    "loader": "the loader service",
    "syncer": "the syncer service",
    "debezium": "Debezium's connector of crm.subscriptions, in the Kafka Connect worker",
}
"""Everything that sends or receives on a topic, by the name the AsyncAPI operations use."""


@dataclass(frozen=True, slots=True)
class Traffic:
    """Who sends to a topic and who receives from it, and what its Kafka key is, in words."""

    key: str
    senders: tuple[str, ...]
    receivers: tuple[str, ...]


_SERVICES = ("uploader", "monitor", "gatherer", "loader", "syncer")

TRAFFIC: dict[Topic, Traffic] = {
    Topic.BROADCAST_JOBS: Traffic("the job_id", ("producers", "cli"), ("uploader",)),
    Topic.BROADCAST_LISTS: Traffic("the job_id", ("uploader",), ("monitor",)),
    Topic.BROADCAST_STATUS: Traffic("the job_id", ("uploader", "monitor", "gatherer", "loader"), ("cli",)),
    Topic.BROADCAST_CANCELS: Traffic("the job_id", ("producers", "cli"), ("monitor",)),
    Topic.RESPONSE_FILES: Traffic("esp/account/path of the remote file", ("gatherer", "cli"), ("gatherer",)),
    Topic.RESPONSE_EVENTS: Traffic(
        "broadcast_id/communication_key (broadcast_id/email without a key)", ("gatherer", "cli"), ("loader",)
    ),
    Topic.SUBSCRIPTION_CHANGES: Traffic("the email", ("gatherer", "loader"), ("syncer",)),
    Topic.SUBSCRIPTION_REQUESTS: Traffic("the email", ("producers", "cli", "syncer"), ("syncer",)),
    Topic.CRM_CAPTURED: Traffic("the row's email (after, else before)", ("debezium",), ("syncer",)),
    Topic.DEADLETTER: Traffic("the source kind (source.kind)", _SERVICES, ("cli",)),
}
"""The one mapping of which party sends and receives on each topic (docs/asyncapi.yaml's operations)."""


def topic_descriptions() -> dict[str, str]:
    """What flows on each topic, by Topic member name (from the registry)."""
    return {topic.name: spec.description for topic, spec in REGISTRY.items()}


def message_models() -> dict[str, type[Message]]:
    """Every message model on a topic, by name, in registry order."""
    return {spec.model.__name__: spec.model for spec in REGISTRY.values()}


def message_schema(model: type[Message]) -> dict[str, Any]:
    """A message's JSON Schema as a standalone Draft 2020-12 document: ``$id``, title, the model's
    description, and every ``$ref`` pointing into its own ``$defs``."""
    schema = model.model_json_schema(mode="validation")
    spec = next(s for s in REGISTRY.values() if s.model is model)
    head = {
        "$schema": SCHEMA_DIALECT,
        "$id": f"urn:espbridge:message:{model.__name__}",
        "title": model.__name__,
        "description": schema.get("description") or _doc(model),
        "x-topic": spec.topic.value,
    }
    return {**head, **{k: v for k, v in schema.items() if k not in head}}


def _doc(model: type[Message]) -> str:
    return " ".join((model.__doc__ or model.__name__).split())


def _channel_id(topic: Topic) -> str:
    return topic.name.lower()


def asyncapi_document() -> dict[str, Any]:
    """The AsyncAPI 3.0 document of every registry topic: a channel per topic (its address, message,
    key and description), the operations of :data:`TRAFFIC`, the messages' schemas as components."""
    _, bundle = models_json_schema(
        [(spec.model, "validation") for spec in REGISTRY.values()], ref_template=ASYNCAPI_COMPONENTS
    )
    descriptions = topic_descriptions()
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for topic, spec in REGISTRY.items():
        name, channel = spec.model.__name__, _channel_id(topic)
        traffic = TRAFFIC[topic]
        messages[name] = {
            "name": name,
            "title": name,
            "summary": _doc(spec.model),
            "contentType": "application/json",
            "payload": {"$ref": ASYNCAPI_COMPONENTS.format(model=name)},
            "bindings": {
                "kafka": {
                    "key": {"type": "string", "description": f"Keyed by {traffic.key}."},
                    "bindingVersion": "0.5.0",
                }
            },
        }
        channels[channel] = {
            "address": topic.value,
            "title": topic.value,
            "description": descriptions[topic.name]
            + " Deployments may prefix the address (ESPBRIDGE_KAFKA_TOPIC_PREFIX).",
            "messages": {name: {"$ref": f"#/components/messages/{name}"}},
        }
        for action, parties in (("send", traffic.senders), ("receive", traffic.receivers)):
            for party in parties:
                operations[f"{party}_{action}_{channel}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{channel}"},
                    "title": f"{party}: {action} {name}",
                    "summary": f"{PARTIES[party]}: {action} {name} on {topic.value}",
                    "tags": [{"name": party}],
                    "messages": [{"$ref": f"#/channels/{channel}/messages/{name}"}],
                }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "espbridge topics",
            "version": ASYNCAPI_VERSION,
            "description": "Every Kafka topic of espbridge, its message and key, and who sends and "
            "receives on it; generated from shared/model/topics.py and shared/model/messages.py "
            "(`espbridge schema --write`). Messages are JSON, UTF-8, one per record.",
        },
        "servers": {
            "local": {
                "host": LOCAL_KAFKA,
                "protocol": "kafka",
                "description": "The local Kafka of `make demo` and the tests (an example: point "
                "ESPBRIDGE_KAFKA_BOOTSTRAP_SERVERS at yours).",
            }
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages, "schemas": _asyncapi_schema(bundle["$defs"])},
    }


def _asyncapi_schema(schema: Any) -> Any:
    """JSON Schema as AsyncAPI's Schema Object takes it: its ``discriminator`` is the property's name,
    where pydantic writes OpenAPI's ``{propertyName, mapping}``."""
    if isinstance(schema, list):
        return [_asyncapi_schema(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    return {
        key: value["propertyName"]
        if key == "discriminator" and isinstance(value, dict)
        else _asyncapi_schema(value)
        for key, value in schema.items()
    }
