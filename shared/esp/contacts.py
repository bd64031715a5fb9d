"""Contacts at the ESP, both ways: the kit of the connectors' contact calls and of their webhooks.

* ESP → espbridge: a webhook call's items become :class:`SubscriptionChange`\\ s or :class:`BadRow`\\ s
  (:class:`WebhookItems`, or :func:`item_changes` for items of another shape), each under a
  deterministic id (:func:`change_id`), so the same change delivered twice is one change;
  :func:`check_bearer` checks the call's shared secret.
* espbridge → ESP: :func:`applied` and :func:`refused` are the :class:`ContactResult` of one
  :class:`ContactChange`, and :func:`contact_fields` checks the fields a change sets.
"""

from __future__ import annotations

import hmac
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from shared.esp.accounts import AccountConfig
from shared.esp.base import BadRow, ContactChange, ContactResult, WebhookAuthError
from shared.esp.rows import LocalTimes, raw_json
from shared.model.errors import PermanentError
from shared.model.messages import SubscriptionChange, SubscriptionState, event_id_for

DEFAULT_WEBHOOK_EVENTS: dict[str, SubscriptionState] = {
    "unsubscribe": SubscriptionState.UNSUBSCRIBED,
    "complaint": SubscriptionState.UNSUBSCRIBED,
    "bounce_hard": SubscriptionState.UNSUBSCRIBED,
    "subscribe": SubscriptionState.SUBSCRIBED,
    "confirm": SubscriptionState.SUBSCRIBED,
    "remove": SubscriptionState.REMOVED,
}
"""What an ESP-side event reported to espbridge's webhook does to the contact's state (the event's
name is the change's reason); a connector's ``webhook_events`` option lays its own over these."""

FIELD_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
"""A contact field name espbridge passes on to an ESP as a JSON key or a request parameter."""


def change_id(
    esp: str,
    account: str,
    *,
    esp_id: str = "",
    email: str = "",
    list_id: str = "",
    state: str = "",
    occurred_at: datetime | None = None,
) -> uuid.UUID:
    """A reported change's id: over the ESP's own id of it when it has one, else over its facts
    (account, list, email, state, time), so the same change read twice has the same id."""
    if esp_id:
        return event_id_for(esp, esp_event_id=f"{account}:change:{esp_id}")
    return event_id_for(
        esp,
        broadcast_id=f"{account}:change",
        recipient=f"{list_id}/{email}",
        event_type=state,
        occurred_at=occurred_at,
    )


def reported_change(
    account: AccountConfig,
    *,
    email: str,
    list_id: str,
    state: SubscriptionState,
    reason: str,
    occurred_at: datetime,
    esp_id: str = "",
) -> SubscriptionChange:
    """The change an ESP reported for one of the account's contacts, under its :func:`change_id`
    (the ESP's id of it, else its facts with the reason: an unsubscribe and a complaint of one
    contact at one time are two changes)."""
    email = email.strip().lower()
    return SubscriptionChange(
        change_id=change_id(
            account.esp,
            account.account,
            esp_id=esp_id,
            email=email,
            list_id=list_id,
            state=f"{state}:{reason}",
            occurred_at=occurred_at,
        ),
        email=email,
        esp=account.esp,
        account=account.account,
        list=list_id,
        state=state,
        reason=reason,
        occurred_at=occurred_at,
    )


@dataclass(frozen=True, slots=True)
class WebhookItems:
    """How an ESP's webhook items are read: the names of their members, the events they report
    (each event's name is the change's reason) and the times they carry."""

    email_key: str
    list_key: str
    time_key: str
    events: Mapping[str, SubscriptionState]
    times: LocalTimes
    lists: Collection[str] | None = None
    """The account's lists a change may name (None: any)."""

    def change(self, account: AccountConfig, item: Mapping[str, Any]) -> SubscriptionChange:
        """The change one item (``event``, the address, the list, the time and an optional ``id``)
        reports, under its :func:`change_id`; ValueError when it cannot be one."""
        event = text_field(item, "event")
        state = event_state(self.events, event)
        email = text_field(item, self.email_key).lower()
        list_id = text_field(item, self.list_key, required=False)
        if list_id and self.lists is not None and list_id not in self.lists:
            raise ValueError(f"unknown list {list_id!r} (known: {', '.join(sorted(self.lists))})")
        occurred = self.times.utc(self.time_key, text_field(item, self.time_key))
        return reported_change(
            account,
            email=email,
            list_id=list_id,
            state=state,
            reason=event,
            occurred_at=occurred,
            esp_id=text_field(item, "id", required=False),
        )

    def parse(self, account: AccountConfig, body: bytes) -> list[SubscriptionChange | BadRow]:
        """A webhook call's changes and bad items (the body one object or an array of them)."""
        items = json_items(body, "webhook")
        return item_changes(items, lambda _n, item: self.change(account, item), "subscription change")


def json_items(body: bytes, what: str) -> list[Any]:
    """A webhook body's items: one JSON object, or an array of them (PermanentError otherwise)."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise PermanentError(f"the {what} body is not JSON: {exc}") from None
    if isinstance(parsed, dict):
        return [parsed]
    if isinstance(parsed, list):
        return parsed
    raise PermanentError(f"the {what} body is neither an object nor an array")


def item_changes(
    items: Iterable[Any], change: Callable[[int, dict[str, Any]], SubscriptionChange], what: str
) -> list[SubscriptionChange | BadRow]:
    """The changes ``change(number, item)`` makes of JSON objects numbered from 1; an item that is
    no object, or that it rejects with a ValueError, is a BadRow whose error starts with ``what``."""
    out: list[SubscriptionChange | BadRow] = []
    for number, item in enumerate(items, start=1):
        try:
            if not isinstance(item, dict):
                raise ValueError(f"not an object but {type(item).__name__}")
            out.append(change(number, item))
        except ValueError as exc:  # pydantic's ValidationError (a bad address) is one too
            out.append(BadRow(number, raw_json(item), f"{what}: {_first_line(exc)}"))
    return out


def _first_line(exc: ValueError) -> str:
    text = str(exc).strip()
    return " ".join(text.splitlines()[:3])[:500]


def text_field(item: Mapping[str, Any], name: str, *, required: bool = True) -> str:
    """A string member of a webhook item (a number is taken as its digits); ValueError when a
    required one is missing or empty."""
    value = item.get(name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if value is None or value == "":
        if required:
            raise ValueError(f"no {name}")
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} is not a string but {type(value).__name__}")
    return value.strip()


def event_state(events: Mapping[str, SubscriptionState], event: str) -> SubscriptionState:
    """The state an ESP-side event leads to; ValueError for an event the account does not map."""
    state = events.get(event)
    if state is None:
        raise ValueError(f"unknown event {event!r} (known: {', '.join(sorted(events))})")
    return state


def check_bearer(headers: Mapping[str, str], secret: str, what: str) -> None:
    """A webhook call must carry ``Authorization: Bearer <secret>`` (compared in constant time)."""
    given = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
    if given is None:
        raise WebhookAuthError(f"the {what} call carries no Authorization header")
    scheme, _, token = given.partition(" ")
    ok = hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), secret.encode())
    if scheme.lower() != "bearer" or not ok:
        raise WebhookAuthError(f"the {what} call's bearer token is wrong")


def applied(change: ContactChange, state: SubscriptionState | None, detail: str = "") -> ContactResult:
    """The result of a change the ESP took; ``state``: what it now holds, where it says."""
    return ContactResult(change.email, change.list, accepted=True, state=state, detail=detail)


def refused(change: ContactChange, detail: str) -> ContactResult:
    """The result of a change the ESP refused, with its reason."""
    return ContactResult(change.email, change.list, accepted=False, detail=detail)


def contact_fields(change: ContactChange, reserved: Collection[str]) -> dict[str, str] | str:
    """The change's fields to send, or why they cannot be: a name no ESP field can have, or one the
    connector sets itself (``reserved``: the address, the list's opt-in, the credentials)."""
    bad = sorted(n for n in change.fields if not FIELD_NAME.fullmatch(n))
    if bad:
        return f"field names {bad} are not field names (a letter, then letters, digits or _)"
    taken = sorted(n for n in change.fields if n.lower() in {r.lower() for r in reserved})
    if taken:
        return f"fields {taken} are set by espbridge itself, not through fields"
    return dict(change.fields)
