"""What the operator's ``espbridge subscriptions`` commands do beside the export: publish a
subscription request as any producer would, and read one contact's state from the CRM."""

from __future__ import annotations

import uuid
from collections.abc import Mapping

from pydantic import ValidationError

from shared.infra.settings import KafkaSettings
from shared.model.errors import InvalidMessageError
from shared.model.messages import RequestOrigin, SubscriptionRequest, SubscriptionState, utcnow
from shared.operations.jobs import publish_message, validation_problems


def build_request(
    email: str,
    esp: str,
    account: str,
    *,
    list_id: str = "",
    state: SubscriptionState | None = None,
    fields: Mapping[str, str] | None = None,
    reason: str = "",
) -> SubscriptionRequest:
    """A producer's request made now, from the CRM (``source`` crm), with a new id; a bad value is
    an :class:`InvalidMessageError` naming each problem."""
    try:
        return SubscriptionRequest(
            request_id=uuid.uuid4(),
            email=email,
            esp=esp,
            account=account,
            list=list_id,
            state=state,
            fields=dict(fields or {}),
            reason=reason,
            origin=RequestOrigin.PRODUCER,
            requested_at=utcnow(),
        )
    except ValidationError as exc:
        raise InvalidMessageError(
            f"the subscription request is not valid:\n{validation_problems(exc, '(request)')}"
        ) from None


async def publish_request(kafka: KafkaSettings, request: SubscriptionRequest) -> None:
    """Publish a request to subscriptions.requests.v1, keyed by its email (creating the topics if
    needed); the syncer writes it to the CRM and pushes it to the ESP account."""
    await publish_message(kafka, request)
