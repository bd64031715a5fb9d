"""The syncer's handlers, each the stages of a batch subscriber (read a batch, its work, what
follows): ESP changes into the CRM with their follow-ons, the CRM's captured changes into push
requests, and requests pushed to the ESPs. Bad records are dead-lettered one by one; database
and ESP outages retry the batch."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import asyncpg
from aiokafka.structs import ConsumerRecord

from services.syncer import core
from services.syncer.settings import Settings
from shared.esp import Connectors
from shared.esp.accounts import Accounts
from shared.esp.base import ContactResult
from shared.infra.db import outside_message_context, subscriptions
from shared.infra.db.core import Conn
from shared.infra.db.subscriptions import Outcome, Push, Result, Write
from shared.infra.kafka import BatchStages, Records
from shared.model.deadletters import record_letter, subscription_letter
from shared.model.errors import PermanentError, UnavailableError, is_transient
from shared.model.messages import (
    CapturedChange,
    DeadLetter,
    SubscriptionChange,
    SubscriptionRequest,
    decode,
)
from shared.runtime.runtime import Runtime

log = logging.getLogger(__name__)

Record = ConsumerRecord[bytes, bytes]
T = TypeVar("T")
CaptureMapper = Callable[[CapturedChange], list[SubscriptionRequest]]
"""The requests a captured row change makes (none for espbridge's own writes: no echo)."""


@dataclass
class Syncer:
    """The syncer's per-process resources."""

    settings: Settings
    runtime: Runtime
    crm: asyncpg.Pool
    """The CRM's database (crm.subscriptions and its log)."""
    accounts: Accounts
    connectors: Connectors


async def _in_crm(work: Callable[[Conn], Awaitable[T]], syncer: Syncer, what: str) -> T:
    """Run ``work`` on a CRM connection; database trouble is an outage (the batch is retried)."""

    async def run() -> T:
        async with syncer.crm.acquire() as conn:
            return await work(conn)

    try:
        return await outside_message_context(run())
    except asyncpg.UndefinedTableError as exc:
        raise UnavailableError(
            f"{what} failed: the CRM database has no subscription tables ({exc}); run `espbridge db migrate`"
        ) from exc
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise UnavailableError(f"{what} failed: {exc}") from exc


async def _dead_letters(syncer: Syncer, letters: Sequence[DeadLetter], what: str) -> None:
    for letter in letters:
        await syncer.runtime.dead_letter(letter)
    if letters:
        log.warning(
            "%s rejected to the dead-letter topic",
            what,
            extra={"dead_letters": len(letters), "error_classes": sorted({d.error_class for d in letters})},
        )


def _letter(record: Record, exc: Exception) -> DeadLetter:
    return record_letter(record, exc, core.SERVICE_NAME)


# --- ESP changes → the CRM ------------------------------------------------------------------------


@dataclass
class Changes:
    """A batch of ESP changes read: the writes they make (their follow-ons among them)."""

    writes: list[Write]
    count: int


async def prepare_changes(records: Records, syncer: Syncer) -> Changes | None:
    """Read a batch of changes; an invalid one or one of an unknown account is dead-lettered."""
    writes: list[Write] = []
    letters: list[DeadLetter] = []
    count = 0
    for record in records:
        try:
            change = decode(SubscriptionChange, record.value or b"")
            writes += core.change_writes(change, syncer.accounts)
            count += 1
        except PermanentError as exc:
            letters.append(_letter(record, exc))
    await _dead_letters(syncer, letters, "subscription changes")
    return Changes(writes, count) if writes else None


@dataclass
class Applied:
    """What a batch of changes did in the CRM, and when it was committed."""

    results: list[Result]
    committed_at: datetime
    requests: list[SubscriptionRequest]
    """The follow-ons to push: those the CRM took, once each, but none an ESP has taken already
    (a change that comes again, or a batch retried after its follow-ons were published)."""


async def store_changes(batch: Changes, syncer: Syncer) -> Applied:
    """The batch's one CRM transaction: the changes and their follow-ons."""

    async def write(conn: Conn) -> tuple[list[Result], list[SubscriptionRequest]]:
        results = await subscriptions.apply(conn, batch.writes)
        requests = {r.request_id: r for r in map(core.follow_on_request, results) if r is not None}
        duplicates = {r.write.change_id for r in results if r.outcome is Outcome.DUPLICATE}
        again = [i for i in requests if i in duplicates]
        taken = await subscriptions.accepted_pushes(conn, again) if again else set()
        return results, [r for i, r in requests.items() if i not in taken]

    results, requests = await _in_crm(write, syncer, f"writing {batch.count} changes")
    return Applied(results, datetime.now(UTC), requests)


async def finish_changes(batch: Changes, applied: Applied, syncer: Syncer) -> None:
    """After the commit: the follow-ons' push requests, metrics, a log line per applied change."""
    requests = applied.requests
    await syncer.runtime.publish_many(requests)
    metrics = syncer.runtime.metrics
    for result in applied.results:
        w = result.write
        if w.origin is subscriptions.Origin.ESP:
            metrics.inc("subscription_changes_total", outcome=result.outcome.value, esp=w.key.esp)
        lag = core.crm_lag_s(result, applied.committed_at)
        if lag is not None:
            log.info(
                "subscription change applied",
                extra={
                    "change_id": str(w.change_id),
                    "esp": w.key.esp,
                    "account": w.key.account,
                    "list": w.key.list,
                    "state": w.state,
                    "reason": w.reason,
                    "crm_lag_s": round(lag, 3),
                },
            )
    metrics.inc("subscription_follow_ons_total", len(requests))
    outcomes = Counter(r.outcome.value for r in applied.results if r.write.origin is subscriptions.Origin.ESP)
    log.info(
        "subscription changes written",
        extra={"changes": batch.count, **outcomes, "follow_ons": len(requests)},
    )


def change_stages(syncer: Syncer) -> BatchStages[Changes, Applied]:
    """The stages of the changes subscriber (subscriptions.changes.v1 → the CRM)."""
    return BatchStages(
        prepare=lambda records: prepare_changes(records, syncer),
        store=lambda batch: store_changes(batch, syncer),
        finish=lambda batch, applied: finish_changes(batch, applied, syncer),
    )


# --- the CRM's captured changes → push requests ---------------------------------------------------


@dataclass
class Captured:
    """The push requests a batch of captured row changes makes."""

    requests: list[SubscriptionRequest]
    count: int


async def prepare_captured(records: Records, syncer: Syncer, mapper: CaptureMapper) -> Captured | None:
    """Read a batch of Debezium's row changes; espbridge's own writes, snapshots and truncates make
    no request (no echo); a record that cannot be read is dead-lettered."""
    requests: list[SubscriptionRequest] = []
    letters: list[DeadLetter] = []
    for record in records:
        if record.value is None:
            continue  # a tombstone (Debezium's after a delete, where they are on) carries no change
        try:
            requests += mapper(decode(CapturedChange, record.value))
        except PermanentError as exc:
            letters.append(_letter(record, exc))
    await _dead_letters(syncer, letters, "captured changes")
    return Captured(requests, len(records)) if records else None


async def store_captured(batch: Captured, syncer: Syncer) -> int:
    """Publish the batch's requests (acknowledged by Kafka before the offsets are committed)."""
    await syncer.runtime.publish_many(batch.requests)
    return len(batch.requests)


async def finish_captured(batch: Captured, published: int, syncer: Syncer) -> None:
    """Metrics and the log line of a batch of captured changes."""
    syncer.runtime.metrics.inc("captured_changes_total", batch.count)
    syncer.runtime.metrics.inc("captured_requests_total", published)
    if published:
        log.info("captured changes to push", extra={"captured": batch.count, "requests": published})


def capture_stages(syncer: Syncer, mapper: CaptureMapper) -> BatchStages[Captured, int]:
    """The stages of the capture subscriber (crm.subscriptions.captured.v1 → requests)."""
    return BatchStages(
        prepare=lambda records: prepare_captured(records, syncer, mapper),
        store=lambda batch: store_captured(batch, syncer),
        finish=lambda batch, published: finish_captured(batch, published, syncer),
    )


# --- requests → the ESPs ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Item:
    """One request of a batch, with where it goes and the record it came in."""

    request: SubscriptionRequest
    target: core.Target
    record: Record


@dataclass
class Requests:
    """A batch of requests read and resolved."""

    items: list[Item]
    count: int


@dataclass
class Pushed:
    """What pushing a batch did."""

    refused: list[tuple[Item, str]] = field(default_factory=list)
    """Requests the ESP refused, with the reason."""
    pushed: dict[str, int] = field(default_factory=dict)
    """Requests an ESP took, per ESP."""
    skipped: int = 0
    """Requests not pushed: stale, overtaken, or taken by the ESP before."""


async def prepare_requests(records: Records, syncer: Syncer) -> Requests | None:
    """Read a batch of requests; an invalid one, or one for an unknown account or list or an
    account that syncs no lists, is dead-lettered with the reason."""
    items: list[Item] = []
    letters: list[DeadLetter] = []
    for record in records:
        try:
            request = decode(SubscriptionRequest, record.value or b"")
            items.append(Item(request, core.request_target(request, syncer.accounts), record))
        except PermanentError as exc:
            letters.append(_letter(record, exc))
    await _dead_letters(syncer, letters, "subscription requests")
    return Requests(items, len(records)) if items else None


async def push_requests(batch: Requests, syncer: Syncer) -> Pushed:
    """Write producers' requests to the CRM (the others are there already), then push those still
    to push, each account's in chunks of its connector's ``contacts_per_call``, the accounts side
    by side."""
    writes = [core.request_write(i.request, i.target.key) for i in batch.items]

    async def write(conn: Conn) -> tuple[list[Result], set[Any]]:
        results = await subscriptions.apply(conn, writes)
        return results, await subscriptions.accepted_pushes(conn, [w.change_id for w in writes])

    results, taken = await _in_crm(write, syncer, f"writing {len(writes)} requests")
    by_id = {r.write.change_id: r for r in results}
    todo = [
        i
        for i in batch.items
        if core.is_to_push(by_id[i.request.request_id]) and i.request.request_id not in taken
    ]
    todo = list({i.request.request_id: i for i in todo}.values())  # a request published twice: once
    pushed = Pushed(skipped=len(batch.items) - len(todo))
    per_account: dict[tuple[str, str], list[Item]] = {}
    for item in todo:
        per_account.setdefault((item.target.key.esp, item.target.key.account), []).append(item)
    outcomes = await asyncio.gather(
        *(_push_account(items, syncer, pushed) for items in per_account.values()), return_exceptions=True
    )
    failures = [o for o in outcomes if isinstance(o, BaseException)]
    if failures:
        transient = [f for f in failures if is_transient(f)]
        raise (transient or failures)[0]
    return pushed


async def _push_account(items: list[Item], syncer: Syncer, pushed: Pushed) -> None:
    """One account's requests, chunk after chunk; what each chunk did is recorded at once, so a
    retry after an outage pushes nothing the ESP took. A connector that cannot change contacts (or
    cannot be made) refuses them all with its reason."""
    first = items[0].target.key
    try:
        connector = syncer.connectors.get(first.esp, first.account)
    except PermanentError as exc:
        await _record(items, [_refused(i, exc) for i in items], syncer, pushed)
        return
    for chunk in core.chunks(items, [i.target.key for i in items], connector.contacts_per_call):
        changes = [core.contact_change(i.request, i.target) for i in chunk.items]
        try:
            answers = await connector.apply_contacts(changes)
            problem = core.results_problem(changes, answers)
            if problem is not None:
                raise PermanentError(problem)
        except PermanentError as exc:
            answers = [_refused(i, exc) for i in chunk.items]
        await _record(chunk.items, answers, syncer, pushed)


def _refused(item: Item, error: Exception) -> ContactResult:
    return ContactResult(item.request.email, item.target.key.list, False, None, str(error))


async def _record(items: list[Item], answers: list[ContactResult], syncer: Syncer, pushed: Pushed) -> None:
    now = datetime.now(UTC)
    pushes = [
        Push(
            i.request.request_id,
            i.target.key,
            None if i.request.state is None else i.request.state.value,
            i.request.origin.value,
            a.accepted,
            None if a.state is None else a.state.value,
            a.detail,
        )
        for i, a in zip(items, answers, strict=True)
    ]
    backs = [
        w for i, a in zip(items, answers, strict=True) if (w := core.write_back(i.request, i.target, a, now))
    ]

    async def record(conn: Conn) -> None:
        async with conn.transaction():
            await subscriptions.record_pushes(conn, pushes)
            await subscriptions.apply(conn, backs)

    await _in_crm(record, syncer, f"recording {len(pushes)} pushes")
    esp = items[0].target.key.esp
    for item, answer in zip(items, answers, strict=True):
        if answer.accepted:
            pushed.pushed[esp] = pushed.pushed.get(esp, 0) + 1
        else:
            pushed.refused.append((item, core.refusal(item.target, item.request.email, answer.detail)))


async def finish_requests(batch: Requests, pushed: Pushed, syncer: Syncer) -> None:
    """After the pushes: refused contacts dead-lettered with the ESP's reason, metrics, the log line."""
    letters = [
        subscription_letter(
            item.record,
            item.target.key.esp,
            item.target.key.account,
            item.target.key.list,
            reason,
            core.SERVICE_NAME,
        )
        for item, reason in pushed.refused
    ]
    await _dead_letters(syncer, letters, "contacts the ESP refused")
    metrics = syncer.runtime.metrics
    for esp, n in pushed.pushed.items():
        metrics.inc("subscription_requests_pushed_total", n, esp=esp)
    for item, _ in pushed.refused:
        metrics.inc("subscription_requests_refused_total", esp=item.target.key.esp)
    metrics.inc("subscription_requests_skipped_total", pushed.skipped)
    log.info(
        "subscription requests pushed",
        extra={
            "requests": batch.count,
            "pushed": sum(pushed.pushed.values()),
            "refused": len(pushed.refused),
            "skipped": pushed.skipped,
        },
    )


def request_stages(syncer: Syncer) -> BatchStages[Requests, Pushed]:
    """The stages of the push subscriber (subscriptions.requests.v1 → the ESPs)."""
    return BatchStages(
        prepare=lambda records: prepare_requests(records, syncer),
        store=lambda batch: push_requests(batch, syncer),
        finish=lambda batch, pushed: finish_requests(batch, pushed, syncer),
    )
