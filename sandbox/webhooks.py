"""A flavor's webhook calls to its client: JSON bodies POSTed in order, per account.

A flavor whose ESP reports changes by calling out (a Deployteq campaign's HTTP request object, an
Instiller workflow's webhook, the generic ESP's contacts webhook) puts each call's body on the
account's queue; one worker per account sends them one after the other with
``Authorization: Bearer <TOKEN>``, so they arrive in the order they happened (one body a call, or
up to ``batch`` of them as one JSON array). A call the client does not answer with a 2xx is tried
again ``RETRIES`` times, ``RETRY_DELAY_S`` apart, then dropped with a log line, as ESPs give up on
a webhook in the end; one it refuses (a 4xx but 429) is dropped at once.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson

from sandbox.contacts import ContactEvent
from sandbox.engine import Account

log = logging.getLogger(__name__)

RETRIES = 5
RETRY_DELAY_S = 0.5
TIMEOUT_S = 10.0


@dataclass
class _Queue:
    batch: int
    bodies: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    worker: asyncio.Task[None] | None = None


_QUEUES: dict[int, _Queue] = {}


def call_webhook(account: Account, url_template: str | None, body: dict[str, Any], *, batch: int = 1) -> None:
    """Queue a call of ``url_template`` (``{account}`` replaced by the account's name); none without
    a URL: the account's ESP reports nothing then. ``batch`` > 1: queued bodies go together, up to
    that many a call, as a JSON array."""
    if not url_template:
        log.info("no webhook URL: the change is not reported", extra={"account": account.name})
        return
    queue = _QUEUES.setdefault(id(account), _Queue(batch))
    queue.bodies.put_nowait(body)
    if queue.worker is None or queue.worker.done():
        url = url_template.replace("{account}", account.name)
        queue.worker = account.spawn(_deliver(account, url, queue), f"webhook calls of {account.name}")


def report_change(
    account: Account,
    event: ContactEvent,
    url_template: str | None,
    *,
    email_key: str,
    list_key: str,
    time_key: str,
    time: str,
) -> None:
    """Queue the call that reports a change made on the ESP's side: its unique ``id``, the
    ``event`` (the change's reason: ``unsubscribe``, ``complaint``, ``confirm``…), the address,
    the list and the time, under the member names of the flavor's ESP."""
    record = event.record
    body = {
        "id": account.contacts.event_id(event),
        "event": record.reason or record.state.value,
        email_key: record.email,
        list_key: record.list,
        time_key: time,
    }
    call_webhook(account, url_template, body)


async def _deliver(account: Account, url: str, queue: _Queue) -> None:
    """Send the queued calls in order until the sandbox stops."""
    token = account.settings.bearer_token.get_secret_value()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as http:
        while True:
            body = await queue.bodies.get()
            if queue.batch == 1:
                await _post(http, url, headers, body, account.name)
                continue
            bodies = [body]
            while not queue.bodies.empty() and len(bodies) < queue.batch:
                bodies.append(queue.bodies.get_nowait())
            await _post(http, url, headers, bodies, account.name)


def _what(body: dict[str, Any] | list[dict[str, Any]]) -> dict[str, Any]:
    """A call's log fields: its event, or how many changes it carries."""
    return {"changes": len(body)} if isinstance(body, list) else {"event": body.get("event")}


async def _post(
    http: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    body: dict[str, Any] | list[dict[str, Any]],
    account: str,
) -> None:
    data = orjson.dumps(body)
    for attempt in range(1, RETRIES + 2):
        status: int | str
        try:
            async with http.post(url, data=data, headers=headers) as resp:
                status = resp.status
                if 200 <= status < 300:
                    log.info("webhook called", extra={"account": account, **_what(body)})
                    return
                if 400 <= status < 500 and status != 429:
                    break  # the client refuses this call: repeating it changes nothing
        except (aiohttp.ClientError, TimeoutError) as exc:
            status = type(exc).__name__
        log.warning("webhook call failed", extra={"account": account, "status": status, "attempt": attempt})
        if attempt <= RETRIES:
            await asyncio.sleep(RETRY_DELAY_S)
    log.warning("webhook call dropped", extra={"account": account, **_what(body)})
