"""The generic ESP connector (``connector: generic``), written from docs/generic-esp.md.

REST under the account's ``api_url`` with a bearer token; list files as UTF-8 CSV with ``Email``
and ``CommunicationKey``; response files in ``responses/`` with one event per row. An account's
``requests_per_second`` option limits its calls (by every process of the deployment together).

Subscriptions: :meth:`GenericConnector.apply_contacts` calls the list's contact calls (subscribe,
unsubscribe, remove, update), up to 1000 contacts a call; ESP-side changes arrive as opt-out rows of
a broadcast's response files (the loader makes them changes) or by the contacts webhook
(:meth:`GenericConnector.parse_webhook`), authenticated with the account's token.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any, Unpack
from urllib.parse import quote

from pydantic import Field

from shared.esp import base, contacts, rows
from shared.esp.accounts import AccountConfig
from shared.esp.delimited import read_records, undecodable
from shared.esp.limits import rate_limiter
from shared.esp.options import ConnectorOptions
from shared.esp.rest import EspClient, EspUnavailableError, RequestParts, Retries, short_json
from shared.model.errors import ConfigurationError, PermanentError
from shared.model.events import EncodedEvent, FileEventWriter, event_key, json_plain, utc_text
from shared.model.messages import (
    MAX_BROADCAST_ID,
    BroadcastJob,
    EventType,
    ResponseEvent,
    SubscriptionChange,
    SubscriptionState,
)

RESPONSE_HEADER_LINE = "EventId,BroadcastId,MessageId,CommunicationKey,Email,EventType,Url,OccurredAt"
"""The first line of a response file, as docs/generic-esp.md gives it."""
RESPONSE_HEADER = tuple(RESPONSE_HEADER_LINE.split(","))
MAX_CONTACTS = 1000
"""Contacts in one contact call at most (docs/generic-esp.md)."""
CONTACT_RETRIES = Retries(attempts=3, backoff_s=lambda attempt, _error: 0.5 * attempt, max_wait_s=30.0)
"""A contact call is idempotent (it sets a state): a 429 or 5xx is repeated twice, after the ESP's
Retry-After or a short pause, before the outage goes to the caller (which retries the batch)."""


class ListRejectedError(PermanentError):
    """The ESP refused to import or send a list."""


class Options(ConnectorOptions):
    """The generic connector's options."""

    requests_per_second: float | None = Field(
        default=None, gt=0, description="the account's calls a second at most (None: no limit)"
    )


class GenericConnector(base.Connector):
    """Connector for the generic ESP protocol."""

    list_format = base.ListFormat()
    response_sources: tuple[base.ResponseSource, ...] = (base.ResponseSource("responses"),)
    contacts_per_call = MAX_CONTACTS

    def __init__(self, account: AccountConfig, context: base.ConnectorContext) -> None:
        super().__init__(account, context)
        if not account.api_url:
            raise ConfigurationError(f"account {account.name} needs an api_url")
        token = account.token.get_secret_value() if account.token else ""
        rate = Options.of(account).requests_per_second
        limiter = None
        if rate:
            calls = max(1, int(rate))  # whole calls in a window as long as they need: 2.5/s is 2 per 0.8 s
            limiter = rate_limiter(context, account, calls, calls / rate)
        self._api = EspClient(
            context.http,
            account.api_url,
            account=account.name,
            timeout_s=account.request_timeout_s,
            headers={"Authorization": f"Bearer {token}"},
            limiter=limiter,
        )

    # --- REST ---------------------------------------------------------------------------------

    async def _body(
        self,
        method: str,
        path: str,
        refused: Callable[[Any], Exception],
        refused_on: tuple[int, ...] = (404,),
        **parts: Unpack[RequestParts],
    ) -> Any:
        """The body of the answer; a status of ``refused_on`` raises what ``refused`` makes of its body."""
        status, body = await self._api.call(method, path, **parts)
        if status in refused_on:
            raise refused(body)
        return body

    async def start_import(self, remote_path: str, job: BroadcastJob) -> base.ImportStatus:
        """POST /imports (idempotent by the job id as external id)."""
        rel = self.in_account_folder(remote_path)
        request: dict[str, Any] = {"file": rel, "list_name": job.list_name, "external_id": job.job_id}
        policy = self.account.subscriptions
        if policy.enabled:  # the recipients join the broadcast list, so an opt-out has a contact to change
            request["list_id"] = policy.default_list
        body = await self._body(
            "POST",
            "/imports",
            lambda body: ListRejectedError(f"the ESP cannot find the list file {rel}: {_message(body)}"),
            json=request,
        )
        return _import_status(body)

    async def import_status(self, import_id: str) -> base.ImportStatus:
        """GET /imports/{id}."""
        unknown = ListRejectedError(f"the ESP does not know import {import_id}")
        return _import_status(await self._body("GET", f"/imports/{import_id}", lambda _: unknown))

    async def find_send(self, job: BroadcastJob) -> base.SendStatus | None:
        """GET /sends?external_id=…; the first send of the broadcast, if any."""
        _, body = await self._api.call("GET", "/sends", params={"external_id": job.job_id})
        sends = body.get("sends", []) if isinstance(body, dict) else []
        return _send_status(sends[0]) if sends else None

    async def send(self, import_id: str, job: BroadcastJob) -> base.SendStatus:
        """POST /sends (idempotent by the job id as external id)."""
        send_at = base.schedule_of(job)
        payload = {
            "import_id": import_id,
            "message": job.message,
            "external_id": job.job_id,
            "send_at": send_at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if send_at else None,
        }
        body = await self._body(
            "POST",
            "/sends",
            lambda body: ListRejectedError(f"the ESP refused the send: {_message(body)}"),
            (404, 409),
            json=payload,
        )
        return _send_status(body)

    async def send_status(self, send_id: str) -> base.SendStatus:
        """GET /sends/{id}."""
        unknown = EspUnavailableError(f"the ESP does not (yet) know send {send_id}")
        return _send_status(await self._body("GET", f"/sends/{send_id}", lambda _: unknown))

    async def cancel_send(self, send_id: str, job: BroadcastJob) -> base.CancelResult:
        """POST /sends/{id}/cancel: 200 → cancelled (also when it was already); 409 → too late."""
        path = f"/sends/{quote(send_id, safe='')}/cancel"
        status, body = await self._api.call("POST", path, answered=(200, 404, 409))
        if status == 404:
            raise ListRejectedError(f"the ESP does not know send {send_id}: {_message(body)}")
        if status == 409:
            return base.CancelResult(base.CancelOutcome.TOO_LATE, f"send {send_id}: {_message(body)}")
        return base.CancelResult(
            base.CancelOutcome.CANCELLED, f"send {send_id} cancelled at the ESP: nothing was sent"
        )

    # --- contacts ---------------------------------------------------------------------------------------

    async def apply_contacts(self, changes: Sequence[base.ContactChange]) -> list[base.ContactResult]:
        """One contact call per (list, call) the changes need, in the order they first appear; a
        contact the ESP refuses is a refused result with its ``error: message``."""
        results: dict[int, base.ContactResult] = {}
        groups: dict[tuple[str, str, bool], list[int]] = {}
        for index, change in enumerate(changes):
            fields = contacts.contact_fields(change, ())
            if isinstance(fields, str):
                results[index] = contacts.refused(change, fields)
                continue
            call = _CALL_OF[change.state]
            double = call == "subscribe" and (
                change.double_opt_in or change.state is SubscriptionState.PENDING
            )
            groups.setdefault((change.list, call, double), []).append(index)
        for (list_id, path, double), indexes in groups.items():
            batch = [changes[i] for i in indexes]
            for index, result in zip(
                indexes, await self._contact_call(list_id, path, double, batch), strict=True
            ):
                results[index] = result
        return [results[i] for i in range(len(changes))]

    async def _contact_call(
        self, list_id: str, path: str, double_opt_in: bool, batch: Sequence[base.ContactChange]
    ) -> list[base.ContactResult]:
        """One contact call; a call the ESP refuses as a whole (400, 404) refuses each contact."""
        payload: dict[str, Any] = {"contacts": [_contact_item(c) for c in batch]}
        if double_opt_in:
            payload["double_opt_in"] = True
        method, where = ("PATCH", "contacts") if path == "update" else ("POST", path)
        status, body = await self._api.call(
            method,
            f"/lists/{quote(list_id, safe='')}/{where}",
            json=payload,
            answered=(200, 400, 404),
            retries=CONTACT_RETRIES,
        )
        if status != 200:
            return [contacts.refused(c, f"the ESP refused the call: {_message(body)}") for c in batch]
        items = body.get("results") if isinstance(body, dict) else None
        if not isinstance(items, list) or len(items) != len(batch):
            raise PermanentError(f"the ESP answered {len(batch)} contacts with {short_json(body)}")
        return [_contact_result(change, item) for change, item in zip(batch, items, strict=True)]

    def parse_webhook(
        self, headers: Mapping[str, str], body: bytes
    ) -> list[ResponseEvent | SubscriptionChange | base.BadRow]:
        """The contacts webhook: a JSON array of changes made at the ESP, with the account's token
        as the bearer token; each change under an id made from the ESP's own."""
        secret = self.account.token.get_secret_value() if self.account.token else ""
        if not secret:
            raise base.WebhookAuthError(f"{self.account.name} has no token to check the webhook with")
        contacts.check_bearer(headers, secret, "contacts webhook")
        items = contacts.json_items(body, "contacts webhook")
        return [*contacts.item_changes(items, lambda _n, item: self._webhook_change(item), "contact change")]

    def _webhook_change(self, item: Mapping[str, Any]) -> SubscriptionChange:
        account = self.account
        return SubscriptionChange(
            change_id=contacts.change_id(
                account.esp, account.account, esp_id=contacts.text_field(item, "id")
            ),
            email=contacts.text_field(item, "email"),
            esp=account.esp,
            account=account.account,
            list=contacts.text_field(item, "list"),
            state=SubscriptionState(contacts.text_field(item, "state")),
            reason=contacts.text_field(item, "reason", required=False),
            occurred_at=rows.aware_time("changed_at", contacts.text_field(item, "changed_at")),
        )

    # --- response files -------------------------------------------------------------------------

    def parse_response_file(
        self, local_path: Path, remote_path: str
    ) -> Iterator[ResponseEvent | base.BadRow]:
        """Rows of a response file as events; a row that does not fit becomes a BadRow."""
        for item in self.encode_response_file(local_path, remote_path):
            yield item if isinstance(item, base.BadRow) else ResponseEvent.from_json(item.body)

    def encode_response_file(
        self, local_path: Path, remote_path: str
    ) -> Iterator[EncodedEvent | base.BadRow]:
        """Rows of a response file as event JSON, checked by the model's rules without a model each."""
        writer = FileEventWriter(self.account.esp, self.account.account, posixpath.normpath(remote_path))
        records = read_records(local_path, encoding="utf-8")
        header = next(records, None)
        if header is None:
            return
        if header.fields is None or tuple(header.fields) != RESPONSE_HEADER:
            yield base.BadRow(1, header.raw, f"unexpected header, want {','.join(RESPONSE_HEADER)}")
            return
        yield from rows.records_events(
            records, lambda record: _event(writer, record.line, record.fields or [])
        )


def _message(body: Any) -> str:
    return str(body.get("message") or body.get("error")) if isinstance(body, dict) else str(body)


_CALL_OF: dict[SubscriptionState | None, str] = {
    SubscriptionState.SUBSCRIBED: "subscribe",
    SubscriptionState.PENDING: "subscribe",
    SubscriptionState.UNSUBSCRIBED: "unsubscribe",
    SubscriptionState.REMOVED: "remove",
    None: "update",
}
"""The contact call a wanted state takes (``update``: the fields alone)."""


def _contact_item(change: base.ContactChange) -> dict[str, Any]:
    item: dict[str, Any] = {"email": change.email}
    if change.fields:
        item["fields"] = dict(change.fields)
    if change.reason and change.state is not None:
        item["reason"] = change.reason[:200]
    return item


def _contact_result(change: base.ContactChange, item: Any) -> base.ContactResult:
    """One item of a contact call's ``results``."""
    if not isinstance(item, dict):
        raise PermanentError(f"the ESP answered a contact with {short_json(item)}")
    if item.get("accepted") is not True:
        return contacts.refused(
            change, f"{item.get('error') or 'refused'}: {item.get('message') or ''}".strip()
        )
    try:
        state = SubscriptionState(item["state"]) if item.get("state") else None
    except ValueError:
        raise PermanentError(f"the ESP answered an unknown contact state {short_json(item)}") from None
    return contacts.applied(change, state)


def _import_status(body: Any) -> base.ImportStatus:
    errors = tuple(f"line {e.get('line')}: {e.get('error')}" for e in body.get("errors") or [])
    return base.ImportStatus(
        import_id=str(body["import_id"]),
        state=base.ImportState(body["state"]),
        rows_valid=int(body.get("rows_valid") or 0),
        rows_invalid=int(body.get("rows_invalid") or 0),
        errors=errors,
    )


def _send_status(body: Any) -> base.SendStatus:
    if body["state"] == "cancelled":  # the send ends here, without messages
        return base.SendStatus(str(body["send_id"]), base.SendState.FAILED, detail="cancelled at the ESP")
    return base.SendStatus(
        send_id=str(body["send_id"]),
        state=base.SendState(body["state"]),
        recipients=int(body.get("recipients") or 0),
    )


_TYPES = frozenset(t.value for t in EventType)

_times: dict[str, str] = {}
"""OccurredAt values seen, as written in the event JSON (response files repeat their times)."""
_MAX_TIMES = 100_000


def _utc_time(value: str) -> str:
    """An OccurredAt value as the event JSON's UTC time; raises ValueError as :func:`aware_time`."""
    text = _times.get(value)
    if text is None:
        text = utc_text(rows.aware_time("OccurredAt", value))
        if len(_times) >= _MAX_TIMES:
            _times.clear()
        _times[value] = text
    return text


def _event(writer: FileEventWriter, line: int, row: list[str]) -> EncodedEvent:
    """One row as event JSON; every rule of ResponseEvent is checked here (a ValueError says which)."""
    if len(row) != len(RESPONSE_HEADER):
        raise ValueError(f"{len(row)} fields, want {len(RESPONSE_HEADER)}")
    joined = "".join(row)
    if not joined.isascii():
        bad_bytes = undecodable(row, "UTF-8")
        if bad_bytes:
            raise ValueError(bad_bytes)
    event_id, broadcast_id, message_id, key, email, kind, url, occurred = row
    if kind not in _TYPES:
        raise ValueError(f"unknown EventType {kind!r}")
    if not event_id:
        raise ValueError("empty EventId")
    if not 1 <= len(broadcast_id) <= MAX_BROADCAST_ID:
        raise ValueError(f"BroadcastId must have 1 to {MAX_BROADCAST_ID} characters")
    if not (key or email):
        raise ValueError("a response event needs a CommunicationKey or an Email")
    body = writer.json(
        writer.event_id(event_id),
        broadcast_id,
        message_id or None,
        key or None,
        email or None,
        kind,
        url or None,
        _utc_time(occurred),
        line,
        plain=json_plain(joined),  # else values with quotes, backslashes or control characters
    )
    return EncodedEvent(body, event_key(broadcast_id, key, email).encode(), broadcast_id, line)
