"""The syncer's rules, without I/O: which row a change or request is about, what an account's policy
makes of it (hard bounces, post-operations), which requests go to the ESP and in what batches, and
the reasons of its dead letters.

No echo: a change an ESP reported is written to the CRM as espbridge's (never captured into a
push), its follow-ons never target the row it came from, and a change that does not change the
CRM's state has no follow-ons — so two ESPs never ping-pong a contact.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar

from shared.esp.accounts import AccountConfig, Accounts
from shared.esp.base import ContactChange, ContactResult
from shared.infra.db.subscriptions import Key, Origin, Outcome, Result, Write
from shared.model.errors import PermanentError
from shared.model.messages import (
    EventType,
    RequestOrigin,
    SubscriptionChange,
    SubscriptionRequest,
    SubscriptionState,
)

SERVICE_NAME = "syncer"

FOLLOW_ON_STATES = frozenset({SubscriptionState.UNSUBSCRIBED})
"""The states an account's ``unsubscribe_scope`` carries to its other lists or accounts."""
PUSHED_OUTCOMES = frozenset({Outcome.APPLIED, Outcome.UNCHANGED, Outcome.IGNORED})
"""A request whose CRM write came out so goes to the ESP (a stale one never does)."""
WRITE_BACK_NAMESPACE = uuid.UUID("4f0c6a53-52f1-4d0e-9d35-0b9a1c7e2a15")
"""Namespace of the ids of the states an ESP answered a push with (uuid5 of the request id)."""


class NoListsSyncedError(PermanentError):
    """A request for an ESP account whose policy syncs no lists."""


class UnknownListError(PermanentError):
    """A request for a list the ESP account does not sync."""


class ContactRefusedError(PermanentError):
    """The ESP refused a contact change (its reason is the message)."""


def source_of(esp: str, account: str) -> str:
    """The ``source`` of a change an ESP account made: ``esp/account``."""
    return f"{esp}/{account}"


def row_list(list_id: str, account: AccountConfig) -> str:
    """The CRM row's list of a change or request: its own, or the account's default list (``*``,
    every list, when the account syncs none)."""
    return list_id or account.subscriptions.default_list


def is_ignored(change: SubscriptionChange, account: AccountConfig) -> bool:
    """Whether the account's policy ignores this change (a hard bounce, ``hard_bounces: ignore``)."""
    return change.reason == EventType.BOUNCE_HARD.value and account.subscriptions.hard_bounces == "ignore"


def follow_on_targets(origin: Key, account: AccountConfig, accounts: Sequence[AccountConfig]) -> list[Key]:
    """The rows an unsubscribe on ``origin`` also unsubscribes, by the reporting account's
    ``unsubscribe_scope``: none (list), the account's other synced lists (account), or every
    synced list of every account whose sync is on (all_accounts); never the origin row."""
    scope = account.subscriptions.unsubscribe_scope
    if scope == "list":
        return []
    reach = [account] if scope == "account" else [a for a in accounts if a.subscriptions.enabled]
    targets = {
        Key(origin.email, a.esp, a.account, list_id) for a in reach for list_id in a.subscriptions.lists
    }
    targets.discard(origin)
    return sorted(targets)


def follow_on_id(origin_id: uuid.UUID, target: Key) -> uuid.UUID:
    """A follow-on's id: the same for the same origin and target, however often the origin comes."""
    return uuid.uuid5(origin_id, f"{target.esp}/{target.account}/{target.list}")


def change_writes(change: SubscriptionChange, accounts: Accounts) -> list[Write]:
    """What a change an ESP reported writes: its own row, then its follow-ons (applied only if it
    changes its row's state). An unknown account is a permanent error."""
    account = accounts.get(change.esp, change.account)
    key = Key(change.email, change.esp, change.account, row_list(change.list, account))
    source = source_of(change.esp, change.account)
    ignored = is_ignored(change, account)
    own = Write(
        change.change_id,
        key,
        change.state.value,
        change.occurred_at,
        Origin.ESP,
        source,
        change.reason,
        ignored=ignored,
    )
    if ignored or change.state not in FOLLOW_ON_STATES:
        return [own]
    return [
        own,
        *(
            Write(
                follow_on_id(change.change_id, target),
                target,
                change.state.value,
                change.occurred_at,
                Origin.FOLLOW_ON,
                source,
                change.reason,
                after=change.change_id,
            )
            for target in follow_on_targets(key, account, accounts.all())
        ),
    ]


def follow_on_request(result: Result) -> SubscriptionRequest | None:
    """The request that pushes a follow-on the CRM took (or took the first time it came)."""
    w = result.write
    if w.origin is not Origin.FOLLOW_ON or result.effective is not Outcome.APPLIED or w.state is None:
        return None
    return SubscriptionRequest(
        request_id=w.change_id,
        email=w.key.email,
        esp=w.key.esp,
        account=w.key.account,
        list=w.key.list,
        state=SubscriptionState(w.state),
        reason=w.reason,
        origin=RequestOrigin.FOLLOW_ON,
        source=w.source,
        requested_at=w.occurred_at,
    )


def crm_lag_s(result: Result, committed_at: datetime) -> float | None:
    """Seconds from an ESP's change to its commit in the CRM, for a change it applied."""
    w = result.write
    if w.origin is not Origin.ESP or result.outcome is not Outcome.APPLIED:
        return None
    return max(0.0, (committed_at - w.occurred_at).total_seconds())


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request goes: its account, and the row (with the ESP's list) it is about."""

    account: AccountConfig
    key: Key


def request_target(request: SubscriptionRequest, accounts: Accounts) -> Target:
    """The account and list a request goes to; unknown account, an account that syncs no lists
    and a list it does not sync are permanent errors that say so."""
    account = accounts.get(request.esp, request.account)
    policy = account.subscriptions
    if not policy.enabled:
        raise NoListsSyncedError(
            f"ESP account {account.name} syncs no lists (its subscriptions.lists is empty): "
            "nothing is pushed to it"
        )
    list_id = row_list(request.list, account)
    if list_id not in policy.lists:
        raise UnknownListError(
            f"list {list_id!r} is not one of the lists ESP account {account.name} syncs "
            f"({', '.join(policy.lists)})"
        )
    return Target(account, Key(request.email, request.esp, request.account, list_id))


def request_write(request: SubscriptionRequest, key: Key) -> Write:
    """A request's CRM write: a producer's is written; a captured change or a follow-on is in the
    CRM already, so only checked against its row (a later change there makes it stale)."""
    return Write(
        request.request_id,
        key,
        None if request.state is None else request.state.value,
        request.requested_at,
        Origin(request.origin.value),
        request.source,
        request.reason,
        dict(request.fields),
        in_crm=request.origin is not RequestOrigin.PRODUCER,
    )


def is_to_push(result: Result) -> bool:
    """Whether a request goes to the ESP: not stale (now or the first time), not overtaken since."""
    return not result.superseded and result.effective in PUSHED_OUTCOMES


def contact_change(request: SubscriptionRequest, target: Target) -> ContactChange:
    """The connector's view of a request; a subscribe asks for the ESP's confirmation where the
    account's policy wants double opt-in."""
    return ContactChange(
        email=request.email,
        list=target.key.list,
        state=request.state,
        fields=dict(request.fields),
        double_opt_in=target.account.subscriptions.double_opt_in
        and request.state is SubscriptionState.SUBSCRIBED,
        reason=request.reason,
    )


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Chunk(Generic[T]):
    """Requests of one account for one ``apply_contacts`` call."""

    esp: str
    account: str
    items: list[T]


def chunks(items: Sequence[T], keys: Sequence[Key], size: int) -> list[Chunk[T]]:
    """Items grouped per account (in order of first appearance), in chunks of at most ``size``
    (the connector's ``contacts_per_call``); a contact's second change of a list starts a new chunk,
    so that an ESP never gets two changes of one contact in one call."""
    per_account: dict[tuple[str, str], list[Chunk[T]]] = {}
    held: dict[tuple[str, str], set[tuple[str, str]]] = {}
    for item, key in zip(items, keys, strict=True):
        account = (key.esp, key.account)
        made = per_account.setdefault(account, [])
        contact = (key.email, key.list)
        if not made or len(made[-1].items) >= max(1, size) or contact in held[account]:
            made.append(Chunk(key.esp, key.account, []))
            held[account] = set()
        made[-1].items.append(item)
        held[account].add(contact)
    return [chunk for made in per_account.values() for chunk in made]


def results_problem(changes: Sequence[ContactChange], results: Sequence[ContactResult]) -> str | None:
    """Why a connector's answer cannot be matched to the changes it was given, or None."""
    if len(results) != len(changes):
        return f"the connector answered {len(results)} results for {len(changes)} contact changes"
    for change, result in zip(changes, results, strict=True):
        if (result.email.lower(), result.list) != (change.email, change.list):
            return (
                f"the connector answered for {result.email} on {result.list!r} in the place of {change.email}"
            )
    return None


def refusal(target: Target, email: str, detail: str) -> str:
    """The reason of the dead letter of a contact an ESP refused."""
    return f"{target.account.name} refused {email} on list {target.key.list!r}: {detail or 'no reason given'}"


def write_back(
    request: SubscriptionRequest, target: Target, result: ContactResult, now: datetime
) -> Write | None:
    """The state an ESP answered a push with, when it is not the one asked for (``pending`` for
    a double opt-in): written to the CRM as the account's own change."""
    if not result.accepted or result.state is None or result.state == request.state:
        return None
    return Write(
        uuid.uuid5(WRITE_BACK_NAMESPACE, str(request.request_id)),
        target.key,
        result.state.value,
        max(now, request.requested_at),
        Origin.ESP,
        source_of(target.key.esp, target.key.account),
        result.detail[:200] or request.reason,
    )
